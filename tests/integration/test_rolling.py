"""Issue 13, part 5: `reload` and `restart` roll the instances of a group (rolling.py).

- 4 instances of a small Python HTTP server on one socket that pmond holds (`--listen`), a client loop
  hammering it during `pmon2 reload web`: no failed request, no refused connection, every instance
  replaced (new pids), each counted one restart;
- a broken new version (argv updated to a program that never becomes ready) stops the roll at its first
  instance, with the reason, a non-zero exit and a "roll" event; the old instances keep serving;
- instances on ports of their own (`--port`) roll stop-then-start, one at a time.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pmon2.client import Client
from pmon2.paths import resolve
from procs import free_port

# A threaded HTTP server that answers its pid. Its socket: fd 3 from pmond (LISTEN_FDS), else its own,
# bound with SO_REUSEPORT on argv[1]. It boots in BOOT_DELAY s, then says READY=1 when it has a
# NOTIFY_SOCKET; on SIGTERM it stops accepting, finishes the requests under way and exits (what every
# graceful server does; a bare Python process would die at once and drop them).
SERVER = """
import os, signal, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.005)
        body = f"{os.getpid()}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close waits for the requests under way
    request_queue_size = 512

if os.environ.get("LISTEN_FDS") and os.environ.get("LISTEN_PID") == str(os.getpid()):
    sock = socket.socket(fileno=3)
