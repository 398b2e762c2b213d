"""Socket activation with systemd's protocol (sd_listen_fds(3), systemd.socket(5)).

A service with `listen` gets listening sockets that pmond creates, binds and holds itself. Each launch
passes them as fds 3, 4, ... in the order of `listen`, with LISTEN_FDS (how many), LISTEN_FDNAMES (their
names, `:`-separated) and LISTEN_PID (the service's own pid: the intermediate forks and sets it in the
child before exec, see launcher.py). A set is bound at the service's first start (launch -> ensure) and
held while the service should run, so a restart or a crash never closes it: connections that arrive while
no process accepts wait in the backlog (listen(2), BACKLOG capped by somaxconn) and are served by the next
process, none refused. A `stop` or `del` closes it (collect): a stopped service refuses connections rather
than leave them waiting.

Which processes share a set (a `key`): the instances of a group NAME share one set (and so one accept
queue), as a plain service has its own; with `reuseport`, each instance (service id) has its own set,
bound with SO_REUSEPORT, and the kernel spreads connections over them. A closed SO_REUSEPORT socket
resets the connections still queued on it unless net.ipv4.tcp_migrate_req = 1 (Linux 5.14+).

Rights: the sockets of a service that runs as another user (pmond as root) are created as that user
(seteuid, so that their owner, which SO_REUSEPORT groups compare, is the service's uid), and a unix
socket is bound as that user too: its file, its missing directories and the removal of a stale socket
file happen with the service's rights, so no service can make pmond create or delete a file where it
could not itself. An existing path is replaced only when it is a socket nobody listens on (a symbolic
link, or any other file, is refused; bind(2) never follows one). TCP ports are bound as pmond, which
may bind below 1024 as root: the API lets only root ask for those (check_caller). pmond is
single-threaded, so switching its effective ids for the length of a few syscalls is safe.

After pmond restarts, `recover` takes each set back from a running service with pidfd_getfd(2)
(ptrace rights over the service: root, or the same uid where ptrace rules allow it), finding which fd
is which by type, listening state and getsockname. When it cannot, it binds the set again at once if
the address is free, or at the service's next start, and says so in a `listen` event.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pmon2 import spec as model
from pmon2.daemon import auth
from pmon2.errors import SpawnError

BACKLOG = 4096
# Variables of the protocol: never inherited from the caller's environment (systemd unsets them too).
LISTEN_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
SYS_PIDFD_GETFD = 438  # one number on every architecture (Linux 5.6+)
UNIX_MODE = 0o666  # systemd's SocketMode= default

# (scheme, host, port, path (a unix socket's, resolved against cwd), mode, reuseport, uid): a held
# socket can serve a wanted entry only when all of these are equal. The fd's name is not part of it.
Ident = tuple[str, str, int, str, int | None, bool, int]


@dataclass(eq=False)  # compared by identity: one held socket is one fd
class Held:
    sock: socket.socket
    ident: Ident


@dataclass
class SocketSet:
    held: list[Held]
    users: set[int] = field(default_factory=set)  # ids of the services it was made or taken back for

    def close(self) -> None:
        for h in self.held:
            h.sock.close()
        self.held.clear()


def key(svc: Any) -> str | None:
    """Which set a service uses: "group:NAME" (shared by the instances of NAME, or a plain service's own),
    "id:ID" with reuseport; None without `listen`."""
    s = svc.spec
    if not s.get("listen"):
        return None
    return f"id:{svc.id}" if s.get("reuseport") else f"group:{s.get('instance_of') or svc.name}"


def wanted(spec: dict[str, Any]) -> list[tuple[model.Listen, Ident]]:
    """A spec's `listen` entries, parsed, each with the ident of the socket it needs."""
    uid = auth.uid_of_user(spec.get("user"))
    out = []
    for text in spec.get("listen") or ():
        entry = model.parse_listen(text)
        path = entry.path
        if entry.scheme == "unix" and not path.startswith("@"):
            path = os.path.normpath(os.path.join(spec["cwd"], path))
        mode = (UNIX_MODE if entry.mode is None else entry.mode) if entry.scheme == "unix" else None
        out.append((entry, (entry.scheme, entry.host, entry.port, path, mode, bool(spec.get("reuseport")), uid)))
    return out


def check_caller(req: dict[str, Any], but: Any, services: Iterable[Any]) -> None:
    """A caller who is not root may not ask for a TCP port below 1024 (auth.Forbidden, HTTP 403). Entries
    the service already has (`but`, the service an update changes) or its group has were granted by root
    and stay allowed."""
    caller = auth.CALLER.get()
    listen = req.get("listen") or []
    if caller is None or caller.privileged or not listen:
        return
    granted = set(but.spec.get("listen") or ()) if but is not None else set()
    group = req.get("instance_of")
    if group:
        granted.update(t for s in services if s.spec.get("instance_of") == group for t in s.spec.get("listen") or ())
    for text in listen:
        entry = model.parse_listen(text)
        if entry.scheme != "unix" and entry.port < 1024 and text not in granted:
            raise auth.Forbidden(f"listen: {text}: ports below 1024 are for root only; choose one from 1024 up")


class Sockets:
    """The sets pmond holds, by key. `event(svc, kind, message, **data)` records an event;
    `services()` gives every service pmond knows (the supervisor's table)."""

    def __init__(self, event: Callable[..., Any], services: Callable[[], Iterable[Any]]) -> None:
        self.sets: dict[str, SocketSet] = {}
        self._event = event
        self._services = services

    def launch(self, svc: Any, env: dict[str, str]) -> tuple[tuple[int, ...], dict[str, str]]:
        """The fds to pass (in `listen` order) and the env with LISTEN_FDS and LISTEN_FDNAMES (LISTEN_PID is
        set in the service's process). Binds what is not held yet (ensure): SpawnError when it cannot."""
        if any(k in env for k in LISTEN_ENV):
            env = {k: v for k, v in env.items() if k not in LISTEN_ENV}
        k = key(svc)
        if k is None:
            if any(svc.id in st.users for st in self.sets.values()):
                self.ensure(svc)  # `listen` was removed: its sockets go
            return (), env
        want = wanted(svc.spec)
        current = self.sets.get(k)
        if current is None or [h.ident for h in current.held] != [ident for _, ident in want]:
            self.ensure(svc)
            current = self.sets[k]
        group = svc.spec.get("instance_of") or svc.name
        names = ":".join(entry.name or group for entry, _ in want)
        return (tuple(h.sock.fileno() for h in current.held),
                dict(env, LISTEN_FDS=str(len(want)), LISTEN_FDNAMES=names))

    def ensure(self, svc: Any) -> None:
        """Make the set `svc` needs hold what its spec asks for now: reuse what is held, take over equal
        sockets from sets nobody wants any more (a renamed service, a scaled one), bind the rest. Raises
        SpawnError (one line) when a bind fails; what was held is then kept."""
        k = key(svc)
        if k is None:
            for st in self.sets.values():
                st.users.discard(svc.id)
            self.collect()
            return
        want = wanted(svc.spec)
        current = self.sets.get(k)
        if current is not None and [h.ident for h in current.held] == [ident for _, ident in want]:
            current.users.add(svc.id)
            return
        live = {key(s) for s in self._services()}
        pool = [(sk, h) for sk, st in self.sets.items() if sk == k or sk not in live for h in st.held]
        reused: list[Held | None] = []
        for _, ident in want:
            found = next(((sk, h) for sk, h in pool if h.ident == ident), None)
            if found is not None:
                pool.remove(found)
            reused.append(found[1] if found is not None else None)
        # A socket of ours on an address that must be bound again (its mode, owner or reuseport changed)
        # would make the bind fail: it goes first.
        for (_, ident), h in zip(want, reused, strict=True):
            if h is None:
                for sk, old in [(sk, o) for sk, o in pool if o.ident[:4] == ident[:4]]:
                    self._drop(sk, old)
                    pool.remove((sk, old))
        identity = _identity(svc.spec)
        bound: list[Held] = []
        try:
            for (entry, ident), h in zip(want, reused, strict=True):
                bound.append(h if h is not None else Held(bind(entry, ident, identity), ident))
        except SpawnError:
            for h in bound:
                if not any(h is r for r in reused):
                    h.sock.close()
            raise
        for h in reused:
            if h is not None:
                for st in self.sets.values():
                    if h in st.held:
                        st.held.remove(h)
        users = ({svc.id} | current.users) if current is not None else {svc.id}
        if current is not None:
            current.close()
        self.sets[k] = SocketSet(bound, users)
        fresh = [entry.address() for (entry, _), h in zip(want, reused, strict=True) if h is None]
        if fresh:
            self._event(svc, "listen", f"listening on {', '.join(fresh)}", listen=fresh)
        self.collect()

    def collect(self) -> None:
        """Close the sets that no service uses any more (stopped, deleted, or `listen` removed): a set is
        kept while a service that should run wants its key, or one that used it still has `listen` (a renamed
        one, until its next start takes it over)."""
        services = [s for s in self._services() if s.desired == "running"]
        live = {key(s) for s in services}
        existing = {s.id for s in services if s.spec.get("listen")}
        for k in list(self.sets):
            st = self.sets[k]
            st.users &= existing
            if (k not in live and not st.users) or not st.held:
                st.close()
                del self.sets[k]

    def _drop(self, k: str, h: Held) -> None:
        st = self.sets[k]
        st.held.remove(h)
        h.sock.close()

    def close(self) -> None:
        for st in self.sets.values():
            st.close()
        self.sets.clear()

    # after a restart of pmond

    def recover(self, services: Iterable[Any]) -> None:
        """Take back the sets of running services (pidfd_getfd); for a set that cannot be taken back, bind
        it again now if its addresses are free, else at the next start. Each outcome is a `listen` event."""
        groups: dict[str, list[Any]] = {}
        for svc in services:
            k = key(svc)
            if k is not None and k not in self.sets:
                groups.setdefault(k, []).append(svc)
        for k, members in groups.items():
            alive = [s for s in members if s.alive and s.pid is not None and s.pidfd is not None]
            if not alive:
                continue  # bound at their next start
            want = wanted(members[0].spec)
            reasons = []
            for svc in alive:
                try:
                    held = take_back(svc.pid, svc.pidfd, want)
                except OSError as exc:
                    reasons.append(f"process {svc.pid}: {exc.strerror or exc}")
                    continue
                except LookupError as exc:
                    reasons.append(f"process {svc.pid} {exc.args[0]}")
                    continue
                self.sets[k] = SocketSet(held, {s.id for s in members})
                self._event(svc, "listen", f"took back {len(held)} listening socket{'s' if len(held) != 1 else ''} "
                            f"from process {svc.pid}", pid=svc.pid)
                break
            else:
                why = "; ".join(reasons)
                try:
                    self.ensure(alive[0])
                except SpawnError as exc:
                    self._event(alive[0], "listen", f"cannot take back the listening sockets ({why}); they are "
                                f"bound again at the next start ({exc.message})", reason=why)
                else:
                    self._event(alive[0], "listen", f"cannot take back the listening sockets ({why}); bound them "
                                "again, as the running process no longer listens on them", reason=why)


def _identity(spec: dict[str, Any]) -> tuple[int, int, list[int]] | None:
    """(uid, gid, groups) to create a service's sockets as, when pmond is root and the service runs as
    another user or group; None: as pmond."""
    user, group = spec.get("user"), spec.get("group")
    if os.geteuid() != 0 or (user is None and group is None):
        return None
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user) if user is not None else pwd.getpwuid(0)
        gid = grp.getgrnam(group).gr_gid if group is not None else pw.pw_gid
    except KeyError:
        raise SpawnError(f"no such user or group: {user if group is None else group}") from None
    if (pw.pw_uid, gid) == (0, 0):
        return None
    return pw.pw_uid, gid, os.getgrouplist(pw.pw_name, gid)


