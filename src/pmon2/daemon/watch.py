"""Watching processes that are not pmond's children: pidfds in one epoll set, exit status, adoption.

A pidfd becomes readable (EPOLLIN) when its process exits, and reports EPOLLHUP once the process
has been reaped by its parent (init, here slow to reap). The exit is acted on at EPOLLIN, at once;
the exit *status* is read at EPOLLHUP with ioctl(PIDFD_GET_INFO), which only answers after reaping.
All pidfds live in one epoll set whose fd sits in the asyncio loop: no polling, no timers while idle.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pmon2 import procfs

PIDFD_GET_INFO = 0xC040FF0B
PIDFD_INFO_EXIT = 1 << 3
_INFO_SIZE = 64
_EXIT_CODE_OFFSET = 60
# How long to wait for init to reap an exited service before calling its status unknown.
STATUS_DEADLINE = 30.0


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    signal: int | None
    core: bool = False
    source: str = "unknown"  # "pidfd", "waitpid", "proc_connector" or "unknown"

    @classmethod
    def from_wait_status(cls, status: int, source: str) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status), os.WCOREDUMP(status), source)
        if os.WIFEXITED(status):
            return cls(os.WEXITSTATUS(status), None, False, source)
        return cls(None, None, False, "unknown")

    @property
    def known(self) -> bool:
        return self.code is not None or self.signal is not None

    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"SIG{self.signal}"

    def describe(self) -> str:
        if self.code is not None:
            return f"exit code {self.code}"
        if self.signal is not None:
            return f"signal {self.signal_name()}" + (" (core dumped)" if self.core else "")
        return "unknown exit status"


UNKNOWN = ExitStatus(None, None)


class PidfdInfo:
    """ioctl(PIDFD_GET_INFO): None while the process is unreaped, UNKNOWN on kernels before 6.15."""

    supported = True

    @classmethod
    def exit_status(cls, pidfd: int) -> ExitStatus | None:
        if not cls.supported:
            return UNKNOWN
        buf = bytearray(_INFO_SIZE)
        struct.pack_into("=Q", buf, 0, PIDFD_INFO_EXIT)
        try:
            fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                cls.supported = False
                return UNKNOWN
            if exc.errno == errno.ESRCH:
                return None
            return UNKNOWN
        mask = struct.unpack_from("=Q", buf, 0)[0]
        if not mask & PIDFD_INFO_EXIT:
            return None
        return ExitStatus.from_wait_status(struct.unpack_from("=i", buf, _EXIT_CODE_OFFSET)[0], "pidfd")


ExitCallback = Callable[[], None]
StatusCallback = Callable[[ExitStatus], None]


class _Watch:
    __slots__ = ("deadline", "exited", "on_exit", "on_status", "pid", "pidfd")

    def __init__(self, pid: int, pidfd: int, on_exit: ExitCallback, on_status: StatusCallback) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.on_exit = on_exit
        self.on_status = on_status
        self.exited = False
        self.deadline: asyncio.TimerHandle | None = None


class Watcher:
    """Owns the pidfds of watched processes and closes each once its story is told."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.watches: dict[int, _Watch] = {}  # by pidfd
        self.status_sources: list[Callable[[int], ExitStatus | None]] = []
        loop.add_reader(self.epoll.fileno(), self._on_ready)

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        for w in list(self.watches.values()):
            self._forget(w)
        self.epoll.close()

    def watch(self, pid: int, pidfd: int, on_exit: ExitCallback, on_status: StatusCallback) -> None:
        """Take ownership of `pidfd`: on_exit runs once the process ends, on_status once its status is known."""
        w = _Watch(pid, pidfd, on_exit, on_status)
        self.watches[pidfd] = w
        self.epoll.register(pidfd, select.EPOLLIN)

    def _on_ready(self) -> None:
        for fd, events in self.epoll.poll(0):
            w = self.watches.get(fd)
            if w is None:
                continue
            if not w.exited:
                w.exited = True
                self.epoll.modify(fd, 0)  # from now on, only EPOLLHUP (reaped) wakes us
                w.deadline = self.loop.call_later(STATUS_DEADLINE, self._give_up, w)
                w.on_exit()
            if events & select.EPOLLHUP or not PidfdInfo.supported:
                self._settle(w)

    def _settle(self, w: _Watch) -> None:
        status = PidfdInfo.exit_status(w.pidfd)
        if status is None or not status.known:
            for source in self.status_sources:
                found = source(w.pid)
                if found is not None:
                    status = found
                    break
        if status is None:
            return  # not reaped yet: EPOLLHUP will come
        self._forget(w)
        w.on_status(status)

    def _give_up(self, w: _Watch) -> None:
        if w.pidfd in self.watches:
            self._forget(w)
            w.on_status(UNKNOWN)

    def _forget(self, w: _Watch) -> None:
        self.watches.pop(w.pidfd, None)
        if w.deadline is not None:
            w.deadline.cancel()
        try:
            self.epoll.unregister(w.pidfd)
        except (OSError, ValueError):
            pass
        os.close(w.pidfd)


def has_exited(pidfd: int) -> bool:
    r, _, _ = select.select([pidfd], [], [], 0)
    return bool(r)


def send_signal(pidfd: int, sig: int) -> bool:
    """Signal exactly the process behind `pidfd`; False if it has already ended."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False


def signal_group(pidfd: int, pgid: int, sig: int) -> bool:
    """Signal the service's process group. The group is only trusted while its leader is unreaped:
    a pid whose process exists (even as a zombie) or leads a live group cannot be reused."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return send_signal(pidfd, sig)
    except PermissionError:
        return send_signal(pidfd, sig)


def adopt(pid: int, start_ticks: int | None, boot_id: str | None) -> int | None:
    """A pidfd for `pid` if it is still the very process we started, else None.

    The pidfd is opened first: from then on the check cannot race a reuse of the pid.
    """
    if start_ticks is None or boot_id != procfs.boot_id():
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    stat = procfs.read_stat(pid)
    if stat is None or not stat.alive or stat.starttime != start_ticks or has_exited(pidfd):
        os.close(pidfd)
        return None
    return pidfd
