"""A small /proc reader: what pmon2 needs of a process, at about 35 µs a process (psutil: 166 µs).

`read_stat` is the cheap look (one small file the kernel fills from the task). `read_pss` reads
smaps_rollup, for which the kernel walks the page tables: 3-4 times a stat for a small process, about
1 ms for one with 50 MB touched (measured here); daemon/usage.py caches it for that reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    utime: int  # clock ticks
    stime: int
    starttime: int  # clock ticks after boot: with the boot id, it names one process for good
    rss_pages: int
    threads: int = 1

    @property
    def alive(self) -> bool:
        # A zombie has exited; PID 1 may take seconds to reap it here.
        return self.state not in ("Z", "X", "x")

    @property
    def cpu_seconds(self) -> float:
        return (self.utime + self.stime) / CLOCK_TICKS

    @property
    def rss_bytes(self) -> int:
        return self.rss_pages * PAGE_SIZE


def parse_stat(pid: int, text: str | bytes) -> Stat:
    # comm may hold spaces and parentheses: the fields start after the *last* ')'. Bytes are parsed as
    # they are (int() takes them), and only comm is decoded: half the time of decoding the whole line.
    raw = text.encode() if isinstance(text, str) else text
    open_paren = raw.index(b"(")
    close_paren = raw.rindex(b")")
    f = raw[close_paren + 2 :].split()
    # f[0] is field 3 (state); field N is f[N - 3].
    return Stat(pid=pid, comm=raw[open_paren + 1 : close_paren].decode(errors="replace"), state=f[0].decode(),
                ppid=int(f[1]), pgrp=int(f[2]), session=int(f[3]), utime=int(f[11]), stime=int(f[12]),
                starttime=int(f[19]), rss_pages=int(f[21]), threads=int(f[17]))


def _read(path: str, size: int = 4096) -> bytes | None:
    # os.open/os.read, not open(): the text-mode io stack was 70 % of the 17.5 µs of a read, and `ls`
    # reads one per service.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:  # ESRCH: the process went away between the open and the read
        return None
    finally:
        os.close(fd)


def read_stat(pid: int, proc: str = "/proc") -> Stat | None:
    data = _read(f"{proc}/{pid}/stat")
    return parse_stat(pid, data) if data else None


def parse_pss(data: bytes) -> int | None:
    """Bytes of the `Pss:` line of smaps_rollup (given in kB), or None if it has none."""
    at = data.find(b"\nPss:")
    if at < 0:
        return None
    end = data.find(b"\n", at + 5)
    parts = data[at + 5 : end if end >= 0 else len(data)].split()
    try:
        return int(parts[0]) * 1024
    except (IndexError, ValueError):
        return None


def read_pss(pid: int, proc: str = "/proc") -> int | None:
    """The process's proportional set size in bytes: its private pages plus its share of each page it
    shares (a copy-on-write page of 4 forked workers counts a quarter in each). None when smaps_rollup
    cannot be read: another user's process while pmond is not root (EACCES), a kernel before 4.14, a
    process that has exited, or a kernel thread (no memory of its own: an empty file)."""
    data = _read(f"{proc}/{pid}/smaps_rollup")
    return parse_pss(data) if data else None


def children(pid: int, threads: int = 1, proc: str = "/proc") -> list[int]:
    """The pids of a process's children. The kernel lists them per thread (a child's parent is the thread
    that forked it), so a process with more than one thread has each of its threads' lists read. Needs
    CONFIG_PROC_CHILDREN (every distribution kernel has it); [] if it cannot be read."""
    tids = [pid]
    if threads > 1:
        try:
            tids = [int(t) for t in os.listdir(f"{proc}/{pid}/task")]
        except OSError:
            return []
    out: list[int] = []
    for tid in tids:
        data = _read_all(f"{proc}/{pid}/task/{tid}/children")
        if data:
            out += [int(c) for c in data.split()]
    return out


def descendants(roots: Iterable[int], limit: int = 4096, proc: str = "/proc") -> dict[int, Stat]:
    """The live descendants of the processes `roots` (not the roots themselves), read down the kernel's
    child lists (`children` above), nearest first, at most `limit` of them: the one reader of a process
    tree in pmond (a reload window's children to pin, the ppid rule of a service's processes). A process
    that exits loses its children to a reaper at once: descendants of an exited root are not found here."""
    found: dict[int, Stat] = {}
    seen = set(roots)
    queue = list(seen)
    while queue and len(found) < limit:
        parent = queue.pop(0)
        st = read_stat(parent, proc)
        if st is None:
            continue
        for child in children(parent, st.threads, proc):
            if child in seen:
                continue
            seen.add(child)
            cst = read_stat(child, proc)
            if cst is None or cst.ppid != parent:  # exited, or the number reused since the list was read
                continue
            if cst.alive:
                found[child] = cst
            queue.append(child)
            if len(found) >= limit:
                break
    return found


def _read_all(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)


def cgroup_pids(cgroup_dir: str) -> list[int] | None:
    """Every process of a cgroup (v2 `cgroup.procs`, or v1's `cgroup.procs` in any hierarchy), None if it
    cannot be read. The seam for services that run in a cgroup of their own (daemon/usage.py)."""
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "rb") as fh:
            return [int(line) for line in fh.read().split()]
    except (OSError, ValueError):
        return None


@cache
def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as fh:
        return fh.read().strip()


@cache
def boot_time() -> float:
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def start_wall_time(starttime_ticks: int) -> float:
    return boot_time() + starttime_ticks / CLOCK_TICKS


def pids(proc: str = "/proc") -> list[int]:
    """Every pid /proc lists now (processes, not threads)."""
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def group_members(pgid: int, proc: str = "/proc") -> list[int]:
    """Live pids of a process group (zombies excluded)."""
    members = []
    for pid in pids(proc):
        st = read_stat(pid, proc)
        if st is not None and st.pgrp == pgid and st.alive:
            members.append(st.pid)
    return members
