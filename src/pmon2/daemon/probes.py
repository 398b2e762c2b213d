"""Probes: is a service ready (and later: healthy, alive)? One attempt is `await probe.check(...)`.

A probe comes from the text of a service's `ready` field:

- `tcp://HOST:PORT`: a TCP connection succeeds (it is closed at once; nothing is sent);
- `http://HOST:PORT[/PATH]`, `https://HOST:PORT[/PATH]`: a GET of PATH (default `/`) is answered 2xx;
  a redirect is not followed and is not ready. https verifies the certificate and the host name with
  the system's CA store (`ssl.create_default_context()`, so SSL_CERT_FILE in pmond's environment
  applies): a self-signed certificate is not ready. The first https probe costs pmond, once, the import
  of ssl and the loading of the CA store (about 0.1-0.25 s of its loop here, and 5.7 MB of RSS);
- `exec:COMMAND`: COMMAND, split with shell rules (shlex) but never run by a shell unless it names one
  (`exec:sh -c '...'`), exits 0.

HOST is an IP address (IPv6 in brackets: `[::1]`) or `localhost` (127.0.0.1, then ::1). pmond resolves
no names: its loop must not block on DNS, and asyncio's resolver would need a thread.

Rules this module keeps for pmond (a single-threaded asyncio daemon): it never blocks the loop beyond
starting a process (and, once, loading ssl); it starts no thread (asyncio's subprocess support would:
in Python 3.11 its child watcher waits in a thread per process, so exec probes use `subprocess.Popen`,
a pidfd and `loop.add_reader`); and it loads `ssl` (OpenSSL, about 3.4 MB of resident memory) only
when an https probe runs. pmond's entry point blocks `ssl` with a `None` in `sys.modules`, so asyncio's
own TLS is off for good; https is spoken here over `ssl.MemoryBIO` and a plain asyncio stream.

An exec probe runs in a new session (its own process group), with stdin, stdout and stderr on
/dev/null, the service's env and cwd, and as the service's user (the cwd is entered as that user). When
it exits, whatever is left of its process group is killed; on a timeout or a cancellation the whole
group is killed. It is always reaped. As a subreaper, pmond's SIGCHLD handler may reap it first: its
status then comes from the pidfd (Linux 6.15+), else from `reaped_status` (see there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11

from pmon2.daemon import watch

# Seconds. wait_ready: the first pause between attempts, doubling up to MAX_INTERVAL; an attempt's
# timeout when the caller gives none (always cut to what is left of the deadline, but not below
# MIN_ATTEMPT, so the last attempt may end up to MIN_ATTEMPT past the deadline).
INTERVAL = 0.1
MAX_INTERVAL = 1.0
DEFAULT_TIMEOUT = 5.0
MIN_ATTEMPT = 0.1
# How long a killed exec probe may take to die before it is left to be reaped when it does.
KILL_GRACE = 1.0
# Bytes read at a time from a connection; an HTTP answer's head may be at most h11's limit (16 KiB).
READ_SIZE = 16384

User = tuple[int, int, list[int]]  # uid, gid, supplementary gids

# Set by pmond when it reaps orphans itself (a subreaper, or PID 1): given the pid of an exec probe its
# SIGCHLD handler reaped first, the status it got (popped), else None. Its handler must keep the
# statuses of the pids for which `owns(pid)` is true.
reaped_status: Callable[[int], watch.ExitStatus | None] | None = None

_children: set[int] = set()  # pids of exec probes that have not been reaped here yet
_tls_context: Any = None  # ssl.SSLContext, made at the first https probe


def owns(pid: int) -> bool:
    """Whether pid is an exec probe's process that has not been collected yet."""
    return pid in _children


@dataclass(frozen=True, slots=True)
class Result:
    """One answer: ok or not, and a short phrase for people, one line, no final period ("HTTP 503",
    "exit code 1", "connection refused", "timed out after 1 s", "TLS: certificate verify failed: ...")."""

    ok: bool
    detail: str


class Probe:
    """A parsed readiness check. `spec` is the text it came from; `kind` is tcp, http, https or exec."""

    kind = ""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r}>"

    async def check(self, *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
                    user: User | None = None) -> Result:
        """One attempt, taking at most `timeout` seconds (> 0; an exec probe's kill may add up to KILL_GRACE).

        env, cwd and user (uid, gid, supplementary gids) are the service's; only exec probes use them.
        env None means pmond's own environment, cwd None pmond's cwd, user None pmond's user. Never
        raises for what the service or the network does: every failure is a Result with ok False.
        Raises ValueError for a timeout <= 0."""
        raise NotImplementedError


