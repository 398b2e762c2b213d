"""REVIEW13: zero-downtime reload broken on purpose, as a newcomer would (follow.py, notify.py, sockets.py,
rolling.py).

Tests marked xfail(strict=True) show a bug of today's code (each reason says which); the others prove a
property that held under the same attack. Every process here is real; strangers are detached Python
processes of the test's own uid started with a clean environment (no PMON2_SERVICE marker), whose parent
is init: exactly what a Python daemon of the same user looks like to pmond.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import all_pids, free_port, has_env_marker, is_alive, ppid

from .peer import request_as

Pmon = Any  # tests/conftest.py's helper (the `pmon` fixture)

pytestmark = pytest.mark.timeout(60)
PY = sys.executable

# A detached Python process of this uid, unrelated to any service: double fork, setsid, no environment.
STRANGER = r"""
import os, sys
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)"], {})
    os._exit(0)
os.close(w)
print(os.read(r, 32).decode())
"""


@pytest.fixture
def strangers() -> Iterator[list[int]]:
    """Pids of the strangers a test started: killed (by pid) at its end, whatever pmond did to them."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def stranger(pmon: Pmon, pids: list[int]) -> int:
    out = subprocess.run([PY, "-c", STRANGER], capture_output=True, text=True, timeout=10, env={}, check=True)
    pid = int(out.stdout)
    pids.append(pid)
    real = os.path.realpath(PY)
    pmon.wait_for(lambda: os.readlink(f"/proc/{pid}/exe") == real and ppid(pid) == 1, 5,
                  message=f"stranger {pid} running {real}, adopted by init")
    return pid


def marked(pmon: Pmon, service_id: int) -> list[int]:
    """Live processes that carry this service's PMON2_SERVICE marker."""
    entry = pmon.service_marker() + str(service_id).encode()
    return [p for p in all_pids() if is_alive(p) and has_env_marker(p, entry)]


