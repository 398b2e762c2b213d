"""The pure parts of daemon/follow.py: the pid file reader, the topmost of a set of processes, the search for
a successor over a fake /proc, the membership rule of MAINPID= and pid files, and the new spec fields."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pmon2 import procfs, spec
from pmon2.daemon import follow, recovery
from pmon2.daemon.follow import Follower, Kin, Refused, find_successor, read_pidfile, topmost
from pmon2.daemon.policy import Status
from pmon2.errors import BadRequest

ME = os.geteuid()
INST = recovery.Instance("inst", b"k" * recovery.KEY_BYTES)  # markers verify with its key


# the pid file


def test_a_pid_file_gives_its_first_line_as_a_pid(tmp_path: Path) -> None:
    path = tmp_path / "a.pid"
    path.write_text("  4242 \nsomething else\n")
    assert read_pidfile(str(path), ME) == 4242


@pytest.mark.parametrize(("content", "why"), [("", "is empty"), ("nginx\n", "does not hold a pid"),
                                              ("1\n", "does not hold a pid"), ("-5\n", "does not hold a pid"),
                                              (f"{1 << 23}\n", "does not hold a pid")])
def test_a_pid_file_not_written_yet_is_not_a_refusal(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "a.pid"
    path.write_text(content)
    got = read_pidfile(str(path), ME)
    assert got == f"pid file {path} {why}" and not isinstance(got, Refused), "no content echoed, no refusal"
    missing = read_pidfile(str(tmp_path / "none.pid"), ME)
    assert isinstance(missing, str) and not isinstance(missing, Refused) and "does not exist" in missing


def test_a_symlink_a_fifo_or_a_big_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.pid"
    target.write_text("4242\n")
    link = tmp_path / "link.pid"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)  # opened O_NONBLOCK: no writer, and still no hang
    big = tmp_path / "big.pid"
    big.write_text("4242\n" + "x" * follow.PIDFILE_MAX)
    for path, why in ((link, "symbolic link"), (fifo, "not a regular file"), (big, "larger than")):
        got = read_pidfile(str(path), ME)
        assert isinstance(got, Refused) and why in got, got


def test_what_is_not_a_regular_file_is_never_opened_for_reading(tmp_path: Path) -> None:
    """The path is the service user's choice and pmond reads it as root: opening a device can act (a watchdog
    device arms at open). A FIFO with a writer blocked in open(2) tells: any open for reading releases it."""
    import threading

    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)
    opened = threading.Event()
    tid: list[int] = []

    def writer() -> None:
        tid.append(threading.get_native_id())
        fd = os.open(fifo, os.O_WRONLY)  # blocks until a reader opens the FIFO
        opened.set()
        os.close(fd)

    def blocked() -> bool:
        try:
            return bool(tid) and Path(f"/proc/self/task/{tid[0]}/wchan").read_text() == "wait_for_partner"
        except OSError:
            return False

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not blocked():
            assert time.monotonic() < deadline, "the writer never blocked in open(2)"
            time.sleep(0.005)
        got = read_pidfile(str(fifo), ME)
        assert isinstance(got, Refused) and "not a regular file" in got, got
        assert not opened.wait(0.3), "the FIFO was opened for reading"
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # release the writer
        thread.join(5)


def test_a_pid_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if ME != 0:
        pytest.skip("needs root: chown to another uid")
    path = tmp_path / "a.pid"
    path.write_text("4242\n")
    os.chown(path, 4242, 4242)
    assert read_pidfile(str(path), 4242) == 4242  # the service's own user
    got = read_pidfile(str(path), 1000)
    assert isinstance(got, Refused) and "belongs to uid 4242" in got


# the topmost of a set of processes


def stat(pid: int, ppid: int, start: int, sid: int | None = None, pgrp: int | None = None,
         state: str = "S") -> procfs.Stat:
    return procfs.Stat(pid=pid, comm="x", state=state, ppid=ppid, pgrp=pgrp or pid, session=sid or pid, utime=0,
                       stime=0, starttime=start, rss_pages=0)


def test_the_topmost_is_the_one_whose_parent_is_not_in_the_set_and_ties_go_to_the_oldest() -> None:
    master, workers = stat(10, 1, 100), [stat(11, 10, 101), stat(12, 10, 102)]
    members = {s.pid: s for s in [*workers, master]}
    assert topmost(members) == 10
    helper = stat(9, 1, 50)  # an older process whose parent is not in the set either
    assert topmost({**members, 9: helper}) == 9
    assert topmost({**members, 9: helper}, since_ticks=60) == 10, "a reload window prefers what started after it"
    assert topmost({}) is None and topmost(members, since_ticks=1000) is None


# the search for a successor, over a fake /proc


class FakeProc:
    """A /proc of our own: stat, environ and an exe link per process; every dir is ours (uid ME)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, pid: int, ppid: int, start: int, sid: int | None = None, pgrp: int | None = None,
            state: str = "S", env: dict[str, str] | None = None, exe: Path | None = None) -> None:
        d = self.root / str(pid)
        d.mkdir()
        fields = [state, ppid, pgrp or pid, sid or pid, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 1, 0, start, 0, 0]
        (d / "stat").write_text(f"{pid} (proc {pid}) " + " ".join(map(str, fields)) + "\n")
        (d / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in (env or {}).items()))
        (d / "status").write_text(f"Name:\tproc {pid}\nUid:\t{ME}\t{ME}\t{ME}\t{ME}\n")  # recovery.process_uid
        if exe is not None:
            (d / "exe").symlink_to(exe)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    root = tmp_path / "proc"
    root.mkdir()
    return FakeProc(root)