@contextlib.contextmanager
def _acting_as(identity: tuple[int, int, list[int]] | None) -> Iterator[None]:
    """Effective ids (and groups) of the service for the length of the block; pmond's own again after."""
    if identity is None:
        yield
        return
    uid, gid, groups = identity
    saved = (os.getegid(), os.getgroups())
    os.setgroups(groups)
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(saved[0])
        os.setgroups(saved[1])


def backlog() -> int:
    """BACKLOG capped by net.core.somaxconn (the kernel would cap it silently)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(1, min(BACKLOG, int(f.read())))
    except (OSError, ValueError):
        return BACKLOG


def bind(entry: model.Listen, ident: Ident, identity: tuple[int, int, list[int]] | None = None) -> socket.socket:
    """A new listening socket for one entry (close-on-exec); SpawnError with the reason when it cannot be."""
    scheme, host, port, path, mode, reuseport, _ = ident
    family = {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6, "unix": socket.AF_UNIX}[scheme]
    try:
        with _acting_as(identity):
            sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise SpawnError(f"listen: {entry.address()}: {exc.strerror or exc}") from None
    try:
        if scheme == "unix":
            with _acting_as(identity):
                _bind_unix(sock, path, UNIX_MODE if mode is None else mode)
        else:
            # SO_REUSEADDR: bind again at once over the TIME_WAIT connections of a socket pmond held before.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if scheme == "tcp6":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 is a tcp:// entry of its own
            sock.bind((host, port))
        sock.listen(backlog())
    except (OSError, SpawnError) as exc:
        sock.close()
        if isinstance(exc, SpawnError):
            raise
        raise SpawnError(f"listen: {entry.address()}: {_describe(exc, entry, identity)}") from None
    return sock


def _describe(exc: OSError, entry: model.Listen, identity: tuple[int, int, list[int]] | None) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"no interface of this machine has the address {entry.host}"
    if exc.errno == errno.EACCES and entry.scheme != "unix":
        return "permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
    who = f" (as uid {identity[0]})" if identity is not None else ""
    return f"{exc.strerror or exc}{who}"


def _bind_unix(sock: socket.socket, path: str, mode: int) -> None:
    """Bind to `path` (as whoever this process acts as): its directory made if missing, a stale socket file
    replaced; anything else at the path is refused. The file gets `mode` (through the umask: chmod would
    follow a link swapped in after the bind)."""
    if path.startswith("@"):
        sock.bind("\0" + path[1:])  # the abstract namespace: no file
        return
    os.makedirs(os.path.dirname(path) or "/", 0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise SpawnError(f"listen: unix:{path}: the path exists and is {what}; not replaced")
        if _in_use(path):
            raise SpawnError(f"listen: unix:{path}: another process listens on it")
        os.unlink(path)  # a stale socket file (unlink never follows a link)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)


def _in_use(path: str) -> bool:
    """Does a process listen on the unix socket at `path`? Only a refused connection says no."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full backlog must not block pmond: EAGAIN says someone listens
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


