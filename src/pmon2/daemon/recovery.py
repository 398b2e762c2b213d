"""What the processes on this machine say about pmond's services, for recovery at start-up.

Every service's processes carry `PMON2_SERVICE=<instance id>:<service id>:<tag>` (set when it is
launched, overwriting an inherited value), so pmond can find them without its database: to refuse a
database that does not know services that still run (emptied, truncated, or rolled back by a lost
`-wal`), to stop the leftovers of a deleted service, and, for `pmon2 daemon recover`, to rebuild the
database from them.

The instance id is no secret (a hash of pmond's uid and data dir: anyone can compute it), so the tag
authenticates the marker: a keyed BLAKE2b of the instance id, the service id and the uid the service runs
as, under a key only pmond reads (<data dir>/marker.key, 0600, made at the first start: load_key). A
process of another user with a made-up marker, or a service's own marker copied onto a process of
another uid (a set-user-ID program run with it), carries no marker as far as pmond is concerned: it can
neither make pmond refuse to start (a "lost" service), nor be stopped as a leftover, followed as a
successor, or rebuilt into a service. A service's own user can read its marker and copy it onto its own
processes, which pmond may then take as the service's: nothing that user could not do to them itself.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field

from pmon2 import procfs
from pmon2.errors import PmonError

try:  # the built-in BLAKE2, not hashlib: importing hashlib loads OpenSSL (3.4 MB of pmond's memory)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - an interpreter built without it
    from hashlib import blake2b
from _operator import _compare_digest as same_bytes  # hmac.compare_digest, without importing hashlib

MARKER = b"PMON2_SERVICE="
KEY_FILE = "marker.key"  # in the data dir
KEY_BYTES = 32
TAG_BYTES = 12  # 96 bits: 24 hex digits in each marker


class Instance(str):
    """This pmond's instance id (the str itself: supervisor.instance_id, 16 hex digits) with `key`, the
    secret its markers are signed with (load_key; set in place by startup_recovery.recover, so that every
    holder of the object sees it). What marker_value, marker_of and marked_processes take as `instance_id`:
    with no key (empty, or a plain str) no marker verifies, and none made is signed."""

    key: bytes

    def __new__(cls, value: str, key: bytes) -> Instance:
        self = super().__new__(cls, value)
        self.key = key
        return self


def tag(key: bytes, instance_id: str, sid: int, uid: int) -> str:
    """The tag of service `sid`'s marker for a process running as `uid`: TAG_BYTES of keyed BLAKE2b, in hex."""
    return blake2b(f"{instance_id}:{sid}:{uid}".encode(), key=key, digest_size=TAG_BYTES,
                   person=b"pmon2-marker").hexdigest()


def marker_value(instance_id: str, sid: int, uid: int) -> str:
    """PMON2_SERVICE's value for service `sid` run as `uid`: "<instance id>:<sid>:<tag>". Computed in
    memory (no I/O: a restart after a crash launches at once). Without a key (a plain str), just
    "<instance id>:<sid>", which never verifies."""
    key = getattr(instance_id, "key", None)
    return f"{instance_id}:{sid}:{tag(key, instance_id, sid, uid)}" if key else f"{instance_id}:{sid}"


def process_uid(pid: int, proc: str = "/proc") -> int | None:
    """The one uid process `pid` runs as: its real, effective and saved uids (/proc/PID/status) when all
    three are equal, else None (a set-user-ID program: its caller's real uid, another effective one), as
    when it is gone. Unlike the owner of /proc/PID, right for a process that made itself non-dumpable."""
    data = procfs._read(f"{proc}/{pid}/status")
    if not data:
        return None
    for line in data.split(b"\n"):
        if line.startswith(b"Uid:"):
            ids = line.split()[1:4]
            return int(ids[0]) if len(ids) == 3 and len(set(ids)) == 1 and ids[0].isdigit() else None
    return None


def marker_of(pid: int, instance_id: str, proc: str = "/proc") -> int | None:
    """The service id in this pmond's marker in a process's environment, or None: no marker of this
    pmond's, or one whose tag does not verify: not made with `instance_id.key` for that service id and
    the uid the process runs as (process_uid). A plain str `instance_id` (no key) verifies none."""
    key = getattr(instance_id, "key", None)
    if not key:
        return None
    prefix = MARKER + instance_id.encode() + b":"
    try:
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    value = next((e[len(prefix):] for e in data.split(b"\0") if e.startswith(prefix)), None)
    if value is None:
        return None
    sid, _, got = value.partition(b":")
    if not (sid.isascii() and sid.isdigit() and len(sid) <= 18 and len(got) == 2 * TAG_BYTES):
        return None
    uid = process_uid(pid, proc)  # read after the marker: few processes carry one
    if uid is None or not same_bytes(got, tag(key, instance_id, int(sid), uid).encode()):
        return None
    return int(sid)


