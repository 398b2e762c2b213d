"""stop, stop -f, start, restart: signals to the whole group, escalation, one instance at a time."""

from __future__ import annotations

import os
import socket
import time

IGNORE_TERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "w") as fh:
    fh.write(str(os.getpid()))
while True:
    time.sleep(0.1)
"""


def _ready(path):
    return lambda: path.exists() and path.read_text().strip().isdigit()


def test_stop_signals_the_whole_group(pmon):
    svc = pmon.start_service("sh", "-c", "sleep 31101 & wait", "--name", "group")
    shell = svc["pid"]
    # The child: same process group as the service (by design) or, failing that, its child.
    child = pmon.wait_for(lambda: [p for p in pmon.group_members(shell) if p != shell]
                          or pmon.children_of(shell), message="the shell's background sleep")[0]
    assert pmon.ppid(child) == shell
    out = pmon.run("stop", "group").stdout
    assert "group stopped" in out
    pmon.wait_dead(shell, timeout=2.0, what="the service (sh)")
    pmon.wait_dead(child, timeout=2.0, what=f"the service's child (sleep), in group {pmon.pgrp(child)},")
    svc = pmon.desc("group")
    assert svc["status"] == "stopped" and svc["pid"] is None


def test_stop_escalates_to_sigkill_after_kill_timeout(pmon):
    ready = pmon.work / "ready"
    script = pmon.script("stubborn", IGNORE_TERM)
    svc = pmon.start_service(str(script), str(ready), "--name", "stubborn", "--kill-timeout", "1")
    pmon.wait_for(_ready(ready), message="the service to ignore SIGTERM")
    t0 = time.monotonic()
    pmon.run("stop", "stubborn")
    took = time.monotonic() - t0
    assert took >= 1.0, f"stop returned after {took:.2f} s, before the kill timeout"
    assert took < 4.0, f"stop took {took:.2f} s with --kill-timeout 1"
    pmon.wait_dead(svc["pid"], timeout=1.0)
    svc = pmon.wait_service("stubborn", lambda s: (s["last_exit"] or {}).get("signal") == "SIGKILL",
                            what="last_exit.signal == SIGKILL")
    assert svc["status"] == "stopped"
    events = [r["kind"] for r in pmon.db_rows("SELECT kind FROM events WHERE service = 'stubborn' ORDER BY id")]
    assert "kill" in events, events


def test_stop_force_kills_at_once(pmon):
    ready = pmon.work / "ready"
    script = pmon.script("stubborn", IGNORE_TERM)
    svc = pmon.start_service(str(script), str(ready), "--name", "forced")  # default kill timeout 5 s
    pmon.wait_for(_ready(ready), message="the service to ignore SIGTERM")
    t0 = time.monotonic()
    pmon.run("stop", "-f", "forced")
    took = time.monotonic() - t0
    assert took < 2.0, f"stop -f took {took:.2f} s"
    assert not pmon.is_alive(svc["pid"])
    pmon.wait_service("forced", lambda s: (s["last_exit"] or {}).get("signal") == "SIGKILL",
                      what="last_exit.signal == SIGKILL")


def test_stopped_service_stays_stopped_and_start_brings_it_back(pmon):
    old = pmon.start_service("sleep", "31102", "--name", "toggle")["pid"]
    pmon.run("stop", "toggle")
    assert not pmon.is_alive(old)
    svc = pmon.desc("toggle")
    assert (svc["status"], svc["desired"], svc["pid"]) == ("stopped", "stopped", None)
    pmon.holds(lambda: pmon.services()[0]["status"] == "stopped", 0.5, message="a stopped service stays stopped")
    out = pmon.run("start", "toggle").stdout
    svc = pmon.desc("toggle")
    assert (svc["status"], svc["desired"]) == ("running", "running")
    assert svc["pid"] not in (None, old) and pmon.is_alive(svc["pid"])
    assert f"pid {svc['pid']}" in out
    assert svc["restarts"] == 0  # a start after a stop is not a restart


def test_stop_signal_option_is_used(pmon):
    got = pmon.work / "got"
    script = pmon.script("intsvc", f"""
        import signal, sys, time
        def on(sig, _):
            open({str(got)!r}, "w").write(signal.Signals(sig).name)
            sys.exit(0)
        signal.signal(signal.SIGINT, on)
        signal.signal(signal.SIGTERM, on)
        open({str(got)!r} + ".ready", "w").close()
        while True:
            time.sleep(0.1)
        """)
    pmon.start_service(str(script), "--name", "intsvc", "--stop-signal", "INT")
    pmon.wait_for(lambda: (pmon.work / "got.ready").exists(), message="handlers installed")
    pmon.run("stop", "intsvc")
    assert got.read_text() == "SIGINT"


PORT_SERVICE = """
import errno, os, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_REUSEADDR on purpose
try:
    s.bind(("127.0.0.1", port))
except OSError as exc:
    if exc.errno == errno.EADDRINUSE:
        sys.stderr.write(f"{os.getpid()}: port {port}: address already in use\\n")
        sys.stderr.flush()
        sys.exit(1)
    raise
s.listen(8)
print(f"listening {os.getpid()}", flush=True)
while True:
    time.sleep(1)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_restart_never_runs_two_instances(pmon):
    port = _free_port()
    script = pmon.script("portsvc", PORT_SERVICE)
    svc = pmon.start_service(str(script), str(port), "--name", "port")
    out_log, err_log = svc["out_log"], svc["err_log"]

    def listening(pid):
        return lambda: f"listening {pid}" in open(out_log).read()

    pmon.wait_for(listening(svc["pid"]), message="the first instance to listen")
    pids = [svc["pid"]]
    for i in range(1, 4):
        out = pmon.run("restart", "port").stdout
        assert "restarted" in out
        assert not pmon.is_alive(pids[-1]), "restart returned while the old process still runs"
        svc = pmon.desc("port")
        assert svc["status"] == "running" and svc["restarts"] == i, svc
        assert svc["pid"] not in pids
        pids.append(svc["pid"])
        pmon.wait_for(listening(svc["pid"]), message=f"instance {i} to listen")
        err = open(err_log).read() if os.path.exists(err_log) else ""
        assert "in use" not in err, f"two instances overlapped: {err}"
    svc = pmon.desc("port")
    assert svc["status"] == "running" and svc["restarts"] == 3 and svc["pid"] == pids[-1]


def test_restart_of_a_stopped_service_starts_it(pmon):
    pmon.start_service("sleep", "31103", "--name", "cold")
    pmon.run("stop", "cold")
    pmon.run("restart", "cold")
    svc = pmon.desc("cold")
    assert svc["status"] == "running" and pmon.is_alive(svc["pid"])
