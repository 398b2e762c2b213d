"""CPU and memory of a whole service, all its processes, found without a scan of all /proc.

A service is its main process and every live process of its session. The launcher's intermediate
calls setsid and starts the service as the leader of a process group of its own, so the session id is
the intermediate's pid: it exits at once, but the kernel does not hand its pid out again while any
process of the session lives, and no process can join a session it was not born in. A process group
never spans sessions, so the service's process group (pgid == main pid) is inside the session, and the
main process, a group leader, can never leave it (setsid fails for a group leader). Children that call
setsid leave the service: they are no longer counted, as `stop` no longer reaches them.

That holds while the session's leader has exited, as pmond's intermediate does at once. A process
adopted in place (`pmon2 import`) may share its session with strangers (its shell, the manager it
came from); while the leader of main's session is another live process, the service is main's process
group (pgrp == main pid) instead, and a main process that leads no group is alone.

Where the session's processes are found, without reading all of /proc: every one was forked by
another, starting from main, so it is a descendant of main (/proc/PID/task/TID/children, per thread),
unless its parent exited. An orphan goes to the nearest subreaper among its ancestors, or to init:
to a member (then it still descends from main), or to main's own parent, which is init or the
subreaper that took main in when the intermediate exited. So the session is main's descendants plus
the children of main's parent and of init that are in it (and their descendants). Checked per request:
each process found has its stat read (CPU, RSS, state: zombies are not counted) and its session
compared. Not covered: a process that left main's tree and then went to a subreaper that is no
ancestor of main (it would have to be reparented twice) — the cgroup will cover it.

Once services run in a cgroup of their own, `Scan.usage(..., cgroup=DIR)` takes the cgroup's
`cgroup.procs` instead of the session: that is the seam, unused until the supervisor has a cgroup
to give.

Cost, with `ls` in mind (100 services on a host of 2,000 other processes), measured here (2 shared
cores, under load; docs/benchmarks.md):

- Listing /proc and reading the stat of 2,000 strangers took 40 ms per `ls` (18 µs a stat), about
  what all of `ls` takes today. Listing /proc and one getsid(2) per process instead: 2 to 10 ms with
  3,000 processes (the listing alone 1 to 5 ms), and no faster than the walk with 1,000 services
  (measured in pmond: 133 to 154 ms a list either way). The walk costs what the services have: one children
  file per process (12 µs; 1.1 ms for 100 services, 14 ms for 1,000) and a stat per process other
  than main, plus the children of init (and of a subreaper) with one getsid(2) each, at most every
  ORPHANS_TTL seconds (3 ms here, where init had 1,000 children).
- PSS comes from /proc/PID/smaps_rollup, for which the kernel walks the page tables: 62 µs for a
  `sleep`, 1.2 ms for a process with 50 MB touched (stat: 18 and 9 µs): 50 ms per `ls` of 1,000
  services. `Sampler` keeps each process's PSS for PSS_TTL seconds, keyed by pid and start time, since
  `ls` is often called in a loop (monit polls every second), and up to PSS_IDLE_TTL for a process
  that has not run since, while its service keeps the same processes; never once its RSS (in the
  stat read anyway) has moved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from pmon2 import procfs
from pmon2.procfs import CLOCK_TICKS, Stat

# Two samples closer than this are all noise at 100 ticks a second: the previous figure stands.
MIN_WINDOW = 0.2
# How long a process's PSS is reused before smaps_rollup is read again (seconds); and how long for a process
# that has not run since (the same CPU time) in a service whose processes are the same ones: what changes
# its PSS then is only another process that shares its pages (a library's, or shared memory) coming or going.
PSS_TTL = 2.0
PSS_IDLE_TTL = 30.0
# How long the children of init (and of a subreaper) are kept by session: where orphans of services are.
# A stale list only finds an orphan later; a pid reused meanwhile is caught by the stat read (its session).
# Init may have thousands of children: 3 ms a look here with 1,000, at every `ls` without this.
ORPHANS_TTL = 5.0

# The fields a service view gets from here, in order; all None while the service does not run.
FIELDS = ("cpu_percent", "mem_bytes", "mem_source", "processes", "main_cpu_percent", "main_mem_bytes")


def boottime() -> float:
    """Seconds since boot, on the clock that /proc/PID/stat's start times count in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class CpuSample(NamedTuple):
    """CPU times of a service's processes at one moment (kept in Service.cpu_sample): the baseline of the
    next figure. Per process, so one that exits between two samples takes its CPU time along instead of
    making the service's total go backwards. (NamedTuples here: `ls` makes two per service.)"""

    at: float  # boottime()
    ticks: dict[int, tuple[int, int]]  # pid -> (start time, utime + stime), both in clock ticks
    main: tuple[int, int]  # (pid, start time) of the main process
    total_pct: float  # the figures computed at `at`
    main_pct: float
    own_session: bool = False  # main's session is the service's alone (Scan._service_session): for good