def parse(spec: str) -> Probe:
    """The probe for a `ready` text. Raises ValueError with a one-line reason (the text quoted first)."""
    if not isinstance(spec, str):
        raise ValueError(f"a probe is a string, not {type(spec).__name__}")
    if spec.startswith("exec:"):
        try:
            argv = shlex.split(spec[5:])
        except ValueError as exc:
            raise ValueError(f"{spec!r}: {str(exc).lower()}") from None
        if not argv:
            raise ValueError(f"{spec!r}: give a command after exec:")
        return ExecProbe(spec, argv)
    for scheme in ("tcp", "http", "https"):
        if spec.startswith(scheme + "://"):
            break
    else:
        raise ValueError(f"{spec!r}: use tcp://HOST:PORT, http://HOST:PORT/PATH, https://HOST:PORT/PATH "
                         "or exec:COMMAND")
    rest = spec[len(scheme) + 3:]
    hostport, slash, path = rest.partition("/")
    hosts, port = _host_port(spec, scheme, hostport)
    if scheme == "tcp":
        if path:
            raise ValueError(f"{spec!r}: a tcp probe has no path")
        return TcpProbe(spec, hosts, port)
    path = (slash + path).partition("#")[0] or "/"
    if not all(33 <= ord(c) < 127 for c in path):
        raise ValueError(f"{spec!r}: the path may hold only printable ASCII, no spaces (percent-encode the rest)")
    return HttpProbe(spec, hosts, port, path, hostport, tls=scheme == "https")


def _host_port(spec: str, scheme: str, hostport: str) -> tuple[list[tuple[str, int]], int]:
    """([(address, family), ...] to try in order, port) from HOST:PORT."""
    host, colon, port_text = hostport.rpartition(":")
    if not colon or not host or not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"{spec!r}: give HOST:PORT, such as {scheme}://127.0.0.1:8080")
    port = int(port_text)
    if host.lower() == "localhost":
        return [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)], port
    if host.startswith("[") and host.endswith("]"):
        address, family = host[1:-1], socket.AF_INET6
    elif ":" in host:
        raise ValueError(f"{spec!r}: write an IPv6 address in brackets, such as {scheme}://[::1]:{port}")
    else:
        address, family = host, socket.AF_INET
    try:
        socket.inet_pton(family, address)
    except OSError:
        raise ValueError(f"{spec!r}: HOST must be an IP address or localhost (pmond resolves no names)") from None
    return [(address, family)], port


def _format_s(seconds: float) -> str:
    """1 -> "1 s", 0.25 -> "0.25 s" (to the millisecond)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + " s"


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be more than 0 seconds, not {timeout!r}")


def _os_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def _show(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def _connect(hosts: list[tuple[str, int]], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A plain connection to the first address that takes it; raises the first address's OSError."""
    first: OSError | None = None
    for address, family in hosts:
        try:
            # A numeric address with its family: asyncio skips getaddrinfo (and its executor thread).
            reader, writer = await asyncio.open_connection(address, port, family=family, limit=READ_SIZE)
        except OSError as exc:
            first = first or exc
            continue
        return reader, writer, _show(address, port)
    assert first is not None
    raise first


class TcpProbe(Probe):
    """tcp://HOST:PORT: a connection is accepted. Closed at once, nothing sent."""

    kind = "tcp"

    def __init__(self, spec: str, hosts: list[tuple[str, int]], port: int) -> None:
        super().__init__(spec)
        self.hosts = hosts
        self.port = port

    async def check(self, *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
                    user: User | None = None) -> Result:
        _check_timeout(timeout)
        try:
            async with asyncio.timeout(timeout):
                _, writer, shown = await _connect(self.hosts, self.port)
        except TimeoutError as exc:
            return Result(False, _os_error(exc) if exc.errno else f"timed out after {_format_s(timeout)}")
        except OSError as exc:
            return Result(False, _os_error(exc))
        writer.close()
        return Result(True, f"connected to {shown}")


