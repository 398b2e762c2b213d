"""sd_notify for services (daemon/notify.py): parsing, the sender checks against a fake /proc, and the socket
with a fake supervisor (real datagrams sent by this process, no forks)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pmon2 import procfs
from pmon2.daemon import follow, notify, recovery
from pmon2.daemon.follow import GONE, Kin, parse_pid
from pmon2.daemon.notify import clean_status, parse, parse_usec
from pmon2.daemon.policy import Status, Trigger
from pmon2.daemon.supervisor import Service

# parsing


def test_parse_keeps_the_first_of_a_key_and_skips_bad_lines() -> None:
    data = b"READY=1\nSTATUS=one=two\n\nnoequals\nlower=x\n=empty\nSTATUS=second\nMAINPID=12\n"
    assert parse(data) == {"READY": "1", "STATUS": "one=two", "MAINPID": "12"}


def test_parse_replaces_bad_utf8() -> None:
    assert parse(b"STATUS=caf\xe9") == {"STATUS": "caf\ufffd"}


def test_clean_status_strips_control_and_format_characters_and_cuts() -> None:
    assert clean_status("  serving\x1b[31m 3\nrequests\u202e  ") == "serving[31m 3requests"
    assert clean_status("\x00\t\n") is None
    long = clean_status("x" * 1000)
    assert long is not None and len(long) == notify.STATUS_MAX and long.endswith("…")


@pytest.mark.parametrize(("text", "pid"), [("42", 42), ("0", None), ("1", None), ("-1", None), ("4x", None),
                                           ("٣", None), (str(1 << 23), None), ("", None)])
def test_parse_pid(text: str, pid: int | None) -> None:
    assert parse_pid(text) == pid


def test_parse_usec() -> None:
    assert parse_usec("500000") == 500000
    assert parse_usec("0") == 0
    assert parse_usec("1e6") is None
    assert parse_usec("99999999999") == 86_400_000_000  # capped at a day


def test_wants_socket() -> None:
    assert notify.wants_socket({"ready": "notify"})
    assert notify.wants_socket({"watchdog_sec": 2.0})
    assert not notify.wants_socket({"ready": "tcp://127.0.0.1:80"})
    assert not notify.wants_socket({})


# the sender checks (follow.Kin.check, as a notify socket uses it), against a fake /proc


def fake_proc(root: Path, pid: int, *, pgrp: int, session: int, state: str = "S", marker: str | None = None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = [state, "1", str(pgrp), str(session)] + ["0"] * 15 + ["777", "0", "0"]
    (d / "stat").write_text(f"{pid} (svc) " + " ".join(fields) + "\n")
    if marker:  # "abc:7": pmond abc's service 7, tagged with the key as pmond tags it (recovery.marker_value)
        instance, sid = marker.split(":")
        marker = recovery.marker_value(recovery.Instance(instance, MARK_KEY), int(sid), 1000)
    env = b"PATH=/bin\0" + (f"PMON2_SERVICE={marker}\0".encode() if marker else b"")
    (d / "environ").write_bytes(b"" if state == "Z" else env)
    (d / "status").write_text("Uid:\t1000\t1000\t1000\t1000\n")


MARK_KEY = b"k" * recovery.KEY_BYTES


def kin(proc: Path, main: int | None = 100) -> Kin:
    return Kin(uid=1000, marker=(recovery.Instance("abc", MARK_KEY), 7), main=main, session=main, pgrp=main,
               proc=str(proc))


def check(proc: Path, pid: int, uid: int = 1000, main: int | None = 100) -> str | None:
    return kin(proc, main).check(pid, uid=uid, sender=True)[1]


def test_sender_of_the_service_is_accepted(tmp_path: Path) -> None:
    fake_proc(tmp_path, 100, pgrp=100, session=100)  # the main process
    fake_proc(tmp_path, 101, pgrp=100, session=100)  # a worker in its group
    fake_proc(tmp_path, 102, pgrp=102, session=100)  # its own group, the same session
    fake_proc(tmp_path, 103, pgrp=103, session=103, marker="abc:7")  # left with setsid, marked
    for pid in (100, 101, 102, 103):
        assert check(tmp_path, pid) is None, pid
    assert check(tmp_path, 101, uid=0) is None, "root may speak for a process of the service"
    st, _ = kin(tmp_path).check(101, uid=1000, sender=True)
    assert st is not None and st.starttime == 777


def test_stranger_is_refused(tmp_path: Path) -> None:
    fake_proc(tmp_path, 100, pgrp=100, session=100)
    fake_proc(tmp_path, 200, pgrp=200, session=200)  # same uid, no marker
    fake_proc(tmp_path, 201, pgrp=201, session=201, marker="abc:8")  # another service's
    fake_proc(tmp_path, 202, pgrp=202, session=202, marker="zzz:7")  # another pmond's service 7
    for pid in (200, 201, 202):
        reason = check(tmp_path, pid)
        assert reason is not None and reason != GONE and "not a process of the service" in reason, (pid, reason)
    reason = check(tmp_path, 101, uid=1001)
    assert reason is not None and "uid 1001" in reason
    assert check(tmp_path, 0) is not None and check(tmp_path, 0) != GONE


def test_uid_is_checked_before_anything_else(tmp_path: Path) -> None:
    fake_proc(tmp_path, 100, pgrp=100, session=100)
    reason = check(tmp_path, 100, uid=1001)  # even the main pid, from another uid (a reused pid)
    assert reason is not None and "uid 1001" in reason


def test_exited_senders_are_dropped_silently_unless_of_the_group(tmp_path: Path) -> None:
    fake_proc(tmp_path, 101, pgrp=100, session=100, state="Z")
    fake_proc(tmp_path, 300, pgrp=300, session=300, state="Z", marker="abc:7")
    assert check(tmp_path, 101) is None, "a zombie of the main's group still tells its group"
    assert check(tmp_path, 300) == GONE, "a zombie's environment is gone: nothing tells it was the service's"
    assert check(tmp_path, 999) == GONE
    assert check(tmp_path, 101, main=None) == GONE, "no main process: only a live marker counts"


# the socket, with a fake supervisor


class FakeFollow(follow.Follower):
    """Supervisor.follow, with group() as after a handover: `groups` pid -> (pgid, pidfd) of the group a main
    process that leads none belongs to."""

    def __init__(self, sup: Any) -> None:
        super().__init__(sup)
        self.groups: dict[int, tuple[int, int]] = {}

    def group(self, svc: Any, pid: int, pidfd: int) -> tuple[int, int]:
        return self.groups.get(pid, (pid, pidfd))


class FakeSup:
    def __init__(self) -> None:
        self.services: dict[int, Service] = {}
        self.instance_id = "test"
        self.follow = FakeFollow(self)
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.claims: list[tuple[int, str]] = []

    def _event(self, svc: Any, kind: str, message: str, **data: Any) -> None:
        self.events.append((kind, message, data))

    def _claim_main_pid(self, svc: Any, pid: int, source: str) -> str | None:
        self.claims.append((pid, source))
        return None

    def kinds(self, kind: str) -> list[str]:
        return [m for k, m, _ in self.events if k == kind]


def service(spec: dict[str, Any], status: Status = Status.RUNNING) -> Service:
    """A service whose main process is this test process (so that what it sends is the service's)."""
    me = procfs.read_stat(os.getpid())
    assert me is not None
    return Service(id=5, name="svc", spec={"env": {}, "kill_timeout": 0.05, **spec}, uid=os.geteuid(),
                   status=status, pid=os.getpid(), start_ticks=me.starttime, pidfd=self_pidfd())


_SELF: list[int] = []


def self_pidfd() -> int:
    """A pidfd on this test process, the services' main process here (opened once: the watchdog dups it)."""
    if not _SELF:
        _SELF.append(os.pidfd_open(os.getpid()))
    return _SELF[0]


def with_notify(tmp_path: Path, body: Callable[[FakeSup, notify.Notify], Awaitable[None]]) -> None:
    async def main() -> None:
        sup = FakeSup()
        n = notify.Notify(sup, str(tmp_path / "run" / "notify"))
        try:
            await body(sup, n)
        finally:
            for sid in list(n.channels):
                n.close(sid)

    (tmp_path / "run").mkdir()
    asyncio.run(main())


def send(path: str, text: str | bytes, fds: list[int] | None = None) -> None:
    data = text.encode() if isinstance(text, str) else text
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, "little") for fd in fds))] \
            if fds else []
        s.sendmsg([data], ancillary, 0, path)


