"""rotate.py without pmond: sizes, the budget's choices, the check's timing, and that nothing is followed."""

from __future__ import annotations

import asyncio
import gzip
import os
import pwd
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from pmon2.daemon import rotate
from pmon2.daemon.rotate import (
    MIN_DELAY,
    Budget,
    Candidate,
    LogFile,
    Refused,
    RotationPolicy,
    Rotator,
    Share,
    Track,
    choose,
    empty_log,
    next_delay,
    open_checked,
    open_dir,
    parse_share,
    parse_size,
    update_rate,
)

ME = frozenset({os.geteuid()})
ROOT_SKIP = "needs root"


def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


# sizes


def test_sizes_and_shares() -> None:
    assert parse_size("10M") == 10 << 20 and parse_size("1.5K") == 1536 and parse_size(4096) == 4096
    for bad in ("lots", "", "10X", True, 100, "nan", float("inf"), [1]):
        with pytest.raises(ValueError):
            parse_size(bad)  # type: ignore[arg-type]
    assert parse_share("10%") == Share(percent=10.0) and parse_share("2G") == Share(2 << 30)
    assert parse_share("0", zero=True) == Share(0) and parse_share("0%", zero=True).of(1000) == 0
    for bad in ("0%", "101%", "x%", 0, "-5%"):
        with pytest.raises(ValueError):
            parse_share(bad)
    assert Share(percent=10).of(80 << 20) == 8 << 20


# the budget


def test_the_budget_keeps_free_space_and_a_maximum() -> None:
    budget = Budget.of(None, None)  # 10 % used at most, 15 % kept free
    total = 100 << 20
    assert budget.limit(total, free=80 << 20, usage=1 << 20)[0] == 10 << 20
    limit, why = budget.limit(total, free=5 << 20, usage=1 << 20)  # the disk is full of something else
    assert limit == 0 and "must stay free" in why
    limit, why = budget.limit(total, free=10 << 20, usage=8 << 20)
    assert limit == 3 << 20 and "log_keep_free" in why
    assert Budget.of("1M", "0").limit(total, free=0, usage=5 << 20)[0] == 1 << 20


def test_the_oldest_rotated_files_go_first_then_the_biggest_live_log() -> None:
    log = LogFile("/x/a-out.log", RotationPolicy(), "a")

    def c(name: str, disk: int, mtime: float, live: bool = False) -> Candidate:
        return Candidate("/x", name, disk, mtime, log, live)

    files = [c("a-out.log.1", 10, 30), c("a-out.log.3", 10, 10), c("a-out.log.2", 10, 20),
             c("a-out.log", 50, 0, live=True), c("b-out.log", 70, 0, live=True), c("a-err.log", 0, 0, live=True)]
    assert [x.name for x in choose(files, 15)] == ["a-out.log.3", "a-out.log.2"]
    assert [x.name for x in choose(files, 31)] == ["a-out.log.3", "a-out.log.2", "a-out.log.1", "b-out.log"]
    assert [x.name for x in choose(files, 1000)][-2:] == ["b-out.log", "a-out.log"]  # never an empty file
    assert choose(files, 0) == []


# timing


def test_the_next_check_comes_before_a_file_can_grow_by_its_max_size() -> None:
    t = Track()
    update_rate(t, 0, 0.0)
    update_rate(t, 5_000_000, 0.1)  # 50 MB/s
    assert t.rate == pytest.approx(50e6)
    t.size, t.started = 0, False  # just rotated
    assert next_delay(t, 2 << 20, 10.0, live=True) == pytest.approx((2 << 20) / 50e6 + rotate.SOON)
    assert next_delay(t, 1 << 20, 10.0, live=True) >= MIN_DELAY
    t.size = 10 << 20  # already past it: as soon as allowed
    assert next_delay(t, 2 << 20, 10.0, live=True) == MIN_DELAY
    # The writer stops: the rate halves at each check, then it is forgotten; an idle file waits the interval.
    for i in range(40):
        update_rate(t, 10 << 20, 0.2 + i)
    assert t.rate == 0 and next_delay(t, 2 << 20, 10.0, live=False) == 10.0
    # A shrink means it was emptied: all of it is new.
    update_rate(t, 1000, 40.2)
    assert t.rate == pytest.approx(1000)


