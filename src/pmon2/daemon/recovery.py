"""What the processes on this machine say about pmond's services, for recovery at start-up.

Every service's processes carry `PMON2_SERVICE=<instance id>:<service id>` (set when it is launched,
overwriting an inherited value), so pmond can find them without its database: to refuse a database that
does not know services that still run (emptied, truncated, or rolled back by a lost `-wal`), to stop
the leftovers of a deleted service, and, for `pmon2 daemon recover`, to rebuild the database from them.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field

from pmon2 import procfs

MARKER = b"PMON2_SERVICE="


def marker_of(pid: int, instance_id: str, proc: str = "/proc") -> int | None:
    """The service id in this pmond's marker in a process's environment, or None."""
    prefix = MARKER + instance_id.encode() + b":"
    try:
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    value = next((e[len(prefix):] for e in data.split(b"\0") if e.startswith(prefix)), None)
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def marked_processes(instance_id: str, proc: str = "/proc") -> dict[int, list[int]]:
    """{service id: [pids]} of the live (not zombie) processes whose environment carries this pmond's
    marker. Reads every /proc/PID/environ that pmond may read: at start-up, and on `del`."""
    found: dict[int, list[int]] = {}
    for pid in procfs.pids(proc):
        sid = marker_of(pid, instance_id, proc)
        if sid is None:
            continue
        st = procfs.read_stat(pid, proc)
        if st is not None and st.alive:
            found.setdefault(sid, []).append(pid)
    return found


def main_process(pids: list[int], proc: str = "/proc") -> int | None:
    """The service's main process among its marked ones: the leader of its own process group (each
    service is started as one), else the oldest."""
    stats = [st for st in (procfs.read_stat(p, proc) for p in pids) if st is not None and st.alive]
    leaders = [st for st in stats if st.pgrp == st.pid]
    pick = leaders or stats
    return min(pick, key=lambda st: st.starttime).pid if pick else None


@dataclass
class Rebuilt:
    """A service as its running process shows it, and what could not be learnt from it."""

    pid: int
    start_ticks: int
    argv: list[str]
    exe: str
    cwd: str
    env: dict[str, str]
    user: str | None
    out_log: str | None
    err_log: str | None
    missing: list[str] = field(default_factory=list)


def rebuild(pid: int, proc: str = "/proc") -> Rebuilt | None:
    """Read back a service's spec from its process: argv, exe, cwd, env, user and the files behind its
    stdout and stderr. None when the process is gone or unreadable."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="surrogateescape") for a in fh.read().split(b"\0")[:-1]]
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            pairs = [e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e]
        exe = os.readlink(f"{proc}/{pid}/exe")
        cwd = os.readlink(f"{proc}/{pid}/cwd")
        uid = os.stat(f"{proc}/{pid}").st_uid
    except OSError:
        return None
    st = procfs.read_stat(pid, proc)
    if st is None or not st.alive or not argv:
        return None
    env = {k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape") for k, v in pairs
           if k != MARKER[:-1]}
    logs: list[str | None] = []
    for fd in (1, 2):
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{fd}")
        except OSError:
            target = None
        logs.append(target if target and target.startswith("/") and not target.endswith(" (deleted)") else None)
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    if uid == os.geteuid():
        user = None  # pmond's own user: stored as null, as `run` without --user stores it
    missing = ["name (taken from the launch record or made up)", "autorestart", "min_uptime", "kill_timeout",
               "stop_signal", "log rotation settings", "restart count and exit history"]
    if logs[0] is None or logs[1] is None:
        missing.append("log paths")
    return Rebuilt(pid, st.starttime, argv, exe.removesuffix(" (deleted)"), cwd, env, user, logs[0], logs[1],
                   missing)
