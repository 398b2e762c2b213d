"""Built-in log rotation: copytruncate, because services hold their logs open with O_APPEND.

The copy runs in the event loop in 1 MiB steps with a yield between them, so a big log never
blocks pmond (no threads: pmond forks, and forking beside a busy thread is asking for trouble).
The check is a timer that only runs while some service is running: an idle pmond stays asleep.
A full disk is survived: the live log is truncated even if its copy cannot be kept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("pmond")

CHUNK = 1 << 20
UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
         "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


@dataclass(frozen=True)
class RotationPolicy:
    max_size: int = 10 << 20
    keep: int = 5
    compress: bool = False


def parse_size(value: str | int | float) -> int:
    """10485760, "10M", "512K", "1.5G" -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int | float):
        size = int(value)
    else:
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGIB")
        unit = text[len(number):]
        if unit not in UNITS or not number:
            raise ValueError(f"not a size: {value!r} (try 10M, 512K or a number of bytes)")
        size = int(float(number) * UNITS[unit])
    if size < 1024:
        raise ValueError(f"a log size below 1K makes no sense: {value!r}")
    return size


def rotated_name(path: str, n: int, compress: bool) -> str:
    return f"{path}.{n}" + (".gz" if compress else "")


async def rotate(path: str, policy: RotationPolicy) -> str:
    """Shift path.1..path.keep, copy path to path.1 (gzipped if asked), truncate path. Returns what happened."""
    for n in range(policy.keep, 0, -1):
        for compressed in (False, True):
            src = rotated_name(path, n, compressed)
            if not os.path.exists(src):
                continue
            if n == policy.keep:
                os.unlink(src)
            else:
                os.replace(src, rotated_name(path, n + 1, compressed))
    target = rotated_name(path, 1, policy.compress)
    partial = target + ".part"  # renamed when complete: nobody ever reads half a rotated file
    kept = True
    try:
        await _copy(path, partial, policy.compress)
        os.replace(partial, target)
    except OSError as exc:
        kept = False
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
    # Lines written between the end of the copy and this truncate are lost: the price of copytruncate.
    os.truncate(path, 0)
    return f"rotated {path}" if kept else f"disk full: emptied {path} without keeping a copy"


async def _copy(src: str, dst: str, compress: bool) -> None:
    packer = None
    if compress:
        import zlib

        packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    with open(src, "rb") as fin, open(dst, "wb", opener=lambda p, f: os.open(p, f, 0o640)) as fout:
        while chunk := fin.read(CHUNK):
            fout.write(packer.compress(chunk) if packer else chunk)
            await asyncio.sleep(0)
        if packer:
            fout.write(packer.flush())


class Rotator:
    """Checks log sizes every `interval` seconds while any service runs."""

    def __init__(self, interval: float, files: Callable[[], Iterable[tuple[str, RotationPolicy, str]]],
                 on_rotated: Callable[[str, str], None]) -> None:
        self.interval = interval
        self.files = files  # (path, policy, service name) of running services
        self.on_rotated = on_rotated
        self.handle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """A service started: make sure a check is planned."""
        if self.handle is None and self.interval > 0:
            self.handle = asyncio.get_running_loop().call_later(self.interval, self._due)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.task is not None:
            self.task.cancel()

    def _due(self) -> None:
        self.handle = None
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.check())

    async def check(self) -> None:
        files = list(self.files())
        for path, policy, name in files:
            try:
                if os.stat(path).st_size <= policy.max_size:
                    continue
                self.on_rotated(name, await rotate(path, policy))
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("%s: cannot rotate %s: %s", name, path, exc.strerror)
        if files:
            self.wake()
