"""pmond may die, be killed or restarted: services stay up and are taken back exactly (issue 3)."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kill_daemon(pmon: Any) -> int:
    pid = pmon.daemon_pid()
    assert pid, "pmond is not running"
    os.kill(pid, signal.SIGKILL)
    pmon.wait_dead(pid)
    return pid


def events(pmon: Any, name: str) -> list[dict]:
    return pmon.json("events", name, "-n", "200", "--json")


def test_sigkill_of_pmond_leaves_20_services_running_and_they_are_readopted(pmon: Any) -> None:
    base = random.randint(100_000, 900_000)
    before = {}
    for i in range(20):
        svc = pmon.start_service("sleep", str(base + i), "--name", f"s{i}")
        before[svc["name"]] = svc["pid"]
    old_daemon = kill_daemon(pmon)

    for name, pid in before.items():
        assert pmon.is_alive(pid), f"{name} died with pmond"
        assert pmon.ppid(pid) == 1, f"{name} has parent {pmon.ppid(pid)}"

    after = {s["name"]: s for s in pmon.services()}  # this call starts pmond again
    assert pmon.daemon_pid() not in (None, old_daemon)
    assert {n: s["pid"] for n, s in after.items()} == before
    assert all(s["restarts"] == 0 and s["status"] == "running" for s in after.values())
    ours = {str(base + i) for i in range(20)}
    sleepers = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                if pmon.is_alive(p) and _cmdline(p)[:2] in (["sleep", n] for n in ours)]
    assert sorted(sleepers) == sorted(before.values()), "duplicates or missing services"
    assert any(e["kind"] == "adopt" for e in events(pmon, "s0"))


def _cmdline(pid: int) -> list[str]:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    return [p.decode(errors="replace") for p in parts if p] + [""]


def test_service_killed_while_pmond_is_down_is_started_again_with_an_event(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "424242", "--name", "victim")
    pmon.run("daemon", "stop")
    os.kill(svc["pid"], signal.SIGKILL)
    pmon.wait_dead(svc["pid"])

    back = pmon.wait_service("victim", lambda s: s["status"] == "running" and s["pid"] != svc["pid"],
                             what="a new process")
    assert pmon.is_alive(back["pid"])
    assert back["restarts"] == 1
    down = [e for e in events(pmon, "victim") if e["kind"] == "exit" and e["data"].get("while_down")]
    assert down and "while pmond was down" in down[-1]["message"]


def test_daemon_stop_and_start_keep_the_same_processes(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "525252", "--name", "steady")
    for _ in range(3):
        pmon.run("daemon", "stop")
        assert pmon.is_alive(svc["pid"])
        again = pmon.desc("steady")
        assert (again["pid"], again["restarts"], again["status"]) == (svc["pid"], 0, "running")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: steering pid allocation")
def test_a_stranger_holding_the_pid_is_neither_adopted_nor_signalled(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "616161", "--name", "reused")
    old = svc["pid"]
    pmon.run("daemon", "stop")
    os.kill(old, signal.SIGKILL)
    # Wait until init has reaped it, so the pid is free for the stranger.
    pmon.wait_for(lambda: not os.path.exists(f"/proc/{old}"), timeout=15, message=f"pid {old} to be reaped")
    stranger = None
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(old - 1))
        proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        if proc.pid == old:
            stranger = proc
            break
        proc.kill()
        proc.wait()
    if stranger is None:
        pytest.skip("could not make the kernel hand out the old pid (busy machine)")
    try:
        back = pmon.wait_service("reused", lambda s: s["status"] == "running", what="a fresh start")
        assert back["pid"] != old, "pmond adopted a stranger"
        pmon.holds(lambda: stranger.poll() is None, 0.5, message="the stranger must not be signalled")
        pmon.run("stop", "reused")
        assert stranger.poll() is None, "stop killed the stranger"
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("source", ["auto", "pidfd", "proc_connector"])
def test_exit_code_and_signal_are_recorded(pmon: Any, source: str) -> None:
    # auto: PIDFD_INFO_EXIT where the kernel has it (6.15+), else the proc connector as root.
    if source != "auto":
        pmon.env["PMON2_EXIT_STATUS"] = source
    pmon.run("daemon", "start")
    used = pmon.json("daemon", "status", "--json")["exit_status_sources"]
    if source != "auto" and used != [source]:
        pytest.skip(f"{source} is not available here (pmond uses {used})")
    pmon.run("run", "--no-autorestart", "--name", "three", "sh", "-c", "sleep 0.2; exit 3")
    three = pmon.wait_service("three", lambda s: (s["last_exit"] or {}).get("code") == 3, what="exit code 3")
    assert three["status"] == "exited"
    assert three["last_exit"]["signal"] is None
    assert three["last_exit"]["source"] in used and (source == "auto" or three["last_exit"]["source"] == source)

    svc = pmon.start_service("sleep", "737373", "--name", "termed")
    os.kill(svc["pid"], signal.SIGTERM)
    termed = pmon.wait_service("termed", lambda s: (s["last_exit"] or {}).get("signal") == "SIGTERM",
                               what="signal SIGTERM")
    assert termed["last_exit"]["code"] is None
    exits = [e for e in events(pmon, "termed") if e["kind"] == "exit"]
    assert exits[-1]["data"]["signal"] == "SIGTERM"


def test_without_any_source_the_exit_is_recorded_as_unknown(pmon: Any) -> None:
    env = dict(pmon.env, PMON2_EXIT_STATUS="none")
    pmon.run("run", "--no-autorestart", "--name", "mystery", "sh", "-c", "sleep 0.2; exit 3", env=env)
    svc = pmon.wait_service("mystery", lambda s: s["status"] == "exited" and s["last_exit"]["source"] == "unknown",
                            what="an unknown exit")
    assert svc["last_exit"]["code"] is None and svc["last_exit"]["signal"] is None
    info = pmon.json("daemon", "status", "--json")
    assert info["exit_status_sources"] == ["unknown"]


def test_why_and_events_explain_a_crash_loop(pmon: Any) -> None:
    pmon.run("run", "--name", "loop", "sh", "-c", "echo 'cannot open config' >&2; exit 2")
    pmon.wait_service("loop", lambda s: s["status"] == "backoff" and s["restarts"] >= 3, what="a crash loop")
    pmon.wait_for(lambda: any(e["data"].get("code") == 2 for e in events(pmon, "loop") if e["kind"] == "exit"),
                  message="an exit event with code 2")
    kinds = {e["kind"] for e in events(pmon, "loop")}
    assert {"start", "exit", "restart", "backoff"} <= kinds
    why = pmon.run("why", "loop").stdout
    assert "keeps dying" in why and "code 2" in why and "cannot open config" in why
    human = pmon.run("events", "loop", "-n", "5").stdout.strip().splitlines()
    assert len(human) == 5


def test_a_corrupt_database_is_reported_and_left_untouched(pmon: Any) -> None:
    pmon.db_path.parent.mkdir(parents=True)
    garbage = b"this is not a database\n" * 100
    pmon.db_path.write_bytes(garbage)
    proc = pmon.run("ls", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "not a database" in proc.stderr and "left untouched" in proc.stderr
    assert pmon.db_path.read_bytes() == garbage


def test_the_database_survives_sigkill_of_pmond_at_any_moment(pmon: Any) -> None:
    pmon.run("run", "--min-uptime", "0", "--name", "churn", "sh", "-c", "exit 1")
    for _ in range(5):
        pmon.wait_for(lambda: pmon.daemon_pid(), message="pmond")
        time.sleep(random.uniform(0.05, 0.3))  # kill it in the middle of its restart churn
        kill_daemon(pmon)
        assert pmon.services()[0]["name"] == "churn"
    pmon.run("stop", "churn")
    db = sqlite3.connect(pmon.db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def test_subreaper_mode_reaps_and_knows_exit_codes(pmon: Any) -> None:
    env = dict(pmon.env, PMON2_EXIT_STATUS="waitpid")
    daemon = subprocess.Popen([sys.executable, "-m", "pmon2.daemon", "--subreaper"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        pmon.wait_for(lambda: pmon.socket.exists() and pmon.daemon_pid() == daemon.pid, message="pmond --subreaper")
        svc = pmon.start_service("sleep", "828282", "--name", "child")
        assert pmon.ppid(svc["pid"]) == daemon.pid  # the nearest subreaper is pmond itself
        pmon.run("run", "--no-autorestart", "--name", "five", "sh", "-c", "sleep 0.1; exit 5")
        five = pmon.wait_service("five", lambda s: (s["last_exit"] or {}).get("code") == 5, what="exit code 5")
        assert five["last_exit"]["source"] == "waitpid"

        def no_zombies() -> bool:
            return not [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                        if pmon.ppid(p) == daemon.pid and pmon.proc_state(p) == "Z"]

        pmon.wait_for(no_zombies, timeout=3, message="pmond to reap the zombies it inherits")
        daemon.terminate()
        daemon.wait(timeout=10)
        assert pmon.is_alive(svc["pid"]), "a service died with pmond --subreaper"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@pytest.mark.slow
def test_no_descriptor_leak_over_1000_crash_restarts() -> None:
    spec = importlib.util.spec_from_file_location("leak", ROOT / "bench" / "leak.py")
    assert spec and spec.loader
    leak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(leak)
    result = leak.run(1000)
    assert result["fds_after"] <= result["fds_before"], result
    assert result["rss_kib_after"] - result["rss_kib_before"] < 2048, result