def test_a_new_writer_is_probed_at_growing_gaps() -> None:
    t = Track()
    gaps = [next_delay(t, 1 << 20, 10.0, live=True) for _ in range(40)]
    assert gaps[0] == MIN_DELAY and gaps == sorted(gaps) and gaps[-1] == 10.0
    assert sum(gaps[:gaps.index(10.0)]) < 60 and gaps.index(10.0) < 35
    # It starts writing: measured again at once, then from its rate.
    update_rate(t, 0, 0.0)
    update_rate(t, 100_000, 0.05)
    assert next_delay(t, 1 << 20, 10.0, live=True) == MIN_DELAY
    assert next_delay(t, 1 << 20, 10.0, live=True) == pytest.approx(((1 << 20) - 100_000) / 2e6 + rotate.SOON)
    assert next_delay(Track(), 1 << 20, 10.0, live=False) == 10.0


# nothing is followed


def _dir(path: Path) -> int:
    return open_dir(str(path))


def test_open_dir_refuses_a_symlink_on_the_way_that_another_user_owns(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "mine").symlink_to(tmp_path / "real")
    fd = _dir(tmp_path / "mine")  # pmond's own (or root's) symlinks are followed
    try:
        assert os.fstat(fd).st_ino == (tmp_path / "real").stat().st_ino
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        _dir(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        _dir(tmp_path / "file")
    if os.geteuid() != 0:
        pytest.skip(f"{ROOT_SKIP}: a symlink that another user owns")
    evil = tmp_path / "evil"
    evil.symlink_to("/etc")
    os.lchown(evil, nobody().pw_uid, nobody().pw_gid)
    with pytest.raises(Refused, match="evil is a symbolic link that nobody owns"):
        _dir(evil)
    with pytest.raises(Refused):
        _dir(evil / "ssl")  # deeper: the same


def test_a_log_that_is_a_symlink_a_fifo_or_a_hard_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n" * 100)
    (tmp_path / "link.log").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.log")
    os.link(target, tmp_path / "hard.log")
    (tmp_path / "dir.log").mkdir()
    (tmp_path / "ok.log").write_bytes(b"x" * 10)
    for name, why in (("link.log", "a symbolic link"), ("fifo.log", "a FIFO"), ("hard.log", "2 hard links"),
                      ("dir.log", "a directory")):
        started = time.monotonic()
        with pytest.raises(Refused, match=f"refused to empty .*{name}: it (is|has) {why}"):
            empty_log(str(tmp_path / name), ME)
        assert time.monotonic() - started < 1
    assert target.read_bytes() == b"precious\n" * 100
    assert empty_log(str(tmp_path / "ok.log"), ME) and (tmp_path / "ok.log").stat().st_size == 0
    assert not empty_log(str(tmp_path / "missing.log"), ME)
    assert not empty_log("/dev/null", ME)  # a log to /dev/null: nothing to empty, no error


def test_a_fifo_swapped_in_after_the_lstat_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.mkfifo(tmp_path / "fifo.log")
    real_stat = os.stat

    def looks_regular(path: Any, *args: Any, **kwargs: Any) -> Any:
        st = real_stat(path, *args, **kwargs)
        if path == "fifo.log":
            return os.stat_result((stat.S_IFREG | 0o644, *tuple(st)[1:3], 1, *tuple(st)[4:]))
        return st

    monkeypatch.setattr(rotate.os, "stat", looks_regular)
    fd = _dir(tmp_path)
    try:
        started = time.monotonic()
        for flags in (os.O_RDWR, os.O_WRONLY):
            with pytest.raises(Refused):
                open_checked(fd, "fifo.log", ME, flags)
        assert time.monotonic() - started < 1
    finally:
        os.close(fd)


def test_a_log_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{ROOT_SKIP}: a file that another user owns")
    log = tmp_path / "a.log"
    log.write_bytes(b"x" * 100)
    os.chown(log, nobody().pw_uid, nobody().pw_gid)
    with pytest.raises(Refused, match="belongs to nobody"):
        empty_log(str(log), frozenset({12345}))
    assert log.stat().st_size == 100
    assert empty_log(str(log), frozenset({nobody().pw_uid}))


# rotation


def _rotate(tmp_path: Path, name: str, policy: RotationPolicy, owners: frozenset[int] = ME,
            chown: tuple[int, int] | None = None) -> tuple[str, int, int] | None:
    fd = _dir(tmp_path)
    try:
        return asyncio.run(rotate.rotate(fd, name, policy, owners, chown))
    finally:
        os.close(fd)


def test_a_planted_part_file_is_replaced_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret\n")
    log = tmp_path / "a.log"
    log.write_bytes(b"line\n" * 1000)
    (tmp_path / "a.log.1.part").symlink_to(secret)
    what, copied, largest = _rotate(tmp_path, "a.log", RotationPolicy(max_size=4096, keep=2))  # type: ignore[misc]
    assert what == "rotated a.log (4.9 KiB)" and copied == largest == 5000
    assert secret.read_bytes() == b"secret\n"
    one = tmp_path / "a.log.1"
    assert stat.S_ISREG(one.lstat().st_mode) and one.read_bytes() == b"line\n" * 1000
    assert oct(one.stat().st_mode & 0o777) == "0o640"
    assert log.stat().st_size == 0 and not (tmp_path / "a.log.1.part").exists()


@pytest.mark.parametrize("planted", ["a.log.1", "a.log.2.gz"])
def test_a_planted_rotated_file_stops_the_rotation_untouched(tmp_path: Path, planted: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret\n")
    log = tmp_path / "a.log"
    log.write_bytes(b"line\n" * 1000)
    (tmp_path / planted).symlink_to(secret)
    with pytest.raises(Refused, match=f"{planted}: it is a symbolic link"):
        _rotate(tmp_path, "a.log", RotationPolicy(max_size=1024, keep=3))
    assert secret.read_bytes() == b"secret\n" and log.stat().st_size == 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.log", planted, "secret"])


def test_rotated_files_shift_and_the_oldest_goes(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    policy = RotationPolicy(max_size=2048, keep=2, compress=True)
    for i in range(4):
        log.write_bytes(f"run {i}\n".encode() * 300)
        _rotate(tmp_path, "a.log", policy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "a.log.1.gz", "a.log.2.gz"]
    assert gzip.decompress((tmp_path / "a.log.1.gz").read_bytes()) == b"run 3\n" * 300
    assert gzip.decompress((tmp_path / "a.log.2.gz").read_bytes()) == b"run 2\n" * 300
    log.write_bytes(b"x" * 5000)
    assert _rotate(tmp_path, "a.log", RotationPolicy(max_size=1024, keep=0))[0].startswith("emptied")  # type: ignore[index]
    assert log.stat().st_size == 0 and not (tmp_path / "a.log.1").exists()
    assert _rotate(tmp_path, "missing.log", policy) is None


def test_a_log_past_twice_its_max_size_is_cut_into_several_files_at_line_ends(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    lines = b"".join(f"line {i:05}\n".encode() for i in range(1000))  # 11 bytes each, 11000 bytes
    log.write_bytes(lines)
    (tmp_path / "a.log.1").write_bytes(b"older\n")
    what, copied, largest = _rotate(tmp_path, "a.log", RotationPolicy(max_size=2048, keep=10))  # type: ignore[misc]
    assert copied == 11000 and largest <= 4096
    assert what == "rotated a.log (10.7 KiB in 3 files of at most 4.0 KiB)"
    parts = [(tmp_path / f"a.log.{n}").read_bytes() for n in (3, 2, 1)]
    assert b"".join(parts) == lines and all(p.endswith(b"\n") and len(p) <= 4096 for p in parts)
    assert (tmp_path / "a.log.4").read_bytes() == b"older\n"
    # What log_keep files cannot hold is not even copied.
    for p in tmp_path.glob("a.log.*"):
        p.unlink()
    log.write_bytes(lines)
    what, copied, largest = _rotate(tmp_path, "a.log", RotationPolicy(max_size=2048, keep=2))  # type: ignore[misc]
    assert "the oldest 2.7 KiB were not kept: log_keep is 2" in what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "a.log.1", "a.log.2"]
    kept = (tmp_path / "a.log.2").read_bytes() + (tmp_path / "a.log.1").read_bytes()
    assert lines.endswith(kept) and 4096 < len(kept) <= 8192 and largest <= 4096


def test_a_rotated_file_goes_to_the_services_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{ROOT_SKIP}: chown")
    pw = nobody()
    log = tmp_path / "a.log"
    log.write_bytes(b"x" * 5000)
    os.chown(log, pw.pw_uid, pw.pw_gid)
    _rotate(tmp_path, "a.log", RotationPolicy(max_size=1024), frozenset({pw.pw_uid}), (pw.pw_uid, pw.pw_gid))
    st = (tmp_path / "a.log.1").stat()
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)


# the checker


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, dict[str, Any]]] = []

    def __call__(self, f: LogFile, kind: str, what: str, data: dict[str, Any]) -> None:
        self.seen.append((f.name, kind, what, data))

    def kinds(self, kind: str) -> list[str]:
        return [what for _, k, what, _ in self.seen if k == kind]


