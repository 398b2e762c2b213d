"""Reading services' logs for the API: the last lines across rotated files, and following them.

`log` and `logf` go through pmond, so a user allowed to see a service reads its logs without any
access to the log dir, and a remote CLI can do the same. pmond, often root, reads files that a
service's user may control, so nothing is followed and nothing blocks:

- Each file is lstat-ed first (a FIFO or a device is never even opened; a character device is a log to
  /dev/null, read as empty), opened with O_NOFOLLOW|O_NONBLOCK, and checked with fstat on what was
  really opened: a regular file and, for a caller other than root or pmond's own user, owned by the
  service's uid. A symlink planted in place of a log, or a file of someone else's that a service
  names with --log, is refused with one line, and its content never leaves pmond.
- The last N lines are read backwards from the end of the live file in CHUNK steps, then from NAME.1,
  NAME.2.gz... (the rotated files, newest first; a .gz file is decompressed forwards, at most CHUNK
  bytes out per step, keeping only its last lines). Reading stops once N lines are found, and after
  SCAN_BUDGET bytes read or decompressed per request (the answer then says `truncated`). Every step
  yields to the loop.
- Following costs nothing while nobody follows: each follower checks its files every FOLLOW_INTERVAL
  (an fstat and an lstat each), reads at most FOLLOW_READ bytes of a file per step, and notices a
  copytruncate (the file shrank below what was read: read again from 0) and a rename rotation (another
  file at the path: the rest of the old one first, then the new one from its start).

A rotation may run between two steps of a read: a line can then be missed or shown twice. That is
the price of reading without locks, as for `tail`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import stat
import zlib
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from pmon2 import spec as model
from pmon2.daemon.auth import Caller
from pmon2.daemon.server import Streamed
from pmon2.errors import PmonError

CHUNK = 256 << 10  # bytes per read step, and at most per decompression step
SCAN_BUDGET = 64 << 20  # bytes read or decompressed per request to find the last lines
FOLLOW_INTERVAL = 0.25  # seconds between two checks of followed files
FOLLOW_READ = 1 << 20  # bytes of one followed file read per step
MAX_PENDING = 1 << 20  # an unterminated line longer than this is sent as it is
MAX_ROTATED = 1000  # NAME.1 ... NAME.1000 at most (log_keep's maximum)
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Unreadable(PmonError):
    """A log pmond will not read (a symlink, a FIFO, someone else's file) or cannot read."""

    code = "refused"


# opening


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _problem(st: os.stat_result, owner: int | None) -> str | None:
    """Why a log must not be read, or None. `owner`: the uid it must belong to (None: any)."""
    if not stat.S_ISREG(st.st_mode):
        for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                           (stat.S_ISDIR, "a directory"), (stat.S_ISBLK, "a block device")):
            if test(st.st_mode):
                return f"it is {what}"
        return "it is not a regular file"
    if owner is not None and st.st_uid != owner:
        return f"it belongs to {_user(st.st_uid)}, not to {_user(owner)}"
    return None


