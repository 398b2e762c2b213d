"""pmond's launcher process: services start through it, and without it (killed, or turned off) as well."""

from __future__ import annotations

import marshal
import os
import signal
import sys
import time
from pathlib import Path

from pmon2.daemon import launcher
from procs import is_alive


def comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def launcher_of(pmon) -> int | None:
    daemon = pmon.daemon_pid()
    found = [p for p in pmon.children_of(daemon) if comm(p) == "pmond-launcher" and pmon.is_alive(p)]
    return found[0] if found else None


def crash_restarts(pmon, name: str) -> None:
    old = pmon.services()[0]["pid"]
    os.kill(old, signal.SIGKILL)
    svc = pmon.wait_service(name, lambda s: s["pid"] not in (None, old) and s["status"] == "running",
                            timeout=2.0, what="a new pid after SIGKILL")
    assert pmon.ppid(svc["pid"]) == 1 and pmon.pgrp(svc["pid"]) == svc["pid"]


def test_services_start_through_a_launcher_child_of_pmond(pmon):
    pmon.start_service("sleep", "36001", "--name", "via")
    helper = pmon.wait_for(lambda: launcher_of(pmon), message="a pmond-launcher child of pmond")
    crash_restarts(pmon, "via")
    assert launcher_of(pmon) == helper, "the launcher should serve every launch, not be replaced"
    assert pmon.json("daemon", "status", "--json")["launcher_pid"] == helper
    # The launcher is the parent of no service: they belong to init.
    assert all(pmon.ppid(p) != helper for p in pmon.service_pids())


def test_a_killed_launcher_is_replaced_and_launches_go_on_meanwhile(pmon):
    pmon.start_service("sleep", "36002", "--name", "orphaned")
    helper = pmon.wait_for(lambda: launcher_of(pmon), message="the launcher")
    os.kill(helper, signal.SIGKILL)
    pmon.wait_dead(helper, what="the killed launcher")
    crash_restarts(pmon, "orphaned")  # pmond forks the service itself meanwhile
    fresh = pmon.wait_for(lambda: launcher_of(pmon) not in (None, helper) and launcher_of(pmon), timeout=5.0,
                          message="a new launcher")
    crash_restarts(pmon, "orphaned")
    assert pmon.is_alive(fresh)
    assert pmon.services()[0]["restarts"] == 2


def test_without_the_launcher_pmond_forks_services_itself(pmon):
    pmon.env["PMON2_LAUNCHER"] = "0"
    pmon.start_service("sleep", "36003", "--name", "direct")
    assert launcher_of(pmon) is None and pmon.json("daemon", "status", "--json")["launcher_pid"] is None
    crash_restarts(pmon, "direct")
    proc = pmon.run("run", "/nonexistent/binary", check=False)
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_daemon_stop_takes_its_launcher_along_and_reaps_it(pmon):
    pmon.start_service("sleep", "36004", "--name", "stays")
    helper = pmon.wait_for(lambda: launcher_of(pmon), message="the launcher")
    ahead = pmon.wait_for(lambda: pmon.children_of(helper), message="the child forked ahead")[0]
    svc_pid = pmon.services()[0]["pid"]
    pmon.run("daemon", "stop")
    # Reaped by their parents before pmond exits, not left to init as zombies (init reaps late here).
    for pid, what in ((helper, "the launcher"), (ahead, "the launcher's child")):
        pmon.wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), timeout=0.5,
                      message=f"{what} ({pid}) reaped, not a zombie: state {pmon.proc_state(pid)}")
    assert pmon.is_alive(svc_pid)


