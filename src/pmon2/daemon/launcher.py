"""The service launcher: pmond's small helper process, and the intermediate child that starts a service.

Why a helper: a fork copies the forking process's page tables, and the child then pays a copy-on-write
fault for every page it touches. From pmond (about 20 MB resident) the child of a fork ran its first
instruction 2.0 ms after the fork began, here; from a bare interpreter, 1.0 ms. So pmond starts this
module once, as `python -I -S` (nothing but os, signal, marshal and _socket loaded), and hands it each
launch over a SOCK_SEQPACKET socketpair: the request, and the two pipe ends the intermediate reports on.

The launcher keeps one child forked ahead, waiting on the socket; the child that takes a request
becomes that service's intermediate, and the launcher forks the next one. The intermediate puts itself
in a new session, sets up stdio, cwd and user in itself, and starts the service with posix_spawn: a
vfork and exec, with no second copy of page tables. It does not reap the service, and waits until
pmond has a pidfd on it, so the pid cannot be reused under pmond's feet; then it exits, and the
service's parent becomes init (or pmond, when pmond is the subreaper). If pmond never acknowledges,
the intermediate kills the service rather than leave a process nobody knows of.

pmond falls back to forking the intermediate itself (same code) when the launcher is not there.
This module must stay on builtin modules (and _socket): it is the launcher's whole import cost.
"""

import _socket
import marshal
import os
import signal
import sys

# Request: marshal of (exe, argv, env, cwd, out_log, err_log, ident), ident None or (uid, gid, groups).
# Reports on the status pipe: b"P" + pid of the service + pid of the intermediate (8 bytes each,
# little-endian), or b"E" + stage + NUL + errno when the set-up or the exec failed.
MAX_REQUEST = 1 << 20
LOG_MODE = 0o640


def pack_report(service: int, intermediate: int) -> bytes:
    return b"P" + service.to_bytes(8, "little") + intermediate.to_bytes(8, "little")


def unpack_report(msg: bytes) -> tuple[int, int]:
    return int.from_bytes(msg[1:9], "little"), int.from_bytes(msg[9:17], "little")


REPORT_SIZE = 17


def changed_signals() -> list[int]:
    """Signals whose disposition differs from the default here: ignored ones survive exec (Python ignores
    SIGPIPE and SIGXFSZ), so the service gets the default for each of them."""
    return [sig for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)
            and signal.getsignal(sig) not in (signal.SIG_DFL, None)]


def _close_all_but(keep: list[int]) -> None:
    """Whatever the parent holds without close-on-exec must not reach the service."""
    low = 3
    for fd in sorted(f for f in keep if f >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def intermediate(req: tuple, status_w: int, ack_r: int, changed: list[int] | None = None,  # type: ignore[type-arg]
                 spawned_w: int = -1) -> int:
    """Runs in the intermediate child; returns its exit code. `spawned_w`, when given, gets a byte once
    the service is started (or failed to start)."""
    exe, argv, env, cwd, out_log, err_log, ident = req
    stage = "setsid"
    try:
        try:
            os.setsid()
            _close_all_but([status_w, ack_r, spawned_w])
            stage = "stdin"
            devnull = os.open("/dev/null", os.O_RDONLY)
            stage = "log " + out_log
            out = os.open(out_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE)
            stage = "log " + err_log
            err = out if err_log == out_log else os.open(err_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE)
            # dup2 here rather than as spawn file actions: this process is thrown away, and 0-2 end up
            # inheritable whatever numbers the opens returned.
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            stage = "cwd " + cwd
            os.chdir(cwd)
            if ident is not None:
                stage = "user"
                uid, gid, groups = ident
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
            if changed is None:
                changed = changed_signals()
            stage = "exec " + exe
            # setpgroup=0: the service leads a process group of its own inside the new session, so stop can
            # signal it and all its children with killpg(pid). No signal stays blocked.
            pid = os.posix_spawn(exe, argv, env, setpgroup=0, setsigmask=(), setsigdef=changed)
        finally:
            if spawned_w >= 0:
                _note(spawned_w, b"t")
    except OSError as exc:
        os.write(status_w, b"E" + f"{stage}\0{exc.errno or 0}".encode())
        return 127
    try:
        os.write(status_w, pack_report(pid, os.getpid()))
        go = os.read(ack_r, 1)
    except OSError:  # EPIPE: pmond is gone
        go = b""
    if go != b"g":
        os.kill(pid, signal.SIGKILL)  # pmond went away before it could record the service
        return 1
    return 0


def _note(fd: int, what: bytes) -> None:
    """Tell the launcher (best effort: if it died, there is no next child to fork, and the service that
    was just started must still be reported to pmond)."""
    try:
        os.write(fd, what)
    except OSError:
        pass
    os.close(fd)


def _reap(signum: int, frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(fd: int) -> None:
    """The launcher's loop, on its end of the socketpair; returns when pmond closes the other end.

    One child is always forked ahead, waiting on the socket: a request finds its intermediate already
    there, and the fork for the next one happens once this one's service is started."""

    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write("pmond-launcher")
    except OSError:
        pass
    # pmond decides when the launcher ends (by closing the socket), not a Ctrl-C meant for pmond.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _reap)
    sock = _socket.socket(fileno=fd)
    sock.send(b"R")
    while True:
        note_r, note_w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(note_r)
            os.close(note_w)
            return  # pmond sees us go and forks services itself
        if pid == 0:
            os.close(note_r)
            code = 127
            try:
                code = _take_one(sock, note_w)
            finally:
                os._exit(code)
        os.close(note_w)
        try:
            note = os.read(note_r, 1)
        finally:
            os.close(note_r)
        if note == b"q":
            try:
                os.waitpid(pid, 0)  # it exits right after saying so: reap it rather than leave init a zombie
            except ChildProcessError:
                pass  # our SIGCHLD handler was quicker
            return


def _take_one(sock: _socket.socket, note_w: int) -> int:
    """In the child forked ahead: wait for one request and become its intermediate."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the service is never reaped here
    changed = changed_signals()
    data, ancillary, flags, _ = sock.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(2 * 4))
    if not data:
        _note(note_w, b"q")  # pmond closed the socket: the launcher ends
        return 0
    fds = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)]
    if len(fds) != 2 or flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
        _note(note_w, b"t")
        return 1  # pmond sees the status pipe close and forks the intermediate itself
    status_w, ack_r = fds
    try:
        req = marshal.loads(data)
    except (ValueError, EOFError, TypeError):
        _note(note_w, b"t")
        return 1
    return intermediate(req, status_w, ack_r, changed, spawned_w=note_w)
