"""CPU and memory of a whole service, all its processes, in one look at /proc per request.

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

Cost, with `ls` in mind (100 services on a host of 2,000 other processes), measured here:

- Listing /proc and reading the stat of 2,000 strangers took 40 ms per `ls` (18 µs a stat), about
  what all of `ls` takes today; listing /proc and one getsid(2) each, 2 to 10 ms (the listing of
  2,000 entries alone 1 to 9 ms on this loaded VM). The walk costs the services' own processes (a
  children file per process, 7 µs, and a stat per process other than main) plus the children of
  init and of the subreaper, once per request, with one getsid(2) (0.3 µs) each.
- PSS comes from /proc/PID/smaps_rollup, for which the kernel walks the page tables: 62 µs for a
  `sleep`, 1.2 ms for a process with 50 MB touched (stat: 18 and 9 µs). `Sampler` keeps each process's
  PSS for PSS_TTL seconds, keyed by pid and start time, since `ls` is often called in a loop (monit
  polls every second), unless the process's RSS (in the stat read anyway) has moved meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pmon2 import procfs
from pmon2.procfs import CLOCK_TICKS, Stat

# Two samples closer than this are all noise at 100 ticks a second: the previous figure stands.
MIN_WINDOW = 0.2
# How long a process's PSS is reused before smaps_rollup is read again (seconds).
PSS_TTL = 2.0
# Views outside `ls` and `desc` (the answers of start, restart, run...) reuse a scan this young. It can
# only miss a process forked since: every process it names has its stat read again and checked.
SHARED_SCAN_AGE = 0.5

# The fields a service view gets from here, in order; all None while the service does not run.
FIELDS = ("cpu_percent", "mem_bytes", "mem_source", "processes", "main_cpu_percent", "main_mem_bytes")


def boottime() -> float:
    """Seconds since boot, on the clock that /proc/PID/stat's start times count in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU times of a service's processes at one moment (kept in Service.cpu_sample): the baseline of the
    next figure. Per process, so one that exits between two samples takes its CPU time along instead of
    making the service's total go backwards."""

    at: float  # boottime()
    ticks: dict[int, tuple[int, int]]  # pid -> (start time, utime + stime), both in clock ticks
    main: tuple[int, int]  # (pid, start time) of the main process
    total_pct: float  # the figures computed at `at`
    main_pct: float


def cpu_sample(procs: list[Stat], main: Stat, prev: CpuSample | None, now: float) -> CpuSample:
    """The service's CPU use since `prev` (percent of one core, summed over its processes) and the main
    process's own, as the next sample. A process new since `prev` counts its CPU time since it started,
    or since `prev` if it is older (pro rata). Without a usable `prev` (the first look, or a new main
    process), each process's average over its life so far."""
    ident = (main.pid, main.starttime)
    if prev is not None and prev.main == ident and now - prev.at < MIN_WINDOW:
        return prev
    ticks = {st.pid: (st.starttime, st.utime + st.stime) for st in (main, *procs)}

    if prev is not None and prev.main == ident:
        window = now - prev.at
        before = prev.ticks

        def used(pid: int, start: int, t: int) -> float:
            seen = before.get(pid)
            if seen is not None and seen[0] == start:
                return max(t - seen[1], 0)
            age = now - start / CLOCK_TICKS
            return float(t) if age <= window else t * window / age

        total = sum(used(pid, start, t) for pid, (start, t) in ticks.items())
        main_used = used(main.pid, *ticks[main.pid])
        total_pct, main_pct = (100.0 * x / CLOCK_TICKS / window for x in (total, main_used))
    else:

        def rate(start: int, t: int) -> float:
            age = now - start / CLOCK_TICKS
            return t / CLOCK_TICKS / age if age > 0 else 0.0

        total_pct = 100.0 * sum(rate(start, t) for start, t in ticks.values())
        main_pct = 100.0 * rate(*ticks[main.pid])
    return CpuSample(now, ticks, ident, round(max(total_pct, 0.0), 1), round(max(main_pct, 0.0), 1))


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_percent: float  # the whole service, percent of one core
    mem_bytes: int  # the whole service: PSS summed (RSS for a process whose PSS cannot be read)
    mem_source: str  # "pss": every process by PSS; "rss": none could be; "mixed": some by RSS
    processes: int
    main_cpu_percent: float
    main_mem_bytes: int  # the main process's RSS

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


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
        # (pid, start time) -> (read at, RSS in pages then, PSS in bytes or None if unreadable)
        self._pss: dict[tuple[int, int], tuple[float, int, int | None]] = {}
        self._shared: Scan | None = None

    def scan(self) -> Scan:
        """A fresh look, for one request (`ls`, `desc`): its process list is read once, when first needed."""
        now = self.clock()
        if self._pss:
            self._pss = {k: v for k, v in self._pss.items() if now - v[0] < self.pss_ttl}
        self._shared = Scan(self, now)
        return self._shared

    def shared_scan(self) -> Scan:
        """The last scan if it is younger than SHARED_SCAN_AGE, else a fresh one: for views that come one
        by one from a batch (`restart all` answers 100 views), so that they do not list /proc 100 times."""
        if self._shared is not None and self.clock() - self._shared.at < SHARED_SCAN_AGE:
            return self._shared
        return self.scan()

    def pss(self, st: Stat) -> int | None:
        """The process's PSS in bytes (None: unreadable), read again once PSS_TTL has passed or once its
        RSS has moved by more than 1/32 (a process that grows is not shown with its size of 2 s ago)."""
        key = (st.pid, st.starttime)
        now = self.clock()
        hit = self._pss.get(key)
        if hit is not None and now - hit[0] < self.pss_ttl and abs(st.rss_pages - hit[1]) * 32 <= hit[1]:
            return hit[2]
        value = self._read_pss(st.pid, self.proc)
        self._pss[key] = (now, st.rss_pages, value)
        return value