class Intermediate:
    """An intermediate child forked here, as pmond or the launcher would, to start `sleep NUMBER`; we play
    pmond's part through `status_r` (its report) and `ack_w` (our acknowledgement)."""

    def __init__(self, tmp_path: Path, number: int, *, pmond_gone: bool = False, launcher_gone: bool = False):
        # The argument carries this test process's pid: a concurrent run of the suite (CI beside a
        # developer's run) has sleeps of the same NUMBER, which services() and close() must never touch.
        arg = f"{number}.{os.getpid()}"
        self.want = f"sleep\0{arg}\0".encode()
        req = ("/bin/sleep", ["sleep", arg], dict(os.environ), str(tmp_path), str(tmp_path / "out"),
               str(tmp_path / "err"), None)
        self.status_r, status_w = os.pipe()
        ack_r, self.ack_w = os.pipe()
        note_r, note_w = os.pipe()
        if pmond_gone:
            os.close(self.status_r)  # pmond died before it could read the report
            self.status_r = -1
        if launcher_gone:
            os.close(note_r)
            note_r = -1
        self.pid = os.fork()
        if self.pid == 0:
            code = 127
            try:
                for fd in (self.status_r, self.ack_w, note_r):
                    if fd >= 0:
                        os.close(fd)
                code = launcher.intermediate(marshal.loads(marshal.dumps(req)), status_w, ack_r, spawned_w=note_w)
            finally:
                os._exit(code)
        for fd in (status_w, ack_r, note_w):
            os.close(fd)
        self.note_r = note_r

    def report(self) -> bytes:
        return os.read(self.status_r, 64)

    def exit_code(self) -> int:
        return os.WEXITSTATUS(os.waitpid(self.pid, 0)[1])

    def services(self) -> list[int]:
        """Live processes running our `sleep NUMBER` (a SIGKILLed one takes a moment to die)."""
        deadline = time.monotonic() + 2.0
        while True:
            found = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                     if read_cmdline(p) == self.want and is_alive(p)]
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def close(self) -> None:
        for fd in (self.status_r, self.ack_w, self.note_r):
            if fd >= 0:
                os.close(fd)
        for p in self.services():
            os.kill(p, signal.SIGKILL)


def read_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_intermediate_kills_the_service_when_pmond_never_acknowledges(tmp_path):
    """pmond died between the launch and its pidfd: no process may stay behind that nobody knows of."""
    inter = Intermediate(tmp_path, 36005)
    try:
        report = inter.report()
        service, pid = launcher.unpack_report(report)
        assert report[:1] == b"P" and pid == inter.pid and is_alive(service)
        os.close(inter.ack_w)  # pmond "died": no ack
        inter.ack_w = -1
        assert inter.exit_code() == 1
        assert inter.services() == [], "the unacknowledged service is still running"
    finally:
        inter.close()


def test_intermediate_kills_the_service_when_pmond_is_gone_before_the_report(tmp_path):
    inter = Intermediate(tmp_path, 36007, pmond_gone=True)
    try:
        assert inter.exit_code() == 1
        assert inter.services() == [], "a service nobody knows of was left running"
    finally:
        inter.close()


def test_a_dead_launcher_does_not_cost_the_report_of_a_started_service(tmp_path):
    """The child forked ahead can outlive its launcher for a moment and take one more request: its note to
    the dead launcher fails, and the service it started must still be reported (not left unknown)."""
    inter = Intermediate(tmp_path, 36006, launcher_gone=True)
    try:
        report = inter.report()
        assert report[:1] == b"P", f"the started service was reported as a failure: {report!r}"
        os.write(inter.ack_w, b"g")
        assert inter.exit_code() == 0
        assert inter.services() == [launcher.unpack_report(report)[0]]
    finally:
        inter.close()


def test_launcher_module_imports_nothing_heavy():
    code = ("import sys, pmon2.daemon.launcher; "
            "print(' '.join(m for m in ('asyncio', 'sqlite3', 'logging', 'h11', 'socket', 'typing') "
            "if m in sys.modules))")
    import subprocess

    src = str(Path(launcher.__file__).parents[2])
    out = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {src!r}); {code}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"the launcher's import pulls in: {out}"
