"""Built-in log rotation and the log budget: copytruncate, and nothing ever followed.

Services hold their logs open with O_APPEND, so a log is copied to NAME.1 and emptied in place.

Nothing is followed (issue 9): a service may own its log dir and plant anything there while pmond,
often root, rotates. So each file is reached from an O_PATH fd of its directory, got by walking the
path one component at a time with O_NOFOLLOW (a symlink on the way is followed only if root or
pmond's user owns it); opened with O_NOFOLLOW|O_NONBLOCK relative to that fd (a FIFO never blocks
pmond); and checked with fstat before anything is done to it: a regular file, one link, owned by the
service's user (or pmond's, for files of older versions). Rotated files are lstat-checked the same
way before they are shifted; the copy is created with O_CREAT|O_EXCL|O_NOFOLLOW and handed to the
service's user; renames and unlinks go through the directory fd. A file that fails is refused, with
one event, and never touched.

Every log pmond knows is checked, its service running or not, and pmond.log too (issue 10). Checks
are adaptive: a growing file is checked again just after it should cross its max size at the rate
seen (MIN_DELAY at the least), a newly started writer is probed at once, and an idle machine costs
one wake-up per log_check_interval (none at all when pmond knows no service: pmond.log grows only
when pmond logs, and logging plans a check). Between two full checks, a check looks only at the logs
that are due (a heap) and at those of services started since the last one (`wake`), so a bulk start of
N services costs O(N log N), not O(N) per start; the starts of a burst share one probe.

No rotated file holds more than twice max_size: a log that got past that anyway (pmond starved of CPU)
is cut into several rotated files at line ends. The ledger gets one rotation event per log and
interval, then a summary.

The log budget, per filesystem holding logs (journald's SystemMaxUse= and SystemKeepFree=): logs use
at most log_max_use and leave log_keep_free free. Over it, the oldest rotated files go first, then
the biggest live logs are emptied, and an event says so.

The copy runs in the event loop in 1 MiB steps with a yield between them, so a big log never blocks
pmond (no threads: pmond forks, and forking beside a busy thread is asking for trouble). A full disk
is survived: the live log is emptied even if its copy cannot be kept.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import heapq
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from pmon2.errors import PmonError

log = logging.getLogger("pmond")

CHUNK = 1 << 20
UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
         "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
# The shortest time between two checks of a growing file: at 50 MB/s a 1 MiB log grows by half its
# size in 10 ms, so no rotated file gets past twice the limit.
MIN_DELAY = 0.01
EARLY = 0.002  # a file due this soon is checked now
SOON = 0.002  # how far past its predicted crossing of the max size a growing file is checked
MAX_SYMLINKS = 40
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
LOG_MODE = 0o640
DEFAULT_MAX_USE = "10%"
DEFAULT_KEEP_FREE = "15%"


class Refused(PmonError):
    """A log file (or a directory on its way) that pmond will not touch: one line, naming it and why."""

    code = "refused"


@dataclass(frozen=True)
class RotationPolicy:
    max_size: int = 10 << 20
    keep: int = 5
    compress: bool = False


@dataclass(frozen=True)
class LogFile:
    """One log that pmond rotates."""

    path: str
    policy: RotationPolicy
    name: str  # the service's name, or "pmond"
    ref: int | None = None  # the service's id; None for pmond's own log
    owners: frozenset[int] = frozenset()  # uids the file may belong to (pmond's euid is always one)
    chown: tuple[int, int] | None = None  # (uid, gid) for new rotated files, when pmond is root
    writer: int | None = None  # pid of the process writing it, None when its service is not running
    quiet: bool = False  # grows only when pmond logs (pmond.log): no timer needed while all else sleeps


# sizes and shares


def parse_size(value: str | int | float) -> int:
    """10485760, "10M", "512K", "1.5G" -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not a size: {value!r}")
        size = int(value)
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGIB")
        unit = text[len(number):]
        try:
            size = int(float(number) * UNITS[unit])
        except (KeyError, ValueError, OverflowError):
            raise ValueError(f"not a size: {value!r} (try 10M, 512K or a number of bytes)") from None
    else:
        raise ValueError(f"not a size: {value!r} (try 10M, 512K or a number of bytes)")
    if size < 1024:
        raise ValueError(f"a log size below 1K makes no sense: {value!r}")
    return size


@dataclass(frozen=True)
class Share:
    """A number of bytes, or a percentage of a filesystem's size."""

    size: int = 0
    percent: float | None = None

    def of(self, total: int) -> int:
        return int(total * self.percent / 100) if self.percent is not None else self.size

    def __str__(self) -> str:
        return f"{self.percent:g} %" if self.percent is not None else fmt_bytes(self.size)


