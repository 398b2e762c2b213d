"""Issue 10, req 4: the store is the truth or the command fails; automatic restarts go on while the
store fails, and the database catches up once it works again. Never a 2 s stall of pmond's loop."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def _lock(db: Path) -> sqlite3.Connection:
    """Hold the database's write lock from another process's point of view (this test's connection)."""
    conn = sqlite3.connect(str(db), isolation_level=None, timeout=5)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def pmon_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _carries(pid: int, marker: bytes) -> bool:
    try:
        return any(e.startswith(marker) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False


def _timed(pmon: Any, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = pmon.run(*args, check=False)
    return proc, time.monotonic() - began


def test_a_locked_database_fails_user_commands_and_never_stalls_supervision(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "818181", "--name", "held", "--json")
    other = pmon.start_service("sleep", "818182", "--name", "crashy", "--json")
    conn = _lock(pmon.db_path)
    try:
        stop, took = _timed(pmon, "stop", "held")
        assert stop.returncode != 0 and "state not saved" in stop.stderr and "locked" in stop.stderr, stop.stderr
        assert stop.stderr.count("\n") == 1 and "Traceback" not in stop.stderr
        assert took < 5.0
        assert pmon.is_alive(svc["pid"]), "a stop that was not saved must not take effect"
        listing, took = _timed(pmon, "ls", "--json")
        assert listing.returncode == 0 and took < 1.0, f"ls took {took:.2f} s with the database locked"
        run, _ = _timed(pmon, "run", "sleep", "818183", "--name", "never")
        assert run.returncode != 0 and "state not saved" in run.stderr
        assert "never" not in {s["name"] for s in pmon.services()}
        # Automatic restarts keep going.
        began = time.monotonic()
        os.kill(other["pid"], signal.SIGKILL)
        back = pmon.wait_service("crashy", lambda s: s["pid"] not in (None, other["pid"]) and s["status"] == "running",
                                 what="restarted while the database is locked")
        assert time.monotonic() - began < 2.0
        assert pmon.db_rows("SELECT pid FROM services WHERE name = 'crashy'")[0]["pid"] == other["pid"]
    finally:
        conn.rollback()
        conn.close()
    # The store catches up.
    pmon.wait_for(lambda: pmon.db_rows("SELECT pid FROM services WHERE name = 'crashy'")[0]["pid"] == back["pid"],
                  timeout=10, message="the database to catch up with the restart")
    assert pmon.db_rows("SELECT desired FROM services WHERE name = 'held'")[0]["desired"] == "running"
    # And a pmond killed now comes back with the truth: no duplicate, the stop that failed did not happen.
    os.kill(pmon.daemon_pid(), signal.SIGKILL)
    again = {s["name"]: s for s in pmon.services()}
    assert again["crashy"]["pid"] == back["pid"] and again["held"]["pid"] == svc["pid"]
    assert again["held"]["status"] == "running"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounting a small tmpfs")
def test_a_full_data_disk_fails_user_commands_and_restarts_go_on(pmon: Any) -> None:
    data = pmon.home / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data)], check=True)
    try:
        a = pmon.start_service("sleep", "828281", "--name", "a", "--json")
        b = pmon.start_service("sleep", "828282", "--name", "b", "--json")
        filler = data / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        # A stop and a delete that cannot be saved do not happen.
        stop = pmon.run("stop", "a", check=False)
        assert stop.returncode != 0 and "state not saved: disk full" in stop.stderr, stop.stderr
        assert pmon.is_alive(a["pid"])
        gone = pmon.run("del", "b", check=False)
        assert gone.returncode != 0 and "state not saved" in gone.stderr
        assert pmon.is_alive(b["pid"])
        # A crash is restarted anyway.
        os.kill(b["pid"], signal.SIGKILL)
        back = pmon.wait_service("b", lambda s: s["pid"] not in (None, b["pid"]) and s["status"] == "running",
                                 what="restarted on a full disk")
        # pmond dies before the disk frees up: the launch record keeps the next one right.
        os.kill(pmon.daemon_pid(), signal.SIGKILL)
        filler.unlink()
        after = {s["name"]: s for s in pmon.services()}
        assert after["b"]["pid"] == back["pid"] and after["a"]["pid"] == a["pid"]
        # No duplicate: one live main process per service.
        marker = pmon.service_marker()
        mains = [p for p in pmon_pids() if pmon.is_alive(p) and pmon.pgrp(p) == p and _carries(p, marker)]
        assert sorted(mains) == sorted([a["pid"], back["pid"]])
    finally:
        for s in pmon.services():
            if s.get("pid"):
                with contextlib.suppress(OSError):
                    os.kill(s["pid"], signal.SIGKILL)
        pid = pmon.daemon_pid()
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        pmon.wait_for(lambda: subprocess.run(["umount", str(data)]).returncode == 0, timeout=10,
                      message="the tmpfs to unmount")
