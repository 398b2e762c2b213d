"""sd_notify for services (issue 13, part 4): real pmonds and real services that speak to $NOTIFY_SOCKET.

The test service (SERVICE) sends, once per process, the text of every `say.*` file in its cwd as one
datagram (a `once.*` file once only: the process that sends it removes it), and WATCHDOG=1 every 50 ms
while a `ping` file exists (and no `mute.<its pid>`); with a `handover` file it forks a child,
sends MAINPID=<child> and exits. It ignores send errors (pmond may be down), as sd_notify(3) callers do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pmon2.daemon.supervisor import Supervisor

pytestmark = pytest.mark.timeout(90)
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: senders and services as nobody")
needs_follow = pytest.mark.skipif(not hasattr(Supervisor, "_claim_main_pid"),
                                  reason="Supervisor._claim_main_pid (following a new main process) is not there")

SERVICE = r"""
import json, os, socket, sys, time

addr = os.environ.get("NOTIFY_SOCKET", "")


def notify(text):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), addr)
    except OSError:
        pass  # pmond is down, or there is no socket: sd_notify(3) callers carry on


with open(f"env.{os.getpid()}", "w") as fh:
    json.dump({k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}, fh)
sent = {}
while True:
    for name in sorted(os.listdir(".")):
        if name.startswith("say."):
            with open(name) as fh:
                text = fh.read()
            if sent.get(name) != text:
                sent[name] = text
                notify(text)
        elif name.startswith("once."):
            try:
                with open(name) as fh:
                    text = fh.read()
                os.unlink(name)
            except OSError:
                continue
            notify(text)
    if os.path.exists("ping") and not os.path.exists(f"mute.{os.getpid()}"):
        notify("WATCHDOG=1")
    if os.path.exists("handover") and not sent.get("handover"):
        sent["handover"] = "done"
        child = os.fork()
        if child:
            notify(f"MAINPID={child}")
            time.sleep(0.5)
            os._exit(0)
    time.sleep(0.05)
"""


class Svc:
    """A test service's directory: its cwd, where the test drops what it should say."""

    def __init__(self, pmon: Any, name: str, directory: Path | None = None) -> None:
        self.pmon = pmon
        self.name = name
        self.dir = directory or pmon.work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.script = self.dir / "svc.py"
        self.script.write_text(SERVICE)
        self.count = 0

    def run(self, *flags: str, python: str = sys.executable, **kwargs: Any) -> dict[str, Any]:
        return self.pmon.json("run", "--json", "--name", self.name, "--cwd", str(self.dir), *flags, python, "-I",
                              str(self.script), **kwargs)

    def say(self, text: str, once: bool = False) -> None:
        self.count += 1
        tmp = self.dir / f".tmp{self.count}"
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.rename(self.dir / f"{'once' if once else 'say'}.{self.count:03d}")

    def env_of(self, pid: int) -> dict[str, str | None]:
        path = self.dir / f"env.{pid}"
        self.pmon.wait_for(path.exists, message=f"{path} written by the service")
        return self.pmon.wait_for(lambda: json.loads(path.read_text()))

    def events(self, kind: str) -> list[str]:
        return [r["message"] for r in self.pmon.db_rows(
            "SELECT message FROM events WHERE service = ? AND kind = ? ORDER BY id", (self.name, kind))]


def send(path: str, text: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), path)


