"""Raw HTTP requests over pmond's socket for tests: as this process (`request`), or as another uid from a
forked child that dropped to it (`request_as`: no exec, so no interpreter needs to be reachable by that
user)."""

from __future__ import annotations

import json
import os
import socket
from typing import Any


def _exchange(sock_path: str, method: str, path: str, body: Any, timeout: float) -> bytes:
    """The whole raw answer to one request (Connection: close, so it ends when pmond closes)."""
    payload = b"" if body is None else json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n"
                  f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        return b"".join(iter(lambda: s.recv(65536), b""))


def _parse(data: bytes) -> tuple[int, Any]:
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload) if payload.strip() else None


def request(sock_path: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    """(HTTP status, JSON body or None) of one request made as this process."""
    return _parse(_exchange(sock_path, method, path, body, timeout))


def request_as(uid: int, sock_path: str, method: str, path: str, body: Any = None,
               timeout: float = 60.0) -> tuple[int, Any]:
    """(HTTP status, JSON body or None) of one request made as `uid` (its gid too, no groups)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, ask, write the raw answer to the pipe
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(w, _exchange(sock_path, method, path, body, timeout))
        except BaseException as exc:
            os.write(w, f"ERROR {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return _parse(data)
