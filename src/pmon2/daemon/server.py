"""HTTP/1.1 on a Unix socket, parsed by h11, with each peer known by SO_PEERCRED (unix(7)).

Transport only: it turns requests into calls of the API handler, `handler(method, path, query, body,
caller)`, and its answers into JSON responses, or into a body sent as it is made (`Streamed`, for
`logf`: one chunk per item, until the client goes away). It also keeps broken or hostile clients
from hurting pmond:

- Every malformed request is answered before the connection closes, with the status that RFC 9110 §15
  and RFC 9112 give it: 400 bad syntax, 408 too slow, 413 body too large, 431 head too large (RFC 6585
  §5), 501 a transfer coding other than chunked (RFC 9112 §6.1), 503 pmond too busy, 505 not HTTP/1.x.
- A body must be a JSON object (RFC 8259) of at most MAX_DEPTH levels, with finite numbers, integers
  that fit in 64 bits and no lone surrogates; the handler never sees anything else.
- `Limits` bounds the open connections, the time a client may take, and the memory its body may use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Any

import h11

from pmon2.daemon.auth import Caller, PeerPolicy
from pmon2.errors import BadRequest, PmonError
from pmon2.paths import socket_address

log = logging.getLogger("pmond")

MAX_BODY = 4 << 20  # bytes: the largest request body
# bytes: a request head still incomplete beyond this gets 431 (h11's max_incomplete_event_size); one that
# arrives whole in a single read may be up to READ_SIZE
MAX_HEAD = 16 << 10
READ_SIZE = 64 << 10  # bytes: one read from a client; the stream buffers at most twice this before pausing
MAX_DEPTH = 32  # levels of nested objects and arrays in a body; the API's deepest is 2
INT_BITS = 64  # integers in a body must fit in a signed 64-bit integer (what SQLite stores)
ACCEPT_PAUSE = 0.1  # seconds accepting pauses when out of fds, or while the fd reserve is spent
SHED_ON_EMFILE = 8  # idle connections closed when an accept fails for want of fds
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[str, str, dict[str, list[str]], dict[str, Any] | None, Caller], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class Limits:
    """What one pmond lets its clients use. Tests shorten them with PMON2_HTTP_<FIELD> (`from_env`)."""

    connections: int = 256  # connections open at once
    root_reserve: int = 16  # of those, the slots only a privileged caller (root, pmond's own user) may take
    idle_timeout: float = 10.0  # seconds to send a complete request head, from connect or the last response
    body_timeout: float = 30.0  # seconds to send the whole body, once the head has arrived
    send_timeout: float = 30.0  # seconds for the client to take in a response
    body_budget: int = 16 << 20  # bytes of request bodies held at once, across all connections

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """Defaults, but for each PMON2_HTTP_<FIELD> set to a positive number (IDLE_TIMEOUT=0.5...)."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = "PMON2_HTTP_" + field.name.upper()
            if name not in environ:
                continue
            try:
                value = type(field.default)(environ[name])
            except ValueError:
                value = -1
            if value < 0 or (value == 0 and field.name != "root_reserve"):
                log.warning("ignored %s=%r: not a positive number", name, environ[name])
                continue
            values[field.name] = value
        return cls(**values)


class Streamed:
    """A response body sent as it is made: a handler returns (status, Streamed(items)), and each bytes
    item goes out as one chunk (Transfer-Encoding: chunked, RFC 9112 §7.1; h11 chunks a body that has
    no Content-Length) as soon as it comes. The response ends when the iterator does, when the client
    closes its end, or when pmond stops; the connection closes after it. The iterator is closed
    (aclose) in every case, so it may hold files open. The idle timeout does not apply: it only limits
    the wait for a request head."""

    __slots__ = ("content_type", "items")

    def __init__(self, items: AsyncGenerator[bytes, None], content_type: str = "application/x-ndjson") -> None:
        self.items = items
        self.content_type = content_type


