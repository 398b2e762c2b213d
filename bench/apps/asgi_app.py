"""The Python app of bench/zero_downtime.py: any request -> 200 "ok\\n". Stdlib only, no framework.

    uvicorn --fd 3 --app-dir bench/apps asgi_app:app       # an ASGI server on the socket pmond passes
    gunicorn --chdir bench/apps wsgi_app:app               # gunicorn: see wsgi_app.py

With $NOTIFY_SOCKET set (pmon2's `ready = "notify"`, systemd's Type=notify), it says READY=1 once the ASGI
server has run its lifespan startup, and STOPPING=1 at shutdown (sd_notify(3), in a few lines). uvicorn
starts to accept on the inherited socket right after that startup: a connection that arrives in between
waits in the listening socket's backlog, which pmond and the other instances hold open.
"""

from __future__ import annotations

import os
import socket
from typing import Any

BODY = b"ok\n"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


def notify(message: bytes) -> None:
    """One sd_notify datagram to $NOTIFY_SOCKET ('@' = abstract namespace); nothing without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.send(message)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                notify(f"READY=1\nSTATUS=serving, pid {os.getpid()}".encode())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                notify(b"STOPPING=1")
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
