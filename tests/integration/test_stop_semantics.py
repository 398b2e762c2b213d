"""Issue 10: stops give the whole group its grace (systemd's KillMode=control-group), `stop -f` and
`del -f` cut a graceful stop short, `reload` during a stop is refused at once, and the clean-up of a
crashed service never signals a stranger who took its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest

WORKER = """
import signal, sys, time
out = sys.argv[1]
def term(*_):
    open(out, "a").write("term\\n")
    time.sleep(1.0)  # a worker finishing its job: needs its grace time
    open(out, "a").write("finished\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
open(out, "a").write("ready\\n")
while True:
    time.sleep(0.1)
"""

STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(0.1)
"""


def test_stop_gives_the_children_of_a_shell_their_grace(pmon: Any) -> None:
    worker = pmon.script("worker.py", WORKER)
    out = pmon.work / "worker.out"
    # The shell dies at once on SIGTERM; its worker needs 1 s to finish.
    svc = pmon.start_service("sh", "-c", f"{worker} {out} & wait", "--name", "shell", "--kill-timeout", "8",
                             "--json")
    pmon.wait_for(lambda: out.exists() and "ready" in out.read_text(), message="the worker to be ready")
    began = time.monotonic()
    pmon.run("stop", "shell")
    took = time.monotonic() - began
    assert out.read_text().splitlines() == ["ready", "term", "finished"], "the worker got no grace"
    assert 0.9 <= took < 6.0, f"stop took {took:.2f} s: it must wait for the group, and not for the timeout"
    assert not pmon.group_members(svc["pid"])
    kinds = [e["kind"] for e in pmon.json("events", "shell", "--json")]
    assert "kill" not in kinds


def test_restart_and_del_give_the_group_its_grace_too(pmon: Any) -> None:
    worker = pmon.script("worker.py", WORKER)
    out = pmon.work / "worker.out"
    pmon.start_service("sh", "-c", f"{worker} {out} & wait", "--name", "shell2", "--kill-timeout", "8")
    pmon.wait_for(lambda: out.exists() and "ready" in out.read_text(), message="the worker to be ready")
    pmon.run("restart", "shell2")
    assert out.read_text().splitlines()[:3] == ["ready", "term", "finished"]
    pmon.wait_for(lambda: out.read_text().count("ready") == 2, message="the restarted worker")
    pmon.run("del", "shell2")
    assert out.read_text().count("finished") == 2


def test_stop_f_and_del_f_cut_a_graceful_stop_short(pmon: Any) -> None:
    ready = pmon.work / "ready"
    script = pmon.script("stubborn.py", STUBBORN)
    svc = pmon.start_service(str(script), str(ready), "--name", "slow", "--kill-timeout", "60")
    pmon.wait_for(ready.exists, message="the service to be ready")
    graceful = subprocess.Popen(pmon.cmd("stop", "slow"), env=pmon.env, cwd=pmon.work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pmon.wait_service("slow", lambda s: s["status"] == "stopping", what="stopping")
        # reload is refused at once, naming the status
        began = time.monotonic()
        refused = pmon.run("reload", "slow", check=False)
        assert refused.returncode != 0 and "stopping" in refused.stderr
        assert time.monotonic() - began < 2.0
        began = time.monotonic()
        pmon.run("stop", "-f", "slow")
        assert time.monotonic() - began < 3.0, "stop -f waited behind the graceful stop"
        assert graceful.wait(timeout=5) == 0
        assert not pmon.is_alive(svc["pid"])
        kills = [e for e in pmon.json("events", "slow", "--json") if e["kind"] == "kill"]
        assert kills and "stop -f" in kills[-1]["message"]
    finally:
        if graceful.poll() is None:
            graceful.kill()
        graceful.wait()
    # del -f the same way
    ready.unlink()
    pmon.run("start", "slow")
    pmon.wait_for(ready.exists, message="the service to be ready again")
    graceful = subprocess.Popen(pmon.cmd("del", "slow"), env=pmon.env, cwd=pmon.work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pmon.wait_service("slow", lambda s: s["status"] == "stopping", what="stopping")
        began = time.monotonic()
        forced = pmon.run("del", "-f", "slow", check=False)
        assert time.monotonic() - began < 3.0
        # One of the two deletes wins; the other finds the service gone.
        assert graceful.wait(timeout=5) == 0 or forced.returncode == 0
        assert pmon.services() == []
    finally:
        if graceful.poll() is None:
            graceful.kill()
        graceful.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: steering pid allocation")
def test_crash_clean_up_after_a_stall_never_reaches_a_stranger(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "626262", "--name", "victim")
    old = svc["pid"]
    daemon = pmon.daemon_pid()
    assert daemon
    os.kill(daemon, signal.SIGSTOP)
    stranger = None
    try:
        os.kill(old, signal.SIGKILL)
        pmon.wait_for(lambda: not os.path.exists(f"/proc/{old}"), timeout=15, message=f"pid {old} to be reaped")
        for _ in range(200):
            with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
                fh.write(str(old - 1))
            proc = subprocess.Popen(["sleep", "1000"], process_group=0)  # a new group led by the old pid
            if proc.pid == old:
                stranger = proc
                break
            proc.kill()
            proc.wait()
    finally:
        os.kill(daemon, signal.SIGCONT)
    if stranger is None:
        pytest.skip("could not make the kernel hand out the old pid (busy machine)")
    try:
        pmon.wait_service("victim", lambda s: s["restarts"] == 1 and s["status"] == "running",
                          what="the restart after the crash")
        pmon.holds(lambda: stranger.poll() is None, 0.5, message="the stranger must not be signalled")
    finally:
        stranger.kill()
        stranger.wait()
