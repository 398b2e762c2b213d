"""Detached launch: each service in its own session, through a double fork, so its parent is init.

pmond hands each launch to the child its launcher process keeps forked ahead (see launcher.py), which
becomes the intermediate; when the launcher is not there, pmond forks the intermediate itself. The
intermediate sets up the service's session, stdio, cwd and user, starts the service with posix_spawn,
and reports the service's pid on a close-on-exec status pipe. It does not reap the service and waits
for pmond's acknowledgement, so the pidfd pmond opens names the right process even if the service
died at once. Set-up and exec failures come back on the same pipe, so a missing binary or a bad cwd
reaches the user as an error instead of a crash loop. A service's listening sockets (LaunchSpec.fds,
daemon/sockets.py) travel with the request, after the two pipe ends, whichever way the intermediate
is started.

A launch is two steps: `begin` does the synchronous part (the request is on its way, or the fork is
done) and `Pending.finish` waits for the report. pmond begins a restart before it writes the exit to
its ledger, so the service comes back while the ledger is written. Any OSError on the way is a failed
start (SpawnError), never a crash of the caller; running out of fds says so.

File descriptor limits: pmond holds a pidfd per service, so it raises its own soft RLIMIT_NOFILE to
the hard limit at start (raise_nofile_limit). Services must not inherit that: a program that uses
select(2) breaks on an fd above 1023. They get the soft limit pmond started with. The launcher has no
setrlimit (no `resource` module in its bare interpreter), so pmond starts it under the original soft
limit, and the launcher's children, the intermediates, inherit it; an intermediate that pmond forks
itself sets it in the child.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import marshal
import os
import pwd
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pmon2 import procfs
from pmon2.daemon import launcher as launcher_code
from pmon2.errors import SpawnError

log = logging.getLogger("pmond")
# After the launcher dies, wait this long before starting another one (pmond forks services itself
# meanwhile); doubled at each failure in a row, so a launcher that cannot start does not fill the log.
LAUNCHER_RESTART_DELAY = 1.0
LAUNCHER_RESTART_MAX = 300.0
# The soft RLIMIT_NOFILE pmond started with, once raise_nofile_limit raised it: what services get.
_service_nofile: int | None = None


@dataclass(frozen=True)
class LaunchSpec:
    exe: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    out_log: str
    err_log: str
    user: str | None = None
    # pmond's own log dir: logs in it are created by pmond and given to the service's user; any other
    # log is opened as the service's user (launcher.open_log).
    trusted_log_dir: str | None = None
    # When set, the service's PMON2_SERVICE (instance:id:tag, recovery.marker_value): a mark on its process
    # that pmond can tell, and that no one without pmond's key can forge.
    marker: str = ""
    group: str | None = None  # systemd's Group=: the primary group, instead of the user's own
    # Listening sockets pmond holds (daemon/sockets.py), passed as fds 3, 4, ... in this order; with any,
    # the intermediate starts the service by fork and exec, to set LISTEN_PID (launcher.fork_exec).
    fds: tuple[int, ...] = ()


@dataclass
class Launched:
    pid: int
    pidfd: int
    start_ticks: int
    started_at: float = field(default=0.0)


def _request(spec: LaunchSpec) -> tuple:  # type: ignore[type-arg]
    """What the intermediate needs, with the user resolved here (pmond's errors are clearer)."""
    ident = None
    env = spec.env
    if spec.user is not None:
        try:
            pw = pwd.getpwnam(spec.user)
        except KeyError:
            raise SpawnError(f"no such user: {spec.user}") from None
        if pw.pw_uid != os.geteuid():
            if os.geteuid() != 0:
                raise SpawnError(f"--user {spec.user} needs pmond to run as root")
            env = dict(spec.env, HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name,
                       SHELL=pw.pw_shell or "/bin/sh")
            ident = (pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid))
    if spec.group is not None:
        import grp

        try:
            gid = grp.getgrnam(spec.group).gr_gid
        except KeyError:
            raise SpawnError(f"no such group: {spec.group}") from None
        if gid != (ident[1] if ident else os.getegid()):
            if os.geteuid() != 0:
                raise SpawnError(f"--group {spec.group} needs pmond to run as root")
            uid = ident[0] if ident else os.geteuid()
            user = spec.user or pwd.getpwuid(uid).pw_name
            ident = (uid, gid, os.getgrouplist(user, gid))
    env = dict(env)
    if spec.marker:
        env["PMON2_SERVICE"] = spec.marker  # never one inherited from the shell that ran `pmon2 run`
    trusted = os.path.normpath(spec.trusted_log_dir) if spec.trusted_log_dir else None
    return (spec.exe, list(spec.argv), env, spec.cwd, spec.out_log, spec.err_log, ident, trusted, len(spec.fds))


