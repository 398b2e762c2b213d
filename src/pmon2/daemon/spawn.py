"""Detached launch: each service in its own session, through a double fork, so its parent is init.

The grandchild waits on a "go" pipe until pmond has opened a pidfd for it and read its start time:
the pidfd therefore names the right process even if the pid were reused a moment later. Exec
failures travel back on a close-on-exec status pipe, so a missing binary or a bad cwd reaches the
user as an error instead of a crash loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import signal
import struct
import time
from dataclasses import dataclass, field

from pmon2 import procfs
from pmon2.errors import SpawnError

_PID = struct.Struct("=q")
LOG_MODE = 0o640


@dataclass(frozen=True)
class LaunchSpec:
    exe: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    out_log: str
    err_log: str
    user: str | None = None


@dataclass
class Launched:
    pid: int
    pidfd: int
    start_ticks: int
    started_at: float = field(default=0.0)


@dataclass(frozen=True)
class _Identity:
    uid: int
    gid: int
    groups: list[int]
    env: dict[str, str]


def _identity(spec: LaunchSpec) -> _Identity | None:
    if spec.user is None:
        return None
    try:
        pw = pwd.getpwnam(spec.user)
    except KeyError:
        raise SpawnError(f"no such user: {spec.user}") from None
    if pw.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise SpawnError(f"--user {spec.user} needs pmond to run as root")
    env = dict(spec.env, HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
    return _Identity(pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid), env)


def _exec_grandchild(spec: LaunchSpec, ident: _Identity | None, status_w: int, go_r: int) -> None:
    """Runs in the grandchild; never returns. It prepares everything while pmond opens its pidfd, then
    waits for the go and execs at once: a restart costs one exec after the go, not the whole set-up."""
    stage = "start"
    try:
        # Lead a process group of our own inside the new session (whose leader is the intermediate,
        # already gone): stop can then signal the service and all its children with killpg(pid).
        stage = "setpgid"
        os.setpgid(0, 0)
        stage = "stdin"
        devnull = os.open("/dev/null", os.O_RDONLY)
        stage = "log " + spec.out_log
        out = os.open(spec.out_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_MODE)
        stage = "log " + spec.err_log
        err = out if spec.err_log == spec.out_log else os.open(
            spec.err_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_MODE)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        # Close everything else pmond had open (its socket, database, pidfds) but our two pipes.
        low, high = sorted((status_w, go_r))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 1 << 20)
        stage = "cwd " + spec.cwd
        os.chdir(spec.cwd)
        env = spec.env
        if ident is not None:
            stage = "user " + (spec.user or "")
            os.setgroups(ident.groups)
            os.setgid(ident.gid)
            os.setuid(ident.uid)
            env = ident.env
        # Python ignores SIGPIPE and SIGXFSZ, and pmond handles a few; handlers other than the default
        # survive exec as "ignored", so put back the default for every one Python knows is changed.
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) not in (signal.SIG_DFL, None):
                signal.signal(sig, signal.SIG_DFL)
        stage = "start"
        if os.read(go_r, 1) != b"g":
            os._exit(1)  # pmond went away before letting us start
        stage = "exec " + spec.exe
        os.execve(spec.exe, spec.argv, env)
    except OSError as exc:
        msg = f"{stage}\0{exc.errno or 0}".encode()
        try:
            os.write(status_w, msg)
        finally:
            os._exit(127)
    except BaseException:
        os._exit(127)


async def _read_some(fd: int) -> bytes:
    """Wait until `fd` is readable and read what is there; b"" at end of file."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            pass
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


def _reap_later(pid: int) -> None:
    """Collect the intermediate child once it exits (right after its fork), without waiting for it."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return

    def collect() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # a subreaper's SIGCHLD handler was quicker

    loop.add_reader(fd, collect)


def _describe_failure(spec: LaunchSpec, payload: bytes) -> str:
    stage, _, code = payload.decode(errors="replace").partition("\0")
    try:
        reason = os.strerror(int(code))
    except ValueError:
        reason = "unknown error"
    if stage.startswith("exec ") and code == str(errno.ENOENT):
        return f"cannot start {spec.argv[0]}: no such file: {spec.exe}"
    return f"cannot start {spec.argv[0]}: {stage}: {reason}"


async def launch(spec: LaunchSpec) -> Launched:
    ident = _identity(spec)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (status_r, status_w, go_r, go_w):
            os.close(fd)
        raise SpawnError(f"cannot fork: {exc.strerror}") from None
    if pid == 0:  # the intermediate child
        try:
            os.close(status_r)
            os.close(go_w)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                _exec_grandchild(spec, ident, status_w, go_r)
            os.write(status_w, _PID.pack(grandchild))
        finally:
            os._exit(0)

    os.close(status_w)
    os.close(go_r)
    os.set_blocking(status_r, False)
    pidfd = -1
    try:
        buf = b""
        while len(buf) < _PID.size:
            chunk = await _read_some(status_r)
            if not chunk:
                raise SpawnError(f"cannot start {spec.argv[0]}: the launcher died")
            buf += chunk
        grandchild = _PID.unpack(buf[: _PID.size])[0]
        rest = buf[_PID.size :]
        # The grandchild cannot exec before the go, and if it failed its set-up it is at worst an
        # unreaped zombie (init reaps late): either way this pid is still it.
        stat = None
        try:
            pidfd = os.pidfd_open(grandchild)
            stat = procfs.read_stat(grandchild)
            os.write(go_w, b"g")
        except (ProcessLookupError, BrokenPipeError):
            pass  # it died in its set-up; its reason is on the status pipe
        os.close(go_w)
        go_w = -1
        while True:
            chunk = await _read_some(status_r)
            if not chunk:
                break
            rest += chunk
        if rest:
            raise SpawnError(_describe_failure(spec, rest))
        if stat is None or pidfd < 0:
            raise SpawnError(f"cannot start {spec.argv[0]}: the new process vanished")
        launched = Launched(grandchild, pidfd, stat.starttime, time.time())
        pidfd = -1
        return launched
    finally:
        if go_w >= 0:
            os.close(go_w)
        os.close(status_r)
        if pidfd >= 0:
            os.close(pidfd)
        _reap_later(pid)
