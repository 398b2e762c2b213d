"""A client that is not root: one HTTP request over pmond's socket from a forked child that dropped to
another uid (no exec, so no interpreter needs to be reachable by that user)."""

from __future__ import annotations

import json
import os
import socket
from typing import Any


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
            payload = b"" if body is None else json.dumps(body).encode()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(sock_path)
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                while chunk := s.recv(65536):
                    os.write(w, chunk)
        except BaseException as exc:
            os.write(w, f"ERROR {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload) if payload.strip() else None
