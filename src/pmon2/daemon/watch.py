"""Watching processes that are not pmond's children: pidfds in one epoll set, exit status, adoption.

A pidfd becomes readable (EPOLLIN) when its process exits, and reports EPOLLHUP once the process
has been reaped by its parent (init, here slow to reap). The exit is acted on at EPOLLIN, at once;
the exit *status* is read at EPOLLHUP with ioctl(PIDFD_GET_INFO), which only answers after reaping.
All pidfds live in one epoll set whose fd sits in the asyncio loop: no polling, no timers while idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pmon2 import procfs

PIDFD_GET_INFO = 0xC040FF0B
PIDFD_INFO_EXIT = 1 << 3
_INFO_SIZE = 64
_EXIT_CODE_OFFSET = 60
# How long to wait for init to reap an exited service before calling its status unknown.
STATUS_DEADLINE = 30.0
KILL_WAIT = 10.0  # seconds a stop waits for a group to die after SIGKILL
GROUP_POLL = 0.02  # seconds between two looks at a group whose main process has exited, while a stop waits
T = TypeVar("T")


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
    def probe(cls) -> bool:
        """Whether this kernel reports exit statuses through pidfds (6.15+, or a backport): a child that
        exits at once and is reaped here must come back with PIDFD_INFO_EXIT. A version check would
        miss backports; this costs one fork, once."""
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            os.waitpid(pid, 0)
            cls.supported = False
            return False
        try:
            os.waitpid(pid, 0)
            status = cls.exit_status(fd)
        finally:
            os.close(fd)
        cls.supported = status is not None and status.code == 7
        return cls.supported

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


def exit_status_now(pid: int, pidfd: int, proc: str = "/proc") -> ExitStatus | None:
    """The exit status of a process that has exited (its pidfd is readable), before its parent reaps it if
    need be: the zombie's /proc/PID/stat (field 52, exit_code, a wait status; Linux 3.5+) while it is
    unreaped (the pidfd tells, before and after the read, that the number is still the zombie's), else
    PIDFD_INFO_EXIT (Linux 6.15+, once reaped). None when neither tells (yet); source "proc" or "pidfd".
    (The Watcher's own sources, the proc connector and pmond's waitpid, are for the processes it watches.)"""
    if not reaped(pidfd):
        data = procfs._read_all(f"{proc}/{pid}/stat")
        if data and not reaped(pidfd):
            try:
                fields = data[data.rindex(b")") + 2:].split()
                if len(fields) > 49 and fields[0] in (b"Z", b"X"):
                    return ExitStatus.from_wait_status(int(fields[49]), "proc")
            except ValueError:
                pass
    got = PidfdInfo.exit_status(pidfd)
    return got if got is not None and got.known else None


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
        self.by_pid: dict[int, _Watch] = {}
        # Sources that may know a status before init reaps (proc connector, our own waitpid).
        self.status_sources: list[Callable[[int], ExitStatus | None]] = []
        self.use_pidfd_info = True
        self.reaping = False  # pmond is the subreaper: its own waitpid learns every status
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
        self.by_pid[pid] = w
        self.epoll.register(pidfd, select.EPOLLIN)

    def _on_ready(self) -> None:
        for fd, events in self.epoll.poll(0):
            w = self.watches.get(fd)
            if w is None:
                continue
            try:
                self._handle(w, events)
            except Exception:
                # One service's failure must not cost the others their exit in this batch.
                logging.getLogger("pmond").exception("error while handling the exit of process %d", w.pid)

    def _handle(self, w: _Watch, events: int) -> None:
        if not w.exited:
            w.exited = True
            self.epoll.modify(w.pidfd, 0)  # from now on, only EPOLLHUP (reaped) wakes us
            w.deadline = self.loop.call_later(STATUS_DEADLINE, self._give_up, w)
            w.on_exit()
            if w.pidfd in self.watches:
                self._settle(w, reaped=bool(events & select.EPOLLHUP))
        elif events & select.EPOLLHUP:
            self._settle(w, reaped=True)

    def _settle(self, w: _Watch, reaped: bool) -> None:
        status = None
        for source in self.status_sources:
            status = source(w.pid)
            if status is not None:
                break
        if status is None and self.use_pidfd_info:
            status = PidfdInfo.exit_status(w.pidfd)
        if status is None:
            if not reaped and (self.reaping or (self.use_pidfd_info and PidfdInfo.supported)):
                return  # EPOLLHUP comes once the process is reaped, and its status is known then
            status = UNKNOWN
        self._forget(w)
        w.on_status(status)

    def watching(self, pid: int) -> bool:
        return pid in self.by_pid

    def _give_up(self, w: _Watch) -> None:
        if w.pidfd in self.watches:
            self._forget(w)
            w.on_status(UNKNOWN)

    def _forget(self, w: _Watch) -> None:
        self.watches.pop(w.pidfd, None)
        if self.by_pid.get(w.pid) is w:
            del self.by_pid[w.pid]
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


# pidfd_send_signal(2) flag, Linux 6.9+: signal the process group of the pidfd's process. The pidfd
# pins the group's identity (its struct pid), so a pid number reused by a stranger is never reached,
# even after the leader is reaped. include/uapi/linux/pidfd.h.
PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2


class GroupSignal:
    """Whether this kernel signals process groups through pidfds (probed once, at first use)."""

    supported: bool | None = None

    @classmethod
    def probe(cls) -> bool:
        if cls.supported is None:
            try:
                fd = os.pidfd_open(os.getpid())
            except OSError:  # out of fds: ask again next time (pmond probes at start-up, see main.py)
                return False
            try:
                signal.pidfd_send_signal(fd, 0, None, PIDFD_SIGNAL_PROCESS_GROUP)
                cls.supported = True
            except OSError:  # EINVAL: an unknown flag, before 6.9
                cls.supported = False
            finally:
                os.close(fd)
        return cls.supported


def reaped(pidfd: int) -> bool:
    """The process behind `pidfd` has been reaped by its parent (POLLHUP), not merely exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


def signal_group(pidfd: int, pgid: int, sig: int) -> bool:
    """Signal the process group that the process behind `pidfd` leads; False when nothing was reached.

    Never by number alone when the number may have been reused: through the pidfd (6.9+), or, on older
    kernels, with killpg only while the leader is unreaped (a zombie or live leader holds its pid, so
    the number cannot be reused). A group whose leader is reaped is then left alone."""
    if GroupSignal.probe():
        try:
            signal.pidfd_send_signal(pidfd, sig, None, PIDFD_SIGNAL_PROCESS_GROUP)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return send_signal(pidfd, sig)
    if reaped(pidfd):
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return send_signal(pidfd, sig)


def signal_tree(pidfd: int, pgid: int, sig: int) -> bool:
    """Signal the process group `pgid` through `pidfd` (signal_group), or, when that reaches nobody, the
    process behind `pidfd` alone: a main process that was handed over to (a re-exec, MAINPID=) may lead no
    group, and its leader may be gone (daemon/follow.py, Follower.group). False when nothing was reached."""
    return signal_group(pidfd, pgid, sig) or send_signal(pidfd, sig)


def group_alive(pidfd: int, pgid: int) -> bool:
    """Is any process of the group still running? Zombies count as gone (init may reap late)."""
    if GroupSignal.probe():
        try:
            signal.pidfd_send_signal(pidfd, 0, None, PIDFD_SIGNAL_PROCESS_GROUP)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    elif reaped(pidfd):
        return False  # the number may be reused: what is left cannot be told from a stranger
    return bool(procfs.group_members(pgid))


async def unless(stop: asyncio.Event | None, work: Awaitable[T], otherwise: T, timeout: float | None = None) -> T:
    """`work`'s result; `otherwise` as soon as `stop` is set or `timeout` seconds have passed, whichever
    comes first (`work` is then cancelled). The one "wait for one of two things" of pmond."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        await asyncio.wait([task] + ([waiter] if waiter is not None else []), timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        if waiter is not None:
            waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return otherwise


async def group_gone(pidfd: int, pgid: int, exited: asyncio.Event, timeout: float,
                     escalate: asyncio.Event | None = None) -> bool:
    """Wait until the main process has exited (`exited`) and no process of its group `pgid` (signalled
    through `pidfd`) runs: True; False at the deadline or once `escalate` is set. The main's exit is an
    event; the rest of the group can only be looked at, every GROUP_POLL seconds, and only while a stop
    waits for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await unless(escalate, exited.wait(), None, timeout)
    while True:
        if escalate is not None and escalate.is_set():
            return False
        if exited.is_set() and not group_alive(pidfd, pgid):
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(GROUP_POLL, left))