# taking sockets back from a running service


_libc: Any = None


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(2): a copy (close-on-exec) of fd `fd` of the process `pidfd` names. Needs ptrace rights
    over it (PTRACE_MODE_ATTACH_REALCREDS): OSError EPERM otherwise, EBADF when it has no such fd."""
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if got < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(got)


def _socket_fds(pid: int, first: list[int]) -> Iterator[int]:
    """The fds of `pid` to look at: `first` (3.., where pmond passed them, so a busy server's thousands of
    connections are seldom listed), then its other sockets."""
    yield from first
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for name in sorted((n for n in names if n.isdigit() and int(n) not in first), key=int):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                yield int(name)
        except OSError:
            continue


def matches(sock: socket.socket, ident: Ident) -> bool:
    """Is `sock` a listening socket on the address and with the options of `ident`?"""
    scheme, host, port, path, _, reuseport, _ = ident
    try:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        if scheme != "unix" and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) != reuseport:
            return False
        name = sock.getsockname()
    except OSError:
        return False
    if scheme == "unix":
        want: Any = ("\0" + path[1:]).encode() if path.startswith("@") else path
        return sock.family == socket.AF_UNIX and name == want
    import ipaddress

    family = socket.AF_INET if scheme == "tcp" else socket.AF_INET6
    return (sock.family == family and name[1] == port
            and ipaddress.ip_address(name[0]) == ipaddress.ip_address(host))


def take_back(pid: int, pidfd: int, want: list[tuple[model.Listen, Ident]]) -> list[Held]:
    """Copies of the listening sockets `want` names, found among the fds of the running process (pinned
    by `pidfd`). Raises OSError when pidfd_getfd is refused, LookupError("holds no ...") when one is
    missing."""
    found: list[Held | None] = [None] * len(want)
    try:
        for fd in _socket_fds(pid, list(range(3, 3 + len(want)))):
            try:
                copy = pidfd_getfd(pidfd, fd)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    continue
                raise
            try:
                sock = socket.socket(fileno=copy)
            except OSError:  # not a socket (ENOTSOCK)
                os.close(copy)
                continue
            for i, (_, ident) in enumerate(want):
                if found[i] is None and matches(sock, ident):
                    found[i] = Held(sock, ident)
                    break
            else:
                sock.close()
            if all(found):
                return [h for h in found if h is not None]
    except BaseException:
        for h in found:
            if h is not None:
                h.sock.close()
        raise
    missing = [entry.address() for (entry, _), h in zip(want, found, strict=True) if h is None]
    for h in found:
        if h is not None:
            h.sock.close()
    raise LookupError(f"holds no listening socket on {', '.join(missing)}")