def search(proc: FakeProc, held: dict[int, int] | None = None, exclude: set[int] | None = None, uid: int = ME,
           **kw: Any) -> tuple[int | None, set[int]]:
    kin = Kin(uid=uid, marker=(INST, 7), main=100, session=100, pgrp=100, known=held or {},
              others=dict.fromkeys(exclude or (), "other"), proc=str(proc.root))
    top, found = find_successor(kin, **({"since_ticks": 1000} | kw))
    return top, set(found)


def test_a_successor_is_found_by_session_marker_or_held_pidfd_and_never_a_stranger(proc: FakeProc) -> None:
    mark = {"PMON2_SERVICE": recovery.marker_value(INST, 7, ME)}
    proc.add(1, 0, 0)
    proc.add(100, 1, 1000, state="Z")  # the old main: exited
    proc.add(200, 1, 1200, sid=100, pgrp=100)  # re-exec'd without setsid: the old session and group
    proc.add(300, 1, 1300, env=mark)  # re-exec'd with setsid: found by its marker
    proc.add(301, 300, 1301, sid=300, pgrp=300, env=mark)  # its child: not topmost
    proc.add(400, 1, 1400)  # a stranger that started meanwhile
    proc.add(401, 1, 1401, env={"PMON2_SERVICE": recovery.marker_value(INST, 8, ME)})  # another service's process
    proc.add(403, 1, 1403, env={"PMON2_SERVICE": "inst:7"})  # a forged marker (no tag): a stranger
    proc.add(404, 1, 1404, env={"PMON2_SERVICE": recovery.marker_value(INST, 7, ME + 1)})  # tagged for another uid
    proc.add(402, 1, 1402, env={"PMON2_SERVICE": "other:7"})  # another pmond's
    proc.add(50, 1, 500, env=mark)  # marked but older than the old main: a leftover, not a descendant
    top, found = search(proc)
    assert found == {200, 300, 301} and top == 200
    top, found = search(proc, held={400: 1400})  # a child held by the reload window is one, marker or not
    assert found == {200, 300, 301, 400}
    assert search(proc, exclude={200})[0] == 300, "another service's main process is never taken"
    assert search(proc, prefer_since=1250)[0] == 300, "in a window, those started after the signal first"
    assert search(proc, prefer_since=9999)[0] == 200, "then the topmost of all"
    assert search(proc, uid=ME + 1) == (None, set()), "only processes of the service's uid"