def cpu_sample(procs: list[Stat], main: Stat, prev: CpuSample | None, now: float,
               own_session: bool = False) -> CpuSample:
    """The service's CPU use since `prev` (percent of one core, summed over its processes) and the main
    process's own, as the next sample. A process new since `prev` counts its CPU time since it started,
    or since `prev` if it is older (pro rata). Without a usable `prev` (the first look, or a new main
    process), each process's average over its life so far. (Plain loops: `ls` runs this per service.)"""
    ident = (main.pid, main.starttime)
    if prev is not None and prev.main != ident:
        prev = None  # another main process (a restart): nothing to compare with
    if prev is not None and now - prev.at < MIN_WINDOW:
        return prev
    ticks = {main.pid: (main.starttime, main.utime + main.stime)}
    for st in procs:
        ticks[st.pid] = (st.starttime, st.utime + st.stime)
    total = main_used = 0.0
    if prev is not None:
        window = now - prev.at
        before = prev.ticks
        for pid, (start, t) in ticks.items():
            seen = before.get(pid)
            if seen is not None and seen[0] == start:
                used = float(max(t - seen[1], 0))
            else:  # new since prev: all its time, or its share of the window if it is older
                age = now - start / CLOCK_TICKS
                used = float(t) if age <= window else t * window / age
            total += used
            if pid == main.pid:
                main_used = used
        scale = 100.0 / CLOCK_TICKS / window
    else:
        for pid, (start, t) in ticks.items():
            age = now - start / CLOCK_TICKS
            rate = t / age if age > 0 else 0.0
            total += rate
            if pid == main.pid:
                main_used = rate
        scale = 100.0 / CLOCK_TICKS
    return CpuSample(now, ticks, ident, round(max(total * scale, 0.0), 1), round(max(main_used * scale, 0.0), 1),
                     own_session)


class Usage(NamedTuple):
    cpu_percent: float  # the whole service, percent of one core
    mem_bytes: int  # the whole service: PSS summed (RSS for a process whose PSS cannot be read)
    mem_source: str  # "pss": every process by PSS; "rss": none could be; "mixed": some by RSS
    processes: int
    main_cpu_percent: float
    main_mem_bytes: int  # the main process's RSS

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(FIELDS, self, strict=True))


class Sampler:
    """Makes the scans and holds what outlives a request: each process's PSS, for PSS_TTL seconds."""

    # `clock` counts seconds since boot (CLOCK_BOOTTIME), as the start times in /proc do.
    def __init__(self, proc: str = "/proc", pss_ttl: float = PSS_TTL, clock: Callable[[], float] = boottime,
                 getsid: Callable[[int], int] = os.getsid,
                 read_pss: Callable[[int, str], int | None] = procfs.read_pss) -> None:
        self.proc = proc
        self.pss_ttl = pss_ttl
        self.clock = clock
        self.getsid = getsid
        self._read_pss = read_pss
        # (pid, start time) -> (read at, RSS in pages then, CPU ticks then, PSS in bytes or None if unreadable)
        self._pss: dict[tuple[int, int], tuple[float, int, int, int | None]] = {}
        self._pruned = 0.0
        self._reaped: dict[int, tuple[float, dict[int, list[int]]]] = {}  # reaper -> (at, sid -> pids)

    def scan(self) -> Scan:
        """A look for one request (`ls`, `desc`), which all the services it shows share."""
        now = self.clock()
        if now - self._pruned >= 1.0:  # what has expired goes, at most once a second
            self._pruned = now
            self._pss = {k: v for k, v in self._pss.items() if now - v[0] < max(self.pss_ttl, PSS_IDLE_TTL)}
            self._reaped = {k: v for k, v in self._reaped.items() if now - v[0] < ORPHANS_TTL}
        return Scan(self, now)

    def reaped(self, reaper: int, now: float) -> dict[int, list[int]]:
        """session id -> pids of the children of `reaper` (init, or the subreaper that took a service in),
        by one getsid(2) each: where the orphans of every service are. Kept ORPHANS_TTL seconds."""
        hit = self._reaped.get(reaper)
        if hit is not None and now - hit[0] < ORPHANS_TTL:
            return hit[1]
        found: dict[int, list[int]] = {}
        st = procfs.read_stat(reaper, self.proc)
        for pid in procfs.children(reaper, st.threads if st else 1, self.proc):
            try:
                sid = self.getsid(pid)
            except OSError:  # gone since
                continue
            if sid in found:
                found[sid].append(pid)
            else:
                found[sid] = [pid]
        self._reaped[reaper] = (now, found)
        return found

    def pss(self, st: Stat, now: float | None = None, idle_ok: bool = True) -> int | None:
        """The process's PSS in bytes (None: unreadable). Read again once its RSS has moved by more than 1/32
        (a process that grows is not shown with its size of 2 s ago), else once PSS_TTL has passed, or
        PSS_IDLE_TTL for a process that has not run since, if `idle_ok` (its service has the same processes)."""
        key = (st.pid, st.starttime)
        if now is None:
            now = self.clock()
        ticks = st.utime + st.stime
        hit = self._pss.get(key)
        if hit is not None and abs(st.rss_pages - hit[1]) * 32 <= hit[1]:
            age = now - hit[0]
            if age < self.pss_ttl or (idle_ok and age < PSS_IDLE_TTL and ticks == hit[2]):
                return hit[3]
        value = self._read_pss(st.pid, self.proc)
        self._pss[key] = (now, st.rss_pages, ticks, value)
        return value