def send_as(uid: int, path: str, text: str, connect_first: bool) -> int:
    """Send `text` from a forked child running as `uid`: 0 when sent, else the errno. With `connect_first`
    the socket is connected while still root (past the socket file's mode), so only pmond's own check of
    the sender's credentials stands in the way."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if connect_first:
        s.connect(path)
    child = os.fork()
    if child == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if connect_first:
                s.send(text.encode())
            else:
                s.sendto(text.encode(), path)
        except OSError as exc:
            code = exc.errno or 1
        finally:
            os._exit(code)
    s.close()
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_ready_gates_starting_and_status_shows_in_desc(pmon):
    svc = Svc(pmon, "api")
    started = svc.run("--ready", "notify")
    assert started["status"] == "starting"
    pid = started["pid"]
    env = svc.env_of(pid)
    sock = str(pmon.home / "run" / "notify" / str(started["id"]))
    assert env == {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": None, "WATCHDOG_PID": None}
    mode = os.lstat(sock).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    pmon.holds(lambda: pmon.desc("api")["status"] == "starting", 0.5, message="starting until READY=1")
    table = pmon.run("ls").stdout
    assert "starting" in table
    svc.say("STATUS=warming up\nREADY=1")
    view = pmon.wait_service("api", lambda s: s["status"] == "running", what="running after READY=1")
    assert view["pid"] == pid and view["restarts"] == 0
    assert view["status_text"] == "warming up" and view["notify"]["socket"] == sock
    assert svc.events("ready") == [f"ready: READY=1 from process {pid}"]
    svc.say("STATUS=serving \x1b[31m42 requests\x07")
    pmon.wait_service("api", lambda s: s["status_text"] == "serving [31m42 requests", what="the new STATUS=")
    desc = pmon.run("desc", "api").stdout
    assert "status text" in desc and "serving [31m42 requests" in desc and "\x1b" not in desc
    assert f"NOTIFY_SOCKET={sock}" in desc


def test_reloading_shows_until_ready(pmon):
    svc = Svc(pmon, "rel")
    svc.run("--ready", "notify")
    svc.say("READY=1")
    pmon.wait_service("rel", lambda s: s["status"] == "running")
    svc.say("RELOADING=1\nMONOTONIC_USEC=1")
    view = pmon.wait_service("rel", lambda s: s["notify"]["reloading_since"], what="reloading")
    assert view["status"] == "running"
    assert "reloading since" in pmon.run("desc", "rel").stdout
    svc.say("READY=1")
    pmon.wait_service("rel", lambda s: s["notify"]["reloading_since"] is None, what="reloaded")
    assert "reloading since" not in pmon.run("desc", "rel").stdout
    assert [m.split(" (")[0] for m in svc.events("notify")][:1] == ["reloading"]
    assert svc.events("notify")[1].startswith("reloaded in ")


def test_no_ready_within_start_timeout_is_a_failed_start(pmon):
    svc = Svc(pmon, "mute")
    app = pmon.work / "pmon2.toml"
    app.write_text(f'[services.mute]\ncommand = ["{sys.executable}", "-I", "{svc.script}"]\ncwd = "{svc.dir}"\n'
                   'ready = "notify"\nstart_timeout = 1\n')
    began = pmon.run("apply", str(app), check=False)
    assert began.returncode != 0
    first = pmon.wait_for(lambda: svc.events("start_failed"), timeout=10)
    assert first[0] == "not ready: no READY=1 within 1 s"
    pmon.wait_service("mute", lambda s: s["restarts"] >= 1, timeout=10, what="started again after the failed start")


def test_strangers_are_refused(pmon):
    svc = Svc(pmon, "guarded")
    view = svc.run("--ready", "notify")
    pid, sock = view["pid"], str(pmon.home / "run" / "notify" / str(view["id"]))
    svc.say("STATUS=genuine\nREADY=1")
    pmon.wait_service("guarded", lambda s: s["status"] == "running" and s["status_text"] == "genuine")
    # The same uid (root here), not a process of the service: no marker, another session.
    send(sock, "STATUS=forged by a stranger\nWATCHDOG=trigger\nMAINPID=1")
    refused = pmon.wait_for(lambda: [m for m in svc.events("notify") if m.startswith("refused")],
                            message="a notify event about the refused message")
    assert f"the last from process {os.getpid()} (uid {os.geteuid()})" in refused[0], refused
    assert "without its PMON2_SERVICE marker" in refused[0]
    view = pmon.desc("guarded")
    assert view["status_text"] == "genuine" and view["pid"] == pid
    assert svc.events("watchdog") == [] and view["restarts"] == 0


def svc_pid(pmon: Any, name: str) -> int:
    return pmon.desc(name)["pid"]


@needs_root
def test_another_uid_is_refused_by_the_socket_mode_and_by_pmond(pmon):
    svc = Svc(pmon, "guarded2")
    view = svc.run("--ready", "notify")
    sock = str(pmon.home / "run" / "notify" / str(view["id"]))
    svc.say("STATUS=genuine\nREADY=1")
    pmon.wait_service("guarded2", lambda s: s["status"] == "running")
    pmon.home.chmod(0o711)  # so that the stranger reaches the socket file itself
    (pmon.home / "run").chmod(0o711)
    assert send_as(NOBODY, sock, "STATUS=forged", connect_first=False) == 13, "EACCES: the socket is 0600 root's"
    assert send_as(NOBODY, sock, "STATUS=forged\nREADY=1", connect_first=True) == 0
    refused = pmon.wait_for(lambda: [m for m in svc.events("notify") if m.startswith("refused")])
    assert f"runs as uid {NOBODY}, not as the service's uid 0" in refused[0], refused
    assert pmon.desc("guarded2")["status_text"] == "genuine"


@needs_root
def test_a_service_of_another_user_owns_its_socket(pmon, pub):
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs /usr/bin/python3, which nobody may run (the venv's python lives under /root)")
    pmon.run("daemon", "start")
    pmon.home.chmod(0o711)
    (pmon.home / "run").chmod(0o711)
    svc = Svc(pmon, "nob", directory=pub / "nob")
    svc.dir.chmod(0o777)
    view = svc.run("--ready", "notify", "--user", "nobody", python="/usr/bin/python3")
    sock = str(pmon.home / "run" / "notify" / str(view["id"]))
    st = os.lstat(sock)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
    svc.say("STATUS=as nobody\nREADY=1")
    view = pmon.wait_service("nob", lambda s: s["status"] == "running", what="READY=1 from a service of nobody")
    assert view["status_text"] == "as nobody" and pmon.uid_of(view["pid"]) == NOBODY


@pytest.mark.slow
def test_missed_watchdog_restarts_the_service(pmon):
    svc = Svc(pmon, "dog")
    (svc.dir / "ping").touch()
    first = svc.run("--watchdog-sec", "0.5")
    assert first["status"] == "running"
    assert svc.env_of(first["pid"])["WATCHDOG_USEC"] == "500000"
    pmon.holds(lambda: pmon.desc("dog")["pid"] == first["pid"], 1.0, message="alive while it pings")
    (svc.dir / f"mute.{first['pid']}").touch()  # this process stops pinging; the next one will not
    view = pmon.wait_service("dog", lambda s: s["restarts"] == 1 and s["status"] == "running", timeout=10,
                             what="restarted by the watchdog")
    assert view["pid"] != first["pid"]
    assert svc.events("watchdog") == [f"no WATCHDOG=1 for 0.5 s: sending SIGABRT to process group {first['pid']}"]
    view = pmon.wait_service("dog", lambda s: (s["recent_exits"] or [{}])[-1].get("signal") == "SIGABRT",
                             timeout=10, what="the exit by SIGABRT in the ledger")
    assert view["notify"]["watchdog_s"] == 0.5
    pmon.holds(lambda: pmon.desc("dog")["restarts"] == 1, 1.0, message="the new process pings: no more restarts")


def test_watchdog_trigger_and_usec_from_the_service(pmon):
    svc = Svc(pmon, "selfdog")
    first = svc.run("--watchdog-sec", "30")
    svc.say("WATCHDOG_USEC=300000", once=True)  # from 30 s down to 0.3 s, without pings: the watchdog fires
    pmon.wait_service("selfdog", lambda s: s["restarts"] == 1, timeout=10, what="the service's own timeout")
    assert svc.events("watchdog")[0].startswith("no WATCHDOG=1 for 0.3 s")
    assert pmon.desc("selfdog")["notify"]["watchdog_s"] == 30, "the override ended with its process"
    second = svc_pid(pmon, "selfdog")
    assert second != first["pid"]
    svc.say("WATCHDOG=trigger", once=True)
    pmon.wait_service("selfdog", lambda s: s["restarts"] >= 2, timeout=10, what="WATCHDOG=trigger")
    assert any(m.startswith("WATCHDOG=trigger from process") for m in svc.events("watchdog"))


@pytest.mark.slow
def test_the_socket_works_again_after_pmond_is_killed(pmon):
    svc = Svc(pmon, "survivor")
    (svc.dir / "ping").touch()
    view = svc.run("--ready", "notify", "--watchdog-sec", "1")
    pid, sock = view["pid"], str(pmon.home / "run" / "notify" / str(view["id"]))
    svc.say("READY=1\nSTATUS=before")
    pmon.wait_service("survivor", lambda s: s["status_text"] == "before")
    daemon = pmon.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    pmon.wait_dead(daemon, what="pmond")
    svc.say("STATUS=while pmond is down")  # lost (ECONNREFUSED): nobody listens
    pmon.run("daemon", "start")
    view = pmon.wait_service("survivor", lambda s: s["status"] == "running")
    assert view["pid"] == pid and view["restarts"] == 0, "adopted, not restarted"
    assert os.lstat(sock).st_ino and svc.env_of(pid)["NOTIFY_SOCKET"] == sock
    svc.say("STATUS=after pmond came back")
    pmon.wait_service("survivor", lambda s: s["status_text"] == "after pmond came back",
                      what="STATUS= on the socket pmond bound again")
    # The watchdog runs again too (1 s from the adoption): the pings keep the service.
    pmon.holds(lambda: pmon.desc("survivor")["pid"] == pid, 1.5, message="the pings reach the new pmond")
    assert pmon.desc("survivor")["notify"]["watchdog_at"] is not None
    assert svc.events("watchdog") == []


def test_delete_removes_the_socket_and_other_services_get_none(pmon):
    svc = Svc(pmon, "gone")
    view = svc.run("--ready", "notify")
    sock = pmon.home / "run" / "notify" / str(view["id"])
    assert sock.exists()
    plain = Svc(pmon, "plain")
    other = plain.run(env=dict(pmon.env, NOTIFY_SOCKET="/run/systemd/notify", WATCHDOG_USEC="1000"))
    assert plain.env_of(other["pid"]) == {"NOTIFY_SOCKET": None, "WATCHDOG_USEC": None, "WATCHDOG_PID": None}
    pmon.run("del", "gone")
    assert not sock.exists()


@pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-notify"), reason="systemd-notify is not installed")
@needs_root
def test_systemd_notify_works_unchanged(pmon):
    # systemd-notify sends on behalf of its parent (--pid defaults to it), which root may claim: the shell.
    pmon.json("run", "--json", "--name", "shell", "--ready", "notify", "sh", "-c",
              "sleep 0.3; systemd-notify --ready --status='from systemd-notify'; exec sleep 600")
    view = pmon.wait_service("shell", lambda s: s["status"] == "running", what="READY=1 from systemd-notify")
    assert view["status_text"] == "from systemd-notify"


@needs_follow
def test_mainpid_hands_over_to_a_child(pmon):
    svc = Svc(pmon, "forker")
    first = svc.run("--ready", "notify")
    svc.say("READY=1")
    pmon.wait_service("forker", lambda s: s["status"] == "running")
    (svc.dir / "handover").touch()
    view = pmon.wait_service("forker", lambda s: s["pid"] not in (None, first["pid"]), what="the child as main")
    child = view["pid"]
    assert pmon.ppid(child) == first["pid"] or not pmon.is_alive(first["pid"])
    pmon.wait_dead(first["pid"], what="the old main process")
    pmon.holds(lambda: pmon.desc("forker")["pid"] == child, 1.0, message="the child stays the service")
    view = pmon.desc("forker")
    assert view["restarts"] == 0 and view["status"] == "running"
    assert svc.events("reload") == [f"pid {first['pid']} handed over to pid {child} (MAINPID=)"]
    svc.say("STATUS=from the new main")  # the child speaks for the service now
    pmon.wait_service("forker", lambda s: s["status_text"] == "from the new main")


@needs_follow
def test_mainpid_of_a_process_outside_the_service_is_refused(pmon):
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        svc = Svc(pmon, "liar")
        first = svc.run("--ready", "notify")
        svc.say(f"READY=1\nMAINPID={stranger.pid}")
        pmon.wait_service("liar", lambda s: s["status"] == "running")
        refusal = pmon.wait_for(lambda: [r["message"] for r in pmon.db_rows(
            "SELECT message FROM events WHERE service = 'liar' AND kind = 'reload'")], message="the refusal")
        assert refusal[0].startswith(f"MAINPID=: pid {stranger.pid} refused: "), refusal
        view = pmon.desc("liar")
        assert view["pid"] == first["pid"] and view["restarts"] == 0
        assert stranger.poll() is None, "the stranger was not touched"
    finally:
        stranger.kill()
        stranger.wait()


@needs_follow
@pytest.mark.slow
def test_missed_watchdog_kills_a_main_handed_over_to_by_mainpid(pmon):
    """The child that MAINPID= made the main process stays in its parent's group, which it does not lead:
    the watchdog's SIGABRT must still reach it (through the group's pinned leader), and the service restart."""
    svc = Svc(pmon, "handdog")
    (svc.dir / "ping").touch()
    first = svc.run("--watchdog-sec", "0.5", "--kill-timeout", "1")
    (svc.dir / "handover").touch()
    view = pmon.wait_service("handdog", lambda s: s["pid"] not in (None, first["pid"]), what="the child as main")
    child = view["pid"]
    pmon.wait_dead(first["pid"], what="the old main process")
    (svc.dir / "handover").unlink()
    pmon.holds(lambda: pmon.desc("handdog")["pid"] == child, 1.0, message="the child pings: it stays the main")
    (svc.dir / f"mute.{child}").touch()
    pmon.wait_dead(child, timeout=10, what="the muted child, killed by the watchdog")
    view = pmon.wait_service("handdog", lambda s: s["restarts"] == 1 and s["status"] == "running", timeout=10,
                             what="restarted by the watchdog")
    assert view["pid"] != child
    assert svc.events("watchdog") == [f"no WATCHDOG=1 for 0.5 s: sending SIGABRT to process group {first['pid']}"]


IN_PLACE = r"""
import os, signal, socket, subprocess, time

