"""Launch records: the last process pmond started for each service, written before it may run.

pmond writes `<run dir>/launches/<service id>` (pid, start time, boot id, name) after the intermediate
reports the new pid and before pmond acknowledges it; without the acknowledgement the intermediate kills
the service. So whatever instant pmond dies at, every process it let run is on record: in the database,
or here when pmond died before the database write (or the data disk is full). The run dir is a tmpfs
on a normal system (/run, $XDG_RUNTIME_DIR): it survives pmond, keeps working when the data disk is
full, and is emptied by a reboot, when every record would be stale anyway.

Writes are atomic (a temporary file renamed over the record, within one directory fd, O_NOFOLLOW), so
a reader sees the old record or the new one, never half of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchRecord:
    service_id: int
    pid: int
    start_ticks: int
    boot_id: str
    name: str


class LaunchRecords:
    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self) -> None:
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1

    def write(self, record: LaunchRecord) -> None:
        """Raises OSError when the record cannot be written (then the launch must not go on)."""
        tmp = f".{record.service_id}.tmp"
        line = f"{record.pid} {record.start_ticks} {record.boot_id} {record.name}\n".encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dirfd)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(28, "short write")  # ENOSPC: a tmpfs at its size limit
        finally:
            os.close(fd)
        os.replace(tmp, str(record.service_id), src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)

    def remove(self, service_id: int) -> None:
        try:
            os.unlink(str(service_id), dir_fd=self.dirfd)
        except FileNotFoundError:
            pass

    def write_commits(self, count: int, boot_id: str) -> None:
        """The number of user commands the database holds, as pmond last saw it committed."""
        tmp = ".commits.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dirfd)
        try:
            os.write(fd, f"{boot_id} {count}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, "commits", src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)

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

    def load(self) -> dict[int, LaunchRecord]:
        """Every readable record, by service id; malformed ones are skipped (and removed)."""
        out: dict[int, LaunchRecord] = {}
        for entry in os.listdir(self.dirfd):
            if not (entry.isascii() and entry.isdigit()):
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dirfd)
            except OSError:
                continue
            try:
                text = os.read(fd, 4096).decode(errors="replace")
            finally:
                os.close(fd)
            parts = text.rstrip("\n").split(" ", 3)
            try:
                out[int(entry)] = LaunchRecord(int(entry), int(parts[0]), int(parts[1]), parts[2], parts[3])
            except (IndexError, ValueError):
                self.remove(int(entry))
        return out
