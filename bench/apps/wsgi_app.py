"""The WSGI twin of asgi_app.py for gunicorn: any request -> 200 "ok\\n".

    gunicorn --chdir bench/apps wsgi_app:app

gunicorn reads LISTEN_FDS / LISTEN_PID itself (systemd socket activation: it uses fds 3.. when LISTEN_PID
is its own pid) and says READY=1 on $NOTIFY_SOCKET once its arbiter has booted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"ok\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