addr = os.environ["NOTIFY_SOCKET"]


def notify(text):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), addr)


def reload(*_):
    notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
    time.sleep(0.1)  # re-reading its configuration
    notify("READY=1")


signal.signal(signal.SIGHUP, reload)
worker = subprocess.Popen(["sleep", "600"])  # in its group: what a window still open would take as a successor
with open("worker.pid", "w") as fh:
    fh.write(str(worker.pid))
notify("READY=1")
while True:
    time.sleep(1)
"""


@needs_follow
def test_ready_after_reloading_completes_reload_wait_and_closes_the_window(pmon):
    """A Type=notify service that reloads in place (RELOADING=1, then READY=1): `reload --wait` returns at
    READY=1 with success, and the reload window closes then: a crash later in its 30 s is a crash, and the
    worker it leaves is not taken for a successor."""
    svc = Svc(pmon, "inplace")
    svc.script.write_text(IN_PLACE)
    first = svc.run("--ready", "notify")
    pmon.wait_service("inplace", lambda s: s["status"] == "running", what="ready")
    worker = pmon.wait_for(lambda: int((svc.dir / "worker.pid").read_text()), message="the worker's pid")
    waited = pmon.run("reload", "inplace", "--sig", "HUP", "--wait", timeout=10)
    assert waited.returncode == 0 and "inplace: reloaded in place in " in waited.stdout, waited
    assert "(RELOADING=1, then READY=1 from process" in waited.stdout
    os.kill(first["pid"], signal.SIGKILL)  # well inside reload_timeout (30 s) of the reload
    view = pmon.wait_service("inplace", lambda s: s["restarts"] == 1 and s["pid"] not in (None, first["pid"]),
                             timeout=10, what="restarted as after any crash")
    assert view["pid"] != worker, "the worker was taken for a successor"
    assert not [m for m in svc.events("reload") if "handed over" in m]
    pmon.wait_dead(worker, 5, what="the crashed service's worker")