def events(pmon: Pmon, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    out = pmon.json("events", name, "-n", "200", "--json")
    return [e for e in out if kind is None or e["kind"] == kind]


def handovers(pmon: Pmon, name: str) -> list[str]:
    return [e["message"] for e in events(pmon, name, "reload") if "handed over" in e["message"]]


def wait_file(pmon: Pmon, path: Path, timeout: float = 10.0) -> str:
    return pmon.wait_for(lambda: path.exists() and path.read_text().strip(), timeout, message=f"{path}")


# 1. pmond must never follow, adopt or signal a process that is not the service's


# On USR2 the service "reloads" and fails: it exits once `go` exists, without starting a successor.
FAILED_RELOAD = r"""
import os, signal, sys, time
go = sys.argv[1]
def reload(*_):
    while not os.path.exists(go):
        time.sleep(0.01)
    os._exit(0)
signal.signal(signal.SIGUSR2, reload)
open(sys.argv[2], "w").close()
while True:
    time.sleep(1)
"""


def test_a_stranger_started_during_a_reload_window_is_not_taken_for_the_successor(
        pmon: Pmon, strangers: list[int]) -> None:
    script = pmon.script("failed_reload.py", FAILED_RELOAD)
    go, up = pmon.work / "go", pmon.work / "up"
    svc = pmon.start_service("--name", "fr", "--reload-signal", "USR2", PY, str(script), str(go), str(up))
    pmon.wait_for(up.exists, 10)
    waiting = subprocess.Popen(pmon.cmd("reload", "fr", "--wait"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=pmon.work, env=pmon.env)
    try:
        pmon.wait_for(lambda: any("sent SIGUSR2" in e["message"] for e in events(pmon, "fr", "reload")), 10)
        other = stranger(pmon, strangers)  # e.g. another pmond, or a cron job's Python daemon
        go.touch()
        out, err = waiting.communicate(timeout=20)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert f"handed over to pid {other}" not in out, f"the stranger {other} was taken for the successor: {out}"
    assert waiting.returncode == 1 and f"process {svc['pid']} exited and left no successor" in err, (out, err)
    view = pmon.wait_service("fr", lambda s: s["pid"] not in (None, svc["pid"]), 10, what="a restart")
    assert view["pid"] != other and handovers(pmon, "fr") == []
    pmon.run("stop", "fr")
    assert is_alive(other), "pmond's stop killed a stranger"


DAEMONIZE_WINDOW_EXIT = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"


def test_a_stranger_started_while_a_job_exits_0_in_its_start_window_is_not_followed(
        pmon: Pmon, strangers: list[int]) -> None:
    """A one-shot Python job (no daemonizing at all) that ends with exit 0 within min_uptime: any orphan of
    the same executable and uid that started while it ran is "its daemon"."""
    go = pmon.work / "go"
    svc = pmon.start_service("--name", "job", "--no-autorestart", "--min-uptime", "5", PY, "-c",
                             DAEMONIZE_WINDOW_EXIT, str(go))
    other = stranger(pmon, strangers)
    go.touch()
    view = pmon.wait_service("job", lambda s: s["pid"] != svc["pid"], 10, what="the job's exit")
    assert view["pid"] != other, f"the stranger {other} was followed: {handovers(pmon, 'job')}"
    assert view["pid"] is None and view["status"] != "running", view
    assert handovers(pmon, "job") == []
    pmon.run("stop", "job")
    assert is_alive(other), "pmond's stop killed a stranger"


FORKING = r"""
import os, sys, time
if os.fork():
    os._exit(0)  # Type=forking: the launched process exits 0; its daemon writes the pid file
os.setsid()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def test_a_pid_file_naming_another_services_process_is_not_adopted_after_a_pmond_restart(pmon: Pmon) -> None:
    """pmond is SIGKILLed, the Type=forking daemon dies meanwhile, and its pid file now names another
    service's main process (written by the service's user, or a stale pid reused): the next pmond must not
    make that process the daemon's successor (follow.Follower.after_restart)."""
    script = pmon.script("forking.py", FORKING)
    pidfile = pmon.work / "a.pid"
    pmon.run("run", "--name", "a", "--pidfile", str(pidfile), PY, str(script), str(pidfile))
    daemon = int(wait_file(pmon, pidfile))
    pmon.wait_service("a", lambda s: s["pid"] == daemon, 10, what="the daemon followed")
    other = pmon.start_service("--name", "b", PY, "-c", "import time; time.sleep(600)")  # started after a's
    pmond = pmon.daemon_pid()
    assert pmond is not None
    os.kill(pmond, signal.SIGKILL)
    pmon.wait_dead(pmond, what="pmond")
    os.kill(daemon, signal.SIGKILL)
    pidfile.write_text(f"{other['pid']}\n")
    view = pmon.desc("a")  # a new pmond starts and recovers
    assert view["pid"] != other["pid"], f"a adopted b's process {other['pid']}: {handovers(pmon, 'a')}"
    pmon.run("stop", "a")
    assert is_alive(other["pid"]) and pmon.desc("b")["restarts"] == 0, "stopping a killed b's process"


def spawn_at(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """A new process (its own session) that reuses the free pid `pid` (ns_last_pid, root only)."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(pid - 1))
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.fail(f"could not start a process with pid {pid}")


# A daemon: the launched process L forks M (setsid), M forks a worker W, L exits 0 (the daemonize pattern:
# pmond follows M, and remembers M and W as the service's). W exits when `w-exit` appears (M reaps it).
# M says MAINPID=<the pid in `claim`> when that file appears.
DAEMON_WITH_WORKER = r"""
import os, socket, sys, time
if os.fork():
    while not os.path.exists("pids"):
        time.sleep(0.01)
    os._exit(0)
os.setsid()
worker = os.fork()
if worker == 0:
    while not os.path.exists("w-exit"):
        time.sleep(0.01)
    os._exit(0)
with open("pids.tmp", "w") as f:
    f.write(f"{os.getpid()} {worker}")
os.rename("pids.tmp", "pids")
said = False
while True:
    with __import__("contextlib").suppress(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    if os.path.exists("claim") and not said:
        said = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(f"MAINPID={open('claim').read().strip()}".encode(), os.environ["NOTIFY_SOCKET"])
    time.sleep(0.01)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a pid reused on purpose (ns_last_pid)")
def test_a_stranger_reusing_the_pid_of_a_worker_found_at_a_handover_is_not_the_services(pmon: Pmon) -> None:
    script = pmon.script("daemon.py", DAEMON_WITH_WORKER)
    pmon.run("run", "--name", "dw", "--watchdog-sec", "600", "--cwd", str(pmon.work), PY, str(script))
    master, worker = (int(p) for p in wait_file(pmon, pmon.work / "pids").split())
    pmon.wait_service("dw", lambda s: s["pid"] == master, 10, what="the daemon followed")
    (pmon.work / "w-exit").touch()
    pmon.wait_for(lambda: not os.path.exists(f"/proc/{worker}"), 5, message=f"worker {worker} reaped")
    other = spawn_at(worker, ["sleep", "600"])
    try:
        (pmon.work / "claim").write_text(str(worker))
        refusal = pmon.wait_for(lambda: [e for e in events(pmon, "dw", "reload") if e["data"].get("refused")
                                         or f"handed over to pid {worker}" in e["message"]], 10,
                                message="the answer to MAINPID=")
        assert pmon.desc("dw")["pid"] == master, f"the stranger {worker} became the main process: {refusal}"
        pmon.run("stop", "dw")
        assert other.poll() is None, "pmond's stop killed the stranger"
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pmond as root, a caller as nobody")
def test_a_non_root_caller_cannot_read_a_root_only_file_through_pidfile(pmon: Pmon) -> None:
    (pmon.home / "config.toml").write_text('allow_users = ["nobody"]\n')
    pmon.run("daemon", "start")
    for d in (pmon.home, pmon.home / "run"):
        os.chmod(d, 0o711)
    secret = pmon.work / "secret"
    secret.write_text("4000000\n")  # a number pmond reads as a pid (no such process runs)
    secret.chmod(0o600)
    code, body = request_as(65534, str(pmon.socket), "POST", "/v1/services",
                            {"argv": ["/bin/sh", "-c", "sleep 600 & exit 0"], "cwd": "/tmp", "name": "leak",
                             "pidfile": str(secret), "reload_timeout": 1})
    assert code == 201, body
    pmon.wait_service("leak", lambda s: s["followed"] is not None, 10, what="the shell's worker followed")
    pmon.wait_for(lambda: any("named no process" in e["message"] or e["data"].get("refused")
                              for e in events(pmon, "leak", "reload")), 5, message="the pid file's verdict")
    code, seen = request_as(65534, str(pmon.socket), "GET", "/v1/services/leak/events")
    assert code == 200
    leaked = [e["message"] for e in seen if "4000000" in e["message"]]
    assert not leaked, f"nobody read root's file through pmond: {leaked}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a stranger that runs as nobody")
def test_a_forged_marker_on_a_stranger_of_another_user_does_not_stop_pmond_from_starting(pmon: Pmon) -> None:
    pmon.start_service("--name", "s", "sleep", "600")
    forged = pmon.service_marker().decode() + "4242"  # computable by anyone: FNV-1a of "0:<data dir>"
    other = subprocess.Popen(["sleep", "600"], user=65534, group=65534, extra_groups=[], start_new_session=True,
                             env={"PMON2_SERVICE": forged.split("=", 1)[1]}, cwd="/")
    try:
        pmond = pmon.daemon_pid()
        assert pmond is not None
        os.kill(pmond, signal.SIGKILL)
        pmon.wait_dead(pmond, what="pmond")
        again = pmon.run("ls", check=False)
        assert again.returncode == 0, f"pmond refused to start: {again.stderr.strip()}"
    finally:
        other.kill()
        other.wait()


# 2. no service lost, duplicated or left unsupervised


# On USR2: a successor that calls setsid (as Go's graceful libraries may), and the old copy drains for a while.
DRAINING = r"""
import os, signal, sys, time
def reload(*_):
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if os.fork() == 0:
        os.setsid()
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        while True:
            time.sleep(1)
    time.sleep(30)  # draining: the window is open until this copy exits
    os._exit(0)
signal.signal(signal.SIGUSR2, reload)
open(sys.argv[2], "w").close()
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("command", ["stop", "restart"])
def test_stop_or_restart_during_a_reload_window_leaves_no_successor_behind(pmon: Pmon, command: str) -> None:
    script = pmon.script("draining.py", DRAINING)
    succ_file, up = pmon.work / "successor.pid", pmon.work / "up"
    svc = pmon.start_service("--name", "dr", "--reload-signal", "USR2", "--kill-timeout", "2", PY, str(script),
                             str(succ_file), str(up))
    pmon.wait_for(up.exists, 10)
    pmon.run("reload", "dr")
    successor = int(wait_file(pmon, succ_file))
    assert is_alive(successor) and is_alive(svc["pid"])
    pmon.run(command, "dr", timeout=30)
    if command == "stop":
        pmon.wait_dead(successor, 3, what="the successor the reload started")
        assert marked(pmon, svc["id"]) == []
    else:
        new = pmon.desc("dr")
        assert new["status"] == "running"
        pmon.wait_for(lambda: marked(pmon, svc["id"]) == [new["pid"]], 3,
                      message=lambda: f"one process of dr (the new {new['pid']}), not {marked(pmon, svc['id'])}")


# The launched process forks a child that leaves its group (setsid), then exits 0 after the start window:
# a crash, not a daemonization. Its child must not outlive it (nor the restart, nor a stop).
LEAVES_A_CHILD = r"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    while True:
        time.sleep(1)
time.sleep(1.2)
sys.exit(0)
"""


def test_processes_that_left_the_group_do_not_outlive_a_crash_or_a_stop(pmon: Pmon) -> None:
    script = pmon.script("leaves.py", LEAVES_A_CHILD)
    svc = pmon.start_service("--name", "lv", "--min-uptime", "1", PY, str(script))
    pmon.wait_service("lv", lambda s: s["restarts"] >= 2, 10, what="two crashes and restarts")
    pmon.run("stop", "lv")
    left = marked(pmon, svc["id"])
    assert left == [], f"processes of the stopped service lv still run: {left}"


# A prefork server: a master and a worker (the master's child, in its group); USR2 reloads in place (a no-op).
PREFORK = r"""
import os, signal, sys, time
signal.signal(signal.SIGUSR2, lambda *_: None)
worker = os.fork()
if worker == 0:
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    while True:
        time.sleep(1)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(worker))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""


def test_a_main_killed_inside_a_reload_window_is_a_crash_not_a_handover_to_its_worker(pmon: Pmon) -> None:
    script = pmon.script("prefork.py", PREFORK)
    worker_file = pmon.work / "worker"
    svc = pmon.start_service("--name", "pf", "--reload-signal", "USR2", PY, str(script), str(worker_file))
    worker = int(wait_file(pmon, worker_file))
    pmon.run("reload", "pf")  # a reload in place: nothing will exit; the window is open for 30 s
    os.kill(svc["pid"], signal.SIGKILL)  # the OOM killer, say
    # (its fast exit means a backoff first: pid None, restarts 0, until the restart)
    view = pmon.wait_service("pf", lambda s: s["pid"] not in (None, svc["pid"]), 10, what="the crash handled")
    assert view["pid"] != worker, f"the worker {worker} was taken for a successor: {handovers(pmon, 'pf')}"
    assert view["restarts"] == 1
    pmon.wait_dead(worker, 3, what="the killed master's worker")


# A roll whose new process never gets ready, and a plain `stop` of that member meanwhile.
READY_IF_OK = r"""
import os, socket, time
if os.path.exists("ok"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while True:
    time.sleep(1)
"""


def test_stop_during_a_roll_does_not_wait_for_the_new_process_to_time_out(pmon: Pmon) -> None:
    home = pmon.work / "rw"
    home.mkdir()
    (home / "ok").touch()
    script = pmon.script("ready_if_ok.py", READY_IF_OK)
    app = pmon.work / "pmon2.toml"
    app.write_text(f'[services.web]\ncommand = ["{PY}", "{script}"]\ncwd = "{home}"\ninstances = 2\n'
                   'ready = "notify"\nstart_timeout = 8\nkill_timeout = 1\n')
    pmon.run("apply", str(app))
    old = pmon.wait_service("web:0", lambda s: s["status"] == "running", 10, what="ready")["pid"]
    (home / "ok").unlink()  # the new version never says READY=1
    roll = subprocess.Popen(pmon.cmd("reload", "web"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=pmon.work, env=pmon.env)
    try:
        surge = pmon.wait_for(lambda: [e["data"]["pid"] for e in events(pmon, "web:0", "roll")
                                       if "beside" in e["message"]], 10, message="the new process")[0]
        began = time.monotonic()
        pmon.run("stop", "web:0", timeout=30)
        took = time.monotonic() - began
    finally:
        roll.communicate(timeout=30)
    assert not is_alive(surge) and not is_alive(old)
    assert took < 4, f"`stop web:0` waited {took:.1f} s behind the roll (start_timeout = 8 s; kill_timeout = 1 s)"


# Properties that held


# A service that sends, once each and in order, the datagrams of the `say.NNNN` files in its cwd ({"text":
# ..., "to": a socket path, default its own NOTIFY_SOCKET}), and then creates `sent.NNNN`.
NOTIFIER = r"""
import json, os, socket, time
sent = set()
while True:
    for name in sorted(os.listdir(".")):
        if name.startswith("say.") and name not in sent:
            sent.add(name)
            with open(name) as fh:
                msg = json.load(fh)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                try:
                    s.sendto(msg["text"].encode(), msg.get("to") or os.environ["NOTIFY_SOCKET"])
                except OSError:
                    pass
            open("sent." + name[4:], "w").close()
    time.sleep(0.02)
"""


class Speaker:
    def __init__(self, pmon: Pmon, name: str) -> None:
        self.pmon, self.name = pmon, name
        self.dir = pmon.work / name
        self.dir.mkdir()
        self.script = pmon.script("notifier.py", NOTIFIER, directory=self.dir)
        self.count = 0

    def run(self, *flags: str) -> dict[str, Any]:
        return self.pmon.json("run", "--json", "--name", self.name, "--cwd", str(self.dir), *flags, PY,
                              str(self.script))

    def say(self, text: str, to: str | None = None) -> None:
        self.count += 1
        tmp = self.dir / f".say.{self.count}"
        tmp.write_text(json.dumps({"text": text, "to": to}))
        tmp.rename(self.dir / f"say.{self.count:04d}")

    def wait_sent(self) -> None:
        """Until the last datagram said has been sent."""
        self.pmon.wait_for((self.dir / f"sent.{self.count:04d}").exists, 10, message=f"{self.name}'s datagram")


def test_mainpid_abuse_and_forged_or_oversized_datagrams_change_nothing(pmon: Pmon) -> None:
    """MAINPID= of pid 1, of pmond, of its launcher and of another service's main process; a datagram over
    4096 bytes; another service's process writing to this service's socket: all refused or ignored, and no
    process is touched."""
    a, b = Speaker(pmon, "a"), Speaker(pmon, "b")
    va, vb = a.run("--ready", "notify"), b.run("--ready", "notify")
    a.say("READY=1\nSTATUS=genuine")
    b.say("READY=1")
    for name in ("a", "b"):
        pmon.wait_service(name, lambda s: s["status"] == "running", 10, what="READY=1")
    status = pmon.json("daemon", "status", "--json")
    pmond, launcher = status["pid"], status["launcher_pid"]
    assert pmond and launcher
    for pid in (1, pmond, launcher, vb["pid"]):
        a.say(f"MAINPID={pid}")
    a.say("STATUS=" + "x" * 5000)
    sock_a = str(pmon.home / "run" / "notify" / str(va["id"]))
    b.say("STATUS=forged by b\nWATCHDOG=trigger\nMAINPID=" + str(vb["pid"]), to=sock_a)
    b.wait_sent()
    a.say("RELOADING=1")  # a's socket is a FIFO: once this is seen, everything sent before it was read
    pmon.wait_service("a", lambda s: s["notify"]["reloading_since"], 10, what="RELOADING=1 seen")
    refused = pmon.wait_for(lambda: (r := [e["message"] for e in events(pmon, "a", "reload")
                                           if e["data"].get("refused")]) and len(r) >= 3 and r, 10,
                            message="three MAINPID= refusals")
    assert any(f"pid {pmond} refused: process {pmond} is not a process of the service" in m for m in refused)
    assert any(f"pid {launcher} refused: process {launcher} is not a process of the service" in m for m in refused)
    assert any(f"pid {vb['pid']} refused: process {vb['pid']} is the main process of service b" in m
               for m in refused), refused
    notes = pmon.wait_for(lambda: (n := [e["message"] for e in events(pmon, "a", "notify")])
                          and any("not a pid" in m for m in n) and any(m.startswith("refused") for m in n) and n, 10,
                          message="the notify events")
    assert any("MAINPID='1'" in m for m in notes), notes
    view = pmon.desc("a")
    assert view["pid"] == va["pid"] and view["status_text"] == "genuine" and view["restarts"] == 0, view
    assert not events(pmon, "a", "watchdog") and handovers(pmon, "a") == []
    assert all(is_alive(p) for p in (pmond, launcher, vb["pid"], va["pid"]))
    pmon.run("stop", "a")
    assert all(is_alive(p) for p in (pmond, launcher, vb["pid"]))
    assert pmon.json("daemon", "status", "--json")["launcher_pid"] == launcher


@pytest.mark.parametrize("trap", ["fifo", "huge", "other-owner", "pmond", "launcher"])
def test_a_pid_file_that_is_a_fifo_huge_foreign_or_names_pmond_is_refused(pmon: Pmon, trap: str) -> None:
    """Type=forking: the launched shell leaves a worker and exits 0; its pid file was prepared by the
    service's user as a trap. Refused with an event; the worker (its topmost descendant) is followed;
    pmond and its launcher untouched by a `del`."""
    if trap == "other-owner" and os.geteuid() != 0:
        pytest.skip("needs root: a pid file of uid 65534")
    pmon.run("daemon", "start")
    status = pmon.json("daemon", "status", "--json")
    pmond, launcher = status["pid"], status["launcher_pid"]
    pidfile, worker_file = pmon.work / "svc.pid", pmon.work / "worker.pid"
    if trap == "fifo":
        os.mkfifo(pidfile)
        why = "is not a regular file: refused"
    elif trap == "huge":
        pidfile.write_text("4000000\n" + "#" * 8192)
        why = "is larger than 4096 bytes: refused"
    elif trap == "other-owner":
        pidfile.write_text("4000000\n")
        os.chown(pidfile, 65534, 65534)
        why = "belongs to uid 65534, not to the service's user: refused"
    else:
        target = pmond if trap == "pmond" else launcher
        pidfile.write_text(f"{target}\n")
        why = f"pid {target} refused: process {target} is not a process of the service"
    script = pmon.work / "forker.sh"
    script.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {worker_file}\nexit 0\n")
    script.chmod(0o755)
    pmon.run("run", "--name", "fk", "--pidfile", str(pidfile), str(script))
    worker = int(wait_file(pmon, worker_file))
    up = pmon.wait_service("fk", lambda s: s["pid"] == worker, 10, what="the shell's worker followed")
    assert up["restarts"] == 0
    refusals = pmon.wait_for(lambda: [e["message"] for e in events(pmon, "fk", "reload") if e["data"].get("refused")],
                             5, message="the refusal")
    assert any(why in r for r in refusals), refusals
    pmon.run("del", "fk")
    assert not is_alive(worker)
    assert is_alive(pmond) and is_alive(launcher) and pmon.daemon_pid() == pmond
    assert pmon.json("daemon", "status", "--json")["launcher_pid"] == launcher


# Nested daemonization: L forks I, I calls setsid and forks D, I exits at once, D forks a worker, L exits 0.
# D leads no group (its group's leader I is gone) and its worker is its child.
DOUBLE_FORK = r"""
import os, sys, time
if os.fork():
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
worker = os.fork()
if worker == 0:
    while True:
        time.sleep(1)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""


def test_a_double_forked_daemon_is_followed_and_stopped_with_its_worker(pmon: Pmon) -> None:
    script = pmon.script("double.py", DOUBLE_FORK)
    pids = pmon.work / "pids"
    svc = pmon.json("run", "--json", "--name", "df", "--kill-timeout", "1", PY, str(script), str(pids))
    daemon, worker = (int(p) for p in wait_file(pmon, pids).split())
    view = pmon.wait_service("df", lambda s: s["pid"] == daemon, 10, what="the daemon followed")
    assert view["restarts"] == 0 and "daemonized itself" in handovers(pmon, "df")[0]
    pmon.holds(lambda: pmon.desc("df")["pid"] == daemon, 1.0, message="no restart loop")
    pmon.run("stop", "df")
    for p in (daemon, worker):
        pmon.wait_dead(p, 3, what=f"process {p} of the stopped daemon")
    assert marked(pmon, svc["id"]) == []


FLOOD = r"""
import os, socket, sys, time
end = time.monotonic() + float(sys.argv[2])
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    while time.monotonic() < end:
        try:
            s.sendto(b"STATUS=flood\nREADY=1\nWATCHDOG=trigger\nMAINPID=1", sys.argv[1])
        except OSError:
            pass
"""


def test_a_flood_on_a_notify_socket_from_outside_the_service_stalls_nothing(pmon: Pmon) -> None:
    """A process of the same uid outside the service (a new session, no marker) floods its socket for 4 s:
    every datagram is refused, pmond keeps answering and restarts a killed service at once."""
    a = Speaker(pmon, "a")
    va = a.run("--ready", "notify", "--watchdog-sec", "600")
    a.say("READY=1\nSTATUS=genuine")
    pmon.wait_service("a", lambda s: s["status"] == "running", 10)
    other = pmon.start_service("--name", "victim", "sleep", "600")
    sock = str(pmon.home / "run" / "notify" / str(va["id"]))
    flood = subprocess.Popen([PY, "-c", FLOOD, sock, "4"], start_new_session=True, env={})
    try:
        pmon.wait_for(lambda: any(e["message"].startswith("refused") for e in events(pmon, "a", "notify")), 5,
                      message="the flood under way (its first datagram refused)")
        began = time.monotonic()
        pmon.services()
        assert time.monotonic() - began < 2.0, "ls took over 2 s during the flood"
        os.kill(other["pid"], signal.SIGKILL)
        pmon.wait_service("victim", lambda s: s["restarts"] == 1 and s["status"] == "running", 2.0,
                          what="restarted during the flood")
    finally:
        flood.wait(timeout=20)
    view = pmon.desc("a")
    assert view["status_text"] == "genuine" and view["pid"] == va["pid"] and view["restarts"] == 0
    assert not events(pmon, "a", "watchdog") and handovers(pmon, "a") == []


def test_two_services_on_one_address_the_second_is_refused_and_the_first_keeps_it(pmon: Pmon) -> None:
    port = free_port()
    first = pmon.start_service("--name", "l1", "--listen", f"tcp://127.0.0.1:{port}", "sleep", "600")
    for extra in ([], ["--reuseport"]):
        second = pmon.run("run", "--name", "l2", *extra, "--listen", f"tcp://127.0.0.1:{port}", "sleep", "600",
                          check=False)
        assert second.returncode != 0
        assert second.stderr.strip() == f"pmon2: listen: tcp://127.0.0.1:{port}: address already in use", second
    assert [s["name"] for s in pmon.services()] == ["l1"]
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # pmond's socket for l1 still listens (the backlog takes it)
    assert pmon.desc("l1")["pid"] == first["pid"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
