"""HTTP/1.1 on a Unix socket, parsed by h11, with peers checked by SO_PEERCRED.

Transport only: it turns requests into calls of an `Api` and the answers into JSON responses.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from pmon2.errors import PmonError
from pmon2.paths import socket_address

log = logging.getLogger("pmond")

MAX_BODY = 4 << 20
_UCRED = struct.Struct("3i")

Handler = Callable[[str, str, dict[str, list[str]], Any], Awaitable[tuple[int, Any]]]


class PeerPolicy:
    """Who may talk to pmond: root, pmond's own user and, in root mode, members of group pmon2."""

    def __init__(self, group: str | None) -> None:
        self.uids = {0, os.geteuid()}
        self.gid: int | None = None
        self.members: set[str] = set()
        if group:
            try:
                g = grp.getgrnam(group)
                self.gid, self.members = g.gr_gid, set(g.gr_mem)
            except KeyError:
                pass

    def allows(self, uid: int, gid: int) -> bool:
        if uid in self.uids:
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        import pwd

        try:
            return pwd.getpwuid(uid).pw_name in self.members
        except KeyError:
            return False


class HttpServer:
    def __init__(self, path: str, handler: Handler, peers: PeerPolicy) -> None:
        self.path = path
        self.handler = handler
        self.peers = peers
        self.server: asyncio.AbstractServer | None = None

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
        if self.peers.gid is not None:
            os.chown(self.path, 0, self.peers.gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_BODY)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            _pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
            if not self.peers.allows(uid, gid):
                log.warning("refused a client with uid %d", uid)
                await self._exchange(conn, reader, writer, refuse=True)
                return
            while await self._exchange(conn, reader, writer):
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _exchange(self, conn: h11.Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, refuse: bool = False) -> bool:
        """One request and its response; False when the connection is done."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return False
                continue
            if isinstance(event, h11.ConnectionClosed):
                return False
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    await self._respond(conn, writer, 413, _error("too_large", "request body too large"))
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
        assert request is not None
        if refuse:
            await self._respond(conn, writer, 403, _error("forbidden", "this user may not use pmond"))
            return False
        status, payload = await self._dispatch(request, bytes(body))
        await self._respond(conn, writer, status, payload)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _dispatch(self, request: h11.Request, body: bytes) -> tuple[int, Any]:
        path, query = split_target(request.target.decode("ascii", "replace"))
        method = request.method.decode("ascii")
        try:
            data = json.loads(body) if body.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return 400, _error("bad_request", "the request body is not JSON")
        try:
            return await self.handler(method, path, query, data)
        except PmonError as exc:
            return exc.http_status, _error(exc.code, exc.message)
        except Exception:
            log.exception("error while serving %s %s", method, path)
            return 500, _error("internal", "pmond hit an internal error; see pmond.log")

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode() + b"\n"
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


def unquote(text: str) -> str:
    """Percent-decoding, as urllib.parse.unquote (not imported: it costs pmond 0.4 MB of memory)."""
    if "%" not in text:
        return text
    out, i, raw = bytearray(), 0, text.encode()
    while i < len(raw):
        if raw[i] == 0x25 and len(raw) - i >= 3:
            try:
                out.append(int(raw[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode(errors="replace")


def split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """'/v1/x?limit=5&a=b' -> ('/v1/x', {'limit': ['5'], 'a': ['b']}); the path stays encoded."""
    path, _, query = target.partition("?")
    path = path.split("#", 1)[0]
    params: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if pair:
            key, _, value = pair.partition("=")
            params.setdefault(unquote(key.replace("+", " ")), []).append(unquote(value.replace("+", " ")))
    return path, params


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
