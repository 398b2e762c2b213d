"""The one event stream: `pmon2 events -f` and GET /v1/events?follow=true (daemon/events.py).

Real pmonds and real processes: a follower sees the last ledger rows, then live starts, stops and a crash's
exit and restart, with no gap and no duplicate at the boundary between the ledger and the bus, even while a
crash loop writes hundreds of events a second; a non-root caller follows only its own services' events; a
follower that never reads costs pmond a bounded queue, not its memory or its answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .peer import request, request_as

Pmon = Any  # tests/conftest.py's helper (the `pmon` fixture)
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pmond as root, a client as nobody")
pytestmark = pytest.mark.timeout(180)


# a `pmon2 events -f` subprocess, read line by line with deadlines


class Follower:
    """`pmon2 events -f ...` running; its stdout lines are read by a thread into a queue."""

    def __init__(self, pmon: Pmon, *args: str) -> None:
        self.proc = subprocess.Popen(pmon.cmd("events", "-f", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, cwd=str(pmon.work), env=pmon.env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, predicate: Any, timeout: float = 10.0, what: str = "") -> list[str]:
        """Read lines until predicate(all lines so far) holds; fail at the deadline. Returns every line."""
        deadline = time.monotonic() + timeout
        while not predicate(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what or predicate}; the follower printed "
                            f"{len(self.seen)} lines, the last: {self.seen[-5:]}", pytrace=False)
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"the follower ended (exit {self.proc.wait()}) before {what}: {err}", pytrace=False)
            self.seen.append(line)
        return self.seen

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.seen]

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: (exit status, stderr). Killed by pid if it does not end."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(5)
        return self.proc.returncode, self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def follower(pmon: Pmon, *args: str) -> Iterator[Follower]:
    f = Follower(pmon, *args)
    try:
        yield f
    finally:
        f.kill()


def has(events_seen: list[dict[str, Any]], service: str, kind: str, after: int = 0) -> bool:
    return any(e["service"] == service and e["kind"] == kind and (e["id"] or 0) > after for e in events_seen)


def ledger_ids(pmon: Pmon, first: int, last: int) -> list[int]:
    return [r["id"] for r in pmon.db_rows("SELECT id FROM events WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))]


# a raw follow connection, opened as any uid, read with deadlines


def connect_as(uid: int | None, path: str) -> socket.socket:
    """A connection to pmond's socket made by `uid` (None: this process). pmond takes the peer's credentials at
    connect time, so a child that dropped to `uid` connects and hands the socket over (SCM_RIGHTS)."""
    if uid is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, connect, pass the socket back
        try:
            ours.close()
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                socket.send_fds(theirs, [b"x"], [s.fileno()])
        finally:
            os._exit(0)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    assert fds, "the child could not connect"
    return socket.socket(fileno=fds[0])


class RawStream:
    """GET ...?follow=true on a raw connection: the status, then the NDJSON values of the chunked body."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.buf = b""
        self.body = b""
        self.values: list[Any] = []
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n\r\n".encode())
        self.status: int | None = None

    def _recv(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        if not data:
            return False
        self.buf += data
        if self.status is None and b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.status = int(head.split()[1])
        while self.status is not None and b"\r\n" in self.buf:
            size_text, rest = self.buf.split(b"\r\n", 1)
            size = int(size_text.split(b";")[0], 16)
            if len(rest) < size + 2:
                break
            self.body += rest[:size]
            self.buf = rest[size + 2:]
        *lines, self.body = self.body.split(b"\n")
        self.values.extend(json.loads(line) for line in lines if line.strip())
        return True

    def until(self, predicate: Any, timeout: float = 10.0, what: str = "") -> list[Any]:
        deadline = time.monotonic() + timeout
        while not predicate(self.values):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}; got {self.values[-5:]}", pytrace=False)
            if not self._recv(min(left, 0.5)):
                pytest.fail(f"the stream ended before {what}; got {self.values[-5:]}", pytrace=False)
        return self.values

    def close(self) -> None:
        self.sock.close()


