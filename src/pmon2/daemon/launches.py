"""Launch records: the last process pmond started for each service, written before it may run.

pmond writes `<run dir>/launches/<service id>` (pid, start time, boot id, name) after the intermediate
reports the new pid and before pmond acknowledges it; without the acknowledgement the intermediate kills
the service. So whatever instant pmond dies at, every process it let run is on record: in the database,
or here when pmond died before the database write (or the data disk is full). The run dir is a tmpfs
on a normal system (/run, $XDG_RUNTIME_DIR): it survives pmond, keeps working when the data disk is
full, and is emptied by a reboot, when every record would be stale anyway.

Writes are atomic, within one directory fd and O_NOFOLLOW: a record is one pwrite of RECORD_SIZE bytes (the
line, padded with newlines) at offset 0, into the file created with O_EXCL for a new service or over the
old record of the same size, so a reader sees the old record or the new one, never half of one. (A
SIGKILL cannot cut a write of one small block short; a power cut reboots, and a record of another boot
counts for nothing.) A file that pmond died before writing at all is empty: its launch was never
acknowledged, and `load` drops it. This costs a create, or nothing but the write, where a temporary
file renamed over the record cost ext4 a data flush at each rename (`auto_da_alloc`), for every start.
A line longer than RECORD_SIZE (never, with names of 64 characters) falls back to the renamed file.

A rolling restart (rolling.py) keeps two more records of a service beside its launch record, in the same
format: `<id>.surge`, the new process it started beside the running one (written before that process
may run), and `<id>.retire`, the old process it is stopping after the hand over; recovery adopts or
stops what they name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SURGE = ".surge"  # rolling.py: the new process of a roll, not yet the service's main process
RETIRE = ".retire"  # rolling.py: the old process of a roll, being stopped after the hand over
KINDS = ("", SURGE, RETIRE)
RECORD_SIZE = 512  # bytes: pid, start time, boot id (36) and a name of at most 64 characters fit
COMMITS_SIZE = 64


@dataclass(frozen=True)
class LaunchRecord:
    service_id: int
    pid: int
    start_ticks: int
    boot_id: str
    name: str


# O_NONBLOCK: whatever sits at a record's name, opening it never waits (a FIFO would).
_WRITE = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LaunchRecords:
    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self) -> None:
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1

    def write(self, record: LaunchRecord, kind: str = "") -> None:
        """Raises OSError when the record cannot be written (then the launch must not go on). `kind`:
        "" for the launch record, SURGE or RETIRE for a rolling restart's."""
        line = f"{record.pid} {record.start_ticks} {record.boot_id} {record.name}\n".encode()
        self._put(f"{record.service_id}{kind}", line, RECORD_SIZE)

    def _put(self, name: str, line: bytes, size: int) -> None:
        """Write `line` as the whole content of `name`, atomically (see the module's docstring)."""
        if len(line) <= size:
            data = line.ljust(size, b"\n")  # every record of a kind has one size: an overwrite leaves no tail
            try:
                fd = os.open(name, _WRITE, dir_fd=self.dirfd)
            except FileNotFoundError:
                fd = os.open(name, _WRITE | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.dirfd)
            try:
                if os.pwrite(fd, data, 0) != len(data):
                    raise OSError(28, "short write")  # ENOSPC: a tmpfs at its size limit
                if os.fstat(fd).st_size > len(data):  # a longer record of the fallback below
                    os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
            return
        tmp = f".{name}.tmp"
        fd = os.open(tmp, _WRITE | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=self.dirfd)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(28, "short write")
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)

    def remove(self, service_id: int, kind: str | None = None) -> None:
        """Remove one record of a service; `kind` None: all of them (the service is forgotten)."""
        for suffix in KINDS if kind is None else (kind,):
            try:
                os.unlink(f"{service_id}{suffix}", dir_fd=self.dirfd)
            except FileNotFoundError:
                pass

    def write_commits(self, count: int, boot_id: str) -> None:
        """The number of user commands the database holds, as pmond last saw it committed."""
        self._put("commits", f"{boot_id} {count}\n".encode(), COMMITS_SIZE)

    def read_commits(self) -> tuple[str, int] | None:
        try:
            fd = os.open("commits", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dirfd)
        except OSError:
            return None
        try:
            parts = os.read(fd, 256).decode(errors="replace").split()
        finally:
            os.close(fd)
        try:
            return parts[0], int(parts[1])
        except (IndexError, ValueError):
            return None

    def load(self, kind: str = "") -> dict[int, LaunchRecord]:
        """Every readable record of `kind`, by service id; malformed ones are skipped (and removed)."""
        out: dict[int, LaunchRecord] = {}
        for entry in os.listdir(self.dirfd):
            sid = entry[:len(entry) - len(kind)] if kind and entry.endswith(kind) else entry if not kind else ""
            if not (sid.isascii() and sid.isdigit()):
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dirfd)
            except OSError:
                continue
            try:
                text = os.read(fd, 4096).decode(errors="replace")
            finally:
                os.close(fd)
            parts = text.split("\n", 1)[0].split(" ", 3)
            try:
                out[int(sid)] = LaunchRecord(int(sid), int(parts[0]), int(parts[1]), parts[2], parts[3])
            except (IndexError, ValueError):
                self.remove(int(sid), kind)
        return out
