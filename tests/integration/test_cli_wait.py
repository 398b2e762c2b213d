"""The CLI waits as long as pmond works on a request (issue 10, requirement 8).

A stop with `--kill-timeout 400` takes 400 s, and the CLI must not give up first with a timeout of its own.
It notices a pmond that dies (the kernel closes the connection), and Ctrl-C ends it with one line and exit
status 130 while the stop goes on in pmond. The first tests use a fake pmond on a Unix socket, in a thread.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pmon2 import client as client_module
from pmon2.client import Client
from pmon2.errors import DaemonUnreachable
from pmon2.paths import resolve

pytestmark = pytest.mark.timeout(60)
INTERRUPTED = "pmon2: interrupted: the operation goes on in pmond (check with `pmon2 ls`)\n"


# the client alone, against a fake pmond


@pytest.fixture
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pmw", dir="/tmp") as d:
        (Path(d) / "run").mkdir()
        yield Path(d)


def fake_pmond(home: Path, answer: Callable[[socket.socket], None]) -> threading.Thread:
    """Listen on HOME/run/pmond.sock, take one request, and let `answer` deal with the connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home / "run" / "pmond.sock"))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_the_client_sets_no_deadline_on_an_answer() -> None:
    assert client_module.REQUEST_TIMEOUT is None
    assert inspect.signature(Client.request).parameters["timeout"].default is None
    assert client_module.CONNECT_TIMEOUT is not None and client_module.CONNECT_TIMEOUT <= 30


def test_a_late_answer_is_read_though_the_connect_timeout_is_short(home: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    monkeypatch.setattr(client_module, "CONNECT_TIMEOUT", 0.2)

    def late(conn: socket.socket) -> None:
        time.sleep(2.0)  # ten times the connect timeout
        body = b'{"ok": true}'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    thread = fake_pmond(home, late)
    started = time.monotonic()
    assert Client(resolve({"PMON2_HOME": str(home)})).request("POST", "/v1/services/x/stop", {}) == {"ok": True}
    assert time.monotonic() - started >= 1.9
    thread.join(5)


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{\"id\": 1"])
def test_a_pmond_that_dies_mid_request_is_a_lost_connection(home: Path, sent: bytes) -> None:
    def die(conn: socket.socket) -> None:
        time.sleep(0.3)
        conn.sendall(sent)  # then the connection closes, as the kernel closes a killed pmond's sockets

    thread = fake_pmond(home, die)
    with pytest.raises(DaemonUnreachable, match=r"^lost the connection to pmond"):
        Client(resolve({"PMON2_HOME": str(home)})).request("POST", "/v1/services/x/stop", {}, autostart=False)
    thread.join(5)


def test_an_explicit_timeout_still_applies(home: Path) -> None:
    release = threading.Event()
    thread = fake_pmond(home, lambda conn: release.wait(5))
    with pytest.raises(DaemonUnreachable, match=r"did not answer within 0\.3 s"):
        Client(resolve({"PMON2_HOME": str(home)})).request("GET", "/v1/daemon", autostart=False, timeout=0.3)
    release.set()
    thread.join(5)


def test_pmond_autostarted_by_the_cli_does_not_get_systemds_variables(home: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Popen:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            seen.update(kwargs["env"])

        def poll(self) -> int:
            return 1

    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    monkeypatch.setattr(subprocess, "Popen", Popen)
    with pytest.raises(DaemonUnreachable):
        Client(resolve({"PMON2_HOME": str(home)})).start_daemon()
    assert seen and not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(seen)


# the real CLI and pmond


def stubborn(pmon: Any) -> dict[str, Any]:
    """A service that ignores SIGTERM: stopping it takes the whole kill timeout, 400 s."""
    script = pmon.script("stubborn.py", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while True:
            time.sleep(1)
    """)
    svc = pmon.start_service(str(script), "--name", "stubborn", "--kill-timeout", "400")
    pmon.wait_for(lambda: "ready" in (pmon.log_dir / "stubborn-out.log").read_text(), 10,
                  message="the service to ignore SIGTERM")
    return svc


def start_stop(pmon: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(pmon.cmd("stop", "stubborn"), cwd=pmon.work, env=pmon.env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_stop_waits_out_a_long_kill_timeout_and_ctrl_c_leaves_it_to_pmond(pmon: Any) -> None:
    svc = stubborn(pmon)
    cli = start_stop(pmon)
    try:
        pmon.wait_service("stubborn", lambda s: s["status"] == "stopping", what="stopping")
        time.sleep(3.0)
        assert cli.poll() is None, f"the CLI gave up early: {cli.communicate()}"
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=10)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, (out, err)
    assert err == INTERRUPTED and out == ""
    # pmond goes on with the stop: the service is still in its grace time, pmond still serves.
    assert pmon.is_alive(svc["pid"]) and pmon.desc("stubborn")["status"] == "stopping"
    os.kill(svc["pid"], signal.SIGKILL)  # not `stop -f`: it may wait behind the graceful stop
    pmon.wait_service("stubborn", lambda s: s["status"] == "stopped", timeout=10, what="stopped")


def test_stop_says_so_when_pmond_dies_under_it(pmon: Any) -> None:
    svc = stubborn(pmon)
    daemon = pmon.daemon_pid()
    cli = start_stop(pmon)
    try:
        pmon.wait_service("stubborn", lambda s: s["status"] == "stopping", what="stopping")
        os.kill(daemon, signal.SIGKILL)
        out, err = cli.communicate(timeout=10)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 1, (out, err)
    assert err.startswith("pmon2: lost the connection to pmond") and err.count("\n") == 1, err
    assert "Traceback" not in err
    pmon.wait_dead(daemon, what="pmond")
    assert pmon.is_alive(svc["pid"])  # services outlive pmond
    os.kill(svc["pid"], signal.SIGKILL)