async def settle(predicate: Callable[[], Any], timeout: float = 2.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not (value := predicate()):
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)
    return value


def test_env_sets_the_socket_and_watchdog_and_never_keeps_stored_ones(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify", "watchdog_sec": 1.5})
        sup.services[svc.id] = svc
        stored = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_PID": "1"}
        env = n.env(svc, stored)
        path = str(tmp_path / "run" / "notify" / "5")
        assert env == {"PATH": "/bin", "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1500000"}
        assert stored["NOTIFY_SOCKET"] == "/run/systemd/notify", "the stored environment is not changed"
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "run" / "notify").st_mode) == 0o755
        plain = service({})
        plain.id = 6
        assert n.env(plain, stored) == {"PATH": "/bin"}
        assert 6 not in n.channels
        svc.spec = {**svc.spec, "ready": None, "watchdog_sec": 0}
        n.env(svc, {})
        assert not os.path.exists(path), "a service that no longer uses sd_notify loses its socket"

    with_notify(tmp_path, body)


def test_messages_change_the_service(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify"}, Status.STARTING)
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        waiting = asyncio.ensure_future(n.wait_ready(svc, 5.0, asyncio.Event()))
        send(path, "STATUS=warming up\x1b[2J\nRELOADING=1\nMONOTONIC_USEC=1")
        await settle(lambda: svc.status_text)
        assert svc.status_text == "warming up[2J"
        assert n.view(svc)["notify"]["reloading_since"] is not None
        send(path, "READY=1\nSTATUS=serving")
        result = await asyncio.wait_for(waiting, 2)
        assert result.ok and result.detail == f"READY=1 from process {os.getpid()}"
        assert svc.status_text == "serving"
        assert n.view(svc)["notify"]["reloading_since"] is None
        assert any(m.startswith("reloaded in") for m in sup.kinds("notify"))
        send(path, "STOPPING=1")
        await settle(lambda: n.view(svc)["notify"]["stopping"])
        send(path, f"MAINPID={os.getpid()}")  # the main already: nothing to claim
        send(path, "MAINPID=4242")
        await settle(lambda: sup.claims)
        assert sup.claims == [(4242, "MAINPID=")]
        send(path, "MAINPID=abc")
        await settle(lambda: any("not a pid" in m for m in sup.kinds("notify")))
        # A new process starts with a clean slate.
        svc.start_ticks = (svc.start_ticks or 0) + 1
        n.transition(svc, Trigger.SPAWNED)
        assert svc.status_text is None and not n.view(svc)["notify"]["stopping"]

    with_notify(tmp_path, body)


def test_wait_ready_counts_only_the_current_run_and_times_out(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify"}, Status.STARTING)
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        send(path, "READY=1")
        await settle(lambda: n.channels[svc.id].ready)
        svc.start_ticks = (svc.start_ticks or 0) + 1  # as if a newer main process had started since
        result = await n.wait_ready(svc, 0.1, asyncio.Event())
        assert not result.ok and result.detail == "no READY=1 within 0.1 s"
        stop = asyncio.Event()
        stop.set()
        assert (await n.wait_ready(svc, 5, stop)).detail == "the process exited"

    with_notify(tmp_path, body)


def test_wait_ready_pid(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify"})
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        me = os.getpid()
        result = await n.wait_ready_pid(svc, me, 0.05)
        assert not result.ok and result.detail == f"no READY=1 from process {me} within 0.05 s"
        waiting = asyncio.ensure_future(n.wait_ready_pid(svc, me, 5))
        await asyncio.sleep(0.01)
        send(path, "READY=1")
        result = await asyncio.wait_for(waiting, 2)
        assert result.ok, result
        assert (await n.wait_ready_pid(svc, me, 0)).ok, "a READY=1 that came before the call counts"
        assert not (await n.wait_ready_pid(svc, 1 << 22, 1)).ok
        other = service({})
        other.id = 9
        assert "no notify socket" in (await n.wait_ready_pid(other, me, 1)).detail

    with_notify(tmp_path, body)


def test_refused_messages_are_counted_in_rate_limited_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "REFUSED_GAP", 0.2)

    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify"})
        svc.uid = os.geteuid() + 1 if os.geteuid() else 4242  # this process is not of the service's uid
        svc.pid = 1  # nor of its processes
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        os.chmod(path, 0o666)  # as root the socket is the service uid's now: let this test process send
        for i in range(5):
            send(path, f"STATUS=forged {i}\nREADY=1")
        await settle(lambda: sup.kinds("notify"))
        first = sup.kinds("notify")
        assert len(first) == 1 and first[0].startswith("refused 1 message on its notify socket; the last from "
                                                       f"process {os.getpid()}"), first
        await settle(lambda: len(sup.kinds("notify")) == 2)
        assert sup.kinds("notify")[1].startswith("refused 4 messages"), sup.kinds("notify")
        assert svc.status_text is None and not n.channels[svc.id].ready
        await asyncio.sleep(0.3)
        assert len(sup.kinds("notify")) == 2, "nothing more to tell"

    with_notify(tmp_path, body)


def test_oversized_message_is_refused_and_passed_fds_are_closed(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify"})
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        send(path, b"STATUS=" + b"x" * notify.MAX_MESSAGE)
        await settle(lambda: sup.kinds("notify"))
        assert "longer than 4096 bytes" in sup.kinds("notify")[0]
        r, w = os.pipe()
        before = len(os.listdir("/proc/self/fd"))
        send(path, "FDSTORE=1\nSTATUS=with fds", fds=[r, w])
        await settle(lambda: svc.status_text == "with fds")
        assert len(os.listdir("/proc/self/fd")) == before, "the fds pmond received were closed"
        os.close(r)
        os.close(w)

    with_notify(tmp_path, body)


def test_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(notify.watch, "signal_group", lambda fd, pgid, sig: signals.append((pgid, sig)) or True)

    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"watchdog_sec": 0.4}, Status.STARTING)
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        n.transition(svc, Trigger.SPAWNED)
        assert n.channels[svc.id].timer is None, "no watchdog while starting"
        svc.status = Status.RUNNING
        n.transition(svc, Trigger.READY)
        for _ in range(12):  # 0.6 s of pings every 0.05 s: alive
            await asyncio.sleep(0.05)
            send(path, "WATCHDOG=1")
        assert signals == [] and n.view(svc)["notify"]["watchdog_at"] is not None
        await settle(lambda: signals)
        assert signals[0] == (os.getpid(), signal.SIGABRT)
        assert sup.kinds("watchdog") == [f"no WATCHDOG=1 for 0.4 s: sending SIGABRT to process group {os.getpid()}"]
        await settle(lambda: len(signals) == 2)  # still running kill_timeout later
        assert signals[1] == (os.getpid(), signal.SIGKILL)
        # The service sets its own timeout, then asks for the watchdog's action itself.
        svc.generation += 1
        signals.clear()
        n.transition(svc, Trigger.SPAWNED)
        send(path, "WATCHDOG_USEC=0")
        await settle(lambda: n.channels[svc.id].watchdog_override == 0)
        assert n.channels[svc.id].timer is None and n.view(svc)["notify"]["watchdog_s"] is None
        await asyncio.sleep(0.5)
        assert signals == []
        send(path, "WATCHDOG=trigger")
        await settle(lambda: signals)
        assert "WATCHDOG=trigger from process" in sup.kinds("watchdog")[-1]
        svc.status = Status.STOPPING  # a user stops it meanwhile: no SIGKILL from the watchdog
        n.transition(svc, Trigger.STOP)
        await asyncio.sleep(0.15)
        assert signals == [(os.getpid(), signal.SIGABRT)]

    with_notify(tmp_path, body)


def test_watchdog_signals_the_group_a_handed_over_main_belongs_to(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A main process taken over by MAINPID= (a child in its parent's group) leads no group: the watchdog
    signals the group it is in (through its leader's pidfd), or it alone, as a stop does; a group signal
    through its own pidfd would reach nobody (ESRCH) and leave it running."""
    signals: list[tuple[int, int, int]] = []

    def group_signal(fd: int, pgid: int, sig: int) -> bool:
        signals.append((fd, pgid, sig))
        return pgid != os.getpid()  # the main leads no group: its own pgid reaches nobody

    monkeypatch.setattr(notify.watch, "signal_group", group_signal)
    monkeypatch.setattr(notify.watch, "send_signal", lambda fd, sig: signals.append((fd, 0, sig)) or True)

    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"watchdog_sec": 0.1}, Status.RUNNING)
        sup.services[svc.id] = svc
        n.env(svc, {})
        leader = os.pidfd_open(os.getpid())  # stands for the pinned leader of the old main's group
        sup.follow.groups[os.getpid()] = (4242, leader)
        n.transition(svc, Trigger.READY)
        await settle(lambda: len(signals) >= 2)
        assert [(pgid, sig) for _, pgid, sig in signals[:2]] == [(4242, signal.SIGABRT), (4242, signal.SIGKILL)]
        assert all(same_process(fd, leader) for fd, _, _ in signals[:2]), "through the leader's pidfd"
        os.close(leader)
        assert sup.kinds("watchdog") == ["no WATCHDOG=1 for 0.1 s: sending SIGABRT to process group 4242"]
        # No group could be pinned: the process itself is signalled (never nobody).
        signals.clear()
        sup.follow.groups.clear()
        svc.generation += 1
        n.transition(svc, Trigger.SPAWNED)
        await settle(lambda: len(signals) >= 2)
        assert [(pgid, sig) for _, pgid, sig in signals[:2]] == [(os.getpid(), signal.SIGABRT), (0, signal.SIGABRT)]

    with_notify(tmp_path, body)


def same_process(fd: int, other: int) -> bool:
    """Two fds open on the same file (a dup of a pidfd: the watchdog keeps its own while it waits)."""
    a, b = os.fstat(fd), os.fstat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_recover_rebinds_running_services_and_removes_stale_sockets(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify"})
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stale.bind(str(tmp_path / "run" / "notify" / "77"))
        stale.close()
        n.channels[svc.id].sock.close()  # pmond died: its socket is gone, the file stays
        n.channels.clear()
        fresh = notify.Notify(sup, n.directory)
        fresh.recover()
        assert os.path.exists(path) and not os.path.exists(tmp_path / "run" / "notify" / "77")
        send(path, "STATUS=still here")
        await settle(lambda: svc.status_text == "still here")
        for sid in list(fresh.channels):
            fresh.close(sid)

    with_notify(tmp_path, body)


def test_the_notify_dir_must_be_pmonds(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        os.symlink(tmp_path, n.directory)
        svc = service({"ready": "notify"})
        sup.services[svc.id] = svc
        with pytest.raises(notify.SpawnError, match="cannot open"):
            n.env(svc, {})

    with_notify(tmp_path, body)


def test_desc_shows_what_the_service_said() -> None:
    from pmon2.render.detail import render_detail

    svc = {"id": 3, "name": "api", "status": "running", "pid": 42, "argv": ["./api"], "exe": "/srv/api",
           "cwd": "/srv", "restarts": 0, "out_log": "/l/o", "err_log": "/l/e", "env": {}, "autorestart": True,
           "status_text": "serving 12 requests/s",
           "notify": {"socket": "/run/pmon2/notify/3", "reloading_since": "2026-12-01T00:00:00.000Z",
                      "stopping": False, "watchdog_s": 10.0, "watchdog_at": None}}
    lines = render_detail(svc, False).splitlines()
    assert lines[1].split() == ["status", "running"]
    assert lines[2].split(None, 2) == ["status", "text", "serving 12 requests/s"]
    assert lines[3].strip() == "reloading since 2026-12-01T00:00:00.000Z (RELOADING=1, until READY=1)"
    notify_line = next(line for line in lines if line.strip().startswith("sd_notify"))
    assert notify_line.split(None, 1)[1] == ("NOTIFY_SOCKET=/run/pmon2/notify/3; watchdog 10 s, last WATCHDOG=1 "
                                             "none yet")
    assert "status text" not in render_detail(dict(svc, notify=None), False)


def test_only_the_main_process_announces_a_reload_or_a_stop(tmp_path: Path) -> None:
    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify"})
        sup.services[svc.id] = svc
        n.env(svc, {})
        chan = n.channels[svc.id]
        # A marked process in a session of its own that is not the main one (a worker that left the group).
        old = procfs.Stat(pid=4000, comm="old", state="S", ppid=1, pgrp=4000, session=4000, utime=0, stime=0,
                          starttime=1, rss_pages=0)
        n._apply(chan, svc, old, {"STOPPING": "1", "RELOADING": "1", "STATUS": "draining"})
        assert not chan.stopping and chan.reloading_since is None
        assert svc.status_text == "draining", "its STATUS= is still the service's"
        worker = procfs.Stat(pid=4001, comm="w", state="S", ppid=1, pgrp=os.getpid(), session=4001, utime=0,
                             stime=0, starttime=1, rss_pages=0)
        n._apply(chan, svc, worker, {"STOPPING": "1"})
        assert chan.stopping
        svc.status = Status.BACKOFF  # the process is gone: so is what it announced
        n.transition(svc, Trigger.EXIT)
        assert not chan.stopping

    with_notify(tmp_path, body)


def test_a_process_the_service_retired_is_heard_quietly_and_changes_nothing(tmp_path: Path) -> None:
    """A rolling restart handed over away from this process (the old instance) and stops it: its STOPPING=1
    and whatever else it says as it shuts down is no refusal, and no longer the service's word (its STATUS=,
    a stop, READY=1, the watchdog are the new main's)."""
    import subprocess

    new_main = subprocess.Popen(["sleep", "600"], start_new_session=True)  # not this process's session

    async def body(sup: FakeSup, n: notify.Notify) -> None:
        svc = service({"ready": "notify", "watchdog_sec": 5.0})
        sup.services[svc.id] = svc
        path = n.env(svc, {})["NOTIFY_SOCKET"]
        chan = n.channels[svc.id]
        send(path, "READY=1\nSTATUS=serving")  # while this process is the main one
        await settle(lambda: svc.status_text == "serving")
        me = procfs.read_stat(os.getpid())
        assert me is not None
        sup.follow.retiring(svc, os.getpid(), me.starttime)  # as Follower.handed_over does at the roll
        svc.pid, svc.start_ticks = new_main.pid, (me.starttime + 1)
        send(path, "STOPPING=1\nSTATUS=old one stopping\nREADY=1\nWATCHDOG=trigger")
        send(path, "STATUS=still the old one")
        await asyncio.sleep(0.2)
        assert not sup.kinds("notify") or all("refused" not in m for m in sup.kinds("notify")), sup.events
        assert svc.status_text == "serving" and not chan.stopping, "the retired process does not speak for it"
        assert not sup.kinds("watchdog") and len(chan.ready) == 1
        stranger = procfs.Stat(pid=4002, comm="x", state="S", ppid=1, pgrp=os.getpid(), session=4002, utime=0,
                               stime=0, starttime=me.starttime, rss_pages=0)
        assert sup.follow.retired(svc, stranger), "a process of the group the retired one leads"
        assert not sup.follow.retired(svc, procfs.read_stat(new_main.pid)), "never the main process"  # type: ignore[arg-type]

    try:
        with_notify(tmp_path, body)
    finally:
        new_main.kill()
        new_main.wait()