def load_key(data_dir: str) -> bytes:
    """This pmond's marker key: KEY_BYTES random bytes in <data dir>/marker.key, made (and synced to disk)
    at the first start, before any service can be launched with it, and never changed: a new key would
    disown the markers of every process already running. Raises PmonError (one line) when the file cannot
    be read or made, is not a regular file of pmond's own user with no access for group or others (whoever
    reads it can forge markers), or is damaged."""
    path = os.path.join(os.fspath(data_dir), KEY_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return _make_key(path)
    except OSError as exc:
        raise PmonError(f"cannot read the marker key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PmonError(f"the marker key {path} must be a regular file owned by pmond's user with mode "
                            f"0600 (it is {stat.filemode(st.st_mode)}, uid {st.st_uid})")
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise PmonError(f"the marker key {path} is damaged ({len(data)} bytes, not {KEY_BYTES}); remove it to "
                        "make a new one (running services are then known by the database alone until restarted)")
    return data


def _make_key(path: str) -> bytes:
    """A new key, written whole under a temporary name, synced, then linked into place (link: a key made
    meanwhile by someone else is read, never overwritten) and the directory synced."""
    key = os.urandom(KEY_BYTES)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_key(os.path.dirname(path))
        finally:
            os.unlink(tmp)
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise PmonError(f"cannot make the marker key {path}: {exc.strerror}") from None
    return key


def marked_processes(instance_id: str, proc: str = "/proc") -> dict[int, list[int]]:
    """{service id: [pids]} of the live (not zombie) processes whose environment carries this pmond's
    marker, verified (marker_of). Reads every /proc/PID/environ that pmond may read: at start-up, and on `del`."""
    found: dict[int, list[int]] = {}
    for pid in procfs.pids(proc):
        sid = marker_of(pid, instance_id, proc)
        if sid is None:
            continue
        st = procfs.read_stat(pid, proc)
        if st is not None and st.alive:
            found.setdefault(sid, []).append(pid)
    return found


def main_process(pids: list[int], proc: str = "/proc") -> int | None:
    """The service's main process among its marked ones: the leader of its own process group (each
    service is started as one), else the oldest."""
    stats = [st for st in (procfs.read_stat(p, proc) for p in pids) if st is not None and st.alive]
    leaders = [st for st in stats if st.pgrp == st.pid]
    pick = leaders or stats
    return min(pick, key=lambda st: st.starttime).pid if pick else None


@dataclass
class Rebuilt:
    """A service as its running process shows it, and what could not be learnt from it."""

    pid: int
    start_ticks: int
    argv: list[str]
    exe: str
    cwd: str
    env: dict[str, str]
    user: str | None
    out_log: str | None
    err_log: str | None
    missing: list[str] = field(default_factory=list)


def rebuild(pid: int, proc: str = "/proc") -> Rebuilt | None:
    """Read back a service's spec from its process: argv, exe, cwd, env, user and the files behind its
    stdout and stderr. None when the process is gone or unreadable."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="surrogateescape") for a in fh.read().split(b"\0")[:-1]]
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            pairs = [e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e]
        exe = os.readlink(f"{proc}/{pid}/exe")
        cwd = os.readlink(f"{proc}/{pid}/cwd")
    except OSError:
        return None
    # The uid its marker was verified for, not the owner of /proc/PID (root for a non-dumpable process).
    uid = process_uid(pid, proc)
    if uid is None:
        return None
    st = procfs.read_stat(pid, proc)
    if st is None or not st.alive or not argv:
        return None
    env = {k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape") for k, v in pairs
           if k != MARKER[:-1]}
    logs: list[str | None] = []
    for fd in (1, 2):
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{fd}")
        except OSError:
            target = None
        logs.append(target if target and target.startswith("/") and not target.endswith(" (deleted)") else None)
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    if uid == os.geteuid():
        user = None  # pmond's own user: stored as null, as `run` without --user stores it
    missing = ["name (taken from the launch record or made up)", "autorestart", "min_uptime", "kill_timeout",
               "stop_signal", "log rotation settings", "restart count and exit history"]
    if logs[0] is None or logs[1] is None:
        missing.append("log paths")
    return Rebuilt(pid, st.starttime, argv, exe.removesuffix(" (deleted)"), cwd, env, user, logs[0], logs[1],
                   missing)