def open_log(path: str, owner: int | None) -> tuple[int, os.stat_result] | None:
    """(fd, fstat) of a log that may be read; None when there is none (or it is a character device:
    a log to /dev/null). Raises Unreadable, naming the file and why."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unreadable(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISCHR(st.st_mode):
        return None
    why = _problem(st, owner)
    if why is not None:
        raise Unreadable(f"refused to read {path}: {why}")
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EWOULDBLOCK):
            raise Unreadable(f"refused to read {path}: it was replaced while being opened") from None
        raise Unreadable(f"cannot read {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    why = None if stat.S_ISCHR(st.st_mode) else _problem(st, owner)
    if why is not None or stat.S_ISCHR(st.st_mode):
        os.close(fd)
        if why is None:
            return None
        raise Unreadable(f"refused to read {path}: {why}")
    return fd, st


# the last lines


class Budget:
    """Bytes a request may still read or decompress to find last lines."""

    def __init__(self, size: int = SCAN_BUDGET) -> None:
        self.left = size


async def tail_fd(fd: int, end: int, want: int, budget: Budget) -> tuple[list[bytes], bool]:
    """The last `want` lines of the bytes [0, end) of an open file, read backwards: (lines oldest first,
    complete). Not complete when the budget ran out first. A last line without a newline counts."""
    found: list[bytes] = []  # newest first
    head: list[bytes] = []  # chunks read without a newline yet, newest first: the end of an earlier line
    pos = end
    first = True
    while pos > 0 and len(found) < want:
        step = min(CHUNK, pos, budget.left)
        if step <= 0:
            return found[:want][::-1], False
        pos -= step
        data = os.pread(fd, step, pos)
        budget.left -= step
        if len(data) < step:  # emptied meanwhile (a copytruncate): its lines are in NAME.1 now
            break
        if first:
            first = False
            if data.endswith(b"\n"):
                data = data[:-1]
        if pos > 0 and b"\n" not in data:
            head.append(data)  # joined once its line's start is found: a long line costs no copies
        else:
            parts = (data + b"".join(reversed(head))).split(b"\n")
            head = [parts.pop(0)] if pos > 0 else []
            found.extend(reversed(parts))
        if pos > 0 and len(found) < want:
            await asyncio.sleep(0)
    return found[:want][::-1], True


async def tail_gz(fd: int, want: int, budget: Budget) -> tuple[list[bytes], bool]:
    """The last `want` lines of an open gzip file, decompressed forwards: (lines oldest first, complete).
    Not complete (and no lines: they would not be its last ones) when the budget ran out first; a
    corrupt end is where the file ends."""
    ring: deque[bytes] = deque(maxlen=want)
    partial: list[bytes] = []  # the line being decompressed, in pieces: a long line costs no copies
    unpack = zlib.decompressobj(31)  # wbits 31: gzip framing
    pos = 0
    corrupt = False
    while not corrupt:
        raw = os.pread(fd, CHUNK, pos)
        if not raw:
            break
        pos += len(raw)
        budget.left -= len(raw)
        data = raw
        while data:
            try:
                out = unpack.decompress(data, CHUNK)
            except zlib.error:
                corrupt = True
                break
            data = unpack.unconsumed_tail
            if unpack.eof:  # a gzip file may hold several members, one after another
                data = unpack.unused_data + data
                unpack = zlib.decompressobj(31)
            budget.left -= len(out)
            if budget.left < 0:
                return [], False
            if b"\n" in out:
                *lines, rest = (b"".join(partial) + out).split(b"\n")
                ring.extend(lines)
                partial = [rest]
            elif out:
                partial.append(out)
            await asyncio.sleep(0)
        if budget.left <= 0:
            return [], False
    if any(partial):
        ring.append(b"".join(partial))
    return list(ring), True


def rotated_files(path: str, n: int) -> list[str]:
    """NAME.n and NAME.n.gz, those that exist, the newest first (both exist only if compression was
    switched on or off)."""
    found = []
    for name in (f"{path}.{n}", f"{path}.{n}.gz"):
        try:
            found.append((os.lstat(name).st_mtime_ns, name))
        except OSError:
            continue
    return [name for _, name in sorted(found, reverse=True)]


@dataclass
class Tail:
    """The last lines of one stream, and (with keep_open) the live file held open at its end."""

    lines: list[bytes] = field(default_factory=list)
    truncated: bool = False  # the scan budget ran out before `want` lines or the oldest file
    error: str | None = None
    live: tuple[int, os.stat_result] | None = None  # (fd, fstat) of the live file, read up to st_size


async def tail(path: str, want: int, owner: int | None, budget: Budget, keep_open: bool = False) -> Tail:
    """The last `want` lines of a log across its rotated files (NAME, NAME.1, NAME.2.gz...)."""
    result = Tail()
    chunks: list[list[bytes]] = []  # newest file first
    need = want
    try:
        opened = open_log(path, owner)
        if opened is not None:
            fd, st = opened
            try:
                lines, complete = await tail_fd(fd, st.st_size, need, budget)
            finally:
                if keep_open:
                    result.live = opened
                else:
                    os.close(fd)
            chunks.append(lines)
            need -= len(lines)
            result.truncated = not complete
        n = 1
        while need > 0 and not result.truncated and n <= MAX_ROTATED:
            names = rotated_files(path, n)
            if not names:
                break
            for name in names:
                if need <= 0 or result.truncated:
                    break
                opened = open_log(name, owner)
                if opened is None:
                    continue
                fd, st = opened
                try:
                    if name.endswith(".gz"):
                        lines, complete = await tail_gz(fd, need, budget)
                    else:
                        lines, complete = await tail_fd(fd, st.st_size, need, budget)
                finally:
                    os.close(fd)
                chunks.append(lines)
                need -= len(lines)
                result.truncated = not complete
            n += 1
    except Unreadable as exc:
        result.error = exc.message
    except OSError as exc:
        result.error = f"cannot read {path}: {exc.strerror}"
    except BaseException:  # cancelled (the client left) or worse: the live file is nobody's to close
        if result.live is not None:
            os.close(result.live[0])
        raise
    result.lines = [line for lines in reversed(chunks) for line in lines]
    return result


# which files


def log_files(spec: dict[str, Any], stream: str) -> list[tuple[str, str, bool]]:
    """(stream, path, combined) of the logs of a service that `stream` (out, err, all) asks for. A
    service whose stdout and stderr share one file (--log) has only `out`, marked combined."""
    out, err = spec["out_log"], spec["err_log"]
    if out == err:
        return [("out", out, True)] if stream in ("out", "all") else []
    return [(s, p, False) for s, p in (("out", out), ("err", err)) if stream in (s, "all")]


def _owner(caller: Caller, svc: Any) -> int | None:
    """Whose files a caller may read through pmond: any for root and pmond's user, else the service's
    uid only (supervisor.find/select have already checked that the caller owns the service)."""
    return None if caller.privileged else svc.uid


def _text(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")


async def snapshot(services: list[Any], caller: Caller, want: int, stream: str,
                   keep_open: list[Followed] | None = None) -> dict[str, Any]:
    """The answer of GET /v1/logs: {"services": [{"id", "name", "logs": [{"stream", "file", "combined",
    "lines", "truncated", "error"}]}]}. With `keep_open`, a Followed for each file is added to it."""
    budget = Budget()
    answer = []
    for svc in services:
        logs = []
        for name, path, combined in log_files(svc.spec, stream):
            got = await tail(path, want, _owner(caller, svc), budget, keep_open=keep_open is not None)
            logs.append({"stream": name, "file": path, "combined": combined, "lines": [_text(x) for x in got.lines],
                         "truncated": got.truncated, "error": got.error})
            if keep_open is not None:
                keep_open.append(Followed(svc, name, path, _owner(caller, svc), got.live, got.error))
        answer.append({"id": svc.id, "name": svc.name, "logs": logs})
    return {"services": answer}


# following


class Followed:
    """One log being followed for one client: the file held open, and where reading got to."""

    def __init__(self, svc: Any, stream: str, path: str, owner: int | None,
                 live: tuple[int, os.stat_result] | None, error: str | None = None) -> None:
        self.svc = svc
        self.stream = stream
        self.path = path
        self.owner = owner
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self.pos = 0
        self.pending = b""
        self.error = error  # the last problem reported, so each is said once
        if live is not None:
            self.fd, st = live
            self.ident = (st.st_dev, st.st_ino)
            self.pos = st.st_size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def step(self) -> tuple[list[bytes], str | None, bool]:
        """(new complete lines, a problem to report or None, more is waiting to be read)."""
        lines: list[bytes] = []
        if self.fd is not None:
            more = self._read(lines)
            if more:
                return lines, None, True
            try:
                here = os.lstat(self.path)
                ident: tuple[int, int] | None = (here.st_dev, here.st_ino)
            except OSError:
                ident = None  # gone for now: the open file is still read
            if ident is not None and ident != self.ident:
                # Renamed away (a rotation that creates a new file), or replaced: the rest of the old file
                # was read above; the file now at the path is read from its start.
                self._flush(lines)
                self.close()
            elif os.fstat(self.fd).st_size < self.pos:  # emptied in place (copytruncate, flush)
                self._flush(lines)
                self.pos = 0
                return lines, None, self._read(lines)
        if self.fd is None:
            try:
                opened = open_log(self.path, self.owner)
            except Unreadable as exc:
                if exc.message == self.error:
                    return lines, None, False
                self.error = exc.message
                return lines, exc.message, False
            self.error = None
            if opened is None:
                return lines, None, False
            self.fd, st = opened
            self.ident, self.pos = (st.st_dev, st.st_ino), 0
            return lines, None, self._read(lines)
        return lines, None, False

    def _read(self, lines: list[bytes]) -> bool:
        """Append the complete lines written since the last read (at most FOLLOW_READ bytes); True when
        there is more."""
        assert self.fd is not None
        data = os.pread(self.fd, FOLLOW_READ, self.pos)
        if not data:
            return False
        self.pos += len(data)
        *complete, self.pending = (self.pending + data).split(b"\n")
        lines.extend(complete)
        if len(self.pending) > MAX_PENDING:
            self._flush(lines)
        return len(data) == FOLLOW_READ

    def _flush(self, lines: list[bytes]) -> None:
        """An unterminated line is sent as it is: its file is left behind, or it is too long to hold."""
        if self.pending:
            lines.append(self.pending)
            self.pending = b""


def _ndjson(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate from somewhere: \u escapes keep the JSON valid
        return json.dumps(value, separators=(",", ":")).encode() + b"\n"


async def follow(sup: Any, services: list[Any], caller: Caller, want: int, stream: str) -> AsyncGenerator[bytes, None]:
    """The body of GET /v1/logs?follow=true, NDJSON: first the same object as without follow (the last
    `want` lines), then {"service", "stream", "text"} for each new line, and {"service", "stream", "file",
    "error"} when a file cannot be read (once, until that changes). Ends when every followed service is
    deleted; otherwise runs until the client goes away or pmond stops (the server closes it then)."""
    followed: list[Followed] = []
    try:
        yield _ndjson(await snapshot(services, caller, want, stream, keep_open=followed))
        while True:
            out: list[bytes] = []
            more = False
            for f in list(followed):
                if sup.services.get(f.svc.id) is not f.svc:  # deleted: nothing more will come
                    f.close()
                    followed.remove(f)
                    continue
                lines, problem, pending = f.step()
                name = f.svc.name  # read each time: a service may be renamed
                out.extend(_ndjson({"service": name, "stream": f.stream, "text": _text(x)}) for x in lines)
                if problem is not None:
                    out.append(_ndjson({"service": name, "stream": f.stream, "file": f.path, "error": problem}))
                more = more or pending
            if out:
                yield b"".join(out)
            if not followed and not any(sup.services.get(s.id) is s for s in services):
                return
            await asyncio.sleep(0 if more else FOLLOW_INTERVAL)
    finally:
        for f in followed:
            f.close()


# the routes


class LogApi:
    """GET /v1/services/{ref}/logs and GET /v1/logs (docs/api.md, "Logs")."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup

    def routes(self) -> list[tuple[str, re.Pattern[str], tuple[model.Field, ...], tuple[model.Field, ...], Any]]:
        none = model.NO_FIELDS
        return [
            ("GET", re.compile(r"/v1/services/(?P<ref>[^/]+)/logs"), none, model.LOG_QUERY, self.service_logs),
            ("GET", re.compile(r"/v1/logs"), none, (*model.LOG_QUERY, model.LOG_SELECT), self.logs),
        ]

    async def service_logs(self, ref: str, caller: Caller, options: dict[str, Any], **_: Any) -> tuple[int, Any]:
        return await self._answer([self.sup.find(ref, caller)], caller, options)

    async def logs(self, caller: Caller, options: dict[str, Any], **_: Any) -> tuple[int, Any]:
        return await self._answer(self.sup.select(list(options["select"]), caller), caller, options)

    async def _answer(self, services: list[Any], caller: Caller, options: dict[str, Any]) -> tuple[int, Any]:
        if options["follow"]:
            return 200, Streamed(follow(self.sup, services, caller, options["lines"], options["stream"]))
        return 200, await snapshot(services, caller, options["lines"], options["stream"])
