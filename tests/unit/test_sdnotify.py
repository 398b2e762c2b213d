"""sd_notify(3) as pmond speaks it (daemon/sdnotify.py), against a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmon2.daemon import sdnotify
from pmon2.daemon.sdnotify import Notifier


@pytest.fixture
def receiver() -> Iterator[tuple[str, socket.socket]]:
    with tempfile.TemporaryDirectory(prefix="pmn", dir="/tmp") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2.0)
        with sock:
            yield path, sock


def drain(sock: socket.socket, seconds: float) -> list[bytes]:
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            break
    return got


def test_no_notify_socket_means_nothing_at_all() -> None:
    n = Notifier.from_environ({}, pid=123)
    assert not n.enabled and n.interval is None
    assert n.notify("READY=1") is False and n.sock is None
    n.close()


def test_ready_reaches_a_path_socket(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = Notifier(path)
    assert n.notify("READY=1", "STATUS=2 services")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 services"
    assert os.get_inheritable(n.sock.fileno()) is False
    n.close()


def test_abstract_namespace() -> None:
    name = f"pmon2-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        n = Notifier("@" + name)
        assert n.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"
        n.close()


def test_addresses() -> None:
    assert sdnotify.address("/run/systemd/notify") == b"/run/systemd/notify"
    assert sdnotify.address("@x/y") == b"\0x/y"
    assert sdnotify.address("relative") is None and sdnotify.address("vsock:2:1234") is None


def test_a_failed_send_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.notify("READY=1") is False
    n.close()


@pytest.mark.parametrize(("env", "pid", "usec"), [
    ({"WATCHDOG_USEC": "400000"}, 10, 400000),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "10"}, 10, 400000),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "11"}, 10, None),  # meant for another process
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "x"}, 10, None),
    ({"WATCHDOG_USEC": "0"}, 10, None),
    ({"WATCHDOG_USEC": "-5"}, 10, None),
    ({}, 10, None),
])
def test_watchdog_enabled_as_sd_watchdog_enabled_says(env: dict[str, str], pid: int, usec: int | None) -> None:
    assert sdnotify.watchdog_usec(env, pid) == usec


def test_from_environ_takes_the_variables_out() -> None:
    env = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "77", "PATH": "/bin"}
    n = Notifier.from_environ(env, pid=77)
    assert env == {"PATH": "/bin"}  # nothing pmond starts inherits them
    assert n.address == b"/run/n" and n.interval == 15.0
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}, pid=77).interval is None  # no socket, no timer


def test_watchdog_pings_from_the_loop_at_half_the_interval(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = Notifier(path, watchdog=200_000)
    assert n.interval == 0.1

    async def run() -> None:
        n.start_watchdog(asyncio.get_running_loop())
        await asyncio.sleep(0.55)
        n.close()
        assert n.timer is None

    asyncio.run(run())
    got = drain(sock, 0.3)
    assert set(got) == {b"WATCHDOG=1"} and 4 <= len(got) <= 6, got


def test_a_blocked_loop_sends_no_ping(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = Notifier(path, watchdog=100_000)

    async def run() -> None:
        n.start_watchdog(asyncio.get_running_loop())
        await asyncio.sleep(0.2)
        drain(sock, 0.01)
        time.sleep(0.5)  # the loop is stuck: five intervals without a ping
        assert drain(sock, 0.01) == []
        await asyncio.sleep(0.15)
        n.close()

    asyncio.run(run())
    assert b"WATCHDOG=1" in drain(sock, 0.1)


def test_no_watchdog_no_timer(receiver: tuple[str, socket.socket]) -> None:
    path, _sock = receiver
    n = Notifier(path)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        n.start_watchdog(loop)
        assert n.timer is None and not loop._scheduled  # type: ignore[attr-defined]

    asyncio.run(run())
    n.close()