class HttpProbe(Probe):
    """http(s)://HOST:PORT/PATH: a GET answered with a 2xx status (1xx interim answers are skipped)."""

    def __init__(self, spec: str, hosts: list[tuple[str, int]], port: int, path: str, host_header: str,
                 tls: bool) -> None:
        super().__init__(spec)
        self.hosts = hosts
        self.port = port
        self.path = path
        self.host_header = host_header
        self.tls = tls
        self.kind = "https" if tls else "http"

    async def check(self, *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
                    user: User | None = None) -> Result:
        _check_timeout(timeout)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer, _ = await _connect(self.hosts, self.port)
                stream: _Plain | _Tls = _Plain(reader, writer)
                if self.tls:
                    name = self.host_header.rpartition(":")[0].strip("[]")
                    stream = _Tls(reader, writer, _tls(), "localhost" if name.lower() == "localhost" else name)
                    await stream.handshake()
                return await self._exchange(stream)
        except TimeoutError as exc:
            return Result(False, _os_error(exc) if exc.errno else f"timed out after {_format_s(timeout)}")
        except OSError as exc:  # ssl.SSLError is an OSError
            return Result(False, _tls_error(exc) if self.tls else _os_error(exc))
        finally:
            if writer is not None:
                writer.close()

    async def _exchange(self, stream: _Plain | _Tls) -> Result:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=self.path, headers=[
            ("Host", self.host_header), ("User-Agent", "pmon2-probe"), ("Accept", "*/*"), ("Connection", "close")])
        await stream.send(conn.send(request) + conn.send(h11.EndOfMessage()))
        received = b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if not received:
                    return Result(False, "connection closed without an answer")
                return Result(False, f"not an HTTP answer: {received[:40]!r}")
            if event is h11.NEED_DATA:
                data = await stream.recv()
                received = received or data
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                return Result(200 <= event.status_code < 300, f"HTTP {event.status_code}")
            elif not isinstance(event, h11.InformationalResponse):
                return Result(False, "connection closed without an answer")


class _Plain:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        """Up to READ_SIZE bytes; b"" at the end."""
        return await self.reader.read(READ_SIZE)


def _ssl() -> Any:
    """The ssl module, loaded now. pmond puts a None in sys.modules to keep asyncio from loading it."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
    import ssl

    return ssl


def _tls() -> Any:
    """The one client context of https probes: the system's CA store, host names checked."""
    global _tls_context
    if _tls_context is None:
        _tls_context = _ssl().create_default_context()
    return _tls_context


def _tls_error(exc: OSError) -> str:
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return f"TLS: {(exc.reason or str(exc)).lower().replace('_', ' ')}"
    return _os_error(exc)


class _Tls:
    """TLS over a plain asyncio stream, through memory BIOs (asyncio's own TLS needs ssl at its import)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: Any,
                 server_hostname: str) -> None:
        self.ssl = _ssl()
        self.reader = reader
        self.writer = writer
        self.incoming = self.ssl.MemoryBIO()
        self.outgoing = self.ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    async def _run(self, op: Callable[[], Any]) -> Any:
        while True:
            try:
                result = op()
            except self.ssl.SSLWantReadError:
                await self._flush()
                data = await self.reader.read(READ_SIZE)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            await self._flush()
            return result

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def handshake(self) -> None:
        await self._run(self.tls.do_handshake)

    async def send(self, data: bytes) -> None:
        await self._run(lambda: self.tls.write(data))

    async def recv(self) -> bytes:
        """Up to READ_SIZE bytes of plain text; b"" at the end (with or without a close_notify)."""
        try:
            return await self._run(lambda: self.tls.read(READ_SIZE))
        except (self.ssl.SSLZeroReturnError, self.ssl.SSLEOFError):
            return b""


class ExecProbe(Probe):
    """exec:COMMAND: the command exits 0. `argv` is COMMAND split with shell rules."""

    kind = "exec"

    def __init__(self, spec: str, argv: list[str]) -> None:
        super().__init__(spec)
        self.argv = argv

    async def check(self, *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
                    user: User | None = None) -> Result:
        """Runs the command once; on a timeout (or a cancellation) kills its process group.

        As root with `user`, the command runs as that user and enters `cwd` as that user. Not root,
        `user` must be pmond's own uid (it is then ignored), or the result says it cannot be run."""
        _check_timeout(timeout)
        kwargs: dict[str, Any] = {"cwd": cwd}
        if user is not None:
            uid, gid, groups = user
            if os.geteuid() == 0:
                kwargs.update(user=uid, group=gid, extra_groups=list(groups))
                if cwd is not None:  # Popen would enter cwd before the switch, as root
                    kwargs.update(cwd=None, preexec_fn=lambda: os.chdir(cwd))
            elif uid != os.geteuid():
                return Result(False, f"cannot run as uid {uid}: pmond does not run as root")
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env, start_new_session=True, **kwargs)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename and exc.filename != self.argv[0] else ""
            return Result(False, f"cannot run {self.argv[0]}: {where}{_os_error(exc)}")
        except subprocess.SubprocessError:  # only the preexec_fn: the chdir as the service's user
            return Result(False, f"cannot run {self.argv[0]}: cannot enter {cwd} as uid {kwargs.get('user')}")
        except ValueError as exc:  # a NUL in an argument or in env
            return Result(False, f"cannot run {self.argv[0]}: {exc}")
        try:
            child = _Child(proc)
        except OSError as exc:  # no pidfd (out of fds): wait for it here, briefly, after a kill
            _kill_group(proc.pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            return Result(False, f"cannot watch {self.argv[0]}: {_os_error(exc)}")
        try:
            status = await asyncio.wait_for(asyncio.shield(child.status), timeout)
        except TimeoutError:
            child.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.status), KILL_GRACE)
            return Result(False, f"timed out after {_format_s(timeout)}")
        except asyncio.CancelledError:
            child.kill()
            with contextlib.suppress(TimeoutError):  # past that, it is reaped whenever it dies
                await asyncio.wait_for(asyncio.shield(child.status), KILL_GRACE)
            raise
        if status.code is not None:
            return Result(status.code == 0, status.describe())
        if status.signal is not None:
            return Result(False, f"killed by {status.signal_name()}")
        return Result(False, "exit status unknown")


