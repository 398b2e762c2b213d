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
    """Runs in the grandchild; never returns. Only async-signal-safe-ish work: we are single-threaded."""
    stage = "start"
    try:
        if os.read(go_r, 1) != b"g":
            os._exit(1)  # pmond went away before letting us start
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
        # Close everything else pmond had open (its socket, database, pidfds) but the status pipe.
        os.closerange(3, status_w)
        os.closerange(status_w + 1, 1 << 20)
        stage = "cwd " + spec.cwd
        os.chdir(spec.cwd)
        env = spec.env
        if ident is not None:
            stage = "user " + (spec.user or "")
            os.setgroups(ident.groups)
            os.setgid(ident.gid)
            os.setuid(ident.uid)
            env = ident.env
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, so reset them all.
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
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


async def _reap(pid: int) -> None:
    """Collect the intermediate child without blocking the loop (it exits right after its fork)."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        done = loop.create_future()
        loop.add_reader(fd, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            loop.remove_reader(fd)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # a subreaper's SIGCHLD handler was quicker
    finally:
        os.close(fd)


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
        # The grandchild is blocked on the go pipe, so this pid is certainly still it.
        pidfd = os.pidfd_open(grandchild)
        stat = procfs.read_stat(grandchild)
        if stat is None:
            raise SpawnError(f"cannot start {spec.argv[0]}: the new process vanished")
        os.write(go_w, b"g")
        os.close(go_w)
        go_w = -1
        while True:
            chunk = await _read_some(status_r)
            if not chunk:
                break
            rest += chunk
        if rest:
            raise SpawnError(_describe_failure(spec, rest))
        launched = Launched(grandchild, pidfd, stat.starttime, time.time())
        pidfd = -1
        return launched
    finally:
        if go_w >= 0:
            os.close(go_w)
        os.close(status_r)
        if pidfd >= 0:
            os.close(pidfd)
        await _reap(pid)
