"""Issue 10, req 3: out of fds when a service dies, pmond still restarts it (its fd reserve), answers
`ls` once fds free up, and does not flood its log."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import time
from typing import Any


def test_out_of_fds_at_exit_time_still_restarts(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "838381", "--name", "starved", "--json")
    daemon = pmon.daemon_pid()
    assert daemon
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns: list[socket.socket] = []
    old = resource.prlimit(daemon, resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir(f"/proc/{daemon}/fd"))
        resource.prlimit(daemon, resource.RLIMIT_NOFILE, (used + 8, old[1]))
        # Take every fd pmond has left with connections it accepts (and more wait in the backlog).
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(pmon.socket))
            conns.append(s)
        pmon.wait_for(lambda: len(os.listdir(f"/proc/{daemon}/fd")) >= used + 8 - 1, timeout=5,
                      message="pmond to run out of fds")
        began = time.monotonic()
        os.kill(svc["pid"], signal.SIGKILL)
        pids = pmon.wait_for(lambda: _service_pids(pmon, svc), timeout=5,
                             message=lambda: "the restart while out of fds; log: "
                             + (pmon.log_dir / "pmond.log").read_text()[-3000:])
        assert time.monotonic() - began < 3.0, "the restart waited for fds to free up"
        assert pids
    finally:
        for s in conns:
            s.close()
        with contextlib.suppress(OSError):
            resource.prlimit(daemon, resource.RLIMIT_NOFILE, old)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    back = pmon.wait_service("starved", lambda s: s["status"] == "running" and s["pid"] != svc["pid"],
                             what="running again")
    assert pmon.is_alive(back["pid"])
    log = (pmon.log_dir / "pmond.log").stat().st_size
    assert log < 200_000, f"pmond.log grew to {log} bytes"


def _service_pids(pmon: Any, svc: dict[str, Any]) -> list[int]:
    """Live main processes of this service, by its marker (the API may be unreachable meanwhile)."""
    marker = pmon.service_marker() + str(svc["id"]).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == svc["pid"]:
            continue
        try:
            env = open(f"/proc/{name}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(e == marker or e.startswith(marker + b":") for e in env) \
                and pmon.is_alive(int(name)) and pmon.pgrp(int(name)) == int(name):
            found.append(int(name))
    return found
