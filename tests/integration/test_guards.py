"""CI guards of pmon2's speed promises, without timing anything (timings flake on shared CI machines).

- The CLI's everyday commands import none of asyncio, sqlite3, rich, textual: each is tens of ms of
  start-up (docs/benchmarks.md). Checked with `python -X importtime`, which lists every module imported.
- An idle pmond does not wake up more than about once a second: counted as context switches of all its
  threads (/proc/<pid>/task/*/status), which every return from epoll_wait adds to, over a window in
  which the test sends pmond nothing and starts no process. A timer or a polling loop shows up in
  every window; a burst of unrelated activity on the machine shows up in one window only, so the guard
  takes the quietest of up to three windows.
  The count covers pmond's launcher and the intermediate it keeps forked ahead (both blocked in a read).
  On kernels before 6.15, pmond as root hears every process exit on the machine through the netlink proc
  connector, and each one can wake it (docs/benchmarks.md, "idle CPU"). Only when `daemon status` lists
  that source does a window allow one wake-up per process started on the machine during it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

FORBIDDEN = {"asyncio", "_asyncio", "sqlite3", "_sqlite3", "rich", "textual"}
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")

WINDOW_S = 3.0
MAX_WAKEUPS = 3 + 2  # once a second, plus a margin for one wake-up cut in two by a preemption
WINDOWS = 3


def imported_modules(stderr: str) -> set[str]:
    return {m.group(1) for line in stderr.splitlines() if (m := IMPORT_LINE.match(line))}


def forbidden(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in FORBIDDEN}


def run_importtime(pmon, *args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pmon2", *args], capture_output=True, text=True,
                          timeout=30, cwd=str(pmon.work), env=pmon.env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"pmon2 {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
    modules = imported_modules(proc.stderr)
    assert "pmon2.cli" in modules, f"no importtime output for pmon2 {' '.join(args)}: {proc.stderr[-500:]}"
    return modules


def test_everyday_commands_import_no_heavy_module(pmon) -> None:
    pmon.start_service("sleep", "600", "--name", "guard")  # starts pmond; not itself under -X importtime
    commands = [
        ("run", "sleep", "601", "--name", "other"),
        ("ls",),
        ("ls", "--json"),
        ("desc", "guard"),
        ("stop", "guard"),
        ("start", "guard"),
        ("restart", "guard"),
        ("log", "guard", "-n", "5"),
        ("version",),
    ]
    found = {" ".join(args): sorted(forbidden(run_importtime(pmon, *args))) for args in commands}
    bad = {cmd: mods for cmd, mods in found.items() if mods}
    assert not bad, f"everyday commands import heavy modules: {bad}"


def test_importtime_parser_sees_forbidden_modules() -> None:
    sample = ("import time: self [us] | cumulative | imported package\n"
              "import time:       120 |        120 |   _asyncio\n"
              "import time:      2000 |       8000 | asyncio.events\n"
              "import time:        10 |         10 |     textual.app\n"
              "import time:        10 |         10 | json\n")
    assert forbidden(imported_modules(sample)) == {"_asyncio", "asyncio.events", "textual.app"}


# idle wake-ups


def family(pid: int) -> list[int]:
    """pmond and its descendants (the launcher and its intermediate forked ahead)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(k) for k in kids]
    return out


def context_switches(pid: int) -> int:
    return sum(_switches(p) for p in family(pid))


def _switches(pid: int) -> int:
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue  # a thread that just ended
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


def settle(pid: int, quiet: float = 0.5, timeout: float = 1.5) -> None:
    """Wait until pmond has finished what the last CLI call left it (an exit status, a reap, a log line)."""
    deadline = time.monotonic() + timeout
    last, since = context_switches(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = context_switches(pid)
        if now != last:
            last, since = now, time.monotonic()


def last_pid() -> int | None:
    """The last pid handed out on the machine: how many processes others started during a window."""
    try:
        return int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    except (OSError, ValueError):
        return None


def connector_allowance(pmon) -> int:
    """Wake-ups allowed per process started elsewhere on the machine in a window."""
    return 1 if "proc_connector" in pmon.json("daemon", "status", "--json")["exit_status_sources"] else 0


def quietest_window(pmon, pid: int) -> tuple[int, list[str]]:
    """Wake-ups beyond the allowance in the best of up to WINDOWS windows (<= 0 passes), and what each
    window saw, for the failure message."""
    allowance = connector_allowance(pmon)
    excess, seen = [], []
    for _ in range(WINDOWS):
        settle(pid)
        before, first = context_switches(pid), last_pid()
        time.sleep(WINDOW_S)  # no CLI call, no process started by this test, in the window
        woke, last = context_switches(pid) - before, last_pid()
        started = last - first if first is not None and last is not None and last >= first else 0
        excess.append(woke - MAX_WAKEUPS - allowance * started)
        seen.append(f"{woke} wake-ups while {started} processes started on the machine")
        if excess[-1] <= 0:
            break
    return min(excess), seen


def test_idle_pmond_sleeps_with_no_service(pmon) -> None:
    pmon.run("daemon", "start")
    pid = pmon.daemon_pid()
    assert pid and pmon.is_alive(pid)
    excess, seen = quietest_window(pmon, pid)
    assert excess <= 0, (f"pmond with no service, {WINDOW_S:g} s windows: {seen}; at most {MAX_WAKEUPS} "
                         "(+ 1 per process started) allowed: a timer or a poll in the idle loop?")


def test_idle_pmond_sleeps_with_idle_services(pmon) -> None:
    for i in range(3):
        pmon.start_service("sleep", str(700 + i), "--name", f"idle{i}")
    pid = pmon.daemon_pid()
    assert pid and pmon.is_alive(pid)
    excess, seen = quietest_window(pmon, pid)
    assert excess <= 0, (f"pmond with 3 idle services, {WINDOW_S:g} s windows: {seen}; at most {MAX_WAKEUPS} "
                         "(+ 1 per process started) allowed: a timer or a poll per service?")
