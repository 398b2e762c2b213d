"""The service launcher: pmond's small helper process, and the intermediate child that starts a service.

Why a helper: a fork copies the forking process's page tables, and the child then pays a copy-on-write
fault for every page it touches. From pmond (about 20 MB resident) the child of a fork ran its first
instruction 2.0 ms after the fork began, here; from a bare interpreter, 1.0 ms. So pmond starts this
module once, as `python -I -S` (nothing but os, signal, marshal, errno and _socket loaded), and hands it each
launch over a SOCK_SEQPACKET socketpair: the request, and the two pipe ends the intermediate reports on.

The launcher keeps one child forked ahead, waiting on the socket; the child that takes a request
becomes that service's intermediate, and the launcher forks the next one. The intermediate puts itself
in a new session, sets up stdio, cwd and user in itself, and starts the service with posix_spawn: a
vfork and exec, with no second copy of page tables. It does not reap the service, and waits until
pmond has a pidfd on it, so the pid cannot be reused under pmond's feet; then it exits, and the
service's parent becomes init (or pmond, when pmond is the subreaper). If pmond never acknowledges,
the intermediate kills the service rather than leave a process nobody knows of.

A service with listening sockets (socket activation, daemon/sockets.py) gets them as fds 3, 4, ...;
they come with the request (SCM_RIGHTS, after the two pipe ends). systemd's LISTEN_PID must be the
service's own pid, which posix_spawn cannot put in its environment, so such a service is started by
fork and exec instead: the child sets LISTEN_PID to getpid() and execs (fork_exec).

Log files are where a service's user could attack pmond, which often runs as root: a service that
can write its log dir can put a symbolic link, a hard link or a FIFO in place of its log before it
exits, and the next start would append to, or block on, whatever that names. So the intermediate opens
a log in one of two ways (see open_log):

- in pmond's own log dir, when that dir is owned by pmond's user and writable by no one else (so no
  service can plant anything there), it creates the file itself, before the user switch, relative to
  an fd of the dir, and gives it to the service's user with fchown. A file left there by another user
  (a service of theirs that was deleted, failed to start or changed user) is never reused: it is set
  aside (set_aside) and a new one created, as that user may still hold it open, or have opened it to
  others (chmod, an ACL), and a chown takes away neither;
- anywhere else (a --log or --log_dir the user chose), it opens the file only after switching to the
  service's user: a service never writes where its user could not.

Either way the open does not follow a symbolic link (O_NOFOLLOW) nor block (O_NONBLOCK), and fstat
must show a regular file; anything else is refused, and the service is not started.

pmond falls back to forking the intermediate itself (same code) when the launcher is not there.
This module must stay on builtin modules (and _socket; stat comes with os): it is the launcher's whole
import cost.
"""

import _socket
import errno
import marshal
import os
import signal
import stat
import sys

# Request: marshal of (exe, argv, env, cwd, out_log, err_log, ident, trusted_log_dir, listen_fds), ident
# None or (uid, gid, groups), trusted_log_dir None or pmond's own log dir (a request of 7 items has none),
# listen_fds the number of listening sockets (socket activation, daemon/sockets.py) that follow the status
# pipe and the ack pipe in the message's SCM_RIGHTS (a request of 8 items or fewer has none).
# Reports on the status pipe: b"P" + pid of the service + pid of the intermediate (8 bytes each,
# little-endian), or b"E" + stage + NUL + errno [+ NUL + reason] when the set-up or the exec failed;
# a reason ("is a symbolic link") says why a log file was refused, with errno 0.
MAX_REQUEST = 1 << 20
MAX_LISTEN_FDS = 64  # spec.MAX_LISTEN: the fds of one request are 2 + this many at most
LOG_MODE = 0o640
# open(2): O_NOFOLLOW fails with ELOOP on a symbolic link; O_NONBLOCK makes the open of a FIFO without
# a reader fail with ENXIO instead of waiting for one (and of one with a reader succeed, for fstat to
# refuse). O_APPEND: copytruncate rotation then leaves no sparse file.
LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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


class Refused(Exception):
    """A log file that is not a plain file of its own (its message says what it is instead): the service
    is not started, rather than write through it."""