def bus_stats(pmon: Pmon) -> dict[str, int]:
    return pmon.json("daemon", "status", "--json")["event_bus"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


# the tests


def test_events_f_shows_the_last_rows_then_live_changes(pmon: Pmon) -> None:
    pmon.start_service("sleep", "738100", "--name", "web", "--json")
    crash = pmon.start_service("sleep", "738101", "--name", "crashy", "--json")
    pmon.run("stop", "web")
    pmon.run("start", "web")
    before = pmon.json("events", "--json", "-n", "1000")
    assert len(before) >= 5
    with follower(pmon, "--json", "-n", "3") as f:
        f.until(lambda s: len(s) >= 3, what="the last 3 rows")
        rows = f.events()
        assert [e["id"] for e in rows] == [e["id"] for e in before[-3:]]  # the ledger's newest 3, oldest first
        assert set(rows[0]) == set(before[0])  # the same keys as the ledger's rows
        last_row = rows[-1]["id"]

        pmon.run("stop", "web")
        f.until(lambda s: has(f.events(), "web", "stop", last_row), what="web's live stop")
        pmon.run("start", "web")
        f.until(lambda s: has(f.events(), "web", "start", last_row), what="web's live start")
        os.kill(crash["pid"], signal.SIGKILL)
        f.until(lambda s: has(f.events(), "crashy", "exit", last_row) and has(f.events(), "crashy", "restart",
                                                                                last_row)
                and any(e["kind"] == "exit_status" and e["service"] == "crashy" for e in f.events()),
                what="crashy's exit, its status and restart")
        everything = f.events()
        seen = [e for e in everything if e["id"] is not None]  # the ledger's rows, live or read
        live = [e for e in seen if e["id"] > last_row]
        crash_exit = next(e for e in live if e["service"] == "crashy" and e["kind"] == "exit")
        assert crash_exit["data"]["pid"] == crash["pid"] and crash_exit["owner_uid"] == os.geteuid()
        # The status comes after its exit, as an event of the stream alone that names the row it completes.
        status = next(e for e in everything if e["kind"] == "exit_status" and e["service"] == "crashy")
        assert status["data"]["event_id"] == crash_exit["id"] and status["data"]["signal"] == "SIGKILL", status
        assert status["data"]["pid"] == crash["pid"] and "SIGKILL" in status["message"], status
        assert everything.index(status) > everything.index(crash_exit)
        assert next(e for e in live if e["kind"] == "stop")["caller_uid"] == os.geteuid()
        ids = [e["id"] for e in seen]
        assert ids == sorted(set(ids)), f"ids not strictly increasing: {ids}"
        # No gap: every ledger row from the first shown to the last is there, exactly once.
        assert ids == ledger_ids(pmon, ids[0], ids[-1])
        code, err = f.interrupt()
    assert code == 0 and "Traceback" not in err, err


def test_human_lines_and_a_service_ref(pmon: Pmon) -> None:
    pmon.start_service("sleep", "738110", "--name", "one", "--json")
    pmon.start_service("sleep", "738111", "--name", "two", "--json")
    with follower(pmon, "one", "-n", "5") as f:
        f.until(lambda s: any(" one " in line and "start" in line for line in s), what="one's start row")
        pmon.run("stop", "two")
        pmon.run("stop", "one")
        f.until(lambda s: any(" one " in line and "stop" in line for line in s), what="one's live stop")
        assert not any(" two " in line for line in f.seen), f.seen  # only the service asked for
        assert not any(line.lstrip().startswith("{") for line in f.seen)  # human lines, not JSON
    bad = pmon.run("events", "-f", "nosuch", check=False)
    assert bad.returncode == 1 and "nosuch" in bad.stderr and "Traceback" not in bad.stderr


def test_no_gap_and_no_duplicate_while_a_crash_loop_writes(pmon: Pmon) -> None:
    """The follower subscribes, then reads the ledger, while a service crashes and restarts hundreds of times
    a second: the rows and the live events meet exactly."""
    pmon.run("run", "--min-uptime", "0", "--name", "loop", "sh", "-c", "sleep 0.01")  # a crash loop
    pmon.wait_for(lambda: pmon.db_rows("SELECT count(*) AS n FROM events")[0]["n"] > 50, 20,
                  message="the crash loop to write events")
    with follower(pmon, "--json", "-n", "20") as f:
        f.until(lambda s: len(s) >= 400, timeout=60, what="400 events")
        pmon.run("stop", "loop")
        f.until(lambda s: has(f.events(), "loop", "stop"), timeout=30, what="loop's stop")
        everything = f.events()
    seen = [e for e in everything if e["kind"] != "exit_status"]  # statuses: the stream's alone, id null
    assert len(seen) < len(everything), "no exit status followed the crash loop's exits"
    ids = [e["id"] for e in seen]
    assert all(e["kind"] != "lost" for e in seen), "a prompt reader lost events"
    assert ids == sorted(set(ids)), "a duplicate or a reordering at the ledger/live boundary"
    assert ids == ledger_ids(pmon, ids[0], ids[-1]), "a gap at the ledger/live boundary"


@needs_root
def test_a_non_root_follower_sees_only_its_own_services(pmon: Pmon) -> None:
    (pmon.home / "config.toml").write_text('allow_users = ["nobody"]\n')
    root_svc = pmon.start_service("sleep", "738120", "--name", "rootsvc", "--json")
    for d in (pmon.home, pmon.home / "run"):
        os.chmod(d, 0o711)  # let nobody reach the socket (its mode follows allow_users)
    sock = str(pmon.socket)
    code, mine = request_as(NOBODY, sock, "POST", "/v1/services",
                            {"argv": ["/bin/sleep", "738121"], "cwd": "/tmp", "name": "mine"})
    assert code == 201, mine
    # nobody may not follow root's service, by name or id (as if absent), nor send a follow flag that is not one
    for path in ("/v1/services/rootsvc/events?follow=true", f"/v1/services/{root_svc['id']}/events?follow=true"):
        code, err = request_as(NOBODY, sock, "GET", path)
        assert code == 404, (path, err)
    code, err = request_as(NOBODY, sock, "GET", "/v1/events?follow=yes")
    assert code == 400 and "follow" in err["error"]["message"], err

    stream = RawStream(connect_as(NOBODY, sock), "/v1/events?follow=true&limit=1000")
    by_ref = RawStream(connect_as(NOBODY, sock), "/v1/services/mine/events?follow=true")
    try:
        stream.until(lambda v: any(e.get("kind") == "start" for e in v), what="mine's start row")
        assert stream.status == 200
        pmon.wait_for(lambda: bus_stats(pmon)["subscribers"] == 2, message="both followers subscribed")
        # Root's service changes, then nobody's (by root: the event is still nobody's service's).
        pmon.run("stop", "rootsvc")
        pmon.run("start", "rootsvc")
        pmon.run("restart", "rootsvc")
        pmon.run("stop", "mine")
        stream.until(lambda v: any(e.get("kind") == "stop" for e in v), what="mine's live stop")
        by_ref.until(lambda v: any(e.get("kind") == "stop" for e in v), what="mine's live stop, by ref")
        for values in (stream.values, by_ref.values):
            assert {e["service"] for e in values} == {"mine"}, values
            assert {e["owner_uid"] for e in values} == {NOBODY}
        root_view = pmon.json("events", "--json", "-n", "1000")
        assert any(e["service"] == "rootsvc" and e["kind"] == "restart" for e in root_view)
    finally:
        stream.close()
        by_ref.close()
    pmon.wait_for(lambda: bus_stats(pmon)["subscribers"] == 0, message="the followers unsubscribed")


def test_a_follower_that_never_reads_costs_pmond_nothing_unbounded(pmon: Pmon) -> None:
    # Keep pmond from cutting the stuck client (send_timeout, 30 s by default) before its queue overflows.
    pmon.env["PMON2_HTTP_SEND_TIMEOUT"] = "600"
    pmon.run("run", "--min-uptime", "0", "--name", "storm", "sh", "-c", "sleep 0.005")  # a crash loop
    daemon = pmon.daemon_pid()
    assert daemon
    sock = str(pmon.socket)
    stuck = connect_as(None, sock)
    stuck.sendall(b"GET /v1/events?follow=true HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n\r\n")
    try:
        pmon.wait_for(lambda: bus_stats(pmon)["subscribers"] == 1, message="the stuck follower subscribed")
        rss_before = rss_kib(daemon)
        published = bus_stats(pmon)["published"]
        stats = pmon.wait_for(lambda: (s := bus_stats(pmon))["dropped"] > 0 and s, timeout=120, interval=0.5,
                              message="pmond to drop events for the stuck follower")
        assert stats["published"] - published > 1000  # enough to have filled its queue
        # pmond still answers, quickly, while the follower holds its queue full.
        for _ in range(3):
            t0 = time.monotonic()
            listing = pmon.services()
            elapsed = time.monotonic() - t0
            assert [s["name"] for s in listing] == ["storm"]
            assert elapsed < 3.0, f"ls took {elapsed:.2f} s beside a stuck follower"
        more = bus_stats(pmon)["published"] + 2000
        pmon.wait_for(lambda: bus_stats(pmon)["published"] > more, timeout=120, interval=0.5,
                      message="2,000 more events")
        growth = rss_kib(daemon) - rss_before
        assert growth < 16 * 1024, f"pmond's RSS grew by {growth} KiB beside a stuck follower"
        code, view = request(sock, "GET", "/v1/events?limit=5")
        assert code == 200 and len(view) == 5
    finally:
        stuck.close()
    pmon.wait_for(lambda: bus_stats(pmon)["subscribers"] == 0, timeout=10,
                  message="the stuck follower's subscription to end once it closed")
    pmon.run("stop", "storm")