async def _until(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_checker_rotates_sleeps_when_idle_and_wakes_for_pmonds_log(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    own = tmp_path / "pmond.log"
    log.write_bytes(b"")
    own.write_bytes(b"")
    events = Events()
    files = [LogFile(str(log), RotationPolicy(max_size=1024, keep=1), "a"),
             LogFile(str(own), RotationPolicy(max_size=1024, keep=1), "pmond", quiet=True)]
    logger = rotate.logging.getLogger("pmond.test_rotate")

    async def main() -> None:
        r = Rotator(0.1, lambda: files, events, max_use="100%", keep_free="0")
        r.start(logger)
        try:
            log.write_bytes(b"x" * 2000)
            await _until(lambda: (tmp_path / "a.log.1").exists())
            assert events.kinds("rotate") == [f"rotated {log} (2.0 KiB)"]
            # Idle, with a service log known: one check per interval.
            before = r.checks
            await asyncio.sleep(0.55)
            assert 3 <= r.checks - before <= 7
            # Only pmond's own log: asleep, until pmond logs.
            files.pop(0)
            await asyncio.sleep(0.3)
            before = r.checks
            await asyncio.sleep(0.4)
            assert r.checks == before and r.grid_at is None and r.handle is None
            with own.open("ab") as fh:
                fh.write(b"y" * 2000)
            logger.warning("something happened")
            await _until(lambda: (tmp_path / "pmond.log.1").exists())
        finally:
            r.close()

    asyncio.run(main())


def test_the_checker_refuses_once_and_keeps_the_budget(tmp_path: Path) -> None:
    logs = [tmp_path / f"{n}.log" for n in ("a", "b")]
    for i, p in enumerate(logs):
        p.write_bytes(b"")
        for n in (3, 2, 1):  # rotated files of older runs, oldest .3
            rotated = tmp_path / f"{p.name}.{n}"
            rotated.write_bytes(b"r" * 32768)
            os.utime(rotated, (1000 * (10 - n) + i, 1000 * (10 - n) + i))
    logs[1].write_bytes(b"b" * 100_000)
    (tmp_path / "c.log").symlink_to(tmp_path / "a.log.1")
    events = Events()
    files = [LogFile(str(p), RotationPolicy(max_size=1 << 20, keep=5), p.stem) for p in logs]
    files.append(LogFile(str(tmp_path / "c.log"), RotationPolicy(max_size=1024), "c"))

    async def main() -> None:
        r = Rotator(0.1, lambda: files, events, max_use="200K", keep_free="0")
        r.start()
        try:
            await _until(lambda: events.kinds("log_budget"))
            await asyncio.sleep(0.3)
        finally:
            r.close()

    asyncio.run(main())
    left = sorted(p.name for p in tmp_path.iterdir())
    # 292 KiB of logs, 200 KiB allowed: the three oldest rotated files (.3 of a, .3 of b, .2 of a) go.
    assert left == ["a.log", "a.log.1", "b.log", "b.log.1", "b.log.2", "c.log"]
    budget = events.kinds("log_budget")
    assert any("removed a.log.3" in m and "log_max_use" in m for m in budget), budget
    refused = events.kinds("rotate")
    assert refused == [f"refused to rotate {tmp_path / 'c.log'}: it is a symbolic link"], "reported once"
    assert (tmp_path / "a.log.1").read_bytes() == b"r" * 32768


def test_the_budget_empties_the_biggest_live_log_when_nothing_else_is_left(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"a" * 300_000)
    (tmp_path / "b.log").write_bytes(b"b" * 10_000)
    events = Events()
    files = [LogFile(str(log), RotationPolicy(max_size=1 << 20), "a"),
             LogFile(str(tmp_path / "b.log"), RotationPolicy(max_size=1 << 20), "b")]

    async def main() -> None:
        r = Rotator(0.1, lambda: files, events, max_use="100K", keep_free="0")
        r.start()
        try:
            await _until(lambda: events.kinds("log_budget"))
        finally:
            r.close()

    asyncio.run(main())
    assert log.stat().st_size == 0 and (tmp_path / "b.log").stat().st_size == 10_000
    assert events.kinds("log_budget")[0].startswith(f"log budget: emptied {log} (29")


def test_rotations_within_an_interval_share_one_event() -> None:
    events = Events()
    f = LogFile("/x/a.log", RotationPolicy(), "a")
    r = Rotator(1.0, lambda: [f], events)
    r.known = {f.path: f}
    r._rotated_event(f, "rotated /x/a.log (1.0 MiB)", 1 << 20, 1 << 20, now=0.0)
    for i in range(5):
        r._rotated_event(f, "rotated /x/a.log", (1 << 20) + i, (1 << 20) + i, now=0.1 + 0.1 * i)
    r._end_bursts(0.9)
    assert len(events.seen) == 1
    r._end_bursts(1.2)
    assert [e[3] for e in events.seen] == [{"bytes": 1 << 20, "total": 1 << 20},
                                           {"bytes": (1 << 20) + 4, "rotations": 5, "total": 5 * (1 << 20) + 10,
                                            "without_copy": 0}]
    assert events.seen[1][2] == "rotated /x/a.log 5 more times in 1 s (5.0 MiB, the largest 1.0 MiB)"
    r._rotated_event(f, "rotated /x/a.log (1.0 MiB)", 1 << 20, 1 << 20, now=5.0)  # a new interval: at once
    assert len(events.seen) == 3


def test_a_start_probes_only_its_own_logs_and_a_burst_shares_the_checks(tmp_path: Path) -> None:
    """A bulk start of N services: the list of every log is not rebuilt at each start (it was: O(N) per
    start, O(N²) for the bulk), each new log is probed soon after its start, and the starts of a burst
    share their checks."""
    count = 300
    paths = [tmp_path / f"s{i}.log" for i in range(count)]
    for p in paths:
        p.write_bytes(b"")
    asked = [0]
    files: list[LogFile] = []

    def every_log() -> list[LogFile]:
        asked[0] += 1
        return list(files)

    async def main() -> None:
        r = Rotator(30.0, every_log, Events())
        r.start()
        await _until(lambda: r.checks >= 1)
        before, checks = asked[0], r.checks
        for i, p in enumerate(paths):
            f = LogFile(str(p), RotationPolicy(max_size=1024), f"s{i}", i, writer=1000 + i)
            files.append(f)
            r.wake([f])
            if i % 30 == 29:
                await asyncio.sleep(0.005)  # starts come in bursts, as an apply's launches do
        await _until(lambda: len(r.tracks) == count)
        assert all(t.writer == 1000 + i for i, t in enumerate(r.tracks[str(p)] for p in paths))
        assert asked[0] == before, "the list of every log was asked for again"
        assert r.checks - checks <= count // 30 + 2, "each start made a check of its own"
        # A writer that starts writing is seen, and rotated.
        paths[7].write_bytes(b"x" * 4096)
        r.known[str(paths[7])] = files[7]
        r.tracks[str(paths[7])].due = 0.0
        r._plan(str(paths[7]), r.tracks[str(paths[7])])
        r._arm(0.0)
        await _until(lambda: (tmp_path / "s7.log.1").exists())
        r.close()

    asyncio.run(main())


def test_new_writers_are_probed_no_faster_than_the_probe_rate_allows() -> None:
    # Few logs: the probe gap as next_delay gives it, on a grid of a quarter of it.
    assert rotate.probe_delay(100.0, MIN_DELAY, 1) == pytest.approx(MIN_DELAY)
    delay = rotate.probe_delay(100.003, 0.4, 1)
    assert 0.4 <= delay < 0.5 and round((100.003 + delay) * 10, 6) == 1005
    # 2,000 new writers at once: each is probed every 4 s, not every 10 ms.
    assert rotate.probe_delay(100.0, MIN_DELAY, 2000) >= 2000 / rotate.PROBE_RATE