def parse_share(value: str | int | float, zero: bool = False) -> Share:
    """ "10%", "2G", 1073741824 -> a Share. `zero`: 0 (or "0%") is allowed."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"not a percentage: {value!r}") from None
        if not (percent >= 0 if zero else percent > 0) or percent > 100:
            raise ValueError(f"a percentage {'from 0' if zero else 'above 0'} up to 100, not {value!r}")
        return Share(percent=percent)
    if zero and not isinstance(value, bool) and value in (0, "0"):
        return Share(0)
    return Share(parse_size(value))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def rotated_name(path: str, n: int, compress: bool) -> str:
    return f"{path}.{n}" + (".gz" if compress else "")


# who may own a log


@functools.lru_cache(maxsize=1024)
def log_owner(user: str | None) -> tuple[frozenset[int], tuple[int, int] | None]:
    """(uids a service's log files may belong to, (uid, gid) to give new rotated files or None).

    The service's uid, and pmond's own: the log dir of a service that runs as pmond's user is
    pmond's, and older versions created every log as pmond's user. Looked up once per pmond run."""
    euid = os.geteuid()
    if user is None:
        return frozenset({euid}), None
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return frozenset({euid}), None
    return frozenset({pw.pw_uid, euid}), ((pw.pw_uid, pw.pw_gid) if euid == 0 and pw.pw_uid != 0 else None)


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def describe(mode: int) -> str | None:
    """What a file that is not a regular file is, or None for a regular file."""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


def problem(st: os.stat_result, owners: Collection[int]) -> str | None:
    """Why a log file must not be touched, or None when it may."""
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and (st.st_uid in owners or st.st_uid == os.geteuid()):
        return None
    what = describe(st.st_mode)
    if what is not None:
        return f"it is {what}"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} hard links"
    allowed = set(owners) | {os.geteuid()}
    if st.st_uid not in allowed:
        return f"it belongs to {_user(st.st_uid)}, not to {' or '.join(sorted(_user(u) for u in allowed))}"
    return None


# safe opening


def open_dir(path: str) -> int:
    """An O_PATH fd of the directory `path`, reached one component at a time with O_NOFOLLOW.

    A symlink on the way is followed only when root or pmond's user owns it (/var/log -> /data/log made
    by an admin); one that anybody else owns raises Refused. Other errors are OSErrors."""
    if not path.startswith("/"):
        raise Refused(f"{path} is not an absolute path")
    trusted = {0, os.geteuid()}
    todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    here = ""
    fd = os.open("/", DIR_FLAGS)
    links = 0
    try:
        while todo:
            part = todo.pop()
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                if st.st_uid not in trusted:
                    raise Refused(f"{here}/{part} is a symbolic link that {_user(st.st_uid)} owns") from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", DIR_FLAGS)
                    here = ""
                todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                continue
            os.close(fd)
            fd = nfd
            here = os.path.dirname(here) if part == ".." else f"{here}/{part}"
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def open_checked(dfd: int, name: str, owners: Collection[int], flags: int = os.O_RDWR) -> tuple[int, int] | None:
    """Open `name` in the directory `dfd` if it is a log pmond may touch: (fd, size), or None when there is
    no such file or it is a character device (a log to /dev/null). Raises Refused with the reason
    ("it is a symbolic link") otherwise. The lstat first spares a FIFO or a device even an open; the
    fstat after decides, on what was really opened."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISCHR(st.st_mode):
        return None
    why = problem(st, owners)
    if why is not None:
        raise Refused(why)
    try:
        fd = os.open(name, flags | OPEN_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EWOULDBLOCK):  # swapped meanwhile
            raise Refused("it was replaced by something else while being opened") from None
        raise
    try:
        st = os.fstat(fd)
        why = problem(st, owners)
        if why is not None:
            raise Refused(why)
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def empty_log(path: str, owners: Collection[int]) -> bool:
    """Empty a log in place (its writer goes on through O_APPEND at the new end). False when there is no
    such file; Refused (a PmonError: "refused to empty PATH: it is a symbolic link") for a file that
    fails the checks; OSError otherwise."""
    directory, name = os.path.split(path)
    try:
        dfd = open_dir(directory)
    except FileNotFoundError:
        return False
    except Refused as exc:
        raise Refused(f"refused to empty {path}: {exc.message}") from None
    try:
        try:
            opened = open_checked(dfd, name, owners, os.O_WRONLY)
        except Refused as exc:
            raise Refused(f"refused to empty {path}: {exc.message}") from None
        if opened is None:
            return False
        try:
            os.ftruncate(opened[0], 0)
        finally:
            os.close(opened[0])
        return True
    finally:
        os.close(dfd)


# rotation


