"""Run uvicorn on the sockets of systemd's socket-activation protocol (LISTEN_FDS, fds 3..), as pmon2's
`--listen` passes them: `python uvicorn_fds.py MODULE:APP [uvicorn.Config keyword=value ...]`.

Why not `uvicorn --fd 3`: uvicorn 0.x wraps that fd as `socket.fromfd(fd, AF_UNIX, SOCK_STREAM)`, so a TCP
socket is labelled AF_UNIX, and asyncio and uvloop then leave Nagle's algorithm on for its connections
(TCP_NODELAY is only set on AF_INET/AF_INET6 sockets): each small response waits for a delayed ACK, about
40 ms here (1,100 requests/s instead of 9,500 for one instance). `socket.socket(fileno=fd)` reads the
family from the fd. LISTEN_PID is checked as sd_listen_fds(3) does: the fds are ours only if it is our pid.
"""

from __future__ import annotations

import os
import socket
import sys

import uvicorn


def listen_fds() -> list[socket.socket]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=fd) for fd in range(3, 3 + count)]


def main() -> None:
    app, *rest = sys.argv[1:]
    options: dict[str, object] = {"log_level": "warning", "access_log": False}
    for item in rest:
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    sockets = listen_fds()
    if not sockets:
        sys.exit("uvicorn_fds.py: no LISTEN_FDS for this pid")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=sockets)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