class _Reject(Exception):
    """A request pmond answers with an error and then closes the connection."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Client:
    """One connection, as the connection cap and the body budget see it."""

    __slots__ = ("allowed", "caller", "closed", "reserved", "waiting_since", "writer")

    def __init__(self, caller: Caller, allowed: bool, writer: asyncio.StreamWriter, now: float) -> None:
        self.caller = caller
        self.allowed = allowed  # by the peer policy; if not, its request gets 403
        self.writer = writer
        self.waiting_since: float | None = now  # loop time it began to wait for a request head; None mid-request
        self.reserved = 0  # bytes of the body budget it holds
        self.closed = False  # shed to make room: its task only winds down


class HttpServer:
    def __init__(self, path: str, handler: Handler, peers: PeerPolicy, limits: Limits | None = None,
                 may_accept: Callable[[], bool] = lambda: True) -> None:
        self.path = path
        # False while pmond's fd reserve is spent on a launch: a connection accepted then would take the
        # fds the launch needs (spawn.FdReserve).
        self.may_accept = may_accept
        self.sock: socket.socket | None = None
        self.accepting = False
        self.resume: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.handler = handler
        self.peers = peers
        self.limits = limits or Limits()
        self.clients: set[_Client] = set()
        self.budget = self.limits.body_budget  # bytes of body budget left
        self._busy_logged = -math.inf

    async def start(self) -> None:
        address, dirfd = socket_address(self.path)
        try:
            if os.path.lexists(self.path):
                os.unlink(self.path)  # stale: we hold the pid-file lock, so no other pmond owns it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(address)
            finally:
                os.umask(old)
        finally:
            if dirfd is not None:
                os.close(dirfd)
        mode, gid = self.peers.socket_mode()
        if gid is not None:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, mode)
        sock.listen(128)
        sock.setblocking(False)
        self.sock = sock
        self._accept_on()

    # Accepting by hand rather than with asyncio.start_unix_server: out of fds, asyncio logs a traceback
    # per failed accept and retries blindly; here a failed accept sheds idle clients and pauses, and
    # accepting pauses too while pmond's fd reserve is spent on a launch.

    def _accept_on(self) -> None:
        if self.sock is not None and not self.accepting:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_acceptable)
            self.accepting = True

    def _accept_pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if self.accepting and self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.accepting = False
        if self.resume is None:
            self.resume = loop.call_later(seconds, self._accept_resume)

    def _accept_resume(self) -> None:
        self.resume = None
        self._accept_on()

    def _on_acceptable(self) -> None:
        assert self.sock is not None
        for _ in range(32):
            if not self.may_accept():
                self._accept_pause(ACCEPT_PAUSE)
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM
                shed = self.shed_idle(SHED_ON_EMFILE)
                self._log_busy(f"cannot accept a connection ({exc.strerror}); closed {shed} idle connections")
                self._accept_pause(ACCEPT_PAUSE)
                return
            task = asyncio.get_running_loop().create_task(self._serve_socket(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve_socket(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=READ_SIZE)
        except OSError:
            conn.close()
            return
        await self._serve(reader, writer)

    async def close(self) -> None:
        if self.sock is not None:
            if self.accepting:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                self.accepting = False
            if self.resume is not None:
                self.resume.cancel()
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        for task in list(self.tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            writer.close()
            return
        caller = Caller(pid, uid, gid)
        me = _Client(caller, self.peers.allows(uid, gid), writer, asyncio.get_running_loop().time())
        if not self._admit(me):
            # A fresh socket's buffer is empty: this small write goes straight to the kernel, it cannot block.
            writer.write(_raw_response(503, _error("busy", "pmond has too many connections; try again")))
            writer.close()
            return
        self.clients.add(me)
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            while await self._exchange(conn, reader, me):
                conn.start_next_cycle()
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            pass  # pmond is stopping; end quietly (3.11's StreamReaderProtocol would print the cancellation)
        except Exception:
            log.exception("error on a client connection (uid %d, pid %d)", uid, pid)
        finally:
            self._release(me)
            self.clients.discard(me)
            writer.close()

    def _admit(self, new: _Client) -> bool:
        """Make room for a new connection. At most `connections` are open, and the last `root_reserve`
        slots are for privileged callers. When full, the connection that has waited longest for a request
        head is shed with a 503 (an unprivileged newcomer may only shed another unprivileged one): a client
        that connects and says nothing cannot lock anyone out. False when there is nothing to shed."""
        limit = self.limits.connections - (0 if new.caller.privileged else self.limits.root_reserve)
        while len(self.clients) >= limit:
            idle = [c for c in self.clients
                    if c.waiting_since is not None and (new.caller.privileged or not c.caller.privileged)]
            self._log_busy(f"{len(self.clients)} connections open, the most allowed")
            if not idle:
                return False
            victim = min(idle, key=lambda c: c.waiting_since or 0.0)
            victim.closed = True
            self.clients.discard(victim)
            victim.writer.write(_raw_response(503, _error("busy", "pmond has too many connections; try again")))
            victim.writer.close()
        return True

    def shed_idle(self, count: int) -> int:
        """Close up to `count` connections that wait for a request head, unprivileged and longest-waiting
        first: pmond ran out of fds (accept failed), and these hold fds while asking for nothing."""
        idle = sorted((c for c in self.clients if c.waiting_since is not None),
                      key=lambda c: (c.caller.privileged, c.waiting_since or 0.0))[:count]
        for victim in idle:
            victim.closed = True
            self.clients.discard(victim)
            victim.writer.close()
        return len(idle)

    def _reserve(self, me: _Client, size: int) -> None:
        """Hold `size` bytes of the body budget for this client's request, or refuse it with 503."""
        more = size - me.reserved
        if more <= 0:
            return
        if more > self.budget:
            self._log_busy(f"request bodies hold {self.limits.body_budget - self.budget} bytes, the most allowed")
            raise _Reject(503, "busy", "pmond is busy receiving other requests; try again")
        self.budget -= more
        me.reserved = size

    def _release(self, me: _Client) -> None:
        self.budget += me.reserved
        me.reserved = 0

    def _log_busy(self, what: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._busy_logged >= 60.0:  # once a minute at most: a flood must not flood the log too
            self._busy_logged = now
            log.warning("shedding clients: %s", what)

    async def _exchange(self, conn: h11.Connection, reader: asyncio.StreamReader, me: _Client) -> bool:
        """One request and its response; False when the connection is done."""
        try:
            got = await self._read_request(conn, reader, me)
            if got is None:
                return False
            request, body = got
            status, payload = await self._dispatch(request, body, me.caller)
        except _Reject as exc:
            if not me.closed:
                await self._reply(conn, me.writer, exc.status, _error(exc.code, exc.message), close=True)
            return False
        finally:
            self._release(me)
        if isinstance(payload, Streamed):
            await self._stream(conn, reader, me.writer, status, payload, head=request.method == b"HEAD")
            return False
        await self._reply(conn, me.writer, status, payload, head=request.method == b"HEAD")
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            me: _Client) -> tuple[h11.Request, bytearray] | None:
        """Read one request: its head within `idle_timeout`, then its body within `body_timeout`. None when
        the client closed (or was shed) between requests; _Reject when the request cannot be served."""
        loop = asyncio.get_running_loop()
        me.waiting_since = loop.time()
        deadline = me.waiting_since + self.limits.idle_timeout
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint  # h11's: 400, 431 for a head too large, 501 for a transfer coding
                code = {431: "too_large", 501: "not_implemented"}.get(status, "bad_request")
                raise _Reject(status, code, f"malformed request: {str(exc)[:200]}") from None
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    what = "request head" if request is None else "request body"
                    raise _Reject(408, "timeout", f"the {what} did not arrive in time") from None
                if me.closed:
                    return None
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                me.waiting_since = None
                deadline = loop.time() + self.limits.body_timeout
                self._check_head(conn, request, me)
            elif isinstance(event, h11.Data):
                if len(body) + len(event.data) > MAX_BODY:
                    raise _Reject(413, "too_large", f"the request body is over {MAX_BODY} bytes")
                self._reserve(me, len(body) + len(event.data))
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, body
            else:  # ConnectionClosed (PAUSED cannot come: each request is answered before the next is read)
                return None

    def _check_head(self, conn: h11.Connection, request: h11.Request, me: _Client) -> None:
        """Refuse a request from its head alone, before any of its body is read."""
        if not request.http_version.startswith(b"1."):  # RFC 9110 §15.6.6
            raise _Reject(505, "http_version", "only HTTP/1.x is spoken here")
        headers = dict(request.headers)  # h11 lower-cases the names and has checked Content-Length's syntax
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # RFC 9112 §6.1: a server may reject this; it is how requests are smuggled past a proxy.
            raise _Reject(400, "bad_request", "malformed request: both Transfer-Encoding and Content-Length")
        if not me.allowed:
            log.warning("refused a client with uid %d", me.caller.uid)
            raise _Reject(403, "forbidden", "this user may not use pmond")
        length = int(headers.get(b"content-length", b"0"))  # chunked bodies are checked as they come
        if length > MAX_BODY:
            raise _Reject(413, "too_large", f"the request body is over {MAX_BODY} bytes")
        self._reserve(me, length)
        if conn.they_are_waiting_for_100_continue:
            me.writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[], reason="Continue")) or b"")

    async def _dispatch(self, request: h11.Request, body: bytes | bytearray, caller: Caller) -> tuple[int, Any]:
        method = request.method.decode("ascii")  # h11 allows only ASCII in the request line
        path, query = split_target(request.target.decode("ascii"))
        try:
            return await self.handler(method, path, query, parse_body(body), caller)
        except PmonError as exc:
            return exc.http_status, _error(exc.code, exc.message)
        except Exception:
            log.exception("error while serving %s %s", method, path)
            return 500, _error("internal", "pmond hit an internal error; see pmond.log")

    async def _reply(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, payload: Any,
                     close: bool = False, head: bool = False) -> None:
        """Send a response; `close` tells the client the connection ends after it (RFC 9112 §9.6), `head`
        leaves the body out (the answer to HEAD, RFC 9110 §9.3.2)."""
        body = _encode(payload)
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        try:
            response = h11.Response(status_code=status, headers=headers, reason=_phrase(status))
            events = (response, h11.EndOfMessage()) if head else (response, h11.Data(data=body), h11.EndOfMessage())
            data = b"".join(conn.send(e) or b"" for e in events)
        except h11.LocalProtocolError:
            conn.send_failed()  # h11 cannot answer in its state: answer by hand, and the connection ends
            data = _raw_response(status, payload)
        await self._send(writer, data)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write, and wait until the client takes it (at most send_timeout: then the connection is cut)."""
        writer.write(data)
        try:
            async with asyncio.timeout(self.limits.send_timeout):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()
            raise ConnectionAbortedError("the client did not take its response") from None

    async def _stream(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      status: int, stream: Streamed, head: bool = False) -> None:
        """Send a Streamed response: one chunk per item, until the items end or the client closes its end
        (noticed at once: what it sends meanwhile is read and dropped). The connection ends after it."""
        items = stream.items
        step: asyncio.Future[bytes] | None = None
        gone: asyncio.Task[None] | None = None
        try:
            headers = [("content-type", stream.content_type), ("cache-control", "no-store"), ("connection", "close")]
            await self._send(writer, conn.send(h11.Response(status_code=status, headers=headers,
                                                            reason=_phrase(status))) or b"")
            if head:
                await self._send(writer, conn.send(h11.EndOfMessage()) or b"")
                return
            gone = asyncio.ensure_future(_until_eof(reader))
            while True:
                step = asyncio.ensure_future(anext(items))
                await asyncio.wait((step, gone), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return  # the client went away
                try:
                    item = step.result()
                except StopAsyncIteration:
                    break
                finally:
                    step = None
                if item:
                    await self._send(writer, conn.send(h11.Data(data=item)) or b"")
            await self._send(writer, conn.send(h11.EndOfMessage()) or b"")
        finally:
            for task in (step, gone):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait((task,))
            await items.aclose()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    """Read and drop what a client sends while a stream goes to it; return when it closes its end."""
    try:
        while await reader.read(READ_SIZE):
            pass
    except OSError:
        pass


def parse_body(raw: bytes | bytearray) -> dict[str, Any] | None:
    """A request body as the handler gets it: None when empty, else a JSON object (RFC 8259).

    Raises BadRequest naming the problem for anything else: not UTF-8, not JSON, not an object, nested
    more than MAX_DEPTH levels, NaN or Infinity, a number out of a double's range, an integer beyond
    INT_BITS bits, a lone surrogate (\\ud800) in a string."""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise BadRequest(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except _BadNumber as exc:
        raise BadRequest(str(exc)) from None
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # json's other limits
        raise BadRequest(f"the request body is not acceptable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode()
                except UnicodeEncodeError:
                    raise BadRequest("the request body holds a lone surrogate (\\ud800-\\udfff) in a string") from None
        elif isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise BadRequest(f"the request body is nested more than {MAX_DEPTH} levels deep")
            stack.extend((child, depth + 1) for child in ([*node, *node.values()] if isinstance(node, dict) else node))
    return value


class _BadNumber(ValueError):
    pass


def _parse_int(text: str) -> int:
    # Checked before int(): a 5,000-digit literal must not reach int()'s own limit (sys.int_info).
    if len(text.lstrip("-")) > 19 or not -(1 << (INT_BITS - 1)) <= (value := int(text)) < 1 << (INT_BITS - 1):
        raise _BadNumber(f"an integer in the request body is out of range (it must fit in {INT_BITS} bits)")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"a number in the request body is out of range: {text[:40]}")
    return value


def _parse_constant(name: str) -> float:
    raise _BadNumber(f"{name} is not a JSON number (RFC 8259 §6)")


def _encode(payload: Any) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate from somewhere: \u escapes keep the JSON valid
        return json.dumps(payload).encode() + b"\n"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""  # the reason phrase may be empty (RFC 9112 §4)


def _raw_response(status: int, payload: Any) -> bytes:
    """A whole response that ends the connection, made without h11: for a connection refused or shed at
    accept time, and when h11's state allows no response."""
    body = _encode(payload)
    return (f"HTTP/1.1 {status} {_phrase(status)}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_HEX = {bytes([c]) for c in b"0123456789abcdefABCDEF"}


def unquote(text: str) -> str:
    """Percent-decoding, as urllib.parse.unquote (not imported: it costs pmond 0.4 MB of memory)."""
    if "%" not in text:
        return text
    out, i, raw = bytearray(), 0, text.encode()
    while i < len(raw):
        if raw[i] == 0x25 and raw[i + 1 : i + 2] in _HEX and raw[i + 2 : i + 3] in _HEX:
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(raw[i])
        i += 1
    return out.decode(errors="replace")


def split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """'/v1/x?limit=5&a=b' -> ('/v1/x', {'limit': ['5'], 'a': ['b']}); the path stays encoded."""
    path, _, query = target.split("#", 1)[0].partition("?")
    params: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if pair:
            key, _, value = pair.partition("=")
            params.setdefault(unquote(key.replace("+", " ")), []).append(unquote(value.replace("+", " ")))
    return path, params


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