else:
    port = int(os.environ.get("PORT") or sys.argv[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not os.environ.get("PORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = sock
time.sleep(float(os.environ.get("BOOT_DELAY", "0.2")))

def notify(message):
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.connect("\\0" + path[1:] if path.startswith("@") else path)
        s.send(message.encode())
        s.close()

signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
notify("READY=1")
server.serve_forever(poll_interval=0.02)
server.server_close()
"""


class Load:
    """Client threads that each send GET / on a new connection, back to back, and count what fails."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(threads)]

    def one(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/")
            answer = conn.getresponse()
            body = answer.read()
            if answer.status != 200:
                raise OSError(f"HTTP {answer.status}")
            with self.lock:
                self.ok += 1
                self.pids.add(int(body))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            with self.lock:
                self.failures.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    def loop(self) -> None:
        while not self.stop.is_set():
            self.one()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)

    def served(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` more requests have been answered."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"the load made no progress: {self.ok} ok, {self.failures[:5]}"
            time.sleep(0.01)


def group(pmon: Any, name: str) -> list[dict[str, Any]]:
    return sorted((s for s in pmon.services() if s["instance_of"] == name), key=lambda s: s["instance"])


def events(pmon: Any, service: str, kind: str) -> list[str]:
    return [r["message"] for r in pmon.db_rows("SELECT message FROM events WHERE service = ? AND kind = ? "
                                                "ORDER BY id", (service, kind))]


@pytest.fixture(params=["shared", "reuseport"])
def web(pmon: Any, request: pytest.FixtureRequest) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """4 instances of SERVER, ready by sd_notify, on one socket pmond holds, or (reuseport) on one
    SO_REUSEPORT socket each that pmond holds, which an instance's new process shares: (port, the instances)."""
    port = free_port()
    script = pmon.script("server.py", SERVER)
    extra = ["--reuseport"] if request.param == "reuseport" else []
    pmon.run("run", "--instances", "4", "--listen", f"tcp://127.0.0.1:{port}", *extra, "--ready", "notify",
             "--kill-timeout", "10", "--name", "web", str(script))
    instances = pmon.wait_for(lambda: (g := group(pmon, "web")) and all(s["status"] == "running" for s in g) and g,
                              timeout=20, message="4 instances running")
    assert len(instances) == 4
    yield port, instances


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rolling_reload_of_4_instances_under_load_loses_no_request(pmon: Any, web: Any) -> None:
    port, before = web
    with Load(port) as load:
        load.served(50)
        t0 = time.monotonic()
        out = pmon.run("reload", "web", timeout=90)
        took = time.monotonic() - t0
        load.served(50)
    after = group(pmon, "web")
    assert load.failures == [], f"{len(load.failures)} failed of {load.ok + len(load.failures)}: {load.failures[:10]}"
    old, new = {s["pid"] for s in before}, {s["pid"] for s in after}
    assert not old & new, f"not every instance was replaced: before {old}, after {new}"
    assert all(s["status"] == "running" and pmon.is_alive(s["pid"]) for s in after), after
    assert all(not pmon.is_alive(p) for p in old), "an old process still runs"
    assert [s["restarts"] for s in after] == [1, 1, 1, 1], "a roll counts one restart per instance"
    for s in before:
        assert f"{s['name']} replaced (pid {s['pid']} -> pid " in out.stdout, out.stdout
    # one at a time: each instance's new process started after the previous instance's was handed over
    starts = pmon.db_rows("SELECT service, at, message FROM events WHERE kind = 'roll' AND message LIKE "
                          "'started process%' ORDER BY id")
    assert [r["service"] for r in starts] == ["web:0", "web:1", "web:2", "web:3"]
    assert load.ok > 100 and new <= load.pids | new, (load.ok, took)
    print(f"rolling reload of 4 instances: {took:.2f} s, {load.ok} requests, 0 failed")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_broken_new_version_stops_the_roll_and_the_old_instances_keep_serving(pmon: Any, web: Any) -> None:
    port, before = web
    # The new version never says READY=1; it may take 3 s to.
    api(pmon).request("POST", "/v1/services/web/update", {"fields": {"argv": ["sleep", "1000"], "start_timeout": 3}})
    with Load(port) as load:
        load.served(30)
        t0 = time.monotonic()
        out = pmon.run("reload", "web", check=False, timeout=90)
        took = time.monotonic() - t0
        load.served(30)
    assert out.returncode == 1, out
    assert "pmon2: web:0: new process " in out.stderr and "no READY=1" in out.stderr, out.stderr
    assert "keeps serving" in out.stderr, out.stderr
    for later in ("web:1", "web:2", "web:3"):
        assert f"pmon2: {later}: not replaced, it keeps its process: the roll stopped at web:0 (new process " \
            in out.stderr, out.stderr
    assert 3 <= took < 20, took
    after = group(pmon, "web")
    assert [s["pid"] for s in after] == [s["pid"] for s in before], "an old instance was replaced"
    assert all(s["status"] == "running" and s["restarts"] == 0 for s in after), after
    assert load.failures == [], load.failures[:10]
    assert {s["pid"] for s in after} <= load.pids, "an old instance stopped serving"
    stopped = [m for m in events(pmon, "web:0", "roll") if m.startswith("roll stopped: ")]
    assert len(stopped) == 1 and "no READY=1" in stopped[0], events(pmon, "web:0", "roll")
    # the broken process is gone: nothing of the service runs but its 4 old processes
    marked = {p for p in all_pids() if pmon.is_alive(p) and has_marker(p, pmon.service_marker())}
    assert marked == {s["pid"] for s in after}, marked


@pytest.mark.timeout(120)
def test_instances_on_ports_of_their_own_roll_stop_then_start(pmon: Any) -> None:
    """No shared socket: a new process could not bind the port its predecessor holds, so each instance
    is stopped, started and waited ready before the next one stops (the group runs one short)."""
    base = free_port()
    while any(not port_free(base + i) for i in range(2)):
        base = free_port()
    script = pmon.script("server.py", SERVER)
    pmon.run("run", "--instances", "2", "--port", str(base), "--min-uptime", "0.3", "--name", "pp", str(script))
    before = pmon.wait_for(lambda: (g := group(pmon, "pp")) and all(s["status"] == "running" for s in g) and g,
                           timeout=20, message="2 instances running")
    out = pmon.run("restart", "pp", timeout=60)
    after = group(pmon, "pp")
    assert all(s["status"] == "running" for s in after) and [s["restarts"] for s in after] == [1, 1], after
    assert not {s["pid"] for s in before} & {s["pid"] for s in after}
    assert "pp:0 restarted" in out.stdout and "pp:1 restarted" in out.stdout
    # one at a time: pp:1 was stopped only after pp:0 had started again
    rows = pmon.db_rows("SELECT id, service, kind FROM events WHERE service LIKE 'pp:%' AND kind IN "
                        "('stop', 'restart') ORDER BY id")
    order = [(r["service"], r["kind"]) for r in rows]
    assert order[-4:] == [("pp:0", "stop"), ("pp:0", "restart"), ("pp:1", "stop"), ("pp:1", "restart")], order
    # no readiness declared: a new process must stay up min_uptime, or the roll stops
    api(pmon).request("POST", "/v1/services/pp/update", {"fields": {"argv": ["sh", "-c", "exit 3"]}})
    out = pmon.run("restart", "pp", check=False, timeout=60)
    assert out.returncode == 1 and "pmon2: pp:0: new process " in out.stderr and "min_uptime" in out.stderr, out
    assert "pp:1: not replaced, it keeps its process: the roll stopped at pp:0 (" in out.stderr, out.stderr
    assert pmon.desc("pp:1")["pid"] == after[1]["pid"], "pp:1 was to keep serving"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def has_marker(pid: int, marker: bytes) -> bool:
    try:
        return any(e.startswith(marker) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False


def api(pmon: Any) -> Client:
    if not pmon.socket.exists():
        pmon.run("daemon", "start")
    return Client(resolve({"PMON2_HOME": str(pmon.home)}))


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_old_process_that_crashes_while_its_replacement_gets_ready_leaves_one_process(pmon: Any) -> None:
    """The crash starts the restart policy (a new launch waits for the service's lock); the roll then hands
    over to its ready process, and the policy's launch is dropped: one process, running, no backoff."""
    pmon.run("run", "--instances", "2", "--min-uptime", "1.5", "--name", "w", "sleep", "100000")
    before = pmon.wait_for(lambda: (g := group(pmon, "w")) and all(s["status"] == "running" for s in g) and g,
                           timeout=10)
    reload = subprocess.Popen(pmon.cmd("reload", "w"), cwd=pmon.work, env=pmon.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        started = pmon.wait_for(lambda: [m for m in events(pmon, "w:0", "roll") if m.startswith("started process")],
                                timeout=10, message="the roll's new process of w:0")
        new = int(started[0].split()[2])
        os.kill(before[0]["pid"], signal.SIGKILL)
        out, err = reload.communicate(timeout=30)
        assert "w:0 replaced" in out, out
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.wait()
    assert reload.returncode == 0, err
    w0 = pmon.desc("w:0")
    assert w0["pid"] == new and w0["status"] == "running" and pmon.is_alive(new), w0
    marked = {p for p in all_pids() if pmon.is_alive(p) and has_marker(p, pmon.service_marker())}
    assert marked == {s["pid"] for s in group(pmon, "w")}, "one process per instance"
    pmon.holds(lambda: pmon.desc("w:0")["pid"] == new, 1.0, message="w:0 kept its new process")


@pytest.mark.timeout(60)
def test_restart_rolls_in_batches_of_rolling_batch(pmon: Any) -> None:
    """Workers (no port) roll start-first too; `--rolling-batch 2` replaces two at a time, in order."""
    pmon.run("run", "--instances", "4", "--rolling-batch", "2", "--min-uptime", "0.5", "--name", "b",
             "sleep", "100000")
    before = pmon.wait_for(lambda: (g := group(pmon, "b")) and all(s["status"] == "running" for s in g) and g,
                           timeout=10)
    assert pmon.desc("b:0")["rolling_batch"] == 2
    out = pmon.run("restart", "b", timeout=30)
    after = group(pmon, "b")
    assert all(f"{s['name']} restarted (pid {s['pid']})" in out.stdout for s in after), out.stdout
    assert not {s["pid"] for s in before} & {s["pid"] for s in after}
    assert [s["restarts"] for s in after] == [1, 1, 1, 1]
    rows = pmon.db_rows("SELECT service, message FROM events WHERE kind = 'roll' AND (message LIKE 'started%' "
                        "OR message LIKE '%replaces%') ORDER BY id")
    steps = [(r["service"], r["message"].split()[0]) for r in rows]
    third = steps.index(("b:2", "started"))
    freed = min(steps.index(("b:0", "process")), steps.index(("b:1", "process")))  # "process N replaces ..."
    assert {steps[0], steps[1]} == {("b:0", "started"), ("b:1", "started")}, steps
    assert third > freed, f"b:2 started before a slot of the first batch was free: {steps}"


# On USR2 it forks a copy of itself that stays in its process group (no setsid, as Go's grace without
# Setsid, unicorn, puma) and exits: the copy, a follower of the group that leads none, becomes the main.
REEXEC = """
import os, signal, time
def again(*_):
    if os.fork():
        os._exit(0)
signal.signal(signal.SIGUSR2, again)
while True:
    time.sleep(1)
"""


@pytest.mark.timeout(60)
def test_a_roll_stops_an_old_main_that_leads_no_group(pmon: Any) -> None:
    """After a handover to a process in its predecessor's group, a rolling restart must stop that process:
    a signal to the group it does not lead (through its own pidfd) reaches nobody."""
    port = free_port()
    script = pmon.script("reexec.py", REEXEC)
    pmon.run("run", "--listen", f"tcp://127.0.0.1:{port}", "--min-uptime", "0.3", "--kill-timeout", "2",
             "--name", "rx", str(script))
    first = pmon.wait_service("rx", lambda s: s["status"] == "running" and s["pid"])
    pmon.run("reload", "rx", "--sig", "USR2", "--wait")
    follower = pmon.desc("rx")["pid"]
    assert follower != first["pid"] and os.getpgid(follower) == first["pid"], "the copy stays in the old group"
    t0 = time.monotonic()
    out = pmon.run("restart", "rx", timeout=30)
    took = time.monotonic() - t0
    assert "rx restarted" in out.stdout, out.stdout
    pmon.wait_dead(follower, timeout=3, what="the old main, replaced by the roll")
    assert took < 2.0 + 1.0, f"the roll waited {took:.1f} s: its SIGTERM reached nobody"
    assert not [m for m in events(pmon, "rx", "kill")], "no SIGKILL was needed"
    assert f"sending SIGTERM to process group {first['pid']} (replaced by a rolling restart)" in events(
        pmon, "rx", "roll")


@pytest.mark.timeout(60)
def test_reload_wait_of_a_roll_reports_the_roll_not_an_older_handover(pmon: Any) -> None:
    """`reload --wait` of a service that rolls: the answer is the roll's (rolled, replaced_pid); the outcome
    of an earlier reload window (a signal's handover) is not this reload's and is not reported."""
    port = free_port()
    script = pmon.script("reexec.py", REEXEC)
    pmon.run("run", "--listen", f"tcp://127.0.0.1:{port}", "--min-uptime", "0.3", "--name", "rw", str(script))
    pmon.wait_service("rw", lambda s: s["status"] == "running" and s["pid"])
    pmon.run("reload", "rw", "--sig", "USR2", "--wait")  # a window, and its handover
    before = pmon.desc("rw")["pid"]
    answer = api(pmon).request("POST", "/v1/services/rw/reload", {"wait": True})
    assert answer["rolled"] == "surge" and answer["replaced_pid"] == before, answer
    assert "handover" not in answer, answer


def test_events_and_why_take_the_name_of_an_instance_group(pmon: Any) -> None:
    """`events web` and `why web` for web:0..1, as `ls` and `reload` take the group's name."""
    pmon.run("run", "--instances", "2", "--name", "grp", "sleep", "600")
    pmon.wait_for(lambda: (g := group(pmon, "grp")) and all(s["status"] == "running" for s in g) and g,
                  timeout=10, message="2 instances running")
    events = pmon.json("events", "grp", "--json")
    assert {e["service"] for e in events} == {"grp:0", "grp:1"}, events
    assert [e["id"] for e in events] == sorted(e["id"] for e in events), "oldest first, as for one service"
    assert len(pmon.json("events", "grp", "--json", "-n", "1")) == 1
    why = pmon.run("why", "grp").stdout
    assert "grp:0 is running" in why and "grp:1 is running" in why, why
    missing = pmon.run("events", "nogroup", check=False)
    assert missing.returncode != 0 and "no service 'nogroup'" in missing.stderr, missing.stderr


# Says READY=1 with its pid in STATUS=; on SIGTERM it says STOPPING=1 (as uvicorn's lifespan shutdown, with
# a STATUS= of its own), drains for a while, says a last word and exits at once, so that pmond reads that one
# while the process exits (its environment, marker and all, may then be gone already).
STOPPING = """
import os, signal, socket, time
def notify(text):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), os.environ["NOTIFY_SOCKET"])
def stop(*_):
    notify(f"STOPPING=1\\nSTATUS=process {os.getpid()} stopping")
    time.sleep(0.3)
    notify(f"STATUS=process {os.getpid()} exiting")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
notify(f"READY=1\\nSTATUS=process {os.getpid()} serving")
while True:
    signal.pause()
"""


@pytest.mark.timeout(60)
def test_the_stopping_1_of_a_rolled_out_instance_is_no_refusal_and_not_the_services_word(pmon: Any) -> None:
    """A roll's old process says STOPPING=1 as it stops: legitimate (a process of the service), so no `notify`
    refusal, and no longer the service's word: `desc` shows the new process's STATUS=, not stopping."""
    port = free_port()
    script = pmon.script("stopping.py", STOPPING)
    pmon.run("run", "--listen", f"tcp://127.0.0.1:{port}", "--ready", "notify", "--name", "st", str(script))
    pids = [pmon.wait_service("st", lambda s: s["status"] == "running" and s["pid"])["pid"]]
    for _ in range(3):
        out = pmon.run("reload", "st", timeout=30)
        assert "st replaced" in out.stdout, out.stdout
        pids.append(pmon.desc("st")["pid"])
        pmon.wait_dead(pids[-2], 10, what="the rolled-out process")
    assert len(set(pids)) == 4
    pmon.holds(lambda: not pmon.desc("st")["notify"]["stopping"], 0.5, message="the new process is not stopping")
    view = pmon.desc("st")
    assert view["status_text"] == f"process {pids[-1]} serving" and view["status"] == "running", view
    assert events(pmon, "st", "notify") == [], "no refusal of the old processes' STOPPING=1"
