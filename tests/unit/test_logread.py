"""pmond's log reading (daemon/logread.py): last lines across rotated files, bounds, refusals, following;
and the server's streamed responses (daemon/server.py, Streamed)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import stat
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from pmon2.daemon import logread
from pmon2.daemon.auth import Caller, PeerPolicy
from pmon2.daemon.logread import Budget, Followed, Unreadable, log_files, open_log, tail, tail_fd, tail_gz
from pmon2.daemon.server import HttpServer, Streamed

NOBODY = 65534


def lines_of(*numbers: int) -> list[bytes]:
    return [f"line {i}".encode() for i in numbers]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def read_tail(path: Path, want: int, budget: int = logread.SCAN_BUDGET) -> tuple[list[bytes], bool]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return run(tail_fd(fd, os.fstat(fd).st_size, want, Budget(budget)))
    finally:
        os.close(fd)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of 7 bytes: every line boundary case is crossed."""
    monkeypatch.setattr(logread, "CHUNK", 7)


@pytest.mark.parametrize("content, want, expected", [
    (b"", 5, []),
    (b"\n", 5, [b""]),
    (b"a\nb\nc\n", 2, [b"b", b"c"]),
    (b"a\nb\nc", 2, [b"b", b"c"]),  # a last line without a newline counts
    (b"a\nb\nc\n", 10, [b"a", b"b", b"c"]),
    (b"a\n\nb\n", 2, [b"", b"b"]),
    (b"a\nb\n", 0, []),
    (b"x" * 40 + b"\n" + b"y" * 30 + b"\n", 1, [b"y" * 30]),
    (b"x" * 40 + b"\n" + b"y" * 30, 2, [b"x" * 40, b"y" * 30]),
])
def test_last_lines_of_a_file_at_any_chunk_boundary(tmp_path: Path, small_chunks: None, content: bytes, want: int,
                                                    expected: list[bytes]) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(content)
    assert read_tail(path, want) == (expected, True)


def test_last_lines_match_splitting_for_every_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.log"
    content = b"".join(f"{'z' * (i % 13)}{i}\n".encode() for i in range(60))
    path.write_bytes(content)
    every = content[:-1].split(b"\n")
    for chunk in (1, 2, 3, 5, 16, 64, 1 << 20):
        monkeypatch.setattr(logread, "CHUNK", chunk)
        for want in (1, 7, 59, 60, 61):
            assert read_tail(path, want) == (every[-want:], True), (chunk, want)


def test_the_scan_budget_stops_a_search(tmp_path: Path, small_chunks: None) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"a\n" + b"x" * 100 + b"\nlast\n")
    got, complete = read_tail(path, 3, budget=30)
    assert not complete and got == [b"last"]