def raise_nofile_limit() -> int:
    """Raise pmond's soft RLIMIT_NOFILE to its hard limit; returns the soft limit it had, which services
    get (see the module's docstring). Best effort: pmond runs on under the old limit if it cannot."""
    global _service_nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # never so for NOFILE on Linux, whose ceiling is fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft
        _service_nofile = soft
    return soft


def _services_nofile() -> tuple[int, int] | None:
    """The limits a child started now must have, when they differ from pmond's own; else None."""
    if _service_nofile is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = (min(_service_nofile, hard), hard)
    return None if wanted == (soft, hard) else wanted


def _out_of_fds(exc: OSError) -> str | None:
    if exc.errno == errno.EMFILE:
        return "pmond is out of file descriptors (EMFILE): raise LimitNOFILE / ulimit -n"
    if exc.errno == errno.ENFILE:
        return "the system is out of file descriptors (ENFILE): raise fs.file-max"
    return None


def _os_failure(spec: LaunchSpec, exc: OSError) -> SpawnError:
    """Any OSError while starting is a failed start, told in one line."""
    error = SpawnError(f"cannot start {spec.argv[0]}: {_out_of_fds(exc) or exc.strerror or exc}")
    if exc.errno == errno.EMFILE:
        error.code = "out_of_fds"
    return error


class FdReserve:
    """A few fds that pmond holds (on /dev/null) against running out: when a start or an accept meets
    EMFILE, the reserve is closed and the operation tried again, so pmond can still restart a service
    and answer `ls`; it is taken again once fds are free."""

    def __init__(self, count: int = 16) -> None:
        self.count = count
        self.fds: list[int] = []
        self.launches = 0  # launches under way on the spent reserve: until they end, nothing takes it back
        self.refill()

    def refill(self) -> None:
        while len(self.fds) < self.count:
            try:
                self.fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release(self) -> bool:
        """Close the reserve for a launch; False when there was none left to give. `done` when it ends."""
        if not self.fds:
            return False
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.launches += 1
        return True

    def done(self) -> None:
        self.launches -= 1
        if self.launches == 0:
            self.refill()

    def ready(self) -> bool:
        """May others take fds now (the server accepting a connection)? Not while a launch lives on the
        spent reserve, nor until the reserve is whole again."""
        if self.launches:
            return False
        if len(self.fds) < self.count:
            self.refill()
        return len(self.fds) == self.count


RESERVE: FdReserve | None = None  # pmond's, made at start-up (main.py)


def begin_with_reserve(spec: LaunchSpec, via: Launcher | None = None) -> Pending:
    """`begin`, once more with the fd reserve released when pmond is out of fds."""
    if RESERVE is not None and not RESERVE.launches and len(RESERVE.fds) < RESERVE.count:
        RESERVE.refill()  # fds were freed since the reserve was spent
    try:
        return begin(spec, via)
    except SpawnError as exc:
        if exc.code != "out_of_fds" or RESERVE is None or not RESERVE.release():
            raise
        log.warning("out of file descriptors: the reserve is spent on starting %s", spec.argv[0])
    try:
        pending = begin(spec, via)
    except BaseException:
        RESERVE.done()
        raise
    pending.reserve = RESERVE  # given back when the launch ends (Pending._close)
    return pending