class Scan:
    """One look at /proc, shared by all the services that one request shows."""

    def __init__(self, sampler: Sampler, at: float) -> None:
        self.sampler = sampler
        self.at = at
        self._reaped: dict[int, dict[int, list[int]]] = {}

    def reaped(self, reaper: int) -> dict[int, list[int]]:
        """session id -> pids of the children of `reaper` (init, or the subreaper that took a service in),
        by one getsid(2) each: where the orphans of every service are. Once per reaper and scan."""
        found = self._reaped.get(reaper)
        if found is None:
            found = self._reaped[reaper] = {}
            st = procfs.read_stat(reaper, self.sampler.proc)
            for pid in procfs.children(reaper, st.threads if st else 1, self.sampler.proc):
                try:
                    sid = self.sampler.getsid(pid)
                except OSError:  # gone since
                    continue
                found.setdefault(sid, []).append(pid)
        return found

    def processes(self, main: Stat, cgroup: str | None = None) -> list[Stat]:
        """The live processes of the service whose main process is `main`, main first."""
        proc = self.sampler.proc
        if cgroup is not None:
            out = [main]
            for pid in procfs.cgroup_pids(cgroup) or []:
                st = procfs.read_stat(pid, proc) if pid != main.pid else None
                if st is not None and st.alive:
                    out.append(st)
            return out
        session = main.session
        own = self._service_session(main)
        if not own and main.pgrp != main.pid:
            return [main]  # adopted, in a stranger's session and group: itself alone
        # The session's processes descend from main, or were orphaned to a reaper: main's parent (init or
        # the subreaper that took the service in when the intermediate exited) and init.
        roots = [p for r in dict.fromkeys((main.ppid, 1)) if r > 0
                 for p in self.reaped(r).get(session, []) if p not in (main.pid, session)]
        out = [main]
        seen = {main.pid, session}
        todo = [main]
        for pid in roots:
            seen.add(pid)
            st = procfs.read_stat(pid, proc)
            if st is not None and st.alive and st.session == session:
                out.append(st)
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
                if st.session == session:
                    out.append(st)
        if not own:  # the leader of main's session lives: the service is main's process group
            out = [main] + [st for st in out[1:] if st.pgrp == main.pid]
        return out

    def _service_session(self, main: Stat) -> bool:
        """Whether main's session is the service's alone: it leads it, or its leader has exited (pmond's
        intermediate, which exits at once). Not when the leader is another live process: a shell or another
        manager whose process was adopted (`pmon2 import`), pmond itself, or the intermediate in the
        milliseconds before it exits. Then the service is main's process group."""
        if main.session <= 0 or main.session == os.getsid(0):
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
        procs = self.processes(main, cgroup)
        sample = cpu_sample(procs, main, prev, self.sampler.clock())
        total, by_pss = 0, 0
        for st in procs:
            pss = self.sampler.pss(st)
            if pss is None:
                total += st.rss_bytes
            else:
                total += pss
                by_pss += 1
        source = "pss" if by_pss == len(procs) else "rss" if by_pss == 0 else "mixed"
        return Usage(sample.total_pct, total, source, len(procs), sample.main_pct, main.rss_bytes), sample


SAMPLER = Sampler()
