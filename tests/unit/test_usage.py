"""daemon/usage.py on a fake /proc: who belongs to a service, CPU per process, PSS with its fallback and cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pmon2.daemon import usage
from pmon2.procfs import CLOCK_TICKS, PAGE_SIZE

NOW = 1000.0  # seconds since boot, the fake clock's start


def stat_line(pid: int, *, state: str = "S", ppid: int = 1, pgrp: int, session: int, utime: int = 0,
              stime: int = 0, start: float = 900.0, rss: int = 100) -> str:
    fields = ["0"] * 50  # fields 3..52
    fields[0], fields[1], fields[2], fields[3] = state, str(ppid), str(pgrp), str(session)
    fields[11], fields[12] = str(utime), str(stime)
    fields[19] = str(int(start * CLOCK_TICKS))
    fields[21] = str(rss)
    return f"{pid} (p{pid}) " + " ".join(fields) + "\n"


class FakeProc:
    """A /proc of stat and children files, with getsid and smaps_rollup answered from the same table."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.table: dict[int, dict] = {}
        self.pss: dict[int, int | None] = {}
        self.getsid_calls = 0
        self.pss_reads: list[int] = []
        self.now = NOW

    def add(self, pid: int, pss: int | None = 1_000_000, **kw) -> None:
        kw.setdefault("ppid", 1)
        self.table[pid] = kw
        self.pss[pid] = pss
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(stat_line(pid, **kw))
        self._children()

    def remove(self, pid: int) -> None:
        del self.table[pid]
        shutil.rmtree(self.root / str(pid))
        self._children()

    def _children(self) -> None:
        kids: dict[int, list[int]] = {}
        for pid, kw in self.table.items():
            kids.setdefault(kw["ppid"], []).append(pid)
        for parent in {1, *self.table, *kids}:
            d = self.root / str(parent) / "task" / str(parent)
            d.mkdir(parents=True, exist_ok=True)
            (d / "children").write_text("".join(f"{c} " for c in sorted(kids.get(parent, []))))

    def getsid(self, pid: int) -> int:
        self.getsid_calls += 1
        if pid not in self.table:
            raise ProcessLookupError(pid)
        return self.table[pid]["session"]

    def read_pss(self, pid: int, proc: str) -> int | None:
        self.pss_reads.append(pid)
        return self.pss.get(pid)

    def sampler(self, **kw) -> usage.Sampler:
        return usage.Sampler(proc=str(self.root), clock=lambda: self.now, getsid=self.getsid,
                             read_pss=self.read_pss, **kw)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    fp = FakeProc(tmp_path)
    (tmp_path / "self").mkdir()  # not a pid: ignored
    return fp


def service(fake: FakeProc, main: int, sid: int, workers: int = 0, **kw) -> None:
    """A service as pmond starts it: session `sid` (the intermediate's pid, gone), group `main`."""
    fake.add(main, pgrp=main, session=sid, **kw)
    for i in range(1, workers + 1):
        fake.add(main + i, ppid=main, pgrp=main, session=sid)


def a_service_with_neighbours(fake: FakeProc) -> None:
    service(fake, 100, sid=99, workers=1)
    fake.add(102, ppid=1, pgrp=100, session=99)  # an orphan of the service: still its own
    fake.add(103, ppid=100, pgrp=100, session=99, state="Z")  # exited, not yet reaped
    fake.add(104, ppid=100, pgrp=104, session=104)  # called setsid: left the service
    fake.add(105, ppid=100, pgrp=105, session=99)  # a group of its own in the service's session
    fake.add(107, ppid=104, pgrp=100, session=99)  # forked by 104 before its setsid: still the service's
    fake.add(200, pgrp=200, session=200)  # a stranger


def test_members_are_the_session_minus_zombies_and_leavers(fake):
    a_service_with_neighbours(fake)  # the session's leader, pmond's intermediate, has exited
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.processes == 5  # 100, 101, 102, 105, 107
    assert figures.mem_bytes == 5_000_000 and figures.mem_source == "pss"


def test_a_zombie_leader_is_gone(fake):
    a_service_with_neighbours(fake)
    fake.add(99, pgrp=99, session=99, ppid=50, state="Z")  # the intermediate, not reaped yet by init
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.processes == 5


def test_while_the_session_leader_lives_the_service_is_its_process_group(fake):
    # An adopted process (pmon2 import) whose shell or former manager leads the session, or the
    # intermediate in the instant before it exits: strangers may share the session, never the group.
    a_service_with_neighbours(fake)
    fake.add(99, pgrp=99, session=99, ppid=50)
    fake.add(106, ppid=99, pgrp=106, session=99)  # another job of that shell
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.processes == 4  # 100, 101, 102, 107


