"""A service's life: detached start, instant restart after a kill, backoff of a crash loop."""

from __future__ import annotations

import itertools
import os
import signal
import time


def test_service_is_detached_from_pmond_and_the_cli(pmon):
    svc = pmon.start_service("sleep", "31001", "--name", "detached")
    daemon = pmon.daemon_pid()
    assert daemon and pmon.is_alive(daemon)
    parent = pmon.ppid(svc["pid"])
    assert parent != daemon, "the service is a child of pmond: a pmond crash would take it along"
    assert parent == 1, f"PPID of the service is {parent}, not 1"
    assert svc["argv"] == ["sleep", "31001"]


def test_service_leads_its_own_process_group(pmon):
    # `stop` signals the group whose id is the service's pid; that group must exist.
    svc = pmon.start_service("sleep", "31002", "--name", "leader")
    pid = svc["pid"]
    assert pmon.pgrp(pid) == pid, (f"service {pid} is in process group {pmon.pgrp(pid)}, not its own: "
                                   "killpg(pid) cannot reach its children")


def test_sigkill_restarts_at_once_and_records_the_signal(pmon):
    old = pmon.start_service("sleep", "31003", "--name", "killme")["pid"]
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    svc = pmon.wait_service("killme", lambda s: s["pid"] not in (None, old) and s["status"] == "running",
                            timeout=1.0, what="a new running pid within 1 s")
    assert time.monotonic() - t0 < 1.5
    assert pmon.is_alive(svc["pid"])
    assert svc["restarts"] == 1
    svc = pmon.wait_service("killme", lambda s: (s["last_exit"] or {}).get("signal") == "SIGKILL",
                            timeout=5.0, what="last_exit.signal == SIGKILL")
    assert svc["last_exit"]["code"] is None
    assert svc["pid"] != old and svc["restarts"] == 1


def test_crash_loop_backs_off_with_growing_gaps(pmon):
    pmon.run("run", "sh", "-c", "exit 3", "--name", "crasher", check=False)
    # Five starts take 0.1 + 0.2 + 0.4 + 0.8 s of backoff.
    pmon.wait_for(lambda: len(pmon.start_times("crasher")) >= 5, timeout=8.0,
                  message="five starts of the crashing service")
    t0 = time.monotonic()
    pmon.services()
    assert time.monotonic() - t0 < 2.0, "pmond answers slowly while a service crash-loops"
    pmon.wait_service("crasher", lambda s: (s["last_exit"] or {}).get("code") == 3, what="last_exit.code == 3")
    svc = pmon.wait_service("crasher", lambda s: s["status"] == "backoff", what="status backoff")
    assert svc["fast_exits"] >= 4 and svc["retry_at"] is not None

    times = pmon.start_times("crasher")[:5]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for k, gap in enumerate(gaps):
        expected = 0.1 * 2**k
        assert gap >= expected * 0.9, f"gap {k} is {gap:.3f} s, backoff says at least {expected:g} s: {gaps}"
    assert all(b > a for a, b in itertools.pairwise(gaps)), f"gaps do not grow: {gaps}"
    assert gaps[-1] < 3.0, f"backoff far above plan: {gaps}"
    assert pmon.services()[0]["restarts"] >= 4


def test_no_autorestart_leaves_an_exited_service(pmon):
    pmon.run("run", "sh", "-c", "exit 5", "--name", "once", "--no-autorestart", check=False)
    svc = pmon.wait_service("once", lambda s: s["status"] == "exited", what="status exited")
    assert svc["restarts"] == 0 and svc["pid"] is None
    pmon.holds(lambda: len(pmon.start_times("once")) == 1, 0.5, message="started only once")
    svc = pmon.wait_service("once", lambda s: (s["last_exit"] or {}).get("code") == 5, what="exit code 5")


def test_two_services_from_one_binary(pmon):
    a = pmon.start_service("sleep", "31004", "--name", "one")
    b = pmon.start_service("sleep", "31004", "--name", "two")
    assert a["pid"] != b["pid"]
    listed = {s["name"]: s for s in pmon.services()}
    assert set(listed) == {"one", "two"}
    assert all(s["status"] == "running" and pmon.is_alive(s["pid"]) for s in listed.values())


def test_same_name_twice_is_refused_and_changes_nothing(pmon):
    pmon.start_service("sleep", "31005")  # named "sleep" after its command
    volatile = ("uptime_s", "cpu_percent", "mem_bytes", "retry_in_s")

    def stable() -> list[dict]:
        return [{k: v for k, v in s.items() if k not in volatile} for s in pmon.services()]

    before = stable()
    proc = pmon.run("run", "sleep", "31006", check=False)
    assert proc.returncode == 1
    assert "--name" in proc.stderr, proc.stderr
    assert proc.stderr.startswith("pmon2: ") and proc.stderr.count("\n") == 1
    assert stable() == before


def test_delete_stops_and_forgets(pmon):
    pid = pmon.start_service("sleep", "31007", "--name", "gone")["pid"]
    out = pmon.run("del", "gone").stdout
    assert "deleted gone" in out
    pmon.wait_dead(pid, timeout=2.0)
    assert pmon.services() == []
    assert pmon.run("desc", "gone", check=False).returncode == 1
