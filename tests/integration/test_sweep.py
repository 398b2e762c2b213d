"""Processes of a service outside its main's process group (daemon/sweep.py): a crash kills them in the
background (never the new process nor its children), a stop stops them; a stranger of another uid that
carries the service's marker is never signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from procs import is_alive, session

Pmon = Any  # tests/conftest.py's helper (the `pmon` fixture)

pytestmark = pytest.mark.timeout(60)
PY = sys.executable

# Each run forks a child that leaves the group (setsid) and writes its pid to <dir>/child.<main pid>;
# the main exits 3 once <dir>/crash exists (removed by it, so only one run crashes per file).
DETACHES = r"""
import os, sys, time
d = sys.argv[1]
child = os.fork()
if child == 0:
    os.setsid()
    while True:
        time.sleep(1)
with open(os.path.join(d, ".tmp"), "w") as f:
    f.write(str(child))
os.rename(os.path.join(d, ".tmp"), os.path.join(d, f"child.{os.getpid()}"))
while True:
    try:
        os.unlink(os.path.join(d, "crash"))
        sys.exit(3)
    except FileNotFoundError:
        time.sleep(0.02)
"""


def child_of(pmon: Pmon, d: Path, main: int) -> int:
    path = d / f"child.{main}"
    return int(pmon.wait_for(lambda: path.exists() and path.read_text(), 10, message=str(path)))


def test_a_crash_kills_the_detached_child_of_the_old_run_and_spares_the_new_runs(pmon: Pmon) -> None:
    d = pmon.work / "det"
    d.mkdir()
    script = pmon.script("detaches.py", DETACHES)
    svc = pmon.start_service("--name", "det", "--min-uptime", "0.2", PY, str(script), str(d))
    first = child_of(pmon, d, svc["pid"])
    assert session(first) == first  # it left the main's group and session
    (d / "crash").touch()
    new = pmon.wait_service("det", lambda s: s["pid"] not in (None, svc["pid"]) and s["status"] == "running", 10,
                            what="restarted after the crash")
    second = child_of(pmon, d, new["pid"])
    pmon.wait_dead(first, 5, what="the detached child of the crashed run")
    pmon.holds(lambda: is_alive(second) and is_alive(new["pid"]), 1.0,
               message="the new run's processes spared by the sweep after the crash")
    kills = [e["message"] for e in pmon.json("events", "det", "-n", "50", "--json") if e["kind"] == "kill"]
    assert any(str(first) in m for m in kills), kills
    pmon.run("stop", "det")
    pmon.wait_dead(second, 3, what="the detached child of the stopped run")


def test_a_stop_spares_a_process_of_another_uid_carrying_the_services_marker(pmon: Pmon) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the stranger runs as nobody")
    svc = pmon.start_service("--name", "s", "sleep", "600")
    forged = pmon.service_marker().decode().split("=", 1)[1] + str(svc["id"])
    other = subprocess.Popen(["sleep", "600"], user=65534, group=65534, extra_groups=[], start_new_session=True,
                             env={"PMON2_SERVICE": forged}, cwd="/")
    try:
        pmon.run("stop", "s")
        pmon.run("restart", "s")
        pmon.run("stop", "s")
        assert other.poll() is None and is_alive(other.pid), "pmond signalled another user's process"
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait()