def test_a_daemon_that_rewrote_its_environment_is_found_by_its_executable(proc: FakeProc, tmp_path: Path) -> None:
    """nginx overwrites its environment (marker and all) with its process title: its master is found as a
    process reparented away from the old main, running the same executable, started while the main ran."""
    exe, other = tmp_path / "nginx", tmp_path / "other"
    exe.write_text("")
    other.write_text("")
    proc.add(1, 0, 0)
    proc.add(100, 1, 1000, state="Z", exe=exe)
    proc.add(500, 1, 1010, exe=exe)  # the master: no marker, a session of its own
    proc.add(501, 500, 1011, sid=500, pgrp=500, exe=exe)  # a worker
    proc.add(600, 1, 1020, exe=other)  # something else started meanwhile
    proc.add(700, 1, 5000, exe=exe)  # the same program, started after the main had exited
    # pmond's launcher and the intermediate it forked ahead of the next launch, in pmond's session: a
    # service run by pmond's own interpreter sees them as orphans running its executable (CI, stop 16)
    pmond = os.getsid(0)
    proc.add(90, 1, 10, sid=pmond, pgrp=pmond, exe=exe)
    proc.add(800, 90, 1005, sid=pmond, pgrp=pmond, exe=exe, env={"PMON2_SERVICE": "inst:7"})
    # The same interpreter runs many programs: a command a shell started meanwhile (its parent adopts no
    # orphans), another pmond's service (its marker), neither is the main's orphan (CI, stop 17)
    proc.add(95, 1, 20, exe=other)
    proc.add(810, 95, 1030, exe=exe)
    proc.add(820, 1, 1040, exe=exe, env={"PMON2_SERVICE": "another-pmond:3"})
    # Strangers of the same uid and executable that kept an environment of their own, or have none: only
    # a process that overwrote its environment area (the title's tail, NULs) lost its marker that way.
    proc.add(830, 1, 1050, exe=exe, env={"HOME": "/root", "PATH": "/usr/bin"})
    proc.add(840, 1, 1060, exe=exe)  # an empty environment (execve with env={})
    for pid in (500, 810):
        (proc.root / str(pid) / "environ").write_bytes(b"\0" * 64)  # nginx pads its title with NULs
    ident = follow.file_id(str(exe))
    top, found = search(proc, exe=ident, until_ticks=2000)
    assert top == 500 and found == {500}
    assert follow.rewrote_environment(500, str(proc.root)) and not follow.rewrote_environment(830, str(proc.root))
    assert search(proc, exe=ident, until_ticks=2000, reapers=(1, 95))[1] == {500, 810}, "a subreaper's orphan"
    assert search(proc, exe=ident, until_ticks=2000, exe_since=1015)[1] == set(), \
        "in a reload window, an orphan from before the signal is no successor"
    assert search(proc)[0] is None, "without the executable to compare, nothing"
    (proc.root / "840" / "environ").write_bytes(b"ess /usr/sbin/nginx\0\0")  # a long title's tail
    assert search(proc, exe=ident, until_ticks=2000)[1] == {500, 840}


# membership: systemd's rule for MAINPID= and pid files, on this process table (no fork)


class FakeSupervisor:
    def __init__(self) -> None:
        self.instance_id = "0123456789abcdef"
        self.services: dict[int, Any] = {}


def service(pid: int, uid: int = ME, status: Status = Status.RUNNING) -> Any:
    from pmon2.daemon.supervisor import Service

    svc = Service(id=1, name="web", spec={"exe": "/bin/true", "cwd": "/", "env": {}}, uid=uid, status=status,
                  pid=pid)
    svc.pidfd = -1  # "alive" for the rule; no watch is made here
    return svc