async def stop_group(pidfd: int, pgid: int, exited: asyncio.Event, sig: int, grace: float, *,
                     note_kill: Callable[[str], object], escalate: asyncio.Event | None = None,
                     still: Callable[[], bool] | None = None) -> bool:
    """The stop sequence, as systemd's KillMode=control-group: `sig` to the group `pgid` (through `pidfd`,
    or the process alone when it leads none: signal_tree), `grace` seconds for the main process to exit
    (`exited`) and the group to be gone, then SIGKILL and KILL_WAIT more. `escalate` set meanwhile (stop
    -f): SIGKILL at once. `still`, asked before the SIGKILL: False when someone else took over (the
    sequence then stops there). `note_kill(message)` records the SIGKILL. True once nothing of the group
    runs; False when something still runs after SIGKILL (stuck in the kernel?) or `still` said no. The
    caller records the first signal and keeps `pidfd` open throughout."""
    signal_tree(pidfd, pgid, sig)
    if sig != signal.SIGKILL:
        if await group_gone(pidfd, pgid, exited, grace, escalate):
            return True
        if still is not None and not still():
            return False
        why = "stop -f" if escalate is not None and escalate.is_set() else \
            f"still running {grace:g} s after {signal.Signals(sig).name}"
        note_kill(f"{why}: sending SIGKILL to process group {pgid}")
        signal_tree(pidfd, pgid, signal.SIGKILL)
    return await group_gone(pidfd, pgid, exited, KILL_WAIT)


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


