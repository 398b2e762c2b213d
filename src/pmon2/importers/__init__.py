"""Taking services over from other process managers (`pmon2 import`), keeping their running processes.

What the CLI (which plans an import and reports it) and pmond (which alone adopts, and checks every
process again itself) share: whether a running process is the one a foreign record names, and what it
shows of itself. Standard library only; pmond imports this module for POST /v1/adopt.

A process is a record's when (issue 14):
- it is alive and not a zombie;
- its argv, NUL-split from /proc/PID/cmdline, equals the record's argv exactly. For a script, the
  kernel puts the interpreter of its `#!` line first ([interpreter, optional argument, script, args...],
  or [name, script, args...] through `#!/usr/bin/env name`), so that form counts too: argv[0] is then
  the script, reached through its own interpreter, and /proc/PID/exe is the interpreter;
- it leads its own process group: pmon2 stops a service and cleans up after it by signalling its whole
  group, which would reach other processes if the group were someone else's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pmon2 import procfs


def read_cmdline(pid: int, proc: str = "/proc") -> list[str] | None:
    """argv of a process, NUL-split and kept whole: empty arguments stay ("a\\0\\0b\\0" is a, "", b)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if not data:
        return None  # a kernel thread, or a zombie
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode(errors="surrogateescape") for p in parts]


def read_exe(pid: int, proc: str = "/proc") -> str | None:
    """The executable behind a process (its interpreter, for a script); None when it cannot be read
    (another user's process, read without root). A replaced binary reads as PATH, without " (deleted)"."""
    try:
        return os.readlink(f"{proc}/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def shebang(path: str) -> list[str] | None:
    """The argv prefix the kernel runs a script with: [interpreter] or [interpreter, its one argument]
    (Linux passes everything after the interpreter as one argument). None for a binary or no file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode(errors="surrogateescape").strip()
    if not line:
        return None
    interp, _, arg = line.replace("\t", " ").partition(" ")
    arg = arg.strip()
    return [interp, arg] if arg else [interp]


def expected_forms(argv: list[str]) -> list[list[str]]:
    """Every cmdline under which `argv` runs: itself and, for a script, behind its interpreter."""
    forms = [list(argv)]
    prefix = shebang(argv[0]) if argv and argv[0].startswith("/") else None
    if prefix is not None:
        forms.append([*prefix, *argv])
        if os.path.basename(prefix[0]) == "env" and len(prefix) == 2:
            # `#!/usr/bin/env [-S] [VAR=value...] name [args]`: env execs `name`, which then shows first.
            words = prefix[1].split() if prefix[1].startswith("-S") else [prefix[1]]
            words = [w for w in words if w != "-S" and "=" not in w]
            if words:
                forms.append([*words, *argv])
    return forms


@dataclass(frozen=True)
class Identity:
    """What a check of one pid against a record found. `same` only when every rule holds."""

    same: bool
    why: str  # how it matched, or why it is not the record's process
    stat: procfs.Stat | None = None
    cmdline: list[str] | None = None


def identify(pid: int, argv: list[str], proc: str = "/proc") -> Identity:
    """Is process `pid` the one that runs `argv`? pmond opens a pidfd on `pid` first, so that the pid
    cannot be reused between this check and the adoption."""
    stat = procfs.read_stat(pid, proc)
    if stat is None:
        return Identity(False, f"no process {pid} runs")
    if not stat.alive:
        return Identity(False, f"process {pid} has exited (a zombie)", stat)
    cmdline = read_cmdline(pid, proc)
    if cmdline is None:
        return Identity(False, f"the command line of process {pid} cannot be read", stat)
    if cmdline not in expected_forms(argv):
        return Identity(False, f"process {pid} runs something else: {_show(cmdline)}", stat, cmdline)
    if stat.pgrp != pid:
        return Identity(False, f"process {pid} runs this command but does not lead its own process group "
                        f"(group {stat.pgrp}): pmon2 signals a service's whole group, which would reach "
                        "other processes", stat, cmdline)
    how = "the same argv" if cmdline == argv else "the same argv, behind the script's interpreter"
    return Identity(True, how, stat, cmdline)


def runs_file(path: str, exclude: set[int] | frozenset[int] = frozenset(), proc: str = "/proc") -> list[int]:
    """Live processes (zombies excluded) that run the program `path`, whatever their arguments: its
    executable is `path`, or their argv[0] is `path`, or they run the script `path` behind its interpreter."""
    real = os.path.realpath(path)
    prefix = shebang(path)
    found = []
    for pid in procfs.pids(proc):
        if pid in exclude or pid == os.getpid():
            continue
        cmdline = read_cmdline(pid, proc)
        if not cmdline:
            continue
        exe = read_exe(pid, proc)
        hit = exe == real or cmdline[0] == path
        if not hit and prefix is not None:
            hit = path in cmdline[1:len(prefix) + 2]
        if hit:
            st = procfs.read_stat(pid, proc)
            if st is not None and st.alive:
                found.append(pid)
    return sorted(found)


@dataclass(frozen=True)
class Facts:
    """What a running process shows of itself, for the service that adopts it."""

    uid: int | None
    cwd: str | None
    env: dict[str, str] | None


def facts(pid: int, proc: str = "/proc") -> Facts:
    """The real uid, the cwd (None when it was deleted) and the environment of a process; each None when
    it cannot be read."""
    uid = None
    try:
        with open(f"{proc}/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        cwd: str | None = os.readlink(f"{proc}/{pid}/cwd")
    except OSError:
        cwd = None
    if cwd is not None and (cwd.endswith(" (deleted)") or not cwd.startswith("/")):
        cwd = None
    env: dict[str, str] | None = None
    try:
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            entries = fh.read().split(b"\0")
        env = {}
        for entry in entries:
            key, eq, value = entry.partition(b"=")
            if eq and key:
                env[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    except OSError:
        env = None
    return Facts(uid, cwd, env)


def _show(argv: list[str], limit: int = 120) -> str:
    import shlex

    text = shlex.join(argv)
    return text if len(text) <= limit else text[:limit] + "..."