def test_membership_takes_a_descendant_of_the_main_and_refuses_the_rest(tmp_path: Path) -> None:
    """The main process and its child each lead a session of their own (so only the parent links tie
    them); this test process plays pmond."""
    child_file = tmp_path / "child"
    main = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "p = subprocess.Popen(['sleep', '60'], start_new_session=True); "
                             f"open({str(child_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"],
                            start_new_session=True)
    child = None
    try:
        deadline = time.monotonic() + 10
        while not (child_file.exists() and child_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        child = int(child_file.read_text())
        sup = FakeSupervisor()
        f = Follower(sup)  # type: ignore[arg-type]
        svc = service(main.pid)
        sup.services[1] = svc
        assert f.membership(svc, child) is None, "a descendant through the parent links"
        assert "not a process of the service" in (f.membership(svc, 1) or "")
        assert "not a process of the service" in (f.membership(svc, os.getpid()) or ""), "pmond itself: never"
        assert "not a process of the service" in (f.membership(svc, os.getppid()) or ""), "nor its session"
        other_uid = service(main.pid, uid=ME + 4242)
        sup.services[1] = other_uid
        why = f.membership(other_uid, child)
        assert why is not None and f"not as the service's uid {ME + 4242}" in why, why
        assert "no process" in (f.membership(svc, (1 << 22) - 1) or "")
    finally:
        for pid in (child, main.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        main.wait()


def test_a_claim_on_a_service_that_does_not_run_is_refused() -> None:
    f = Follower(FakeSupervisor())  # type: ignore[arg-type]
    fd, why = f.claim(service(os.getppid(), status=Status.STOPPING), os.getpid())
    assert fd is None and why == "web is stopping"


def test_the_foreground_hint_knows_common_daemons() -> None:
    assert "daemon off" in follow.foreground_hint("/usr/sbin/nginx") and "--pidfile" in follow.foreground_hint("x")
    assert "--daemonize no" in follow.foreground_hint("/usr/bin/redis-server")


# the spec fields


def test_the_new_fields_go_through_the_spec_model() -> None:
    assert spec.SERVICE["reload_timeout"].default == 30.0
    assert spec.SERVICE["reload_timeout"].from_text("2.5") == 2.5
    with pytest.raises(BadRequest, match="--reload-timeout: must be more than 0 and at most 86400 seconds"):
        spec.SERVICE["reload_timeout"].from_text("0")
    with pytest.raises(BadRequest, match="--reload-timeout: must be more than 0 and at most 86400 seconds"):
        spec.SERVICE["reload_timeout"].from_text("-1")  # not "between 0 and ...": 0 is refused too
    assert spec.SERVICE["pidfile"].from_text("run/nginx.pid") == "run/nginx.pid"
    wait = {f.name: f for f in spec.RELOAD_FIELDS}["wait"]
    assert wait.validate(True) is True and wait.validate(False) is None and wait.validate(5) == 5.0
    with pytest.raises(BadRequest, match="wait:"):
        wait.validate("soon")
    body = spec.check_body({"argv": ["nginx"], "pidfile": "/run/nginx.pid", "reload_timeout": 10},
                           spec.SERVICE_FIELDS)
    assert body["pidfile"] == "/run/nginx.pid" and body["reload_timeout"] == 10.0


def test_the_one_descendant_reader_and_the_ppid_rule(proc: FakeProc) -> None:
    """procfs.descendants reads down the kernel's child lists, checking each child's ppid (a listed pid that
    is no longer that parent's child is skipped); Kin.check takes a descendant of the main as the service's
    even in a session and group of its own, and nothing else without a marker."""
    for pid, ppid in ((100, 1), (101, 100), (102, 101), (103, 1)):
        proc.add(pid, ppid, 1000 + pid)
    for parent, kids in ((100, "101"), (101, "102 103")):  # 103 is listed by 101, but its parent is init
        (proc.root / str(parent) / "task" / str(parent)).mkdir(parents=True)
        (proc.root / str(parent) / "task" / str(parent) / "children").write_text(kids + " ")
    assert set(procfs.descendants([100], proc=str(proc.root))) == {101, 102}
    assert set(procfs.descendants([100], limit=1, proc=str(proc.root))) == {101}
    kin = Kin(uid=ME, marker=("inst", 7), main=100, session=100, pgrp=100, proc=str(proc.root))
    assert kin.check(102)[1] is None, "a grandchild that left the main's session and group"
    why = kin.check(103)[1]
    assert why is not None and "not a process of the service" in why
    assert "main process of service api" in (Kin(uid=ME, marker=("inst", 7), main=100, others={101: "api"},
                                                 proc=str(proc.root)).check(101)[1] or "")


# the reload window's look at the main's children: 10 ms at first, then backing off, then stopping


def test_the_poll_backs_off_from_10_ms_to_a_quarter_second() -> None:
    delays, elapsed, last = [], 0.0, 0.0
    while elapsed < 3.0:
        last = follow.poll_delay(elapsed, last)
        delays.append(last)
        elapsed += last
    assert delays[0] == follow.POLL_S == 0.01 and min(delays) == 0.01, "never more often than every 10 ms"
    fast = [d for d in delays if d == 0.01]
    assert 49 <= len(fast) <= 51, "10 ms for the first half second"
    assert delays == sorted(delays) and delays[-1] == follow.POLL_MAX_S == 0.25
    assert len(delays) < 75, f"{len(delays)} looks in 3 s (300 at a steady 10 ms)"


CHILD_ON_USR2 = """
import os, signal, sys, time
def fork(*_):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
signal.signal(signal.SIGUSR2, fork)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_a_window_stops_looking_once_the_child_the_reload_forked_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload in place that forks (nginx's HUP starts new workers) and hands nothing over: the window
    looks at the main's children on poll_delay's schedule, not for its whole reload_timeout; once a child
    started since the signal is held it stops looking, and looks again if that child exits."""
    import asyncio
    import itertools
    import signal
    import subprocess
    import sys

    looks: list[float] = []
    real = procfs.descendants

    def counted(*args: Any, **kwargs: Any) -> dict[int, procfs.Stat]:
        looks.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(follow.procfs, "descendants", counted)
    main = subprocess.Popen([sys.executable, "-c", CHILD_ON_USR2], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its group: the child it forks goes with it at the end
    assert main.stdout is not None and main.stdout.readline() == "ready\n"

    async def scenario() -> None:
        sup = FakeSupervisor()
        f = Follower(sup)  # type: ignore[arg-type]
        svc = service(main.pid)
        svc.spec["reload_timeout"] = 20.0
        sup.services[1] = svc
        win = f.open_window(svc)
        try:
            await asyncio.sleep(1.3)
            gaps = [b - a for a, b in itertools.pairwise(looks)]
            assert len(looks) <= 65, f"{len(looks)} looks in 1.3 s (about 130 at a steady 10 ms)"
            assert min(gaps) >= 0.009 and gaps[-1] >= 0.15, gaps
            os.kill(main.pid, signal.SIGUSR2)
            for _ in range(100):
                if win.fresh:
                    break
                await asyncio.sleep(0.02)
            assert win.fresh and win.settled(), "the forked child is held"
            child = next(iter(win.fresh))
            settled = len(looks)
            await asyncio.sleep(1.3)
            assert len(looks) == settled, "no look at /proc once the forked child is held"
            os.kill(child, signal.SIGKILL)
            for _ in range(150):
                if len(looks) > settled:
                    break
                await asyncio.sleep(0.02)
            assert len(looks) > settled, "the child the window held exited: it looks again"
            assert not win.result.done(), "nothing ended the window"
        finally:
            f.forget(svc.id)

    try:
        asyncio.run(scenario())
    finally:
        os.killpg(main.pid, signal.SIGKILL)
        main.wait()
        if main.stdout is not None:
            main.stdout.close()


# REVIEW13 (FIX13A): what a pid alone, an exit inside a reload window and the executable rule may tell


def test_a_known_pid_counts_only_with_its_start_time(proc: FakeProc) -> None:
    """A process found at a handover, held or seen is known by pid and start time: a stranger that reuses
    the number after it exited (another start time) is not the service's."""
    proc.add(1, 0, 0)
    proc.add(100, 1, 1000)
    proc.add(300, 1, 1300)  # its own session and group, no marker: only `known` could make it the service's
    kin = Kin(uid=ME, marker=(INST, 7), main=100, session=100, pgrp=100, known={300: 1300}, proc=str(proc.root))
    assert kin.check(300)[1] is None
    reused = Kin(uid=ME, marker=(INST, 7), main=100, session=100, pgrp=100, known={300: 1250},
                 proc=str(proc.root))
    why = reused.check(300)[1]
    assert why is not None and "not a process of the service" in why


def test_a_death_by_sigkill_or_a_fault_inside_a_reload_window_is_a_crash() -> None:
    import signal

    from pmon2.daemon.watch import ExitStatus

    spec_ = {"stop_signal": "SIGTERM", "reload_signal": "USR2"}
    assert follow.crashed(ExitStatus(None, signal.SIGKILL), spec_)
    assert follow.crashed(ExitStatus(None, signal.SIGSEGV, core=True), spec_)
    assert follow.crashed(ExitStatus(None, signal.SIGUSR1, core=True), spec_), "any death that dumped core"
    assert not follow.crashed(ExitStatus(0, None), spec_), "the old copy's own exit ends the reload"
    assert not follow.crashed(ExitStatus(None, signal.SIGTERM), spec_), "stopped by its successor"
    assert not follow.crashed(ExitStatus(None, signal.SIGQUIT), spec_)
    assert not follow.crashed(ExitStatus(None, signal.SIGKILL), {"stop_signal": "KILL"}), "its own stop signal"


def test_the_executable_rule_holds_only_while_pmond_looks_and_only_after_its_last_look() -> None:
    """Follower._exe_since: a reload window that is not settled gives its last look (never before the
    signal); a settled one, or one that never looked, none; outside a window, the start window's last look
    while its looking task runs, else none."""
    import asyncio

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        tr = follow.Track(main=100, session=100, pgrp=100)
        win = follow.Window(svc_id=1, main=100, deadline=loop.time() + 5, timeout=5, since_ticks=500,
                            result=loop.create_future())
        assert Follower._exe_since(tr, win) is None, "no look yet"
        win.looked = 700
        assert Follower._exe_since(tr, win) == 700
        win.looked = 400
        assert Follower._exe_since(tr, win) == 500, "never before the signal"
        win.held = {1: -1} | {i: -1 for i in range(2, follow.HELD_MAX + 1)}
        assert win.settled() and Follower._exe_since(tr, win) is None, "a settled window looks no more"
        assert Follower._exe_since(tr, None) is None, "no start window"
        tr.looked = 900
        tr.start_task = loop.create_task(asyncio.sleep(10))
        assert Follower._exe_since(tr, None) == 900
        tr.start_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tr.start_task
        assert Follower._exe_since(tr, None) is None, "the start window is over"

    asyncio.run(scenario())


def test_a_pid_file_owned_by_root_is_refused_for_a_service_of_another_user(tmp_path: Path) -> None:
    if ME != 0:
        pytest.skip("needs root: a file of root's for another uid's service")
    path = tmp_path / "a.pid"
    path.write_text("4242\n")
    got = read_pidfile(str(path), 4242)
    assert isinstance(got, Refused) and "belongs to uid 0" in got


def test_the_start_window_looks_ever_less_often() -> None:
    """Every launch has a start window (1,000 at once for an applied file): 7 looks in its first second,
    from 10 ms, each wait twice the last."""
    waits, delay = [], 0.0
    while sum(waits) < 1.0:
        delay = follow.start_look_delay(delay)
        waits.append(delay)
    assert waits[:3] == [0.01, 0.02, 0.04] and len(waits) == 7
