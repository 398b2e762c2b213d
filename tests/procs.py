"""/proc and port helpers that tests share (no pmon2 import: they check pmon2 from the outside).

Facts of the machines these tests run on: PID 1 reaps orphans late (1-2 s), so a dead detached
process lingers as a zombie. Everything here treats a zombie (state Z/X) as dead, and never relies on
/proc/<pid> existing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

DEAD_STATES = ("Z", "X", "x")


# /proc helpers


def read_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat split into fields, field 1 (pid) at index 0 and comm as one field; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")
    pid_part, _, comm = head.partition(" (")
    return [pid_part, comm, *tail.split()]


def proc_state(pid: int) -> str | None:
    """The state letter of a process (R, S, D, Z...), None when /proc has no such pid."""
    st = read_stat(pid)
    return st[2] if st else None


def is_alive(pid: int | None) -> bool:
    """Alive means: exists and is not a zombie. Never trust /proc/<pid> existing alone."""
    if not pid:
        return False
    state = proc_state(pid)
    return state is not None and state not in DEAD_STATES


def ppid(pid: int) -> int | None:
    st = read_stat(pid)
    return int(st[3]) if st else None


def pgrp(pid: int) -> int | None:
    st = read_stat(pid)
    return int(st[4]) if st else None


def session(pid: int) -> int | None:
    st = read_stat(pid)
    return int(st[5]) if st else None


def uid_of(pid: int) -> int | None:
    """The real uid from /proc/<pid>/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    return [p for p in all_pids() if ppid(p) == pid and is_alive(p)]


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    return [p for p in all_pids() if pgrp(p) == pgid and is_alive(p)]


def has_env_marker(pid: int, marker: bytes) -> bool:
    """`marker` is one whole entry of the process's environment (a PMON2_SERVICE=<instance>:<id> entry also
    matches with the tag that follows it, ":<tag>"), or its prefix when it ends with ':'."""
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    if marker.endswith(b":"):
        return any(e.startswith(marker) for e in entries)
    return any(e == marker or e.startswith(marker + b":") for e in entries)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