def test_a_main_process_that_leads_no_group_and_shares_a_live_session_is_alone(fake):
    fake.add(99, pgrp=99, session=99)  # a shell
    fake.add(100, ppid=99, pgrp=98, session=99)  # adopted: one process of the shell's pipeline 98
    fake.add(101, ppid=100, pgrp=98, session=99)
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.processes == 1


def test_a_main_process_that_leads_its_session(fake):
    fake.add(100, pgrp=100, session=100)
    fake.add(101, ppid=100, pgrp=101, session=100)
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.processes == 2


def test_init_s_children_are_looked_at_once_whatever_the_number_of_services(fake):
    for k in range(10):
        service(fake, 1000 + 10 * k, sid=999 - k, workers=2)
    fake.add(50, pgrp=50, session=50)
    sampler = fake.sampler()
    scan = sampler.scan()
    got = [scan.usage(1000 + 10 * k, None) for k in range(10)]
    assert all(g is not None and g[0].processes == 3 for g in got)
    # init's children (10 services and pid 50) once each, not once per service; and each service's leader
    assert fake.getsid_calls == 11 + 10
    fake.now += 1.0
    sampler.scan().usage(1000, None)
    assert fake.getsid_calls == 21 + 1  # the next request within ORPHANS_TTL: the same list of init's children
    fake.now += usage.ORPHANS_TTL
    sampler.scan().usage(1000, None)
    assert fake.getsid_calls == 22 + 11 + 1  # looked at again


def test_a_new_orphan_is_found_once_the_orphan_list_is_renewed(fake):
    service(fake, 100, sid=99, workers=1)
    sampler = fake.sampler()
    assert sampler.scan().usage(100, None)[0].processes == 2
    fake.remove(101)
    fake.add(101, pgrp=100, session=99)  # its parent exited: init's child now
    fake.now += 1.0
    assert sampler.scan().usage(100, None)[0].processes == 1  # not seen yet: at most ORPHANS_TTL late
    fake.now += usage.ORPHANS_TTL
    assert sampler.scan().usage(100, None)[0].processes == 2


def test_nothing_is_looked_at_when_nothing_runs(fake):
    sampler = fake.sampler()
    assert sampler.scan().usage(4242, None) is None
    fake.add(4243, pgrp=4243, session=4242, state="Z")
    assert sampler.scan().usage(4243, None) is None  # a zombie main process is not running
    assert fake.getsid_calls == 0


def test_an_orphan_whose_pid_was_reused_since_the_look_is_not_counted(fake):
    service(fake, 100, sid=99)
    fake.add(102, pgrp=100, session=99)  # an orphan, now init's child
    sampler = fake.sampler()
    scan = sampler.scan()
    assert sampler.reaped(1, scan.at)[99] == [100, 102]  # main too: it is init's child as well
    fake.remove(102)
    fake.add(102, pgrp=300, session=300)  # another process got pid 102 since
    figures, _ = scan.usage(100, None)
    assert figures.processes == 1


def test_pss_falls_back_to_rss_and_says_so(fake):
    service(fake, 100, sid=99, workers=2, rss=10)
    fake.pss[101] = None  # another user's process: smaps_rollup unreadable
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.mem_bytes == 2_000_000 + 100 * PAGE_SIZE  # 101's default rss is 100 pages
    assert figures.mem_source == "mixed"
    assert figures.main_mem_bytes == 10 * PAGE_SIZE  # the main process's RSS
    fake.pss = dict.fromkeys(fake.pss)
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.mem_source == "rss"
    assert figures.mem_bytes == (10 + 100 + 100) * PAGE_SIZE


def test_pss_cached_for_its_ttl_unless_rss_moves(fake):
    service(fake, 100, sid=99)
    sampler = fake.sampler(pss_ttl=2.0)
    sampler.scan().usage(100, None)
    fake.now += 1.0
    sampler.scan().usage(100, None)
    assert fake.pss_reads == [100]
    fake.add(100, pgrp=100, session=99, rss=200)  # it grew: read again
    sampler.scan().usage(100, None)
    assert fake.pss_reads == [100, 100]
    fake.now += 2.5
    sampler.scan().usage(100, None)
    assert fake.pss_reads == [100, 100, 100]


def test_pss_of_an_idle_process_is_kept_longer_while_its_service_is_unchanged(fake):
    service(fake, 100, sid=99, utime=5)
    sampler = fake.sampler(pss_ttl=2.0)
    _, prev = sampler.scan().usage(100, None)
    fake.now += 2.5  # past PSS_TTL, but it has not run and is still alone
    _, prev = sampler.scan().usage(100, prev)
    assert fake.pss_reads == [100]
    fake.add(100, pgrp=100, session=99, utime=6)  # it ran
    fake.now += 2.5
    _, prev = sampler.scan().usage(100, prev)
    assert fake.pss_reads == [100, 100]
    fake.add(101, ppid=100, pgrp=100, session=99, utime=0)  # a new worker may share its pages now
    fake.now += 2.5
    _, prev = sampler.scan().usage(100, prev)
    assert fake.pss_reads == [100, 100, 100, 101]
    fake.now += 2.5
    _, prev = sampler.scan().usage(100, prev)
    assert len(fake.pss_reads) == 4  # both idle, the same two
    fake.now += usage.PSS_IDLE_TTL
    sampler.scan().usage(100, prev)
    assert len(fake.pss_reads) == 6