class Launcher:
    """pmond's side of the launcher process: starts it, sends it requests, starts another if it dies."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock: _socket.socket | None = None
        self.pid: int | None = None
        self.pidfd = -1
        self.ready = False
        self.closed = False
        self.restart_handle: asyncio.TimerHandle | None = None
        self.restart_delay = LAUNCHER_RESTART_DELAY

    def start(self) -> None:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            os.set_inheritable(theirs.fileno(), True)
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(launcher_code.__file__))))
            code = (f"import sys; sys.path.insert(0, {root!r}); "
                    f"from pmon2.daemon.launcher import serve; serve({theirs.fileno()})")
            # The launcher (and so every intermediate it forks, and every service) gets the soft fd limit
            # pmond started with: pmond lowers its own for the length of the spawn (it has no threads, and
            # a lower limit closes nothing), as the launcher could not call setrlimit itself.
            limits = _services_nofile()
            raised = resource.getrlimit(resource.RLIMIT_NOFILE)
            if limits is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            try:
                # posix_spawn: a vfork, so starting it costs pmond no copy of its memory.
                self.pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", code],
                                          dict(os.environ))
            finally:
                if limits is not None:
                    resource.setrlimit(resource.RLIMIT_NOFILE, raised)
        except (OSError, ValueError) as exc:  # ValueError: no sys.executable to run
            ours.close()
            log.warning("cannot start the launcher (%s); pmond forks services itself",
                        getattr(exc, "strerror", None) or exc)
            self._schedule_restart()
            return
        finally:
            theirs.close()
        self.sock = ours
        self.pidfd = os.pidfd_open(self.pid)
        ours.setblocking(False)
        self.loop.add_reader(ours.fileno(), self._on_message)
        self.loop.add_reader(self.pidfd, self._on_death)

    def _on_message(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data == b"R":
            self.ready = True
            self.restart_delay = LAUNCHER_RESTART_DELAY
        elif not data:
            self.loop.remove_reader(self.sock.fileno())
            self.ready = False

    def _on_death(self) -> None:
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        if self.pid is not None:
            _reap(self.pid)
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.ready = False
        if not self.closed:
            log.warning("the launcher (pid %s) died; pmond forks services itself until another starts in %g s",
                        self.pid, self.restart_delay)
            self._schedule_restart()
        self.pid = None

    def _schedule_restart(self) -> None:
        if not self.closed:
            self.restart_handle = self.loop.call_later(self.restart_delay, self.start)
            self.restart_delay = min(self.restart_delay * 2, LAUNCHER_RESTART_MAX)

    def send(self, req: bytes, fds: list[int]) -> bool:
        """Hand a request to the launcher; False when it cannot take it (pmond then forks itself)."""
        if not self.ready or self.sock is None or len(req) > launcher_code.MAX_REQUEST:
            return False
        try:
            self.sock.sendmsg([req], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                       b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
        except OSError:  # full (BlockingIOError), too large (EMSGSIZE), or gone (EPIPE)
            return False
        return True

    def close(self) -> None:
        self.closed = True
        if self.restart_handle is not None:
            self.restart_handle.cancel()
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()  # the launcher exits when it reads the end of the socket
            self.sock = None
        if self.pidfd >= 0:
            self.loop.remove_reader(self.pidfd)
            # pmond is on its way out: wait (briefly) to reap the launcher rather than leave init a zombie.
            import select

            if select.select([self.pidfd], [], [], 1.0)[0] and self.pid is not None:
                _reap(self.pid)
            os.close(self.pidfd)
            self.pidfd = -1


class Pending:
    """A launch under way: the intermediate exists, or its request is with the launcher."""

    def __init__(self, spec: LaunchSpec, req: tuple, via: Launcher | None) -> None:  # type: ignore[type-arg]
        self.spec = spec
        self.req = req
        self.status_r = self.ack_w = -1
        self.forked: int | None = None  # the intermediate's pid when pmond forked it itself
        self.reserve: FdReserve | None = None  # the fd reserve this launch lives on, if any
        # Copies of the listening sockets, for as long as the launch may need them (a launcher that dies
        # with the request is replaced by a fork here, later): whoever holds spec.fds may close them.
        self.listen: tuple[int, ...] = ()
        try:
            for fd in spec.fds:
                self.listen += (os.dup(fd),)
            self._start(via)
        except BaseException:
            self._close()
            raise

    def _start(self, via: Launcher | None) -> None:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        ack_r, ack_w = os.pipe2(os.O_CLOEXEC)
        try:
            if via is None or not via.send(marshal.dumps(self.req), [status_w, ack_r, *self.listen]):
                self.forked = _fork_intermediate(self.req, status_r, status_w, ack_r, ack_w, self.listen)
        except BaseException:
            os.close(status_r)
            os.close(ack_w)
            raise
        finally:
            os.close(status_w)
            os.close(ack_r)
        os.set_blocking(status_r, False)
        self.status_r, self.ack_w = status_r, ack_w

    async def _report(self) -> bytes:
        msg = b""
        while not (msg[:1] == b"P" and len(msg) >= launcher_code.REPORT_SIZE):
            chunk = await _read_some(self.status_r)
            if not chunk:
                break
            msg += chunk
        return msg

    async def finish(self, record: Callable[[int, int], None] | None = None) -> Launched:
        """Wait for the intermediate's report. `record(pid, start_ticks)` runs before the intermediate is
        told to let the service run: if it raises, the intermediate kills the service (SpawnError)."""
        try:
            return await self._finish(record)
        except OSError as exc:
            raise _os_failure(self.spec, exc) from None

    async def _finish(self, record: Callable[[int, int], None] | None) -> Launched:
        spec = self.spec
        pidfd = inter_fd = -1
        try:
            msg = await self._report()
            if not msg and self.forked is None:
                # The launcher died with our request in it: fork the intermediate ourselves.
                reserve, self.reserve = self.reserve, None  # the launch goes on: keep what it lives on
                listen, self.listen = self.listen, ()
                self._close()
                self.reserve, self.listen = reserve, listen
                self._start(None)
                msg = await self._report()
            if msg[:1] != b"P":
                if msg[:1] == b"E":
                    raise SpawnError(_describe_failure(spec, msg[1:]))
                raise SpawnError(f"cannot start {spec.argv[0]}: the intermediate process died")
            service, inter = launcher_code.unpack_report(msg)
            # The intermediate never reaps the service and waits for our ack, so even a service that died
            # at once is still this pid (a zombie at worst): the pidfd and start time name the right process.
            try:
                inter_fd = os.pidfd_open(inter)
                pidfd = os.pidfd_open(service)
            except ProcessLookupError:
                raise SpawnError(f"cannot start {spec.argv[0]}: the new process vanished") from None
            stat = _read_stat(service)
            if stat is None:
                raise SpawnError(f"cannot start {spec.argv[0]}: the new process vanished")
            if record is not None:
                try:
                    record(service, stat.starttime)
                except OSError as exc:
                    raise SpawnError(f"cannot start {spec.argv[0]}: cannot record the launch: "
                                     f"{exc.strerror}") from None
            os.write(self.ack_w, b"g")
            launched = Launched(service, pidfd, stat.starttime, time.time())
            pidfd = -1
            # Return once the intermediate is gone, so the service's parent is already init (or our
            # subreaper) when the caller looks.
            try:
                await _readable(inter_fd)
            except asyncio.CancelledError:
                # pmond is stopping before it could record the service: the next pmond would start it
                # again, so do not leave this one running unknown.
                signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
                os.close(launched.pidfd)
                raise
            return launched
        finally:
            self._close()
            if pidfd >= 0:
                os.close(pidfd)
            if inter_fd >= 0:
                os.close(inter_fd)

    def abort(self) -> None:
        """Give up: without our ack the intermediate kills the service it may have started."""
        self._close()

    def _close(self) -> None:
        if self.ack_w >= 0:
            os.close(self.ack_w)
            self.ack_w = -1
        if self.status_r >= 0:
            os.close(self.status_r)
            self.status_r = -1
        if self.forked is not None:
            _reap_later(self.forked)
            self.forked = None
        if self.reserve is not None:
            self.reserve.done()
            self.reserve = None
        for fd in self.listen:
            os.close(fd)
        self.listen = ()


def begin(spec: LaunchSpec, via: Launcher | None = None) -> Pending:
    """Start launching, through the launcher when it can take the request: the request is sent (or the
    intermediate forked) when this returns."""
    try:
        return Pending(spec, _request(spec), via)
    except OSError as exc:
        raise _os_failure(spec, exc) from None


def _read_stat(pid: int) -> procfs.Stat | None:
    """procfs.read_stat, but an error other than "no such process" is raised (EMFILE must not read as a
    vanished process)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    return procfs.parse_stat(pid, data.decode(errors="replace")) if data else None


