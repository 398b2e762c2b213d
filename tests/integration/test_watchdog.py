"""A real pmond speaking sd_notify(3) to a datagram socket that plays systemd (issue 10, requirement 9).

pmond is started as systemd starts it, `python -m pmon2.daemon` with NOTIFY_SOCKET and WATCHDOG_USEC in its
environment (the CLI's autostart drops them on purpose: a pmond it starts is not a unit's main process).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)


class FakeSystemd:
    """The notify socket of a unit, and the pmond that systemd started with it."""

    def __init__(self, pmon: Any) -> None:
        self.pmon = pmon
        self.path = pmon.home / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pmon2.daemon"], cwd="/", start_new_session=True,
                                     env=dict(self.pmon.env, NOTIFY_SOCKET=str(self.path), **env),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def receive(self, seconds: float) -> list[str]:
        """Every datagram that arrives within `seconds`."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return got

    def next(self, timeout: float = 15.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
        self.sock.close()


@pytest.fixture
def systemd(pmon: Any) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(pmon)
    try:
        yield fake
    finally:
        fake.close()


def ready(systemd: FakeSystemd, pmon: Any) -> None:
    first = systemd.next()
    assert first.split("\n")[0] == "READY=1", first
    assert pmon.socket.exists(), "READY=1 came before the API socket listened"
    assert pmon.daemon_pid() == systemd.proc.pid


def stop_and_expect_stopping(systemd: FakeSystemd, pmon: Any) -> None:
    pmon.run("daemon", "stop")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if systemd.next(timeout=deadline - time.monotonic()) == "STOPPING=1":
            break
    else:
        pytest.fail("no STOPPING=1")
    assert systemd.proc.wait(10) == 0


def test_ready_watchdog_and_stopping(pmon: Any, systemd: FakeSystemd) -> None:
    systemd.start(WATCHDOG_USEC="400000")
    ready(systemd, pmon)
    pmon.start_service("sleep", "717171", "--name", "fed")  # pmond at work, and its launcher started
    pings = systemd.receive(1.0)
    assert set(pings) == {"WATCHDOG=1"} and len(pings) >= 3, pings  # every 0.2 s: half of WATCHDOG_USEC

    # Nothing pmond starts inherits systemd's variables (the launcher gets pmond's os.environ).
    info = json.loads(pmon.run("daemon", "status", "--json").stdout)
    environ = Path(f"/proc/{info['launcher_pid']}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))], environ

    # The pings come from pmond's loop: a stopped pmond sends none, and they resume with it.
    os.kill(systemd.proc.pid, signal.SIGSTOP)
    try:
        pmon.wait_for(lambda: pmon.proc_state(systemd.proc.pid) == "T", message="pmond to stop")
        systemd.receive(0.1)  # one that was on its way
        assert systemd.receive(1.0) == []
    finally:
        os.kill(systemd.proc.pid, signal.SIGCONT)
    assert "WATCHDOG=1" in systemd.receive(1.0)

    stop_and_expect_stopping(systemd, pmon)


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}],
                         ids=["no-watchdog", "watchdog-for-another-pid"])
def test_no_watchdog_no_wakeups(pmon: Any, systemd: FakeSystemd, env: dict[str, str]) -> None:
    systemd.start(**env)
    ready(systemd, pmon)
    assert systemd.receive(1.2) == []
    stop_and_expect_stopping(systemd, pmon)