class Scan:
    """One look at /proc, shared by all the services that one request shows."""

    def __init__(self, sampler: Sampler, at: float) -> None:
        self.sampler = sampler
        self.at = at
        self._own_session = os.getsid(0)  # pmond's

    def processes(self, main: Stat, cgroup: str | None = None, own_session: bool | None = None) -> list[Stat]:
        """The live processes of the service whose main process is `main`, main first. `own_session`: what
        _service_session said of this main process before (it stays true once true)."""
        proc = self.sampler.proc
        if cgroup is not None:
            out = [main]
            for pid in procfs.cgroup_pids(cgroup) or []:
                st = procfs.read_stat(pid, proc) if pid != main.pid else None
                if st is not None and st.alive:
                    out.append(st)
            return out
        session = main.session
        # While the leader of main's session lives, the service is main's process group.
        if own_session is None:
            own_session = self._service_session(main)
        group = None if own_session else main.pid
        if group is not None and main.pgrp != main.pid:
            return [main]  # adopted, in a stranger's session and group: itself alone
        # The session's processes descend from main, or were orphaned to a reaper: init, or main's parent
        # when that is the subreaper that took the service in when the intermediate exited.
        reaped = self.sampler.reaped
        orphans = [p for p in reaped(1, self.at).get(session, ()) if p != main.pid and p != session]
        if main.ppid > 1:
            orphans += [p for p in reaped(main.ppid, self.at).get(session, ()) if p != main.pid and p != session]
        kids = procfs.children(main.pid, main.threads, proc)
        if not orphans and not kids:
            return [main]  # the common case: one process
        out = [main]
        seen = {main.pid, session}
        todo: list[Stat] = []
        for pid, orphan in [(p, True) for p in orphans] + [(p, False) for p in kids]:
            if pid in seen:
                continue
            seen.add(pid)
            st = procfs.read_stat(pid, proc)
            if st is None or not st.alive:
                continue
            mine = st.session == session and (group is None or st.pgrp == group)
            if mine:
                out.append(st)
            if mine or not orphan:  # an orphan that is not the service's is none of its business
                todo.append(st)
        while todo:
            # Every descendant is looked at, even below one that left (setsid): its children may not have.
            parent = todo.pop()
            for pid in procfs.children(parent.pid, parent.threads, proc):
                if pid in seen:
                    continue
                seen.add(pid)
                st = procfs.read_stat(pid, proc)
                if st is None or not st.alive:
                    continue
                todo.append(st)
                if st.session == session and (group is None or st.pgrp == group):
                    out.append(st)
        return out

    def _service_session(self, main: Stat) -> bool:
        """Whether main's session is the service's alone: it leads it, or its leader has exited (pmond's
        intermediate, which exits at once). Not when the leader is another live process: a shell or another
        manager whose process was adopted (`pmon2 import`), pmond itself, or the intermediate in the
        milliseconds before it exits. Then the service is main's process group."""
        if main.session <= 0 or main.session == self._own_session:
            return False
        if main.session == main.pid:
            return True
        try:
            self.sampler.getsid(main.session)  # a system call, where a stat read costs an open of /proc
        except OSError:
            return True  # gone (its pid is not handed out again while the session has a process)
        leader = procfs.read_stat(main.session, self.sampler.proc)  # a zombie, for a second or two?
        return leader is None or not leader.alive

    def usage(self, main_pid: int, prev: CpuSample | None, cgroup: str | None = None
              ) -> tuple[Usage, CpuSample] | None:
        """The service's figures and the CPU sample to keep for the next ones; None if its main process
        is gone (or a zombie)."""
        main = procfs.read_stat(main_pid, self.sampler.proc)
        if main is None or not main.alive:
            return None
        if prev is not None and prev.main != (main.pid, main.starttime):
            prev = None  # another main process (a restart)
        own = prev is not None and prev.own_session
        if cgroup is None and not own:
            own = self._service_session(main)
        procs = self.processes(main, cgroup, own)
        now = self.sampler.clock()
        # The same processes as at the previous sample? Then an idle one's PSS can be kept longer.
        before = prev.ticks if prev is not None else None
        same = before is not None and len(before) == len(procs) and all(
            before.get(st.pid, (-1,))[0] == st.starttime for st in procs)
        sample = cpu_sample(procs, main, prev, now, own)
        total, by_pss = 0, 0
        pss = self.sampler.pss
        for st in procs:
            value = pss(st, now, same)
            if value is None:
                total += st.rss_bytes
            else:
                total += value
                by_pss += 1
        source = "pss" if by_pss == len(procs) else "rss" if by_pss == 0 else "mixed"
        return Usage(sample.total_pct, total, source, len(procs), sample.main_pct, main.rss_bytes), sample


SAMPLER = Sampler()