# The netlink proc connector (root only): exit statuses at exit time, before init reaps.
NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_PROC_EVENT_HDR = struct.Struct("=IIQ")
_EXIT_EVENT = struct.Struct("=IIII")


class ProcConnector:
    """Listens for exit events of every process and keeps those of the pids we watch.

    Events can be dropped under load (ENOBUFS), so this is one source among others, never the only
    truth: a pid with no event falls back to the pidfd, then to "unknown".
    """

    # A process that dies within a millisecond of its exec is reported before its watch is set up:
    # keep the latest exits of every process, a bounded window, and let lookups find them.
    KEEP = 4096

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import socket

        self.loop = loop
        self.statuses: dict[int, ExitStatus] = {}
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  NETLINK_CONNECTOR)
        try:
            self.sock.bind((0, CN_IDX_PROC))
            # Linux 6.6+ filters by event type when the request carries one; older kernels want 4 bytes.
            op = struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_EXIT) if _kernel_at_least(6, 6) \
                else struct.pack("=I", PROC_CN_MCAST_LISTEN)
            cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
            self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn)
        except OSError:
            self.sock.close()
            raise
        loop.add_reader(self.sock.fileno(), self.drain)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: events were lost; the pidfd path still covers them
                continue
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length = _NLMSGHDR.unpack_from(data, offset)[0]
            if length < _NLMSGHDR.size:
                return
            body = offset + _NLMSGHDR.size + _CN_MSG.size
            if body + _PROC_EVENT_HDR.size + _EXIT_EVENT.size <= offset + length:
                what = _PROC_EVENT_HDR.unpack_from(data, body)[0]
                if what == PROC_EVENT_EXIT:
                    pid, tgid, code, _sig = _EXIT_EVENT.unpack_from(data, body + _PROC_EVENT_HDR.size)
                    if pid == tgid:
                        self.statuses.pop(pid, None)
                        self.statuses[pid] = ExitStatus.from_wait_status(code, "proc_connector")
                        if len(self.statuses) > self.KEEP:
                            del self.statuses[next(iter(self.statuses))]
            offset += (length + 3) & ~3

    def lookup(self, pid: int) -> ExitStatus | None:
        self.drain()
        return self.statuses.pop(pid, None)


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False