_KINDS = ((stat.S_ISLNK, "is a symbolic link"), (stat.S_ISFIFO, "is a FIFO"), (stat.S_ISSOCK, "is a socket"),
          (stat.S_ISCHR, "is a device"), (stat.S_ISBLK, "is a device"), (stat.S_ISDIR, "is a directory"))


def _kind(mode: int) -> str | None:
    """Why a file of this mode is no log file; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, what in _KINDS:
        if test(mode):
            return what
    return "is not a regular file"


def trusted_dir_fd(path: str) -> int:
    """An fd of `path` when no service can plant anything in it: a directory (not a symbolic link to one),
    owned by pmond's user, writable by neither group nor others. -1 otherwise.

    Files are then opened relative to this fd (openat), so the dir cannot be swapped under the opens."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        return -1
    return fd


def _open(name: str, flags: int, dirfd: int) -> int:
    """open(2) of a log, with the errors that mean "this is no plain file" turned into Refused."""
    try:
        return os.open(name, flags, LOG_MODE, dir_fd=dirfd if dirfd >= 0 else None)
    except OSError as exc:
        # ELOOP: O_NOFOLLOW met a symbolic link. ENXIO: a FIFO without a reader (O_NONBLOCK), or a socket.
        # EISDIR: a directory opened for writing. Ask lstat which it is, for the message.
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        try:
            what = _kind(os.stat(name, dir_fd=dirfd if dirfd >= 0 else None, follow_symlinks=False).st_mode)
        except OSError:
            what = None
        if what is None and exc.errno == errno.ENXIO:
            what = "is a FIFO"
        if what is None:
            raise
        raise Refused(what) from None


MAX_ASIDE = 1000  # NAME.uid-UID, NAME.uid-UID-2, ...: how many set_aside tries before it gives up