def write_gz(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(data)


def test_last_lines_of_a_gzip_file(tmp_path: Path, small_chunks: None) -> None:
    path = tmp_path / "x.log.2.gz"
    write_gz(path, b"".join(line + b"\n" for line in lines_of(*range(50))))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert run(tail_gz(fd, 3, Budget())) == (lines_of(47, 48, 49), True)
        assert run(tail_gz(fd, 100, Budget())) == (lines_of(*range(50)), True)
        # Decompressing is bounded: out of budget, no lines (they would not be the file's last ones).
        assert run(tail_gz(fd, 3, Budget(100))) == ([], False)
    finally:
        os.close(fd)


def test_a_gzip_bomb_costs_at_most_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "bomb.log.1.gz"
    path.write_bytes(gzip.compress(b"\0" * (32 << 20) + b"\nend\n", compresslevel=1))  # 32 MiB in ~150 KiB
    budget = Budget(4 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert run(tail_gz(fd, 1, budget)) == ([], False)
    finally:
        os.close(fd)
    assert -2 * logread.CHUNK <= budget.left <= 0  # decompression stopped within a step of the budget


def make_rotated(directory: Path) -> Path:
    """app-out.log with lines 7-9, .1 with 4-6, .2.gz with 1-3: the last N lines span all three."""
    live = directory / "app-out.log"
    live.write_bytes(b"line 7\nline 8\nline 9\n")
    (directory / "app-out.log.1").write_bytes(b"line 4\nline 5\nline 6\n")
    write_gz(directory / "app-out.log.2.gz", b"line 1\nline 2\nline 3\n")
    return live


@pytest.mark.parametrize("want", [1, 3, 4, 5, 7, 9, 10, 1000])
def test_last_lines_across_rotated_files_in_order(tmp_path: Path, small_chunks: None, want: int) -> None:
    live = make_rotated(tmp_path)
    got = run(tail(str(live), want, None, Budget()))
    assert got.error is None and not got.truncated
    assert got.lines == lines_of(*range(1, 10))[-want:]


def test_rotated_files_with_both_forms_go_newest_first(tmp_path: Path) -> None:
    live = make_rotated(tmp_path)
    (tmp_path / "app-out.log.3").write_bytes(b"line -1\nline 0\n")  # older than .2.gz: never shown before it
    got = run(tail(str(live), 11, None, Budget()))
    assert got.lines == lines_of(*range(-1, 10))


def test_a_missing_live_file_still_reads_rotated_ones(tmp_path: Path) -> None:
    live = make_rotated(tmp_path)
    live.unlink()
    assert run(tail(str(live), 4, None, Budget())).lines == lines_of(3, 4, 5, 6)


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP SECRET\n")
    live = tmp_path / "app-out.log"
    live.symlink_to(secret)
    got = run(tail(str(live), 10, None, Budget()))
    assert got.lines == [] and "symbolic link" in (got.error or "")
    # A symlink as a rotated file: the lines before it are kept, nothing of its target is read.
    live.unlink()
    live.write_text("fine\n")
    (tmp_path / "app-out.log.1").symlink_to(secret)
    got = run(tail(str(live), 10, None, Budget()))
    assert got.lines == [b"fine"] and "symbolic link" in (got.error or "")
    assert b"TOP SECRET" not in b"".join(got.lines)


def test_a_fifo_is_never_opened_and_dev_null_is_empty(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    with pytest.raises(Unreadable, match="FIFO"):
        open_log(str(fifo), None)  # an open would block without O_NONBLOCK; lstat refuses it first
    assert open_log("/dev/null", None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_caller_reads_only_files_of_the_services_user(tmp_path: Path) -> None:
    mine = tmp_path / "mine.log"
    mine.write_text("ok\n")
    os.chown(mine, NOBODY, NOBODY)
    roots = tmp_path / "roots.log"
    roots.write_text("root's\n")
    opened = open_log(str(mine), NOBODY)
    assert opened is not None
    os.close(opened[0])
    with pytest.raises(Unreadable, match="belongs to root"):
        open_log(str(roots), NOBODY)
    opened = open_log(str(roots), None)  # root and pmond's user read any regular file
    assert opened is not None
    os.close(opened[0])


def test_log_files_of_a_service() -> None:
    split = {"out_log": "/l/a-out.log", "err_log": "/l/a-err.log"}
    one = {"out_log": "/l/a.log", "err_log": "/l/a.log"}
    assert log_files(split, "all") == [("out", "/l/a-out.log", False), ("err", "/l/a-err.log", False)]
    assert log_files(split, "err") == [("err", "/l/a-err.log", False)]
    assert log_files(one, "all") == log_files(one, "out") == [("out", "/l/a.log", True)]
    assert log_files(one, "err") == []


# following


class FakeService:
    id = 1
    name = "app"
    uid = 0


def follower(path: Path) -> Followed:
    """A Followed as logf makes one: the file opened at its current end."""
    opened = open_log(str(path), None)
    return Followed(FakeService(), "out", str(path), None, opened)


def test_follow_reads_new_lines_and_holds_a_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "app-out.log"
    path.write_bytes(b"old\n")
    f = follower(path)
    try:
        assert f.step() == ([], None, False)
        with open(path, "ab") as fh:
            fh.write(b"one\ntw")
        assert f.step() == ([b"one"], None, False)
        with open(path, "ab") as fh:
            fh.write(b"o\n")
        assert f.step() == ([b"two"], None, False)
    finally:
        f.close()


def test_follow_across_copytruncate_and_rename(tmp_path: Path) -> None:
    path = tmp_path / "app-out.log"
    path.write_bytes(b"")
    f = follower(path)
    try:
        writer = open(path, "ab", buffering=0)  # O_APPEND, as a service holds its log
        writer.write(b"a\nb\n")
        assert f.step()[0] == [b"a", b"b"]
        os.truncate(path, 0)  # copytruncate
        writer.write(b"c\n")
        assert f.step()[0] == [b"c"]
        # rename: the service still writes to the old file; a new one appears at the path
        os.rename(path, str(path) + ".1")
        writer.write(b"d\n")
        path.write_bytes(b"e\n")
        assert f.step()[0] == [b"d", b"e"]
        writer.close()
    finally:
        f.close()


def test_follow_refuses_a_symlink_put_in_place_and_says_so_once(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP SECRET\n")
    path = tmp_path / "app-out.log"
    path.write_bytes(b"")
    f = follower(path)
    try:
        path.unlink()
        path.symlink_to(secret)
        lines, problem, _ = f.step()
        assert lines == [] and problem is not None and "symbolic link" in problem
        assert f.step() == ([], None, False)  # said once
        path.unlink()
        path.write_text("back\n")
        assert f.step() == ([b"back"], None, False)
    finally:
        f.close()


def test_follow_reads_a_burst_in_bounded_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logread, "FOLLOW_READ", 10)
    path = tmp_path / "app-out.log"
    path.write_bytes(b"")
    f = follower(path)
    try:
        path.write_bytes(b"123456789\n" * 3)
        seen = []
        for _ in range(10):
            lines, _, more = f.step()
            seen += lines
            if not more:
                break
        assert seen == [b"123456789"] * 3
    finally:
        f.close()


# the server's streamed responses


def test_a_streamed_response_is_chunked_and_closed_when_the_client_leaves(tmp_path: Path) -> None:
    closed = asyncio.Event()
    sent: list[int] = []

    async def items() -> AsyncGenerator[bytes, None]:
        try:
            for i in range(1000):
                sent.append(i)
                yield json.dumps({"n": i}).encode() + b"\n"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def handler(method: str, path: str, query: Any, body: Any, caller: Caller) -> tuple[int, Any]:
        return 200, Streamed(items())

    async def main() -> bytes:
        sock_path = str(tmp_path / "s.sock")
        server = HttpServer(sock_path, handler, PeerPolicy())
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while got.count(b'"n"') < 3:
                got += await asyncio.wait_for(reader.read(65536), 5)
            writer.close()  # the client goes away: the server must notice and close the items
            await asyncio.wait_for(closed.wait(), 5)
            return got
        finally:
            await server.close()

    got = run(main())
    head = got.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200") and b"transfer-encoding: chunked" in head
    assert b"content-length" not in head
    assert len(sent) < 1000


def test_the_stream_file_modes_are_untouched(tmp_path: Path) -> None:
    """Reading never changes a log: not its mode, not its owner, not its times of change."""
    live = make_rotated(tmp_path)
    before = {p.name: os.stat(p) for p in tmp_path.iterdir()}
    run(tail(str(live), 100, None, Budget()))
    after = {p.name: os.stat(p) for p in tmp_path.iterdir()}
    for name, st in before.items():
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, st.st_size) == \
            (stat.S_IMODE(after[name].st_mode), after[name].st_uid, after[name].st_mtime_ns, after[name].st_size)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_read_cancelled_midway_leaves_no_file_open(tmp_path: Path, small_chunks: None) -> None:
    path = tmp_path / "big.log"
    path.write_bytes(b"x\n" * 5000)

    async def main() -> None:
        before = open_fds()
        task = asyncio.ensure_future(tail(str(path), 4000, None, Budget(), keep_open=True))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert open_fds() == before

    run(main())


class FakeSupervisor:
    def __init__(self, *services: Any) -> None:
        self.services = {s.id: s for s in services}


def test_the_follow_stream_starts_with_the_last_lines_and_ends_when_its_service_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logread, "FOLLOW_INTERVAL", 0.01)
    svc = FakeService()
    svc.spec = {"out_log": str(tmp_path / "app.log"), "err_log": str(tmp_path / "app.log")}
    (tmp_path / "app.log").write_text("one\ntwo\n")
    sup = FakeSupervisor(svc)

    async def main() -> list[Any]:
        before = open_fds()
        stream = logread.follow(sup, [svc], Caller(1, 0, 0), 1, "all")
        got = [json.loads(await anext(stream))]
        with open(tmp_path / "app.log", "a") as fh:
            fh.write("three\n")
        got += [json.loads(line) for line in (await anext(stream)).splitlines()]
        del sup.services[svc.id]
        got += [json.loads(line) async for chunk in stream for line in chunk.splitlines()]  # ends by itself
        assert open_fds() == before
        return got

    first, *rest = run(main())
    assert first == {"services": [{"id": 1, "name": "app", "logs": [
        {"stream": "out", "file": str(tmp_path / "app.log"), "combined": True, "lines": ["two"], "truncated": False,
         "error": None}]}]}
    assert rest == [{"service": "app", "stream": "out", "text": "three"}]