def test_cpu_sums_the_processes_and_keeps_the_main_one_apart(fake):
    service(fake, 100, sid=99, utime=100)
    fake.add(101, ppid=100, pgrp=100, session=99, utime=1000)
    sampler = fake.sampler()
    _, first = sampler.scan().usage(100, None)
    fake.now += 1.0
    fake.add(100, pgrp=100, session=99, utime=100)  # idle
    fake.add(101, ppid=100, pgrp=100, session=99, utime=1000 + CLOCK_TICKS * 3 // 4)  # 75 % of a core
    figures, second = sampler.scan().usage(100, first)
    assert figures.cpu_percent == pytest.approx(75.0, abs=0.5)
    assert figures.main_cpu_percent == 0.0
    assert second.at == fake.now


def test_a_worker_that_exits_does_not_make_cpu_negative(fake):
    service(fake, 100, sid=99, utime=100)
    fake.add(101, ppid=100, pgrp=100, session=99, utime=5000)
    sampler = fake.sampler()
    _, first = sampler.scan().usage(100, None)
    fake.now += 1.0
    fake.remove(101)
    fake.add(100, pgrp=100, session=99, utime=100 + CLOCK_TICKS // 10)
    figures, _ = sampler.scan().usage(100, first)
    assert figures.cpu_percent == pytest.approx(10.0, abs=0.5)
    assert figures.processes == 1


def test_a_new_worker_counts_its_time_since_it_started(fake):
    service(fake, 100, sid=99, utime=100)
    sampler = fake.sampler()
    _, first = sampler.scan().usage(100, None)
    fake.now += 1.0
    fake.add(101, ppid=100, pgrp=100, session=99, utime=CLOCK_TICKS // 2, start=fake.now - 0.5)
    figures, _ = sampler.scan().usage(100, first)
    assert figures.cpu_percent == pytest.approx(50.0, abs=0.5)


def test_two_looks_too_close_keep_the_previous_figure(fake):
    service(fake, 100, sid=99, utime=100)
    sampler = fake.sampler()
    _, first = sampler.scan().usage(100, None)
    fake.now += 0.05
    fake.add(100, pgrp=100, session=99, utime=100 + CLOCK_TICKS)
    figures, second = sampler.scan().usage(100, first)
    assert second is first and figures.cpu_percent == first.total_pct


def test_first_look_is_the_average_over_each_process_life(fake):
    service(fake, 100, sid=99, utime=CLOCK_TICKS * 10, start=NOW - 100)  # 10 s over 100 s: 10 %
    fake.add(101, ppid=100, pgrp=100, session=99, utime=CLOCK_TICKS * 5, start=NOW - 10)  # 50 %
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.cpu_percent == pytest.approx(60.0, abs=0.2)
    assert figures.main_cpu_percent == pytest.approx(10.0, abs=0.2)


def test_a_new_main_process_starts_a_new_baseline(fake):
    service(fake, 100, sid=99, utime=CLOCK_TICKS * 10, start=NOW - 100)
    sampler = fake.sampler()
    _, first = sampler.scan().usage(100, None)
    fake.now += 1.0
    service(fake, 300, sid=299, utime=CLOCK_TICKS, start=fake.now - 2)  # restarted: another pid
    figures, _ = sampler.scan().usage(300, first)
    assert figures.cpu_percent == pytest.approx(50.0, abs=0.2)


def test_cgroup_seam_takes_the_cgroup_members(fake, tmp_path):
    service(fake, 100, sid=99, workers=1)
    fake.add(400, pgrp=400, session=400)  # in the cgroup, whatever its session
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cgroup.procs").write_text("100\n101\n400\n")
    figures, _ = fake.sampler().scan().usage(100, None, cgroup=str(cg))
    assert figures.processes == 3
    assert fake.getsid_calls == 0


def test_a_main_process_in_pmonds_own_session_is_matched_by_group(fake):
    own = os.getsid(0)
    service(fake, 100, sid=own, workers=1)
    fake.add(50, pgrp=7, session=own)  # another process of pmond's session: not the service's
    figures, _ = fake.sampler().scan().usage(100, None)
    assert figures.processes == 2


def test_usage_fields_are_the_view_fields():
    figures = usage.Usage(1.0, 2, "pss", 3, 0.5, 1)
    assert list(figures.as_dict()) == list(usage.FIELDS)