def _kill_group(pid: int) -> None:
    """SIGKILL to the process group `pid` leads. Only while pid is our unreaped child (running or a
    zombie), which keeps the pid, and so the group's id, from being reused."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _Child:
    """An exec probe's process, watched through a pidfd; collected (group killed, reaped) once it exits."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.loop = asyncio.get_running_loop()
        self.pidfd = os.pidfd_open(self.pid)
        self.status: asyncio.Future[watch.ExitStatus] = self.loop.create_future()
        _children.add(self.pid)
        self.loop.add_reader(self.pidfd, self._collect)

    def kill(self) -> None:
        if self.pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        _kill_group(self.pid)

    def _collect(self) -> None:
        self.loop.remove_reader(self.pidfd)
        _kill_group(self.pid)  # what it left behind, while its group id is still pinned
        try:
            _, wait_status = os.waitpid(self.pid, os.WNOHANG)
            status = watch.ExitStatus.from_wait_status(wait_status, "waitpid")
        except ChildProcessError:  # pmond's SIGCHLD handler (a subreaper) was quicker
            status = watch.PidfdInfo.exit_status(self.pidfd) or watch.UNKNOWN
            if not status.known and reaped_status is not None:
                status = reaped_status(self.pid) or watch.UNKNOWN
        os.close(self.pidfd)
        self.pidfd = -1
        _children.discard(self.pid)
        # Tell Popen it is collected (or its __del__ would wait on the pid again, and warn).
        self.proc.returncode = status.code if status.code is not None else -(status.signal or 0) or -1
        if not self.status.done():
            self.status.set_result(status)


async def _attempt(probe: Probe, stop: asyncio.Event | None, kwargs: dict[str, Any]) -> Result | None:
    """One check, or None as soon as `stop` is set (the check is then cancelled)."""
    if stop is None:
        return await probe.check(**kwargs)
    check = asyncio.ensure_future(probe.check(**kwargs))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({check, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (check, stopped):
            if not task.done():
                task.cancel()
        await asyncio.wait({check, stopped})  # let the check clean up (an exec probe kills its process)
    if stop.is_set():
        if not check.cancelled():
            check.exception()  # retrieved: a failure after the service exited is of no interest
        return None
    return check.result()


async def _pause(seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep; True if `stop` was set meanwhile (returns at once then)."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True


async def wait_ready(probe: Probe, *, deadline_s: float, interval: float = INTERVAL, stop: asyncio.Event | None = None,
                     **check_kwargs: Any) -> Result:
    """Check until the probe passes, `deadline_s` seconds from now pass, or `stop` is set.

    Between attempts it pauses `interval` seconds, doubling up to MAX_INTERVAL (1 s). check_kwargs go
    to probe.check (env, cwd, user, timeout); an attempt's timeout is `timeout` (default
    DEFAULT_TIMEOUT, 5 s) cut to what is left of the deadline, but at least MIN_ATTEMPT (0.1 s). At
    least one attempt is made, even with a deadline of 0.

    Returns the passing attempt's Result; Result(False, "not ready after N s: <last detail>") past the
    deadline; Result(False, "the process exited") once `stop` is set (the service exited; a running
    attempt is cancelled and an exec probe killed)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    timeout = check_kwargs.pop("timeout", DEFAULT_TIMEOUT)
    _check_timeout(timeout)
    exited = Result(False, "the process exited")
    while True:
        if stop is not None and stop.is_set():
            return exited
        attempt_timeout = max(min(timeout, end - loop.time()), MIN_ATTEMPT)
        result = await _attempt(probe, stop, {**check_kwargs, "timeout": attempt_timeout})
        if result is None:
            return exited
        if result.ok:
            return result
        left = end - loop.time()
        if left <= 0:
            return Result(False, f"not ready after {_format_s(deadline_s)}: {result.detail}")
        if await _pause(min(interval, left), stop):
            return exited
        interval = min(interval * 2, MAX_INTERVAL)