async def rotate(dfd: int, name: str, policy: RotationPolicy, owners: Collection[int],
                 chown: tuple[int, int] | None = None, shown: str | None = None) -> tuple[str, int, int] | None:
    """Rotate the log `name` in the directory `dfd`: copy it (gzipped if asked), shift name.1..name.keep,
    put the copy at name.1, empty the log. Returns (what happened, bytes copied, bytes of the largest
    rotated file), None when there is no such log. Raises Refused (nothing changed) when the log or a
    rotated file fails the checks.

    No rotated file holds more than twice max_size: a log that grew past that before it could be
    rotated (pmond starved of CPU, a stopped service's log written by someone else) is cut into
    several, at line ends, the oldest at the highest number; what log_keep files cannot hold is not
    copied."""
    shown = shown or name
    opened = open_checked(dfd, name, owners)
    if opened is None:
        return None
    fd, size = opened
    piece = 2 * policy.max_size
    skipped = 0
    try:
        if policy.keep == 0:
            os.ftruncate(fd, 0)
            return f"emptied {shown} (log_keep 0: no copy kept)", 0, 0
        _shift(dfd, name, shown, policy, owners, 0)  # only checks: a refusal now spares a useless copy
        target = rotated_name(name, 1, policy.compress)
        skipped = max(0, size - policy.keep * piece)
        pieces: list[tuple[str, int]] = []
        try:
            pieces = await _copy(fd, skipped, size + policy.max_size, dfd, target + ".part", policy.compress,
                                 chown, piece)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = False
        else:
            kept = True
        # From here on, no await: the rotated files shift and the copies take their places at once
        # (NAME.1 is missing for a rename's time only), and the log is emptied right after its copy.
        for part, _ in pieces[:-policy.keep]:  # more than log_keep files: the oldest go at once
            _unlink(dfd, part)
        pieces = pieces[-policy.keep:]
        if pieces:
            try:
                _shift(dfd, name, shown, policy, owners, len(pieces))
            except BaseException:
                for part, _ in pieces:
                    _unlink(dfd, part)
                raise
            for n, (part, _) in enumerate(reversed(pieces), 1):
                os.replace(part, rotated_name(name, n, policy.compress), src_dir_fd=dfd, dst_dir_fd=dfd)
        # Lines written between the end of the copy and this truncate are lost: the price of copytruncate.
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    if not kept:
        return f"disk full: emptied {shown} without keeping a copy", 0, 0
    copied = sum(n for _, n in pieces)
    largest = max((n for _, n in pieces), default=0)
    what = f"rotated {shown} ({fmt_bytes(copied)}"
    if len(pieces) > 1:
        what += f" in {len(pieces)} files of at most {fmt_bytes(piece)}"
    if skipped:
        what += f"; the oldest {fmt_bytes(skipped)} were not kept: log_keep is {policy.keep}"
    return what + ")", copied, largest


