"""File descriptor limits (issue 9, requirement 5): pmond raises its own, services keep the one pmond was
started with, and running out of fds is a clear failed start, not a crash or a "vanished" process."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

SOFT, HARD = 1024, 4096


def nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no Max open files in /proc/{pid}/limits")


def run_limited(pmon, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI, and so the pmond it starts, under RLIMIT_NOFILE (SOFT, HARD)."""
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))

    return subprocess.run(pmon.cmd(*args), env=pmon.env, cwd=pmon.work, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, preexec_fn=lower)


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < HARD, reason=f"hard fd limit below {HARD}")
@pytest.mark.parametrize("launcher", ["1", "0"], ids=["launcher", "pmond-forks"])
def test_pmond_raises_its_fd_limit_and_services_keep_the_original(pmon, launcher):
    pmon.env["PMON2_LAUNCHER"] = launcher
    proc = run_limited(pmon, "run", "--json", "sleep", "36201", "--name", "limited")
    assert proc.returncode == 0, proc.stderr
    svc = json.loads(proc.stdout)
    assert nofile(pmon.daemon_pid()) == (HARD, HARD)
    assert nofile(svc["pid"]) == (SOFT, HARD)
    # A restart as well (through the launcher, or a fork of pmond).
    os.kill(svc["pid"], signal.SIGKILL)
    again = pmon.wait_service("limited", lambda s: s["pid"] not in (None, svc["pid"]) and s["status"] == "running",
                              what="restarted")
    assert nofile(again["pid"]) == (SOFT, HARD)
    assert nofile(pmon.daemon_pid()) == (HARD, HARD)


def fds_of(pid: int) -> set[int]:
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def test_pmond_out_of_fds_gives_a_one_line_error_and_recovers(pmon):
    # Without the fd reserve (test_fd_exhaustion.py shows it at work), the failure itself is seen.
    pmon.env["PMON2_FD_RESERVE"] = "0"
    pmon.start_service("sleep", "36202", "--name", "first")
    daemon = pmon.daemon_pid()
    before = resource.prlimit(daemon, resource.RLIMIT_NOFILE)
    used = fds_of(daemon)
    free = [n for n in range(max(used) + 3) if n not in used]
    # One free fd below the limit: enough to accept the CLI's connection, not for the launch's pipes.
    resource.prlimit(daemon, resource.RLIMIT_NOFILE, (free[1], before[1]))
    try:
        proc = pmon.run("run", "sleep", "36203", "--name", "starved", check=False, timeout=15)
    finally:
        resource.prlimit(daemon, resource.RLIMIT_NOFILE, before)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "file descriptors" in proc.stderr and "EMFILE" in proc.stderr, proc.stderr
    assert "vanished" not in proc.stderr and "Traceback" not in proc.stderr
    assert pmon.daemon_pid() == daemon
    svc = pmon.start_service("sleep", "36204", "--name", "fed")
    assert pmon.is_alive(svc["pid"])
    assert [s["name"] for s in pmon.services()] == ["first", "fed"]
