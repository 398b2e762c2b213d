"""The CLI's side of the API: HTTP/1.1 over pmond's Unix socket, and starting pmond when it is down.

Standard library only, and not http.client (50 ms of imports here): the server is ours, answers with
Content-Length and closes the connection, so reading the response is a few lines. For the same reason
it uses `_socket` (the socket module's enums cost 5 ms) and no urllib or pathlib.
"""

from __future__ import annotations

import _socket
import json
import os
import sys
import time

from pmon2.errors import DaemonUnreachable, PmonError
from pmon2.paths import Paths, socket_address

# Not `typing`: importing it costs the CLI a few ms, and annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

START_TIMEOUT = 15.0
# Connecting is quick when pmond is alive (a full listen backlog is the only wait); a stuck connect is not.
CONNECT_TIMEOUT = 10.0
# No deadline once a request is sent: a stop with --kill-timeout 600 takes 600 s, and the CLI must wait for
# it. pmond either answers or, if it dies, the kernel closes its end and recv() returns (a lost connection,
# below). A pmond that hangs is systemd's watchdog's to notice (pmond.service, WatchdogSec=), not a guess here.
REQUEST_TIMEOUT: float | None = None
# systemd's variables for the unit's main process: a pmond that the CLI starts is never that process.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ApiError(PmonError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code)
        self.status = status


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after a request was sent: pmond carries on with it, and the CLI says so (cli.main)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Client:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def _connect(self, timeout: float | None = CONNECT_TIMEOUT) -> _socket.socket:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        address, dirfd = socket_address(self.paths.socket)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        finally:
            if dirfd is not None:
                os.close(dirfd)
        return sock

    def request(self, method: str, path: str, body: Any = None, *, autostart: bool = True,
                timeout: float | None = REQUEST_TIMEOUT) -> Any:
        """Send one request and wait for pmond's answer: for `timeout` seconds, or, by default, as long as
        pmond keeps the connection open. The connect itself is bounded by CONNECT_TIMEOUT (or `timeout`)."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
        connect_timeout = CONNECT_TIMEOUT if timeout is None else min(timeout, CONNECT_TIMEOUT)
        sock = self._reach(connect_timeout, autostart)
        chunks = []
        try:
            sock.settimeout(timeout)
            try:
                sock.sendall(head + payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # pmond may answer from the head alone and close (413: the body is over its limit): its
                # answer waits in our socket. Without one, the connection was lost.
                chunks = _drain(sock)
                if not chunks:
                    raise DaemonUnreachable(f"lost the connection to pmond: {exc.strerror}") from None
            else:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except TimeoutError:
            raise DaemonUnreachable(f"pmond did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the connection to pmond: {exc.strerror}") from None
        except KeyboardInterrupt:
            # The request may be in pmond's hands already (a stop waiting out its kill timeout): it goes on.
            if method == "GET":
                raise Interrupted("interrupted") from None
            raise Interrupted("interrupted: the operation goes on in pmond (check with `pmon2 ls`)") from None
        finally:
            sock.close()
        status, data = parse_response(b"".join(chunks))
        if status >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            message = err.get("message", f"pmond answered {status}")
            if status == 413 and payload:
                message += f" (this one: {len(payload)} bytes)"
            raise ApiError(status, err.get("code", "error"), message)
        return data

    def _reach(self, connect_timeout: float, autostart: bool) -> _socket.socket:
        """A connection to pmond, started first if it is down and `autostart`; DaemonUnreachable if none."""
        try:
            return self._connect(connect_timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            if not autostart:
                raise DaemonUnreachable("pmond is not running") from None
            self.start_daemon()
            return self._connect(connect_timeout)
        except PermissionError:
            raise DaemonUnreachable(f"permission denied on {self.paths.socket}: run as root or join the "
                                    "pmon2 group") from None
        except TimeoutError:
            raise DaemonUnreachable(f"pmond did not accept a connection within {connect_timeout:g} s") from None
        except OSError as exc:
            raise DaemonUnreachable(f"cannot reach pmond at {self.paths.socket}: {exc.strerror}") from None

    def stream(self, method: str, path: str, *, autostart: bool = True) -> Iterator[list[Any]]:
        """Send one request that pmond answers with a stream of JSON values, one a line (NDJSON, sent
        chunked: GET /v1/logs?follow=true), over this one connection: yield the values as they come, a
        list per chunk, until pmond ends the stream. An error status raises ApiError, as request() does;
        a connection lost midway (pmond stopped) raises DaemonUnreachable."""
        head = f"{method} {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        sock = self._reach(CONNECT_TIMEOUT, autostart)
        try:
            sock.settimeout(None)
            sock.sendall(head.encode())
            reader = _Reader(sock)
            status, headers = reader.head()
            if "chunked" not in headers.get("transfer-encoding", "").lower():  # a whole answer: an error
                status, data = parse_response(reader.rest())
                if status >= 400:
                    err = data.get("error", {}) if isinstance(data, dict) else {}
                    raise ApiError(status, err.get("code", "error"), err.get("message", f"pmond answered {status}"))
                yield [data]
                return
            pending = b""
            while (chunk := reader.chunk()) is not None:
                *lines, pending = (pending + chunk).split(b"\n")
                try:
                    values = [json.loads(line) for line in lines if line.strip()]
                except ValueError:
                    raise DaemonUnreachable("pmond sent a stream that is not JSON lines") from None
                if values:
                    yield values
        except OSError as exc:
            raise DaemonUnreachable(f"lost the connection to pmond: {exc.strerror}") from None
        finally:
            sock.close()

    def service_path(self, ref: str, action: str = "") -> str:
        return f"/v1/services/{quote(str(ref))}" + (f"/{action}" if action else "")

    def is_running(self) -> bool:
        try:
            self._connect(2.0).close()
            return True
        except OSError:
            return False

    def daemon_command(self) -> list[str]:
        return [sys.executable, "-m", "pmon2.daemon"]

    def start_daemon(self, *flags: str) -> None:
        """Start pmond in its own session and wait until it answers on its socket."""
        import subprocess

        run_dir = self.paths.run_dir
        try:
            os.makedirs(run_dir, mode=0o700 if self.paths.mode != "root" else 0o755, exist_ok=True)
        except OSError as exc:
            raise DaemonUnreachable(f"cannot create {run_dir}: {exc.strerror}") from None
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.paths.start_log, "wb") as start_log:
            proc = subprocess.Popen([*self.daemon_command(), *flags], stdin=subprocess.DEVNULL, stdout=start_log,
                                    stderr=start_log, start_new_session=True, cwd="/", env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.is_running():
                return
            code = proc.poll()
            if code is not None and code != 3:  # 3: another pmond won the race; wait for it
                raise DaemonUnreachable(f"pmond failed to start: {self.start_failure()}")
            time.sleep(0.01)
        raise DaemonUnreachable(f"pmond did not start within {START_TIMEOUT:g} s; see {self.paths.start_log}")

    def start_failure(self) -> str:
        try:
            with open(self.paths.start_log, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().strip().splitlines()
        except OSError:
            lines = []
        if not lines:
            return f"no output (see {self.paths.start_log})"
        last = lines[-1]
        return last.removeprefix("pmond: ")


class _Reader:
    """The answer to a streamed request, read as it comes: the head, then chunks (RFC 9112 §7.1)."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.raw_head = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            if not self.raw_head:
                raise DaemonUnreachable("lost the connection to pmond before it answered (see `pmon2 daemon status`)")
            raise DaemonUnreachable("pmond ended the stream (stopped?)")
        self.buf += data

    def head(self) -> tuple[int, dict[str, str]]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > 65536:
                raise DaemonUnreachable("pmond sent a malformed answer: no end to its head")
            self._more()
        self.raw_head = bytes(self.buf[:end + 4])
        del self.buf[:end + 4]
        lines = self.raw_head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise DaemonUnreachable(f"pmond sent a malformed status line: {lines[0][:80]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def rest(self) -> bytes:
        """The whole answer (head and body) once pmond closes the connection."""
        while data := self.sock.recv(65536):
            self.buf += data
        return self.raw_head + bytes(self.buf)

    def chunk(self) -> bytes | None:
        """The next chunk's data; None at the last chunk."""
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > 1024:
                raise DaemonUnreachable("pmond sent a malformed chunk")
            self._more()
        try:
            size = int(bytes(self.buf[:end]).split(b";")[0].strip(), 16)
        except ValueError:
            raise DaemonUnreachable("pmond sent a malformed chunk") from None
        del self.buf[:end + 2]
        if size == 0:
            return None
        while len(self.buf) < size + 2:
            self._more()
        data = bytes(self.buf[:size])
        del self.buf[:size + 2]
        return data


def _drain(sock: _socket.socket) -> list[bytes]:
    """What the peer sent before it closed, once sending to it failed; [] if nothing could be read."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:  # ECONNRESET once the queue is empty: the answer, if any, is in chunks
        pass
    return chunks


def quote(text: str) -> str:
    """Percent-encode a path segment (what urllib.parse.quote(text, safe="") does)."""
    keep = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~"
    return "".join(c if c in keep else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def parse_response(raw: bytes) -> tuple[int, Any]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:  # pmond died (or was stopped) while it held the request
        raise DaemonUnreachable("lost the connection to pmond before it answered (see `pmon2 daemon status`)")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise DaemonUnreachable(f"pmond sent a malformed status line: {lines[0][:80]!r}") from None
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise DaemonUnreachable(f"pmond sent a bad Content-Length: {value.strip()[:20]!r}")
            length = int(value.strip())
    if length is not None:
        if len(body) < length:
            raise DaemonUnreachable("lost the connection to pmond in the middle of its answer")
        body = body[:length]
    try:
        return status, json.loads(body) if body.strip() else None
    except ValueError:
        raise DaemonUnreachable("pmond sent a response that is not JSON") from None