async def launch(spec: LaunchSpec, via: Launcher | None = None) -> Launched:
    return await begin(spec, via).finish()


def _fork_intermediate(req: tuple, status_r: int, status_w: int, ack_r: int, ack_w: int,  # type: ignore[type-arg]
                       listen: tuple[int, ...] = ()) -> int:
    limits = _services_nofile()
    try:
        pid = os.fork()
    except OSError as exc:
        raise SpawnError(f"cannot fork: {exc.strerror}") from None
    if pid == 0:
        code = 127
        try:
            os.close(status_r)
            os.close(ack_w)
            if limits is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            code = launcher_code.intermediate(req, status_w, ack_r, listen=listen)
        finally:
            os._exit(code)
    return pid


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _read_some(fd: int) -> bytes:
    """Wait until `fd` is readable and read what is there; b"" at end of file."""
    while True:
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            pass
        await _readable(fd)


def _reap_later(pid: int) -> None:
    """Collect an intermediate pmond forked itself once it exits, without waiting for it."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return

    def collect() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        _reap(pid)

    loop.add_reader(fd, collect)


def _reap(pid: int) -> None:
    """Collect an exited child of pmond's (the launcher, or an intermediate it forked)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # as subreaper, pmond's SIGCHLD handler was quicker


def _describe_failure(spec: LaunchSpec, payload: bytes) -> str:
    """One line from the intermediate's report: stage NUL errno [NUL why a log file was refused]."""
    stage, _, rest = payload.decode(errors="replace").partition("\0")
    code, _, refused = rest.partition("\0")
    if refused and stage.startswith("log "):
        return f"refused log file {stage[4:]}: it {refused}"
    try:
        reason = os.strerror(int(code))
    except ValueError:
        reason = "unknown error"
    if stage.startswith("exec ") and code == str(errno.ENOENT):
        return f"cannot start {spec.argv[0]}: no such file: {spec.exe}"
    if stage == "user":
        stage = f"user {spec.user}"
    elif spec.user is not None and code == str(errno.EACCES) and stage.startswith(("log ", "cwd ")):
        # Logs outside pmond's own log dir, and the cwd, are opened as the service's user (launcher.py).
        stage += f" (as user {spec.user})"
    return f"cannot start {spec.argv[0]}: {stage}: {reason}"
