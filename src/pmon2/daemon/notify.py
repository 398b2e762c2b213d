"""sd_notify(3) for services: a NOTIFY_SOCKET per service, as systemd gives a Type=notify unit.

(daemon/sdnotify.py is the other direction: pmond's own messages to the systemd that runs it.)

A service with `ready = "notify"` (systemd's Type=notify) or `watchdog_sec` > 0 is launched with
`NOTIFY_SOCKET=<run dir>/notify/<service id>`, and with `WATCHDOG_USEC` when it has a watchdog. Neither
is ever taken from the environment a caller stored: pmond sets them or removes them at every launch.

The socket. One AF_UNIX SOCK_DGRAM socket per service, so no service can speak for another: pmond
unlinks and binds it again at every open (a pmond restarted after a SIGKILL re-creates it at the path
running services already hold), in a directory that is pmond's own (mode 0755, refused when it is a
link, another user's, or writable by others); the socket is made mode 0600 and then given to the
service's uid, so that only that user (and root) can send to it. Every datagram is then checked with the
kernel's credentials (SO_PASSCRED, and SO_PASSPIDFD on Linux 6.5+ so that a pid reused between the send
and the read is noticed): the sender must run as the service's uid (or root), and be a process of the
service by the one rule pmond has for that (follow.Kin.check, as for MAINPID=): its main process, in the
main's process group or session, a descendant, or carrying the service's PMON2_SERVICE marker
(daemon/recovery.py; a second, "surge" process of a rolling restart carries it too). Anything else is
dropped and counted in a `notify` event (at most one every REFUSED_GAP seconds per service). A message
from a process that has already exited and cannot be told apart is dropped silently. Datagrams are read
in pmond's loop (loop.add_reader), never blocking, at most MAX_MESSAGE bytes (a longer one is refused),
at most BATCH per wake-up; file descriptors sent along (FDSTORE=1, BARRIER=1) are closed at once.

The messages (newline-separated KEY=VALUE; the first of a key counts, unknown keys are ignored):
- READY=1: the start is complete; a service in `starting` becomes `running` (Supervisor._await_ready,
  the same path as the `ready` probes, with `start_timeout` as the limit). It also ends a reload.
- RELOADING=1 (with MONOTONIC_USEC=): a reload is in progress; `desc` says so until the next READY=1.
- STOPPING=1: the service is stopping on its own; shown by `desc` until the process is gone.
  (These two count from the main process and its group or session only.)

A process the service no longer runs as its main one (handed over away from, or stopped by a rolling
restart: follow.Follower.retiring) may still speak, typically STOPPING=1 as it shuts down: its messages are
dropped quietly, whatever they say (no refusal, no change to the service; it is not the main any more).
- STATUS=text: one line shown by `desc` and the API (`status_text`), control characters removed, at
  most STATUS_MAX characters; kept in memory only, and cleared when a new process starts.
- MAINPID=N: the main process is now N, if Supervisor._claim_main_pid accepts it (systemd's rule).
- WATCHDOG=1: the service is alive; WATCHDOG=trigger: act as if the watchdog had expired;
  WATCHDOG_USEC=N: the service's own watchdog timeout from now on (0: off), until its next start.

The watchdog (systemd's WatchdogSec=) runs while the service is `running`: with no WATCHDOG=1 for the
timeout, pmond sends SIGABRT to the service's process group and, if the main process still runs
`kill_timeout` later, SIGKILL; the exit then goes through the restart policy like any other crash. The
event is `watchdog`. A pmond that restarts gives an adopted service a full timeout from the adoption
(the spec's timeout: a WATCHDOG_USEC= the service sent, and its STATUS=, are kept in memory only).
Only a service with a watchdog has a timer; an idle pmond with none does not wake up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import stat
import struct
import time
import unicodedata
from collections.abc import Callable
from typing import Any

from pmon2 import procfs
from pmon2.daemon import watch
from pmon2.daemon.follow import GONE, parse_pid
from pmon2.daemon.policy import Status, Trigger
from pmon2.errors import SpawnError
from pmon2.render import words

log = logging.getLogger("pmond")

MAX_MESSAGE = 4096  # bytes of a datagram, as systemd's NOTIFY_BUFFER_MAX
BATCH = 64  # datagrams read per wake-up: a flooding service cannot hold the loop
STATUS_MAX = 256  # characters of STATUS= kept
REFUSED_GAP = 10.0  # seconds between two `notify` events about refused messages of one service
EVENT_BURST, EVENT_REFILL = 10, 6.0  # other `notify` events of a service: 10 at once, then one per 6 s
READY_KEPT = 32  # READY=1 senders remembered per service (for _await_ready and wait_ready_pid)
SUN_PATH_MAX = 107
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # never from a stored environment

# Linux 6.5+ (include/uapi/asm-generic/socket.h, include/linux/socket.h); not in Python 3.11's socket.
SO_PASSPIDFD = 76
SCM_PIDFD = 4
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4) + socket.CMSG_SPACE(4 * 16)



def wants_socket(spec: dict[str, Any]) -> bool:
    """Whether a service gets a NOTIFY_SOCKET: `ready = "notify"` or a watchdog (as systemd sets it for
    NotifyAccess= other than none)."""
    return spec.get("ready") == "notify" or (spec.get("watchdog_sec") or 0) > 0


def parse(data: bytes) -> dict[str, str]:
    """A datagram -> {KEY: value}: newline-separated KEY=VALUE lines; a line without `=` or with a key
    that is not [A-Z0-9_]+ is skipped; the first of a key counts (as systemd's strv_find_startswith).
    Values are UTF-8, undecodable bytes replaced."""
    out: dict[str, str] = {}
    for line in data.split(b"\n"):
        key, eq, value = line.partition(b"=")
        if not eq or not key or not all(c == 95 or 48 <= c <= 57 or 65 <= c <= 90 for c in key):
            continue
        out.setdefault(key.decode("ascii"), value.decode("utf-8", errors="replace"))
    return out


def clean_status(text: str) -> str | None:
    """STATUS= as `desc` shows it: one line, control and format characters (C*: newlines, escapes, bidi
    overrides) removed, outer spaces stripped, at most STATUS_MAX characters; None when nothing is left."""
    kept = "".join(c for c in text if unicodedata.category(c)[0] != "C").strip()
    if len(kept) > STATUS_MAX:
        kept = kept[:STATUS_MAX - 1] + "…"
    return kept or None


def parse_usec(text: str) -> int | None:
    """WATCHDOG_USEC / MONOTONIC_USEC: microseconds, ASCII digits, at most a day (spec.MAX_SECONDS)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        return None
    return min(int(text), 86_400_000_000)


class Channel:
    """One service's notify socket and what its messages said."""

    def __init__(self, service_id: int, path: str, sock: socket.socket, uid: int) -> None:
        self.service_id = service_id
        self.path = path
        self.sock = sock
        self.uid = uid
        self.ready: collections.deque[tuple[int, int]] = collections.deque(maxlen=READY_KEPT)  # (pid, ticks)
        self.changed = asyncio.Event()  # set (and replaced) at every READY=1
        self.status_ticks = 0  # start time of the process whose STATUS= is shown
        self.reloading_since: float | None = None
        self.stopping = False
        self.watchdog_override: int | None = None  # WATCHDOG_USEC= of the running process, microseconds
        self.timer: asyncio.TimerHandle | None = None
        self.last_ping = 0.0  # loop time of the last WATCHDOG=1 (or of arming)
        self.last_ping_at: float | None = None  # wall time of the last WATCHDOG=1
        self.refused = 0
        self.refused_last = ""
        self.refused_next = 0.0
        self.refused_flush: asyncio.TimerHandle | None = None
        self.aborting: asyncio.Task[None] | None = None  # the watchdog's SIGABRT-then-SIGKILL, while it runs
        self.tokens = float(EVENT_BURST)
        self.tokens_at = 0.0

    def ready_since(self, ticks: int | None) -> int | None:
        """The pid of a READY=1 sender that started no earlier than `ticks` (the main process's start):
        one of this run, not a leftover of an older one."""
        return next((pid for pid, t in reversed(self.ready) if ticks is None or t >= ticks), None)

    def reset_watchdog(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Notify:
    """The notify sockets of all services. `sup` is the Supervisor: its `services`, `instance_id`,
    `_event(svc, kind, message, **data)` and `_claim_main_pid(svc, pid, source) -> reason | None`."""

    def __init__(self, sup: Any, directory: str) -> None:
        self.sup = sup
        self.directory = directory
        self.dirfd = -1
        self.channels: dict[int, Channel] = {}
        self.passpidfd = True  # until the kernel says otherwise

    # the supervisor's hooks

    def env(self, svc: Any, env: dict[str, str]) -> dict[str, str]:
        """The environment to launch `svc` with: `env` without any stored NOTIFY_SOCKET / WATCHDOG_*, plus
        pmond's own when the service has a notify socket (opened here, before the process can run).
        Raises SpawnError when the socket cannot be made."""
        if any(k in env for k in VARIABLES):
            env = {k: v for k, v in env.items() if k not in VARIABLES}
        if not wants_socket(svc.spec):
            self.close(svc.id)
            return env
        chan = self.open(svc)
        out = dict(env, NOTIFY_SOCKET=chan.path)
        usec = round((svc.spec.get("watchdog_sec") or 0) * 1e6)
        if usec > 0:
            out["WATCHDOG_USEC"] = str(usec)
        return out

    def transition(self, svc: Any, trigger: Trigger) -> None:
        """After each status change: a new process starts with a clean slate (its STATUS=, a reload or a
        stop it announced, its watchdog override); the watchdog runs only while `running`."""
        chan = self.channels.get(svc.id)
        if chan is None:
            return
        if trigger is Trigger.SPAWNED:
            self._new_run(chan, svc)
        if svc.status is Status.RUNNING:
            if chan.timer is None or trigger in (Trigger.SPAWNED, Trigger.READY):
                self._arm(chan, svc)
        else:
            chan.reset_watchdog()
        if svc.status not in (Status.RUNNING, Status.STARTING):
            chan.reloading_since, chan.stopping = None, False  # over with the process (STATUS= stays)

    def recover(self) -> None:
        """At pmond's start: re-create the socket of every running service that has one (unlink + bind at
        the path it holds in NOTIFY_SOCKET), start the watchdogs, and remove the sockets of services that
        are gone."""
        for svc in self.sup.services.values():
            if svc.alive and wants_socket(svc.spec):
                try:
                    self.open(svc)
                except SpawnError as exc:
                    self.sup._event(svc, "notify", exc.message)
                    continue
                self.transition(svc, Trigger.SPAWNED)
        if not os.path.isdir(self.directory):
            return
        try:
            self._open_dir()
            names = os.listdir(self.dirfd)
        except (OSError, SpawnError):
            return
        for name in names:
            if name.isdigit() and int(name) in self.channels:
                continue
            try:
                if stat.S_ISSOCK(os.lstat(name, dir_fd=self.dirfd).st_mode):
                    os.unlink(name, dir_fd=self.dirfd)
            except OSError:
                pass

    def close(self, service_id: int) -> None:
        """Close a service's socket and remove its file (`del`, or no notify any more)."""
        chan = self.channels.pop(service_id, None)
        if chan is None:
            return
        chan.reset_watchdog()
        if chan.refused_flush is not None:
            chan.refused_flush.cancel()
        if chan.aborting is not None:
            chan.aborting.cancel()
        asyncio.get_running_loop().remove_reader(chan.sock.fileno())
        chan.sock.close()
        if self.dirfd >= 0:
            try:
                os.unlink(str(service_id), dir_fd=self.dirfd)
            except OSError:
                pass

    def view(self, svc: Any) -> dict[str, Any]:
        """The `notify` object of `desc` / the API's detail view, or None without a notify socket:
        {"socket": path, "reloading_since": ISO 8601 or None, "stopping": bool (STOPPING=1), "watchdog_s":
        the timeout in force or None, "watchdog_at": ISO 8601 of the last WATCHDOG=1 or None}."""
        chan = self.channels.get(svc.id)
        if chan is None:
            return {"notify": None}
        from pmon2.daemon.supervisor import iso

        timeout = self._watchdog_usec(chan, svc)
        return {"notify": {"socket": chan.path, "reloading_since": iso(chan.reloading_since),
                           "stopping": chan.stopping, "watchdog_s": timeout / 1e6 if timeout else None,
                           "watchdog_at": iso(chan.last_ping_at)}}

    async def wait_ready(self, svc: Any, timeout: float, stop: asyncio.Event) -> Any:
        """Until a process of the service's current run has sent READY=1 -> probes.Result(True, "READY=1
        from process N"); Result(False, ...) at `timeout` seconds or once `stop` (the main process's exit)
        is set. For Supervisor._await_ready: ready = "notify"."""
        from pmon2.daemon.probes import Result

        chan = self.channels.get(svc.id)
        if chan is None:
            return Result(False, "the service has no notify socket")
        since = svc.start_ticks
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            pid = chan.ready_since(since)
            if pid is not None:
                return Result(True, f"READY=1 from process {pid}")
            if stop.is_set():
                return Result(False, "the process exited")
            left = end - loop.time()
            if left <= 0:
                return Result(False, f"no READY=1 within {timeout:g} s")
            await watch.unless(stop, chan.changed.wait(), None, left)

    async def wait_ready_pid(self, svc: Any, pid: int, timeout: float) -> Any:
        """Until process `pid` of the service (e.g. a surge process of a rolling restart, not yet the main)
        has sent READY=1 -> probes.Result(True, "READY=1 from process PID"). Result(False, reason) when
        the service has no notify socket, when `pid` is not running or exits first, or after `timeout`
        seconds. A READY=1 that arrived before the call counts; one from an earlier process that had
        the same pid does not (start times are compared). Never raises for what the process does."""
        from pmon2.daemon.probes import Result

        chan = self.channels.get(svc.id)
        if chan is None:
            return Result(False, f"{svc.name} has no notify socket (ready = \"notify\" or watchdog_sec)")
        try:
            pidfd = os.pidfd_open(pid)  # first: from here on the pid names this process only
        except OSError:
            return Result(False, f"process {pid} is not running")
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        try:
            st = procfs.read_stat(pid)
            if st is None or not st.alive:
                return Result(False, f"process {pid} exited before READY=1")
            loop.add_reader(pidfd, exited.set)
            end = loop.time() + timeout
            while True:
                if (pid, st.starttime) in chan.ready:
                    return Result(True, f"READY=1 from process {pid}")
                if exited.is_set():
                    return Result(False, f"process {pid} exited before READY=1")
                left = end - loop.time()
                if left <= 0:
                    return Result(False, f"no READY=1 from process {pid} within {timeout:g} s")
                await watch.unless(exited, chan.changed.wait(), None, left)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    # the socket

    def _open_dir(self) -> None:
        """<run dir>/notify: pmond's own, not a link, not writable by others (mode 0755)."""
        if self.dirfd >= 0:
            return
        try:
            os.mkdir(self.directory, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SpawnError(f"cannot create {self.directory}: {exc.strerror}") from None
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SpawnError(f"cannot open {self.directory}: {exc.strerror}") from None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise SpawnError(f"{self.directory} belongs to uid {st.st_uid}, not to pmond: remove it")
        if st.st_mode & 0o022:
            os.fchmod(fd, 0o755)  # ours: nobody else may add or swap a socket in it
        self.dirfd = fd

    def open(self, svc: Any) -> Channel:
        """The service's channel, made if needed: unlink + bind <dir>/<id>, mode 0600, owned by its uid.
        Raises SpawnError."""
        chan = self.channels.get(svc.id)
        if chan is not None:
            if chan.uid != svc.uid:  # `update --user`: the next process runs as another user
                try:
                    self._chown(str(svc.id), svc.uid)
                except OSError as exc:
                    raise SpawnError(f"cannot give the notify socket {chan.path} to uid {svc.uid}: "
                                     f"{exc.strerror}") from None
                chan.uid = svc.uid
            return chan
        for gone in [sid for sid in self.channels if sid not in self.sup.services]:
            self.close(gone)  # a service whose first start failed (never deleted, only forgotten)
        self._open_dir()
        name = str(svc.id)
        path = os.path.join(self.directory, name)
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise SpawnError(f"the notify socket path {path} is longer than {SUN_PATH_MAX} bytes, which no "
                             "service could connect to: use a shorter PMON2_HOME or XDG_RUNTIME_DIR")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            try:
                os.unlink(name, dir_fd=self.dirfd)
            except FileNotFoundError:
                pass
            # Bound through the directory's fd: the path's other components cannot be swapped under us.
            sock.bind(f"/proc/self/fd/{self.dirfd}/{name}")
            # Mode first: until the chown, the socket is pmond's, and 0600 (bind gave 0755 under pmond's
            # umask 022: write permission is what connect and send need, so nobody else could send).
            os.chmod(name, 0o600, dir_fd=self.dirfd)
            self._chown(name, svc.uid)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if self.passpidfd:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
                except OSError:  # ENOPROTOOPT: before Linux 6.5
                    self.passpidfd = False
        except OSError as exc:
            sock.close()
            raise SpawnError(f"cannot make the notify socket {path}: {exc.strerror}") from None
        chan = Channel(svc.id, path, sock, svc.uid)
        self.channels[svc.id] = chan
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, chan)
        return chan

    def _chown(self, name: str, uid: int) -> None:
        if uid >= 0 and uid != os.geteuid():
            os.chown(name, uid, -1, dir_fd=self.dirfd, follow_symlinks=False)

    def _readable(self, chan: Channel) -> None:
        for _ in range(BATCH):
            try:
                data, ancillary, flags, _ = chan.sock.recvmsg(MAX_MESSAGE, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("notify socket %s: %s", chan.path, exc.strerror)
                return
            creds, pidfd = None, None
            for level, kind, payload in ancillary:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    creds = _UCRED.unpack_from(payload)
                elif kind == socket.SCM_RIGHTS or kind == SCM_PIDFD:
                    # Received fds are installed in pmond: close them all (FDSTORE= is not kept; a
                    # BARRIER=1 sender sees its fd closed, which is the answer it waits for).
                    fds = [int.from_bytes(payload[i:i + 4], "little", signed=True)
                           for i in range(0, len(payload) - 3, 4)]
                    if kind == SCM_PIDFD and fds:
                        pidfd = fds.pop()
                    for fd in fds:
                        os.close(fd)
            try:
                self._message(chan, data, flags, creds, pidfd)
            except Exception:  # one bad message must not silence the socket
                log.exception("notify socket %s: a message could not be handled", chan.path)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
            if chan.service_id not in self.channels:
                return  # closed while handling (the service is gone)

    # messages

    def _message(self, chan: Channel, data: bytes, flags: int, creds: tuple[int, int, int] | None,
                 pidfd: int | None) -> None:
        svc = self.sup.services.get(chan.service_id)
        if svc is None:
            self.close(chan.service_id)
            return
        if creds is None:
            self._refuse(chan, svc, 0, -1, "it came without credentials")
            return
        pid, uid, _ = creds
        if pid <= 0:
            st, reason = None, "the kernel gave no pid for it (another pid namespace?)"
        else:  # the one rule of the service's processes (follow.Kin.check), with the kernel's word for its uid
            st, reason = self.sup.follow.kin(svc).check(pid, uid=uid, sender=True)
        if st is not None and self.sup.follow.retired(svc, st):
            # A process the service retired (a roll's old instance, a re-exec's old copy draining): its
            # STOPPING=1 and the rest are legitimate, and say nothing of the service any more. Its
            # environment, marker and all, may already be gone as it exits: never a refusal.
            log.debug("%s: notify message from process %d, which it retired, ignored", svc.name, pid)
            return
        if reason is None and pidfd is not None and watch.reaped(pidfd):
            reason = GONE  # reaped: the /proc entry just read may be a stranger's that reused the pid
        if reason is None and flags & socket.MSG_TRUNC:
            reason = f"it is longer than {MAX_MESSAGE} bytes"
        if reason == GONE:
            log.debug("%s: notify message from process %d dropped: %s", svc.name, pid, GONE)
            return
        if reason is not None or st is None:
            self._refuse(chan, svc, pid, uid, reason or GONE)
            return
        self._apply(chan, svc, st, parse(data))

    def _apply(self, chan: Channel, svc: Any, sender: procfs.Stat, fields: dict[str, str]) -> None:
        pid = sender.pid
        if "MAINPID" in fields:
            self._main_pid(chan, svc, pid, fields["MAINPID"])
        if "STATUS" in fields:
            svc.status_text = clean_status(fields["STATUS"])
            chan.status_ticks = sender.starttime
        # A reload or a stop is the current main process's (and its group's) to announce: not that of an
        # old process a rolling restart is retiring, nor a new one beside it.
        of_main = svc.alive and svc.pid in (pid, sender.pgrp, sender.session)
        if fields.get("RELOADING") == "1" and chan.reloading_since is None and of_main:
            chan.reloading_since = time.time()
            self._note(chan, svc, f"reloading (RELOADING=1 from process {pid})")
        if fields.get("STOPPING") == "1" and not chan.stopping and of_main:
            chan.stopping = True
            self._note(chan, svc, f"stopping on its own (STOPPING=1 from process {pid})")
        if fields.get("READY") == "1":
            chan.ready.append((pid, sender.starttime))
            chan.changed.set()
            chan.changed = asyncio.Event()
            if chan.reloading_since is not None:
                took = time.time() - chan.reloading_since
                chan.reloading_since = None
                self._note(chan, svc, f"reloaded in {took:.3g} s (READY=1 from process {pid})")
                # A reload in place is complete: `reload --wait` returns, and the window closes, so that a
                # crash later is a crash, not a handover.
                self.sup.follow.reloaded(svc, f"reloaded in place in {took:.3g} s (RELOADING=1, then READY=1 "
                                         f"from process {pid})")
        if "WATCHDOG_USEC" in fields:
            usec = parse_usec(fields["WATCHDOG_USEC"])
            if usec is not None:
                chan.watchdog_override = usec
                self._note(chan, svc, f"watchdog timeout set to {usec / 1e6:g} s by process {pid} "
                           "(WATCHDOG_USEC=)" if usec else f"watchdog turned off by process {pid} (WATCHDOG_USEC=0)")
                if svc.status is Status.RUNNING:
                    self._arm(chan, svc)
        ping = fields.get("WATCHDOG")
        if ping == "1":
            chan.last_ping = asyncio.get_running_loop().time()
            chan.last_ping_at = time.time()
        elif ping == "trigger" and svc.status in (Status.RUNNING, Status.STARTING) and svc.alive:
            chan.reset_watchdog()
            self._watchdog_expired(svc, f"WATCHDOG=trigger from process {pid}")

    def _main_pid(self, chan: Channel, svc: Any, sender: int, text: str) -> None:
        new = parse_pid(text)
        if new is None:
            self._note(chan, svc, f"MAINPID={text[:20]!r} from process {sender} ignored: not a pid")
            return
        if svc.alive and new == svc.pid:
            return
        if not self._allow(chan):
            log.info("%s: MAINPID=%d from process %d ignored: too many notify messages", svc.name, new, sender)
            return
        claim: Callable[[Any, int, str], str | None] | None = getattr(self.sup, "_claim_main_pid", None)
        if claim is None:
            self._note(chan, svc, f"MAINPID={new} from process {sender} ignored: this pmond cannot follow "
                       "a new main process")
            return
        claim(svc, new, "MAINPID=")  # it records the handover, or the refusal and its reason

    # events

    def _allow(self, chan: Channel) -> bool:
        """A token bucket per service for `notify` events: EVENT_BURST, then one per EVENT_REFILL s."""
        now = time.monotonic()
        chan.tokens = min(float(EVENT_BURST), chan.tokens + (now - chan.tokens_at) / EVENT_REFILL)
        chan.tokens_at = now
        if chan.tokens < 1:
            return False
        chan.tokens -= 1
        return True

    def _note(self, chan: Channel, svc: Any, message: str) -> None:
        if self._allow(chan):
            self.sup._event(svc, "notify", message)
        else:
            log.info("%s: %s", svc.name, message)

    def _refuse(self, chan: Channel, svc: Any, pid: int, uid: int, reason: str) -> None:
        """Count a refused message; one event per REFUSED_GAP seconds tells how many and the last reason."""
        chan.refused += 1
        chan.refused_last = f"the last from process {pid} (uid {uid}): {reason}"
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= chan.refused_next:
            self._report_refused(chan)
        elif chan.refused_flush is None:
            chan.refused_flush = loop.call_at(chan.refused_next, self._report_refused, chan)

    def _report_refused(self, chan: Channel) -> None:
        chan.refused_flush = None
        svc = self.sup.services.get(chan.service_id)
        if svc is None or chan.refused == 0:
            return
        self.sup._event(svc, "notify", f"refused {words.plural(chan.refused, 'message')} on its notify socket; "
                        f"{chan.refused_last}", refused=chan.refused)
        chan.refused = 0
        chan.refused_next = asyncio.get_running_loop().time() + REFUSED_GAP

    # the watchdog

    def _new_run(self, chan: Channel, svc: Any) -> None:
        if chan.status_ticks < (svc.start_ticks or 0):
            svc.status_text = None  # an older process's STATUS= (a new one's, sent already, stays)
        chan.reloading_since = None
        chan.stopping = False
        chan.watchdog_override = None

    def _watchdog_usec(self, chan: Channel, svc: Any) -> int:
        if chan.watchdog_override is not None:
            return chan.watchdog_override
        return round((svc.spec.get("watchdog_sec") or 0) * 1e6)

    def _arm(self, chan: Channel, svc: Any) -> None:
        """Start the watchdog afresh (a full timeout from now), or stop it when there is none."""
        chan.reset_watchdog()
        usec = self._watchdog_usec(chan, svc)
        if usec <= 0:
            return
        loop = asyncio.get_running_loop()
        chan.last_ping = loop.time()
        chan.timer = loop.call_later(usec / 1e6, self._watchdog_check, chan)

    def _watchdog_check(self, chan: Channel) -> None:
        # One timer per service, moved forward by the pings it finds rather than re-made at each ping.
        chan.timer = None
        svc = self.sup.services.get(chan.service_id)
        if svc is None or svc.status is not Status.RUNNING or not svc.alive:
            return
        timeout = self._watchdog_usec(chan, svc) / 1e6
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        left = chan.last_ping + timeout - loop.time()
        if left > 0:
            chan.timer = loop.call_later(left, self._watchdog_check, chan)
            return
        self._watchdog_expired(svc, f"no WATCHDOG=1 for {timeout:g} s")

    def _watchdog_expired(self, svc: Any, why: str) -> None:
        """systemd's watchdog action: SIGABRT to the process group, SIGKILL after kill_timeout (the stop
        sequence, watch.stop_group, given up once the process is not the service's running main any more:
        it exited, or a user is stopping it); the exit goes through the restart policy."""
        pid, pidfd, gen = svc.pid, svc.pidfd, svc.generation
        chan = self.channels.get(svc.id)
        if pid is None or pidfd is None or chan is None:
            return
        # The group as a stop finds it (follow.py): a main process handed over to (MAINPID=, a re-exec) may
        # lead no group of its own, and a group signal through its pidfd would then reach nobody.
        pgid, group = self.sup.follow.group(svc, pid, pidfd)
        group = os.dup(group)  # the sequence outlives the main's watch, which closes its pidfd
        self.sup._event(svc, "watchdog", f"{why}: sending SIGABRT to process group {pgid}", pid=pid,
                        signal="SIGABRT")

        def still() -> bool:
            return (svc.generation == gen and svc.pid == pid and svc.pidfd is not None
                    and svc.status in (Status.RUNNING, Status.STARTING))

        async def abort() -> None:
            try:
                await watch.stop_group(group, pgid, svc.exited, signal.SIGABRT, svc.spec.get("kill_timeout", 5.0),
                                       note_kill=lambda text: self.sup._event(svc, "kill", text, pid=pid),
                                       still=still)
            finally:
                os.close(group)

        if chan.aborting is not None:
            chan.aborting.cancel()  # an earlier one, at most waiting for its group to be gone
        chan.aborting = asyncio.get_running_loop().create_task(abort())