def set_aside(name: str, dirfd: int, uid: int) -> str:
    """Rename `name` (in the dir of `dirfd`, pmond's own) to NAME.uid-UID, or NAME.uid-UID-N when that is
    taken, and return the new name. `uid` owns the file: the name says whose it was. Never replaces a
    file (only pmond's user can write the dir, so a name seen free stays free), and never matches
    NAME.N or NAME.N.gz, so rotation, the log budget and `pmon2 logs` leave it alone: kept for the
    administrator. Raises Refused when MAX_ASIDE names are taken, OSError when the rename fails."""
    for n in range(1, MAX_ASIDE + 1):
        aside = f"{name}.uid-{uid}" + (f"-{n}" if n > 1 else "")
        try:
            os.stat(aside, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(name, aside, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            return aside
    raise Refused(f"belongs to uid {uid}, and {MAX_ASIDE} names to set it aside are taken")


def open_log(path: str, dirfd: int = -1, owner: tuple[int, int] | None = None) -> int:
    """Open a log file for the service to append to; raises OSError, or Refused for anything that is not
    a regular file of its own.

    With `dirfd` (pmond's own log dir, from trusted_dir_fd), the file is created here with O_EXCL, or an
    existing one opened, both relative to the dir fd, and given to `owner` (uid, gid: the service's, which
    are pmond's own when it runs as pmond's user) with fchown. An existing file is reused only when it
    belongs to owner's uid; one of any other user, pmond's own included (a deleted root service's output
    must not go to the next owner of its name), is set aside (set_aside) and a new one created. It must have
    exactly one link: a second name for it could be anywhere. Without `dirfd`, `path` is opened as
    whoever this process is now (the service's user: see intermediate). As root, a hard link is refused
    there as well: root writes through any link."""
    if dirfd >= 0:
        name = path.rpartition("/")[2]
        try:
            fd = _open(name, LOG_FLAGS | os.O_CREAT | os.O_EXCL, dirfd)
        except FileExistsError:  # O_EXCL: even a dangling symbolic link counts as existing (open(2))
            fd = _open(name, LOG_FLAGS, dirfd)
            st = os.fstat(fd)
            # (a file with a second name is refused below, not set aside: nothing may be written through it)
            if owner is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid != owner[0]:
                os.close(fd)
                set_aside(name, dirfd, st.st_uid)
                fd = _open(name, LOG_FLAGS | os.O_CREAT | os.O_EXCL, dirfd)
    else:
        fd = _open(path, LOG_FLAGS | os.O_CREAT, -1)
    try:
        st = os.fstat(fd)
        what = _kind(st.st_mode)
        if what is not None:
            raise Refused(what)
        if st.st_nlink != 1 and (dirfd >= 0 or os.geteuid() == 0):
            raise Refused(f"has {st.st_nlink} hard links")
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        os.set_blocking(fd, True)  # fcntl(2) F_SETFL: the service's writes must wait, not fail with EAGAIN
    except BaseException:
        os.close(fd)
        raise
    return fd


def intermediate(req: tuple, status_w: int, ack_r: int, changed: list[int] | None = None,  # type: ignore[type-arg]
                 spawned_w: int = -1, listen: list[int] | tuple[int, ...] = ()) -> int:
    """Runs in the intermediate child; returns its exit code. `spawned_w`, when given, gets a byte once
    the service is started (or failed to start). `listen`: listening sockets to pass as fds 3, 4, ...
    (socket activation): the service then starts by fork and exec, so that its LISTEN_PID can be its own
    pid, which posix_spawn cannot set.

    The order matters: logs in pmond's own dir are opened before the user switch (by pmond's user, who
    alone can write there), every other log after it, so that it is opened with the service's rights;
    and the cwd is entered as the service's user as well, or a service could be handed a cwd inside a
    directory it may not enter."""
    exe, argv, env, cwd, out_log, err_log, ident = req[:7]
    trusted = req[7] if len(req) > 7 else None
    stage = "setsid"
    try:
        try:
            os.setsid()
            _close_all_but([status_w, ack_r, spawned_w, *listen])
            if listen:
                status_w, ack_r, spawned_w = place_listen_fds(list(listen), [status_w, ack_r, spawned_w])
            stage = "stdin"
            devnull = os.open("/dev/null", os.O_RDONLY)
            logs = dict.fromkeys((out_log, err_log), -1)
            dirfd = -1
            if trusted is not None and any(p.rpartition("/")[0] == trusted for p in logs):
                dirfd = trusted_dir_fd(trusted)
            for path in logs:
                if dirfd >= 0 and path.rpartition("/")[0] == trusted:
                    stage = "log " + path
                    # Always an owner, pmond's own ids when there is no other user: a file another user
                    # left in the dir (a create of theirs that failed, a deleted service) is not reused.
                    owner = (os.geteuid(), os.getegid()) if ident is None else (ident[0], ident[1])
                    logs[path] = open_log(path, dirfd, owner)
            if ident is not None:
                stage = "user"
                uid, gid, groups = ident
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
            for path, fd in logs.items():
                if fd < 0:
                    stage = "log " + path
                    # A missing log dir is made here, with the service's rights, never by root.
                    os.makedirs(path.rpartition("/")[0] or "/", 0o755, exist_ok=True)
                    logs[path] = open_log(path)
            # dup2 here rather than as spawn file actions: this process is thrown away, and 0-2 end up
            # inheritable whatever numbers the opens returned.
            os.dup2(devnull, 0)
            os.dup2(logs[out_log], 1)
            os.dup2(logs[err_log], 2)
            stage = "cwd " + cwd
            os.chdir(cwd)
            if changed is None:
                changed = changed_signals()
            stage = "exec " + exe
            # setpgroup=0: the service leads a process group of its own inside the new session, so stop can
            # signal it and all its children with killpg(pid). No signal stays blocked.
            if listen:
                pid = fork_exec(exe, argv, env, changed)
            else:
                pid = os.posix_spawn(exe, argv, env, setpgroup=0, setsigmask=(), setsigdef=changed)
        finally:
            if spawned_w >= 0:
                _note(spawned_w, b"t")
    except Refused as exc:
        os.write(status_w, b"E" + "\0".join((stage, "0", str(exc))).encode())
        return 127
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


def place_listen_fds(listen: list[int], others: list[int]) -> list[int]:
    """Put the fds `listen` at 3, 4, ... (inheritable: where the service finds them, sd_listen_fds(3)), and
    move `others` (close-on-exec; -1 for none) above them, out of the way; returns the new numbers of
    `others`. Every other fd above 2 must be closed already (_close_all_but)."""
    keep = [fd for fd in (*listen, *others) if fd >= 0]
    base = max([*keep, 2 + len(listen)]) + 1  # everything from here up is free
    high = {fd: base + i for i, fd in enumerate(keep)}
    for fd, to in high.items():
        os.dup2(fd, to, inheritable=False)
    for fd in keep:
        os.close(fd)
    for i, fd in enumerate(listen):
        os.dup2(high[fd], 3 + i, inheritable=True)
        os.close(high[fd])
    return [high[fd] if fd >= 0 else -1 for fd in others]


def fork_exec(exe: str, argv: list[str], env: dict[str, str], changed: list[int]) -> int:
    """posix_spawn's part, done by hand: the child leads a process group of its own, gets the default
    disposition of `changed` and no blocked signal, sets LISTEN_PID to its own pid and execs. Returns its
    pid; an exec failure comes back as OSError (through a close-on-exec pipe, closed by a good exec)."""
    err_r, err_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(err_r)
        os.close(err_w)
        raise
    if pid == 0:
        code = errno.EINVAL
        try:
            os.close(err_r)
            os.setpgid(0, 0)
            for sig in changed:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            env = dict(env, LISTEN_PID=str(os.getpid()))
            os.execve(exe, argv, env)
        except OSError as exc:
            code = exc.errno or errno.EINVAL
        except BaseException:
            pass
        try:
            os.write(err_w, str(code).encode())
        finally:
            os._exit(127)
    os.close(err_w)
    try:
        failed = os.read(err_r, 16)
    finally:
        os.close(err_r)
    if failed:
        try:
            os.waitpid(pid, 0)  # the child that could not exec is ours to reap
        except ChildProcessError:
            pass
        code = int(failed) if failed.isdigit() else errno.EINVAL
        raise OSError(code, os.strerror(code))
    return pid


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
    there. The fork for the next one happens once this one's service is started, or, when more requests
    are waiting (a bulk create), as soon as this one has taken its request, so that launches overlap."""

    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write("pmond-launcher")
    except OSError:
        pass
    # pmond decides when the launcher ends (by closing the socket), not a Ctrl-C meant for pmond.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _reap)
    # Once, here: in each child it cost 1 ms of CPU (getsignal's enum conversions, and the first pages the
    # child copies). SIGCHLD is in the list (the child resets it to the default, as the list asks).
    changed = changed_signals()
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
                code = _take_one(sock, note_w, changed)
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


def _take_one(sock: _socket.socket, note_w: int, changed: list[int]) -> int:
    """In the child forked ahead: wait for one request and become its intermediate. `changed`: the
    launcher's changed_signals()."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the service is never reaped here
    # MSG_CMSG_CLOEXEC: the fds that come with a request must not reach the service by themselves (the
    # listening sockets among them are placed at 3.. on purpose, see intermediate).
    data, ancillary, flags, _ = sock.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE((2 + MAX_LISTEN_FDS) * 4),
                                             _socket.MSG_CMSG_CLOEXEC)
    if not data:
        _note(note_w, b"q")  # pmond closed the socket: the launcher ends
        return 0
    fds = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)]
    req = None
    if not flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
        try:
            req = marshal.loads(data)
        except (ValueError, EOFError, TypeError):
            pass
    listen = req[8] if isinstance(req, tuple) and len(req) > 8 else 0
    if (not isinstance(req, tuple) or len(req) < 7 or type(listen) is not int
            or not 0 <= listen <= MAX_LISTEN_FDS or len(fds) != 2 + listen):
        _note(note_w, b"t")
        return 1  # pmond sees the status pipe close and forks the intermediate itself
    status_w, ack_r, *sockets = fds
    if _more_waiting(sock):
        # A bulk create (pmond sends several at once): the launcher forks the next child now, while this
        # one sets up and starts its service, so that launches overlap (one at a time, 100 creates took
        # 100 launches in a row). A request alone (a restart) is told after its service started, as the
        # fork would compete with the start for the CPU (measured: a restart 1-3 ms slower).
        _note(note_w, b"t")
        note_w = -1
    return intermediate(req, status_w, ack_r, changed, spawned_w=note_w, listen=sockets)


def _more_waiting(sock: _socket.socket) -> bool:
    """Is another request already queued on the socket? (A peek: it stays there, with its fds.)"""
    try:
        return bool(sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing waiting
        return False
