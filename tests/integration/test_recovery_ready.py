"""After a SIGKILL of pmond: a service whose readiness check had not passed is `starting` again and checked
again, never `running` on trust (REVIEW12 finding 5; startup_recovery.py). And logs another user left in
pmond's log dir are set aside, never written into by a service of someone else (finding 3; launcher.py).

Real pmonds and real processes through the `pmon` fixture."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a service as nobody")


def kill_daemon(pmon: Any) -> int:
    pid = pmon.daemon_pid()
    assert pid, "pmond is not running"
    os.kill(pid, signal.SIGKILL)
    pmon.wait_dead(pid, what="pmond")
    return pid


def events(pmon: Any, name: str) -> list[dict[str, Any]]:
    return pmon.json("events", name, "-n", "200", "--json")


def run_starting(pmon: Any, *args: str) -> dict[str, Any]:
    """`pmon2 run` of a service with a readiness check: it answers while the check runs."""
    svc = pmon.json("run", "--json", *args)
    assert svc["status"] == "starting" and svc["pid"], svc
    return svc


def test_a_service_still_starting_when_pmond_died_is_checked_again_and_not_restarted(pmon: Any) -> None:
    flag = pmon.work / "flag"
    svc = run_starting(pmon, "--name", "slow", "--ready", f"exec:test -e {flag}", "sleep", "7373101")
    kill_daemon(pmon)
    assert pmon.desc("slow")["status"] == "starting", "its check had not passed: not running on trust"
    flag.touch()
    back = pmon.wait_service("slow", lambda s: s["status"] == "running", what="ready once the flag is there")
    assert back["pid"] == svc["pid"] and back["restarts"] == 0, "adopted, not restarted"
    kinds = [e["kind"] for e in events(pmon, "slow")]
    assert kinds[-2:] == ["adopt", "ready"], kinds
    adopt = next(e for e in events(pmon, "slow") if e["kind"] == "adopt")
    assert "not ready yet" in adopt["message"], adopt["message"]


def test_a_check_that_never_passes_after_the_restart_fails_the_start_within_start_timeout(pmon: Any) -> None:
    f = pmon.work / "pmon2.toml"
    f.write_text(textwrap.dedent("""
        [services.deaf]
        command = "sleep 7373102"
        ready = "exec:false"
        start_timeout = 3
    """))
    pmon.run("daemon", "start")
    applying = subprocess.Popen(pmon.cmd("apply", str(f)), cwd=str(pmon.work), env=pmon.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = pmon.wait_for(lambda: next((s for s in pmon.services() if s["name"] == "deaf" and s["pid"]), None),
                              message="deaf started")
        kill_daemon(pmon)
        applying.wait(timeout=10)
    finally:
        if applying.poll() is None:
            applying.kill()
            applying.wait()
    assert pmon.desc("deaf")["status"] == "starting"
    # What was left of its start_timeout, not 3 s more: killed, and the restart policy starts it again.
    pmon.wait_dead(first["pid"], timeout=6, what="the process that never got ready")
    again = pmon.wait_service("deaf", lambda s: s["pid"] not in (None, first["pid"]), timeout=5,
                              what="started again by its restart policy")
    assert again["status"] == "starting" and again["restarts"] >= 1
    failed = [e["message"] for e in events(pmon, "deaf") if e["kind"] == "start_failed"]
    assert failed and "not ready" in failed[0], failed


def test_a_starting_service_that_died_while_pmond_was_down_is_started_again(pmon: Any) -> None:
    svc = run_starting(pmon, "--name", "gone", "--ready", "exec:false", "sleep", "7373103")
    kill_daemon(pmon)
    os.kill(svc["pid"], signal.SIGKILL)
    pmon.wait_dead(svc["pid"])
    back = pmon.wait_service("gone", lambda s: s["pid"] not in (None, svc["pid"]), what="a new process, "
                             "not `starting` without one")
    assert back["status"] == "starting" and back["restarts"] == 1
    down = [e for e in events(pmon, "gone") if e["kind"] == "exit" and e["data"].get("while_down")]
    assert down, "its death while pmond was down is recorded"


@needs_root
def test_the_log_of_a_deleted_service_of_another_user_is_set_aside_not_written_into(pmon: Any, pub: Path) -> None:
    nob = pmon.start_service("sh", "-c", "echo NOBODY_LINE; exec sleep 7373104", "--name", "api",
                             "--user", "nobody", cwd=pub)
    log = pmon.log_dir / "api-out.log"
    pmon.wait_for(lambda: log.read_bytes() == b"NOBODY_LINE\n", message="nobody's output")
    assert log.stat().st_uid == NOBODY
    pmon.run("del", "api")
    pmon.wait_dead(nob["pid"])
    pmon.start_service("sh", "-c", "echo ROOT_SECRET; exec sleep 7373105", "--name", "api", cwd=pub)
    pmon.wait_for(lambda: log.read_bytes() == b"ROOT_SECRET\n", message="root's output, alone, in a new file")
    assert (log.stat().st_uid, log.stat().st_mode & 0o007) == (0, 0)
    aside = pmon.log_dir / f"api-out.log.uid-{NOBODY}"
    assert aside.read_bytes() == b"NOBODY_LINE\n" and aside.stat().st_uid == NOBODY, "kept, still nobody's"
    shown = pmon.run("log", "api", "-n", "20").stdout
    assert "ROOT_SECRET" in shown and "NOBODY_LINE" not in shown, shown
