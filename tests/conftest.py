"""Shared fixtures: a private pmon2 home per test, a CLI runner, and a teardown that leaves nothing behind.

Facts of the machines these tests run on: PID 1 reaps orphans late (1-2 s), so a dead detached
process lingers as a zombie. Everything here treats a zombie (state Z/X) as dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import (
    all_pids,
    children_of,
    group_members,
    has_env_marker,
    is_alive,
    pgrp,
    ppid,
    proc_state,
    session,
    uid_of,
)

# the helper object


class Pmon:
    """Runs the pmon2 CLI against one private PMON2_HOME."""

    proc_state = staticmethod(proc_state)
    is_alive = staticmethod(is_alive)
    ppid = staticmethod(ppid)
    pgrp = staticmethod(pgrp)
    uid_of = staticmethod(uid_of)
    children_of = staticmethod(children_of)
    group_members = staticmethod(group_members)

    def __init__(self, home: Path) -> None:
        self.home = home
        self.work = home / "work"  # scripts and files of the test services; the CLI's cwd
        self.work.mkdir()
        self.env = dict(os.environ, PMON2_HOME=str(home), NO_COLOR="1")
        self.env.pop("PMON2_EXIT_STATUS", None)

    # paths

    @property
    def pidfile(self) -> Path:
        return self.home / "run" / "pmond.pid"

    @property
    def socket(self) -> Path:
        return self.home / "run" / "pmond.sock"

    @property
    def db_path(self) -> Path:
        return self.home / "data" / "pmon2.db"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    # running the CLI

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pmon2", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 30.0, cwd: str | Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout,
                              cwd=str(cwd or self.work), env=env or self.env, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            pytest.fail(f"pmon2 {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                        f"stderr: {proc.stderr}", pytrace=False)
        return proc

    def json(self, *args: str, **kwargs: Any) -> Any:
        proc = self.run(*args, **kwargs)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"pmon2 {' '.join(args)} printed no JSON: {proc.stdout!r}", pytrace=False)

    def services(self) -> list[dict[str, Any]]:
        return self.json("ls", "--json")

    def desc(self, name: str) -> dict[str, Any]:
        return self.json("desc", name, "--json")

    def start_service(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        """`pmon2 run ... --json`; returns the new service and checks that it runs."""
        svc = self.json("run", "--json", *args, **kwargs)
        assert svc["status"] == "running", svc
        assert is_alive(svc["pid"]), f"pid {svc['pid']} of {svc['name']} is not alive"
        return svc

    # waiting

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02,
                 message: str | Callable[[], str] = "") -> Any:
        """Poll `predicate` until it returns something truthy; fail with a clear message at the deadline."""
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        value: Any = None
        while True:
            try:
                value = predicate()
                last_exc = None
            except (AssertionError, OSError, ValueError, KeyError, TypeError) as exc:
                value, last_exc = None, exc
            if value:
                return value
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        what = message() if callable(message) else message
        name = getattr(predicate, "__name__", repr(predicate))
        detail = f"; last error: {last_exc!r}" if last_exc else f"; last value: {value!r}"
        pytest.fail(f"timed out after {timeout:g} s waiting for {what or name}{detail}", pytrace=False)

    def holds(self, predicate: Callable[[], Any], duration: float, interval: float = 0.05,
              message: str = "") -> None:
        """Check that `predicate` stays true for `duration` seconds (for things that must NOT happen)."""
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            value = predicate()
            assert value, f"condition broke: {message or getattr(predicate, '__name__', predicate)} ({value!r})"
            time.sleep(interval)

    def wait_dead(self, pid: int, timeout: float = 5.0, what: str = "process") -> None:
        self.wait_for(lambda: not is_alive(pid), timeout,
                      message=lambda: f"{what} {pid} to die (state now {proc_state(pid)!r})")

    def wait_service(self, name: str, predicate: Callable[[dict[str, Any]], Any], timeout: float = 5.0,
                     what: str = "") -> dict[str, Any]:
        """Poll `desc NAME --json` until predicate(service) holds; returns that service view."""
        seen: list[dict[str, Any]] = []

        def check() -> dict[str, Any] | None:
            svc = self.desc(name)
            seen[:] = [svc]
            return svc if predicate(svc) else None

        def last_state() -> str:
            keys = ("status", "pid", "restarts", "last_exit")
            state = {k: seen[0].get(k) for k in keys} if seen else None
            return f"{name}: {what or 'condition'}; last state: {state}"

        return self.wait_for(check, timeout, interval=0.05, message=last_state)

    # daemon and store

    def daemon_pid(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def db_rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Read the store without taking part in its writes (read-only connection)."""
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=2.0)
        try:
            db.row_factory = sqlite3.Row
            return list(db.execute(sql, params))
        finally:
            db.close()

    def start_times(self, name: str) -> list[float]:
        """`at` of every start and restart of a service, oldest first, from the events table."""
        rows = self.db_rows("SELECT at FROM events WHERE service = ? AND kind IN ('start', 'restart') "
                            "ORDER BY id", (name,))
        return [r["at"] for r in rows]

    # test services

    def script(self, name: str, body: str, directory: Path | None = None) -> Path:
        """An executable Python script with a `#!sys.executable` shebang."""
        path = (directory or self.work) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body).lstrip("\n"))
        path.chmod(0o755)
        return path

    # teardown

    def service_pids(self) -> set[int]:
        pids: set[int] = set()
        if self.pidfile.exists():
            with contextlib.suppress(Exception):
                proc = self.run("ls", "--json", check=False, timeout=10)
                if proc.returncode == 0:
                    pids |= {s["pid"] for s in json.loads(proc.stdout) if s.get("pid")}
        pids |= self.db_pids()
        return pids

    def db_pids(self) -> set[int]:
        if not self.db_path.exists():
            return set()
        try:
            return {r["pid"] for r in self.db_rows("SELECT pid FROM services WHERE pid IS NOT NULL")}
        except sqlite3.Error:
            return set()

    def service_marker(self) -> bytes:
        """The prefix of PMON2_SERVICE that this home's pmond gives every service it starts: the whole
        marker is PMON2_SERVICE=<instance id>:<service id>:<tag> (the tag: daemon/recovery.py)."""
        from pmon2.daemon.supervisor import instance_id

        return f"PMON2_SERVICE={instance_id(str(self.home / 'data'))}:".encode()

    def ours(self, pid: int) -> bool:
        """Started under this test's home: pmond and its helpers carry PMON2_HOME, services the marker."""
        return (has_env_marker(pid, f"PMON2_HOME={self.home}".encode())
                or has_env_marker(pid, self.service_marker()))

    def cleanup(self) -> None:
        mine = {os.getpid(), os.getpgrp(), os.getsid(0), 0, 1}
        pids = self.service_pids()
        daemon = self.daemon_pid()
        # Freeze pmond first so it cannot start replacements of what we kill.
        if daemon and self.ours(daemon):
            with contextlib.suppress(OSError):
                os.kill(daemon, signal.SIGSTOP)
        pids |= self.db_pids()
        for pid in pids:
            if pid in mine:
                continue
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            # Only touch what is provably ours: a process carrying this test's PMON2_HOME.
            if self.ours(pid):
                for group in (pgrp(pid), session(pid)):
                    if group and group not in mine:
                        with contextlib.suppress(OSError):
                            os.killpg(group, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if daemon and daemon not in mine and self.ours(daemon):
            with contextlib.suppress(OSError):
                os.kill(daemon, signal.SIGKILL)
        # Safety net: anything else started under this home (a leftover child, a second pmond).
        for pid in all_pids():
            if pid not in mine and pid != daemon and self.ours(pid) and is_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def pub() -> Iterator[Path]:
    """A 0755 dir under /tmp that user nobody can enter (a test's home is root's, 0700): the scripts and cwd
    of services that run as nobody."""
    path = Path(tempfile.mkdtemp(prefix="pmpub", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pmon() -> Iterator[Pmon]:
    home = Path(tempfile.mkdtemp(prefix="pm", dir="/tmp"))
    helper = Pmon(home)
    try:
        yield helper
    finally:
        helper.cleanup()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: runs a real pmond and real processes")


ROOT_SKIP = "needs root"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI (which runs as root) a test skipped for want of root has not run its check: fail it. A
    root-only test says so with a skip reason that starts with ROOT_SKIP."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("CI") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if reason.removeprefix("Skipped: ").startswith(ROOT_SKIP):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, which must run root tests: {reason}"