def _shift(dfd: int, name: str, shown: str, policy: RotationPolicy, owners: Collection[int], by: int) -> None:
    """NAME.n becomes NAME.n+by, or goes past log_keep (plain and gzipped alike). Every one is
    lstat-checked before any moves: a refusal (Refused) leaves them all as they were. `by` 0: only check."""
    moves = []
    for n in range(policy.keep, 0, -1):
        for compressed in (False, True):
            old = rotated_name(name, n, compressed)
            try:
                st = os.stat(old, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            why = problem(st, owners)
            if why is not None:
                raise Refused(f"{rotated_name(shown, n, compressed)}: {why}")
            moves.append((old, None if n + by > policy.keep else rotated_name(name, n + by, compressed)))
    if by == 0:
        return
    for old, new in moves:  # rename and unlink never follow a symlink, even one planted since the check
        if new is None:
            _unlink(dfd, old)
        else:
            os.replace(old, new, src_dir_fd=dfd, dst_dir_fd=dfd)


def _unlink(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


async def _copy(src: int, start: int, limit: int, dfd: int, part: str, compress: bool,
                chown: tuple[int, int] | None, piece: int) -> list[tuple[str, int]]:
    """Copy the open log `src` from `start` (up to `limit`: a writer faster than the copy is not chased
    for ever) into new files PART, PART1, PART2... of at most `piece` bytes each, cut at a line end when
    there is one. Returns [(name, bytes)], oldest first; on an error, removes them and raises. No await
    after the last read, so the caller truncates right after it."""
    pieces: list[list[Any]] = []  # [name, bytes]
    out, packer = -1, None
    try:
        offset = start
        while offset < limit:
            chunk = os.pread(src, min(CHUNK, limit - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            while chunk:
                if out < 0:
                    pieces.append([f"{part}{len(pieces) or ''}", 0])
                    out, packer = _create(dfd, pieces[-1][0], chown, compress), None
                    if compress:
                        import zlib

                        packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing
                room = piece - pieces[-1][1]
                take = chunk[:room]
                if len(chunk) > room:  # this piece is full: cut after its last line, if it has one
                    end = take.rfind(b"\n")
                    take = chunk[:end + 1] if end >= 0 else take
                chunk = chunk[len(take):]
                _write_all(out, packer.compress(take) if packer else take)
                pieces[-1][1] += len(take)
                if chunk:
                    out = _close_piece(out, packer)
            await asyncio.sleep(0)
        if out >= 0:
            out = _close_piece(out, packer)
        return [(name, n) for name, n in pieces]
    except BaseException:
        if out >= 0:
            os.close(out)
        for name, _ in pieces:
            _unlink(dfd, name)
        raise


def _create(dfd: int, name: str, chown: tuple[int, int] | None, compress: bool) -> int:
    """A new rotated file: whatever had its name (a stale copy, or a symlink planted there) is unlinked,
    never opened; O_EXCL|O_NOFOLLOW makes sure of it; it goes to the service's user."""
    _unlink(dfd, name)
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, LOG_MODE, dir_fd=dfd)
    try:
        if chown is not None:
            os.fchown(out, *chown)
    except BaseException:
        os.close(out)
        raise
    return out


def _close_piece(out: int, packer: Any) -> int:
    try:
        if packer is not None:
            _write_all(out, packer.flush())
    finally:
        os.close(out)
    return -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# the budget


@dataclass(frozen=True)
class Budget:
    max_use: Share = field(default_factory=lambda: parse_share(DEFAULT_MAX_USE))
    keep_free: Share = field(default_factory=lambda: parse_share(DEFAULT_KEEP_FREE, zero=True))

    @classmethod
    def of(cls, max_use: str | int | None, keep_free: str | int | None) -> Budget:
        return cls(parse_share(DEFAULT_MAX_USE if max_use is None else max_use),
                   parse_share(DEFAULT_KEEP_FREE if keep_free is None else keep_free, zero=True))

    def limit(self, total: int, free: int, usage: int) -> tuple[int, str]:
        """The most the logs of a filesystem may use now, and why: min(max_use, usage + free - keep_free)."""
        cap = self.max_use.of(total)
        room = usage + free - self.keep_free.of(total)
        if room < cap:
            keep = self.keep_free.of(total)
            return max(room, 0), f"{fmt_bytes(keep)} (log_keep_free {self.keep_free}) must stay free"
        return cap, f"log_max_use is {fmt_bytes(cap)} ({self.max_use})"


@dataclass(frozen=True)
class Candidate:
    """A file the budget may free: a rotated file (removed) or a live log (emptied)."""

    directory: str
    name: str
    disk: int  # bytes on disk
    mtime: float
    log: LogFile
    live: bool


def choose(candidates: Iterable[Candidate], excess: int) -> list[Candidate]:
    """What to free to get `excess` bytes back: the oldest rotated files first, then the biggest live logs."""
    rotated = sorted((c for c in candidates if not c.live and c.disk > 0), key=lambda c: (c.mtime, c.name))
    live = sorted((c for c in candidates if c.live and c.disk > 0), key=lambda c: -c.disk)
    chosen, freed = [], 0
    for c in rotated + live:
        if freed >= excess:
            break
        chosen.append(c)
        freed += c.disk
    return chosen


# the checker


@dataclass
class Track:
    """What the checker knows of one log."""

    size: int = 0
    disk: int = 0  # bytes on disk (st_blocks * 512)
    at: float | None = None  # loop time of the size
    rate: float = 0.0  # bytes/s, the fastest growth seen lately
    started: bool = False  # it has just started (or sped up) growing: measure again at once
    gap: float = MIN_DELAY  # the next probe of a new writer that has not written yet
    due: float = 0.0
    writer: int | None = None
    dev: int | None = None
    directory: str = ""
    name: str = ""


# A new writer is probed at gaps that grow by a quarter each time: one that starts writing T seconds
# after its start is seen within about T/4 (31 probes from 10 ms to 10 s).
PROBE_GROWTH = 1.25
# Probes of new writers that have not written yet, per second at most, all logs together (about 15 ms of
# CPU a second): after a bulk start of 1,000 services (2,000 new writers) each is probed every 4 s, not
# every 10 ms at first (50,000 probes in the first 5 s: a second of CPU). Each new writer is still probed
# right after its start, so one that writes at once is seen then and checked at its own rate from then on.
PROBE_RATE = 500.0


def next_delay(track: Track, max_size: int, interval: float, live: bool) -> float:
    """Seconds to the next check of a file: before it can grow by what is left to its max size at the
    rate seen; a new writer that has not been seen writing is probed at growing gaps."""
    if track.started:
        # The growth just seen may have begun anywhere since the last check: its rate is a guess.
        track.started = False
        delay = MIN_DELAY
    elif track.rate > 0:
        # Aimed just past the moment it crosses its max size; a check that lands a little early
        # looks again as soon as it should have crossed, not MIN_DELAY later.
        delay = (max_size - track.size) / track.rate + SOON
        if track.size < max_size:
            return min(delay, interval)
    elif live and track.gap < interval:
        delay = track.gap
        track.gap *= PROBE_GROWTH
    else:
        delay = interval
    return min(max(delay, MIN_DELAY), interval)


def probe_delay(now: float, delay: float, crowd: int) -> float:
    """Seconds to the next probe of a new writer that has not written yet, `delay` by next_delay, with
    `crowd` checks planned: no sooner than PROBE_RATE allows, and ending on a grid of a quarter of the
    delay, so that the writers of a burst are probed by the same checks rather than each by its own."""
    delay = max(delay, crowd / PROBE_RATE)
    step = max(MIN_DELAY, delay / 4)
    return math.ceil((now + delay) / step - 1e-6) * step - now  # (less a rounding error's worth)


def update_rate(track: Track, size: int, now: float) -> None:
    """A new size sample. A shrink means it was emptied meanwhile: all of `size` is new. The rate halves
    at most per check, so a writer that pauses is not forgotten at once."""
    if track.at is not None and now > track.at:
        grown = size - track.size if size >= track.size else size
        sample = grown / (now - track.at)
        # It started, or sped up: the growth may have begun anywhere since the last check, so its rate
        # is a guess until measured again.
        track.started = sample > 2 * track.rate
        track.rate = max(sample, track.rate / 2)
        if track.rate < 16:
            track.rate = 0.0
            track.started = False
    track.size, track.at = size, now


Event = Callable[[LogFile, str, str, dict[str, Any]], None]
ROTATED = re.compile(r"(?P<base>.+)\.\d+(?:\.gz)?(?:\.part\d*)?\Z")


class Rotator:
    """Checks the size of every log pmond knows, rotates, refuses what it must, and keeps the budget."""

    def __init__(self, interval: float, files: Callable[[], Iterable[LogFile]], on_event: Event,
                 max_use: str | int | None = None, keep_free: str | int | None = None) -> None:
        self.interval = interval
        self.files = files
        self.on_event = on_event
        self.budget = Budget.of(max_use, keep_free)
        self.known: dict[str, LogFile] = {}
        self.tracks: dict[str, Track] = {}
        self.reported: dict[str, str] = {}  # path -> the last refusal or error reported for it
        self.bursts: dict[str, list[Any]] = {}  # path -> [since, rotations, bytes, largest, without a copy]
        self.listings: dict[str, tuple[int, int, dict[str, tuple[str, int, float]]]] = {}  # dir -> ino, mtime, files
        self.stale = True  # ask `files` again at the next check
        self.fresh: dict[str, LogFile] = {}  # the logs of services started since the last check (`wake`)
        self.heap: list[tuple[float, int, str]] = []  # (due, order, path): checks planned before the next full one
        self.pushed = 0  # tie-breaker of the heap's entries
        self.growing: set[str] = set()  # paths whose rate is above 0
        self.grid_at: float | None = None  # the next check of every file; None: asleep
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.logger: logging.Logger | None = None
        self.checks = 0

    # the timer

    def start(self, logger: logging.Logger | None = None) -> None:
        """Check every log now, then on; with a logger (pmond's), a record logged plans a check too."""
        if self.interval <= 0:
            return
        self.loop = asyncio.get_running_loop()
        if logger is not None:
            self.logger = logger
            logger.addFilter(self._logged)
        self.stale = True
        now = self.loop.time()
        self.grid_at = now
        self._arm(now)

    def wake(self, files: Iterable[LogFile] | None = None) -> None:
        """A service started: probe its logs (`files`; None: ask for every log again) soon, and keep
        checking. The probe is planned MIN_DELAY after the first start of a burst, and every start until
        it runs joins it: an apply of 1,000 services does not make 1,000 checks."""
        if self.loop is None or self.interval <= 0:
            return
        now = self.loop.time()
        if files is None:
            self.stale = True
        else:
            for f in files:
                self.fresh[f.path] = f
        if self.grid_at is None:
            self.grid_at = now + self.interval
        self._arm(now + MIN_DELAY)

    def nudge(self) -> None:
        """Something grew (pmond.log): make sure a check comes within the interval."""
        if self.loop is None or self.loop.is_closed() or self.grid_at is not None:
            return
        self.grid_at = self.loop.time() + self.interval
        self._arm(self.grid_at)

    def _logged(self, record: logging.LogRecord) -> bool:
        self.nudge()
        return True

    def close(self) -> None:
        if self.bursts and self.loop is not None:
            self._end_bursts(self.loop.time(), every=True)
        if self.logger is not None:
            self.logger.removeFilter(self._logged)
            self.logger = None
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.task is not None:
            self.task.cancel()
        self.loop = None

    def _arm(self, when: float) -> None:
        assert self.loop is not None
        if self.task is not None and not self.task.done():
            return  # the running check plans the next one when it ends
        if self.handle is not None:
            if self.handle.when() <= when:
                return
            self.handle.cancel()
        self.handle = self.loop.call_at(when, self._due)

    def _due(self) -> None:
        self.handle = None
        if self.loop is not None and (self.task is None or self.task.done()):
            self.task = self.loop.create_task(self._run())

    def _plan(self, path: str, t: Track) -> None:
        """Put a track's next check (t.due) in the heap; one due at the grid's full check needs no entry."""
        if self.grid_at is not None and t.due > self.grid_at - MIN_DELAY:
            t.due = self.grid_at
            return
        self.pushed += 1
        heapq.heappush(self.heap, (t.due, self.pushed, path))

    def _valid(self, entry: tuple[float, int, str]) -> bool:
        """Is a heap entry still a planned check? (A track re-planned or dropped leaves its old entry.)"""
        t = self.tracks.get(entry[2])
        return t is not None and t.due == entry[0] and entry[2] in self.known

    async def _run(self) -> None:
        try:
            await self.check()
        except Exception:
            log.exception("log check failed")
        if self.loop is None:
            return
        self.task = None
        when = self._next()
        if when is not None:
            self._arm(when)

    def _next(self) -> float | None:
        assert self.loop is not None
        now = self.loop.time()
        if self.stale or self.fresh:
            return now + MIN_DELAY
        if self.grid_at is None:
            return None  # asleep: nothing pmond knows of grew, and no service runs
        while self.heap and not self._valid(self.heap[0]):
            heapq.heappop(self.heap)
        return min(self.grid_at, self.heap[0][0]) if self.heap else self.grid_at

    # the check

    async def check(self) -> None:
        loop = self.loop or asyncio.get_running_loop()
        now = loop.time()
        self.checks += 1
        full = self.grid_at is None or now + EARLY >= self.grid_at
        everything = self.stale or full  # look at every log; else only at the due and the fresh ones
        if everything:
            self.stale = False
            self.fresh = {}
            self.heap = []
            self.known = {}
            for f in self.files():
                self.known.setdefault(f.path, f)
            for path in [p for p in self.tracks if p not in self.known]:
                del self.tracks[path]
            self.growing &= self.known.keys()
            looked: Iterable[LogFile] = self.known.values()
        else:
            fresh, self.fresh = self.fresh, {}
            self.known.update(fresh)
            due: dict[str, LogFile] = {}
            while self.heap and self.heap[0][0] <= now + EARLY:
                entry = heapq.heappop(self.heap)
                if self._valid(entry):
                    due[entry[2]] = self.known[entry[2]]
            looked = [*fresh.values(), *(f for path, f in due.items() if path not in fresh)]
        todo: dict[str, list[tuple[LogFile, Track]]] = {}
        for f in looked:
            t = self.tracks.get(f.path)
            if t is None or t.writer != f.writer:
                # A new writer (or none any more): its rate is unknown, so it is probed from now on.
                directory, name = os.path.split(f.path)
                t = self.tracks[f.path] = Track(size=t.size if t else 0, disk=t.disk if t else 0,
                                                at=t.at if t else None, writer=f.writer, due=now,
                                                dev=t.dev if t else None, directory=directory, name=name)
            if full or t.due <= now + EARLY:
                todo.setdefault(t.directory, []).append((f, t))
            elif everything:
                self._plan(f.path, t)  # the heap was emptied: plan its next check again
        grew = acted = False
        changed: set[int | None] = set()  # filesystems where a log grew or something was done
        fds: dict[str, int | None] = {}  # directory -> its fd, None when it cannot be opened
        try:
            for directory, logs in todo.items():
                dfd = self._open(directory, fds, logs)
                if dfd is None:
                    continue
                dev = os.fstat(dfd).st_dev
                for f, t in logs:
                    t.dev = dev
                    g, a = await self._check_one(dfd, f, t)
                    grew, acted = grew or g, acted or a
                    if g or a:
                        changed.add(dev)
            # The budget of each filesystem where something changed (of every one, at a full check): a
            # probe of new writers that found nothing written leaves the budget as it was.
            devs = changed
            if full:
                devs |= {t.dev for t in self.tracks.values()}
            headrooms = []
            for dev in devs - {None}:
                freed, headroom, rate = await self._keep_budget(dev, fds)  # type: ignore[arg-type]
                acted = acted or freed
                if headroom and rate > 0:
                    headrooms.append((dev, headroom / rate))
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
        now = loop.time()
        if self.bursts:
            self._end_bursts(now)
        if full:
            awake = grew or acted or bool(self.bursts) or any(not f.quiet for f in self.known.values())
            self.grid_at = now + self.interval if awake else None
        planned: dict[str, Track] = {}
        crowd = len(self.heap) + sum(map(len, todo.values()))  # checks planned once these are
        for logs in todo.values():
            for f, t in logs:
                delay = next_delay(t, f.policy.max_size, self.interval, f.writer is not None)
                if t.rate == 0 and f.writer is not None and delay < self.interval:
                    delay = probe_delay(now, delay, crowd)
                t.due = now + delay
                planned[f.path] = t
                if t.rate > 0:
                    self.growing.add(f.path)
                else:
                    self.growing.discard(f.path)
        # The growing logs of a filesystem are checked again before they can eat its budget's headroom.
        for dev, seconds in headrooms:
            for path in self.growing:
                t = self.tracks[path]
                if t.dev == dev and t.rate > 0 and now + max(seconds, MIN_DELAY) < t.due:
                    t.due = now + max(seconds, MIN_DELAY)
                    planned[path] = t
        if self.grid_at is None:
            self.heap = []  # asleep: the next wake-up starts with a full check
        else:
            for path, t in planned.items():
                self._plan(path, t)

    def _open(self, directory: str, fds: dict[str, int | None], logs: list[tuple[LogFile, Track]]) -> int | None:
        """The fd of a log directory, opened once per check; a failure is reported for its logs."""
        if directory in fds:
            return fds[directory]
        fds[directory] = None
        try:
            fds[directory] = open_dir(directory)
        except FileNotFoundError:
            pass
        except Refused as exc:
            for f, _ in logs:
                self._report(f, f"refused to rotate {f.path}: {exc.message}", refused=True)
        except OSError as exc:
            for f, _ in logs:
                self._report(f, f"cannot check {f.path}: {exc.strerror}")
        return fds[directory]

    async def _check_one(self, dfd: int, f: LogFile, t: Track) -> tuple[bool, bool]:
        """(grew, rotated or refused) for one log."""
        try:
            st = os.stat(t.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            t.size = t.disk = 0
            t.at = None
            return False, False
        except OSError as exc:
            self._report(f, f"cannot check {f.path}: {exc.strerror}")
            return False, False
        if stat.S_ISCHR(st.st_mode):  # a log to /dev/null
            return False, False
        why = problem(st, f.owners)
        if why is not None:
            t.size = t.disk = 0
            t.rate = 0.0
            return False, self._report(f, f"refused to rotate {f.path}: {why}", refused=True)
        before = t.size
        update_rate(t, st.st_size, (self.loop or asyncio.get_running_loop()).time())
        t.disk = st.st_blocks * 512
        grew = st.st_size != before
        if st.st_size <= f.policy.max_size:
            if self.reported:
                self.reported.pop(f.path, None)
            return grew, False
        try:
            done = await rotate(dfd, t.name, f.policy, f.owners, f.chown, shown=f.path)
        except Refused as exc:
            return grew, self._report(f, f"refused to rotate {f.path}: {exc.message}", refused=True)
        except OSError as exc:
            self._report(f, f"cannot rotate {f.path}: {exc.strerror}")
            return grew, False
        self.reported.pop(f.path, None)
        self.listings.pop(t.directory, None)
        if done is None:
            return grew, False
        what, copied, largest = done
        t.size = t.disk = 0
        t.at = (self.loop or asyncio.get_running_loop()).time()
        self._rotated_event(f, what, copied, largest, t.at)
        return True, True

    def _rotated_event(self, f: LogFile, what: str, copied: int, largest: int, now: float) -> None:
        """The first rotation of a log in a check interval gets an event; the next ones in it, one summary at
        its end (a 50 MB/s writer rotates 25 times a second: the ledger keeps its starts and exits)."""
        burst = self.bursts.get(f.path)
        if burst is None or now - burst[0] >= self.interval:
            if burst is not None:
                self._burst_event(f, burst, now)
            self.bursts[f.path] = [now, 0, 0, 0, 0]
            self.on_event(f, "rotate", what, {"bytes": largest, "total": copied})
            return
        burst[1] += 1
        burst[2] += copied
        burst[3] = max(burst[3], largest)
        burst[4] += what.startswith("disk full")

    def _burst_event(self, f: LogFile, burst: list[Any], now: float) -> None:
        since, count, total, largest, dropped = burst
        if count:
            extra = f"; {dropped} of them without a copy (disk full)" if dropped else ""
            self.on_event(f, "rotate", f"rotated {f.path} {count} more time{'s' if count > 1 else ''} in "
                          f"{now - since:.0f} s ({fmt_bytes(total)}, the largest {fmt_bytes(largest)}){extra}",
                          {"bytes": largest, "rotations": count, "total": total, "without_copy": dropped})

    def _end_bursts(self, now: float, every: bool = False) -> None:
        """Summaries of the windows that ended (of all of them: `every`)."""
        for path, burst in list(self.bursts.items()):
            if every or now - burst[0] >= self.interval:
                del self.bursts[path]
                f = self.known.get(path)
                if f is not None:
                    self._burst_event(f, burst, now)

    def _report(self, f: LogFile, message: str, refused: bool = False) -> bool:
        """Say it once (an event for a refusal, a warning otherwise) until it changes; True if said now."""
        if self.reported.get(f.path) == message:
            return False
        self.reported[f.path] = message
        if refused:
            self.on_event(f, "rotate", message, {"refused": True})
        else:
            log.warning("%s: %s", f.name, message)
        return True

    # the budget

    def _rotated(self, directory: str, dfd: int) -> dict[str, tuple[str, int, float]]:
        """name -> (the log's name, bytes on disk, mtime) of what looks like a rotated file (NAME.3,
        NAME.1.gz, NAME.1.part) in a directory; the listing is kept until the directory changes."""
        st = os.fstat(dfd)
        cached = self.listings.get(directory)
        if cached is not None and cached[:2] == (st.st_ino, st.st_mtime_ns):
            return cached[2]
        found: dict[str, tuple[str, int, float]] = {}
        rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            with os.scandir(rfd) as entries:
                for entry in entries:
                    m = ROTATED.match(entry.name)
                    if m is None:
                        continue
                    try:
                        est = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(est.st_mode):
                        found[entry.name] = (m["base"], est.st_blocks * 512, est.st_mtime)
        finally:
            os.close(rfd)
        self.listings[directory] = (st.st_ino, st.st_mtime_ns, found)
        return found

    async def _keep_budget(self, dev: int, fds: dict[str, int | None]) -> tuple[bool, int | None, float]:
        """Bring the logs of one filesystem back within the budget: (something was freed, the room left
        under the budget or None when unknown, the filesystem's log growth in bytes/s)."""
        by_dir: dict[str, list[tuple[LogFile, Track]]] = {}
        rate = 0.0
        for f in self.known.values():
            t = self.tracks.get(f.path)
            if t is not None and t.dev == dev:
                by_dir.setdefault(t.directory, []).append((f, t))
                rate += t.rate
        usage = 0
        vfs = None
        listings: dict[str, dict[str, tuple[str, int, float]]] = {}
        for directory, logs in by_dir.items():
            dfd = self._open(directory, fds, logs)
            if dfd is None:
                continue
            try:
                if os.fstat(dfd).st_dev != dev:
                    continue
                listings[directory] = self._rotated(directory, dfd)
                vfs = vfs or os.statvfs(dfd)
            except OSError:
                continue
            bases = {t.name for _, t in logs}
            usage += sum(disk for base, disk, _ in listings[directory].values() if base in bases)
            usage += sum(t.disk for _, t in logs)
        if vfs is None:
            return False, None, rate
        total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
        limit, why = self.budget.limit(total, free, usage)
        if usage <= limit:
            return False, limit - usage, rate
        candidates = []
        for directory, listing in listings.items():
            owner = {t.name: f for f, t in by_dir[directory]}
            candidates += [Candidate(directory, name, disk, mtime, owner[base], live=False)
                           for name, (base, disk, mtime) in listing.items() if base in owner]
            candidates += [Candidate(directory, t.name, t.disk, 0.0, f, live=True) for f, t in by_dir[directory]]
        freed: dict[str, list[str]] = {}
        amount: dict[str, int] = {}
        done = 0
        for c in choose(candidates, usage - limit):
            dfd = fds[c.directory]
            assert dfd is not None
            try:
                if c.live:
                    opened = open_checked(dfd, c.name, c.log.owners, os.O_WRONLY)
                    if opened is None:
                        continue
                    try:
                        os.ftruncate(opened[0], 0)
                    finally:
                        os.close(opened[0])
                    t = self.tracks[c.log.path]
                    t.size = t.disk = 0
                    t.at = (self.loop or asyncio.get_running_loop()).time()
                    what = f"emptied {c.log.path}"
                else:
                    os.unlink(c.name, dir_fd=dfd)
                    self.listings.pop(c.directory, None)
                    what = f"removed {c.name}"
            except Refused as exc:
                self._report(c.log, f"refused to empty {c.log.path}: {exc.message}", refused=True)
                continue
            except FileNotFoundError:
                self.listings.pop(c.directory, None)
                continue
            except OSError as exc:
                self._report(c.log, f"cannot free {c.directory}/{c.name}: {exc.strerror}")
                continue
            freed.setdefault(c.log.path, []).append(what)
            amount[c.log.path] = amount.get(c.log.path, 0) + c.disk
            done += c.disk
        where = next(iter(listings))
        for path, whats in freed.items():
            self.on_event(self.known[path], "log_budget",
                          f"log budget: {', '.join(whats)} ({fmt_bytes(amount[path])}): logs on the "
                          f"filesystem of {where} used {fmt_bytes(usage)}, {why}",
                          {"freed": amount[path], "usage": usage, "limit": limit})
        return bool(freed), max(limit - (usage - done), 0), rate
