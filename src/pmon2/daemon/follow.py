"""Following a service's successor process instead of counting a crash (issue 13, parts 1 and 2).

When a service's main process exits, pmond normally counts a crash, kills what is left of its process
group and starts it again. It follows a successor instead in exactly these cases (systemd's rules where it
has them):

- **the reload window**: from `reload` until `reload_timeout` (default 30 s) after it. Graceful-restart
  libraries (Go's grace, tableflip, endless; unicorn, puma; nginx's binary upgrade) fork and exec a new copy
  on the signal, hand it the listening socket, and the old copy exits. Inside the window pmond looks at the
  main's children (`/proc/PID/task/*/children`) and holds a pidfd on each, so a child that calls setsid
  and is reparented to init is not lost: every POLL_S (10 ms) for the first POLL_FAST_S (0.5 s), when such
  libraries fork, then less and less often, up to every POLL_MAX_S (0.25 s) (`poll_delay`). The looking
  stops once a child started since the signal is held and alive (`Window.settled`: what the reload forked
  is pinned; nginx's new workers after a HUP, a new copy waiting for the old one to drain) and resumes if
  that child exits. A successor forked later, whose parent exits before the next look, is still found:
  by the old main's session and group, by its marker, or by its executable (below); only one that left
  the session, rewrote its environment and runs another executable needs the pidfd. The window closes at
  the handover, at its deadline, or when the service stops or starts again, and the polling with it. A
  main killed inside it by SIGKILL or a fault (`crashed`) is a crash: its workers are no successor.
- **`MAINPID=`** (sd_notify, daemon/notify.py) and **a pid file** (`pidfile`, systemd's `PIDFile=`): the
  pid they name is accepted only if that process belongs to the service (`Follower.membership`, systemd's
  rule) and then handed over to (`Supervisor._claim_main_pid`).
- **Type=forking** (`pidfile` set): the launched process is expected to exit 0; the pid in the file is then
  the service. A pid file written after that exit (nginx writes it from the forked master) is waited for,
  up to `reload_timeout`, while pmond follows the topmost descendant.
- **the daemonize pattern**, without `pidfile`: the launched process exits 0 within the start window
  (`min_uptime`, at least DAEMONIZE_WINDOW_MIN = 1 s) and leaves live descendants. pmond follows the topmost
  of them (nginx's master, not a worker), and `desc` and `why` say so and suggest `--pidfile` or the
  program's foreground flag. During that start window pmond looks at the launched process's children on
  the reload window's schedule, recording each by pid and start time (`Follower.launched`, no pidfd).

Any other exit of the main process is a crash, as before. A handover starts nothing and kills nothing and
leaves `restarts` as it was (Supervisor._hand_over).

The successor is the topmost live process among the old main's descendants. Without a cgroup per service
(none yet: the seam is `procfs.cgroup_pids`), pmond knows them by (`find_successor`):
- the children held by pidfd during a reload window, or seen during the start window (pid and start time);
- the session or process group of the old main (a child that did not call setsid);
- the PMON2_SERVICE=<instance id>:<service id> marker every process of a service inherits (recovery.py);
- for a process that rewrote its environment (nginx overwrites it with its process title, marker and all):
  an orphan (its parent is a reaper) running the main's executable, whose environment area was overwritten
  (`rewrote_environment`), started after pmond's last look at the main's children while it still looked
  (`Follower._exe_since`): anything older that was the main's child would have been held or seen.
Every one of them must run as the service's uid and have started after the old main. Among them the
topmost wins (its parent is not one of them); in a reload window those started after the signal come
first (nginx's binary upgrade starts the new master at USR2, and the old one exits at a later QUIT, in a
window of its own: then the topmost of all wins); ties go to the oldest.

A successor that stays in the old main's process group (it did not call setsid) leads no group: pmond keeps a
pidfd on the group's leader (the old main, even reaped) so that stop signals that group through the pidfd,
never by a number that may be reused (`Follower.group`).

Limitations: a daemon that double-forks (its group's leader, the intermediate child, is gone before pmond
sees it) and leads no group is stopped by signalling it alone. Outside a reload window a daemon found neither
by marker, session nor executable (started through a shell script, say) needs `--pidfile`. With pmond as
subreaper on a kernel before 6.15 an exit status can be gone before pmond reads it: the daemonize pattern,
which needs exit code 0, is then not recognised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pmon2 import procfs
from pmon2.daemon import recovery, sockets, watch
from pmon2.daemon.policy import Status
from pmon2.errors import BadRequest, SpawnError
from pmon2.signals import parse_signal
from pmon2.spec import PID_MAX

if TYPE_CHECKING:
    from pmon2.daemon.supervisor import Service, Supervisor

log = logging.getLogger("pmond")

POLL_S = 0.01  # how often a reload window looks at the main's children at first (the issue: 10 ms at most)
POLL_FAST_S = 0.5  # that long after the signal; then each interval is POLL_GROWTH times the last ...
POLL_GROWTH = 1.5
POLL_MAX_S = 0.25  # ... up to this: 4 looks a second for the rest of a window that hands nothing over
SETTLED_S = 1.0  # a settled window checks this often (a poll(2) per pidfd, no /proc) that its child lives
HELD_MAX = 128  # pidfds held per reload window (a prefork server's workers are children too)
REGROUP_LOOKS_S = (0.05, 0.25, 1.0)  # after a handover to a main that leads no group: when to read its group again
DAEMONIZE_WINDOW_MIN = 1.0  # the start window of the daemonize pattern: min_uptime, at least this, seconds
PIDFILE_MAX = 4096  # bytes; a pid file is a line with a number
PIDFILE_POLL_S = 0.02  # how often a pid file not yet written is read again
RETIRED_KEPT = 8  # processes a service retired (Follower.retiring), remembered per service
# What `reload --wait` says when nothing was handed over: a plain signal reloads in place, with no end to see.
IN_PLACE = "a reload in place, such as nginx's HUP, has nothing to wait for: omit --wait"
GONE = "the process has exited"  # a refusal that says nothing of the process: it cannot be looked at any more

# The foreground switch of programs that daemonize by default: what `why` suggests.
FOREGROUND = {
    "nginx": "nginx -g 'daemon off;'", "redis-server": "redis-server --daemonize no",
    "php-fpm": "php-fpm --nodaemonize", "haproxy": "haproxy -db (no -D)", "sshd": "sshd -D",
    "httpd": "httpd -DFOREGROUND", "apache2": "apache2 -DFOREGROUND", "memcached": "memcached (no -d)",
    "dnsmasq": "dnsmasq --keep-in-foreground", "postfix": "postfix start-fg", "uwsgi": "uwsgi (no --daemonize)",
    "gunicorn": "gunicorn (no --daemon)", "squid": "squid -N", "vsftpd": "vsftpd (background=NO)",
}


@dataclass
class Handover:
    """How a reload window ended: a handover (ok), or why there was none."""

    ok: bool
    message: str
    from_pid: int | None = None
    pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "message": self.message, "from_pid": self.from_pid, "pid": self.pid}


@dataclass
class Window:
    """A reload window: from `reload` until its deadline (loop time), on the main process `main`."""

    svc_id: int
    main: int
    deadline: float
    timeout: float
    since_ticks: int  # clock ticks after boot when it opened: a successor starts after it
    result: asyncio.Future[Handover]
    held: dict[int, int] = field(default_factory=dict)  # pid -> pidfd of the main's children (and theirs)
    ticks: dict[int, int] = field(default_factory=dict)  # pid -> start ticks of those of `held`
    fresh: set[int] = field(default_factory=set)  # those of `held` started since the signal
    looked: int | None = None  # boot ticks of the last look at the main's children (_hold_children)
    task: asyncio.Task[None] | None = None

    def settled(self) -> bool:
        """Whether looking at the main's children has done its work: a child started since the signal (what
        the reload forked) is held and still alive, or HELD_MAX are held."""
        return len(self.held) >= HELD_MAX or any(not watch.has_exited(self.held[pid]) for pid in self.fresh)

    def live(self) -> dict[int, int]:
        """pid -> start ticks of the held processes that have not exited: while a pidfd shows its process
        alive, the number is that process's (after its exit it may be reused)."""
        return {pid: self.ticks[pid] for pid, fd in self.held.items() if not watch.has_exited(fd)}


@dataclass
class Track:
    """What pmond knows of a service's current main process `main`, beyond the Service row."""

    main: int
    session: int
    pgrp: int
    handed: bool = False  # came from a handover: the daemonize pattern and Type=forking are a launch's alone
    leader_fd: int | None = None  # pidfd of its group's leader, when it leads no group of its own
    known: dict[int, int] = field(default_factory=dict)  # pid -> start ticks of those found at the last handover
    # The start window (Follower.launched): the launched process's children seen by its looks, as pid ->
    # start ticks, the boot ticks of the last look, and the task that looks.
    seen: dict[int, int] = field(default_factory=dict)
    looked: int | None = None
    start_task: asyncio.Task[None] | None = None
    window: Window | None = None
    followed: dict[str, Any] | None = None  # for desc and why
    pattern: str | None = None  # set just before a handover: "daemonize" or "forking"
    pidfile_task: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self.leader_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.leader_fd)
            self.leader_fd = None
        if self.pidfile_task is not None:
            self.pidfile_task.cancel()
            self.pidfile_task = None
        if self.start_task is not None:
            self.start_task.cancel()
            self.start_task = None


def boot_ticks() -> int:
    """Now, in the clock ticks after boot of /proc/PID/stat's starttime (CLOCK_BOOTTIME)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * procfs.CLOCK_TICKS)


def parse_pid(text: str) -> int | None:
    """A pid as MAINPID= or a pid file gives it: ASCII digits, 2 to spec.PID_MAX (pid 1 is init, never a
    service's process); None otherwise."""
    return int(text) if text.isascii() and text.isdigit() and 1 < int(text) <= PID_MAX else None


def uid_of(pid: int, proc: str = "/proc") -> int | None:
    """The uid a process runs as (the owner of /proc/PID: its effective uid), None if gone."""
    try:
        return os.stat(f"{proc}/{pid}").st_uid
    except OSError:
        return None


def file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def topmost(members: dict[int, procfs.Stat], since_ticks: int | None = None) -> int | None:
    """The topmost of a set of processes: one whose parent is not in the set; with `since_ticks`, only
    those started at or after it count. Ties go to the oldest (then the lowest pid)."""
    tops = [st for st in members.values() if st.ppid not in members
            and (since_ticks is None or st.starttime >= since_ticks)]
    return min(tops, key=lambda st: (st.starttime, st.pid)).pid if tops else None


def pmonds_own(st: procfs.Stat) -> bool:
    """Whether process `st` is in pmond's own session: pmond's launcher and the intermediates it forks
    ahead of launches. No service process can be (each service is launched in a session of its own, and
    setsid(2) cannot join an existing session); and a service run by the same interpreter as pmond must
    never take them for its daemonized successor, which they resemble (same executable and uid, started
    after the service, parent older than it)."""
    return st.session == os.getsid(0)


def carries_marker(pid: int, proc: str = "/proc") -> bool | None:
    """Whether process `pid`'s environment holds a PMON2_SERVICE marker, of any pmond and any service;
    None when it cannot be read."""
    try:
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return data.startswith(recovery.MARKER) or b"\0" + recovery.MARKER in data


ENV_ENTRY = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*=")


def rewrote_environment(pid: int, proc: str = "/proc") -> bool:
    """Whether process `pid` overwrote its environment area, as nginx and setproctitle(3)-style libraries do
    with the process title: the area the kernel laid out at exec is not empty, yet does not begin with a
    NAME=value entry (it begins with the title's tail or NULs). A process that merely runs with an empty or
    a different environment (a stranger, a cron job) did not: it is no daemon of the service's that lost
    its marker that way."""
    try:
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            head = fh.read(256)
    except OSError:
        return False
    return bool(head) and ENV_ENTRY.match(head) is None


@dataclass
class Kin:
    """What the one rule of "is this process part of the service" compares a process with (`check`): the
    service's uid and marker (pmond's instance id, the service id), its main process with that process's
    session and process group, processes known to be the service's (held by a reload window, seen by a
    start window, found at the last handover: pid -> start ticks, as a pid alone may have been reused since),
    and the other services' main processes (pid -> name), which are never the service's."""

    uid: int
    marker: tuple[str, int]
    main: int | None = None
    session: int | None = None
    pgrp: int | None = None
    known: Mapping[int, int] = field(default_factory=dict)  # pid -> start ticks
    others: dict[int, str] | Callable[[], dict[int, str]] = field(default_factory=dict)  # or made when needed
    proc: str = "/proc"
    _below: Collection[int] | None = None

    def other_mains(self) -> dict[int, str]:
        if callable(self.others):  # a notify datagram from the main itself never needs them
            self.others = self.others()
        return self.others

    def below_main(self) -> Collection[int]:
        """The main's live descendants, read once per Kin (procfs.descendants)."""
        if self._below is None:
            self._below = procfs.descendants([self.main], proc=self.proc) if self.main else {}
        return self._below

    def check(self, pid: int, *, uid: int | None = None, sender: bool = False,
              st: procfs.Stat | None = None) -> tuple[procfs.Stat | None, str | None]:
        """(its stat, None) when process `pid` is the service's, else (stat or None, why not); why is GONE
        when it has exited and nothing tells whether it was the service's. The rule (systemd's, for a
        service without a cgroup of its own): it runs as the service's uid; it is not pmond nor init nor
        another service's main process; and it is the main process, a process known to be the service's
        (the same pid and start time), in the main's session or process group, a descendant of the main
        through the ppid links, or it carries the service's PMON2_SERVICE marker. An exited process counts
        by the first four only (its links and environment are gone). `uid`: the kernel's word for it
        (SCM_CREDENTIALS), else /proc's owner.

        `sender` is the one looser variant: an sd_notify datagram may come from root too (a setuid helper
        of the service, or root speaking for it, as systemd's NotifyAccess= allows); it only speaks for the
        service. A pid that becomes the main process (MAINPID=, a pid file) must run as the service's uid."""
        if uid is not None and uid != self.uid and not (sender and uid == 0):
            return st, f"process {pid} runs as uid {uid}, not as the service's uid {self.uid}"
        if pid <= 1:
            return st, f"process {pid} is not a process of the service"
        st = st or procfs.read_stat(pid, self.proc)
        if st is None:
            return None, GONE
        if uid is None and (owner := uid_of(pid, self.proc)) != self.uid:
            return st, f"process {pid} runs as uid {owner}, not as the service's uid {self.uid}"
        if pid == self.main:
            return st, None
        if pid == os.getpid() or pmonds_own(st):
            return st, f"process {pid} is not a process of the service"
        if pid in self.other_mains():
            return st, f"process {pid} is the main process of service {self.other_mains()[pid]}"
        if self.known.get(pid) == st.starttime or (self.session is not None and st.session == self.session) \
                or (self.pgrp is not None and st.pgrp == self.pgrp):
            return st, None
        if not st.alive:
            return st, GONE
        if pid in self.below_main() or recovery.marker_of(pid, self.marker[0], self.proc) == self.marker[1]:
            return st, None
        main = f"its main process {self.main}" if self.main else "a main process (none runs)"
        return st, (f"process {pid} is not a process of the service (not {main} nor a descendant of it, not in "
                    "its session or process group, and without its PMON2_SERVICE marker)")


def find_successor(kin: Kin, *, since_ticks: int, exe: tuple[int, int] | None = None,
                   until_ticks: int | None = None, exe_since: int | None = None, reapers: Collection[int] = (1,),
                   prefer_since: int | None = None) -> tuple[int | None, dict[int, procfs.Stat]]:
    """(the topmost live descendant of an exited main process, every descendant found), by the rules of the
    module's docstring: the live processes started at or after `since_ticks` (the old main's start) that
    `kin` (the old main's) takes as the service's; and, looser, since the main has exited and its links
    are gone, when `exe` ((st_dev, st_ino) of the main's executable) is given, an orphan of the main: a
    process of the service's uid running that executable, started between `exe_since` (default
    `since_ticks`; Follower._exe_since gives the last look at the main's children) and `until_ticks` (the
    main's exit), whose parent is one of `reapers` (the pids that adopt the main's orphans: init, a
    subreaper), that carries no PMON2_SERVICE marker at all (ours would have let `kin` take it; another
    service's or another pmond's makes it theirs) and did overwrite its environment (rewrote_environment),
    and is not in pmond's own session. That is for a daemon that rewrote its
    environment and with it its marker (nginx); the same interpreter runs many other programs (every
    Python service, every pmon2 command), hence each condition. `prefer_since`: in a reload window,
    those started after the signal come first (a copy forked at the signal, rather than a helper the old
    main had all along). Reads /proc once: a stat per process, more only for the few started since."""
    found: dict[int, procfs.Stat] = {}
    exe_since = since_ticks if exe_since is None else max(exe_since, since_ticks)
    for pid in procfs.pids(kin.proc):
        st = procfs.read_stat(pid, kin.proc)
        if st is None or not st.alive or st.starttime < since_ticks:
            continue
        orphan = exe is not None and st.starttime >= exe_since \
            and (until_ticks is None or st.starttime <= until_ticks) and st.ppid in reapers
        if kin.check(pid, st=st)[1] is None or (
                orphan and not pmonds_own(st) and pid not in kin.other_mains()
                and file_id(f"{kin.proc}/{pid}/exe") == exe and uid_of(pid, kin.proc) == kin.uid
                and carries_marker(pid, kin.proc) is False and rewrote_environment(pid, kin.proc)):
            found[pid] = st
    top = topmost(found, prefer_since) if prefer_since is not None else None
    return (top if top is not None else topmost(found)), found


def poll_delay(elapsed: float, last: float) -> float:
    """The wait before a reload window's next look at the main's children, `elapsed` seconds after the
    signal, the last wait having been `last` seconds: POLL_S for POLL_FAST_S, then growing by POLL_GROWTH
    per look up to POLL_MAX_S."""
    if elapsed < POLL_FAST_S:
        return POLL_S
    return min(max(last, POLL_S) * POLL_GROWTH, POLL_MAX_S)


def start_look_delay(last: float) -> float:
    """The wait before the start window's next look at a launched process's children, the last wait having
    been `last` seconds (0 at the launch): POLL_S, then doubling (10, 20, 40 ... ms: 7 looks in a 1 s
    window). Every launch has a start window, 1,000 of them at once when a file is applied: a reload
    window's 10 ms schedule there doubled pmond's CPU (bench/apply.py, 1,000 services: 0.69 s -> 1.41 s).
    The span in which an orphan may be taken by its executable (Follower._exe_since) stays at most half
    the time since the launch; a daemon's parent (nginx's) exits within milliseconds of the fork."""
    return POLL_S if last <= 0 else last * 2


# Deaths that end no reload: SIGKILL (the OOM killer, a user) and the faults that dump core. A reload's own
# end (the old copy exits, or is stopped by its successor with SIGTERM, SIGQUIT, ...) is none of them.
CRASH_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL,
                           signal.SIGFPE, signal.SIGSYS, signal.SIGTRAP, signal.SIGXCPU, signal.SIGXFSZ})


def crashed(status: watch.ExitStatus, spec: dict[str, Any]) -> bool:
    """Whether an exit inside a reload window is a crash, not the end of a reload: a death by one of
    CRASH_SIGNALS or with a core dump, unless by the service's own stop or reload signal (`spec`)."""
    if status.signal is None or not (status.core or status.signal in CRASH_SIGNALS):
        return False
    own = set()
    for key in ("stop_signal", "reload_signal"):
        with contextlib.suppress(BadRequest):
            if spec.get(key):
                own.add(int(parse_signal(spec[key])))
    return status.signal not in own


def pin(pid: int, starttime: int | None = None) -> int | None:
    """A pidfd on `pid` if it is alive (and started at `starttime`), opened first so that the checks
    after it cannot race a reuse of the number."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    st = procfs.read_stat(pid)
    if st is None or not st.alive or (starttime is not None and st.starttime != starttime) or watch.has_exited(fd):
        os.close(fd)
        return None
    return fd


class Refused(str):
    """A pid file refused for what it is (a link, a FIFO, too large, another user's), not merely not written
    yet: recorded once, never read again for this start."""


def read_pidfile(path: str, uid: int) -> int | str:
    """The pid a pid file names, or why not (a line for the ledger, never the file's content; a Refused one
    when the file is refused for what it is). The file may be written by the service's user, who is not
    trusted: opened with O_NOFOLLOW (a symlink is refused) and O_NONBLOCK (a FIFO cannot block pmond), it
    must be a regular file of at most PIDFILE_MAX bytes owned by `uid` (the service's: root only for a root
    service), whose first line is a pid (systemd reads the first line too). Missing, empty or not yet a
    number: a daemon may be writing it. The caller runs this as the service's user
    (Follower._read_pidfile), so that a file that user could not read is never read."""
    try:
        # O_PATH first: opening a device for reading can act (a watchdog device arms, a tape rewinds), and
        # a service's user chooses the path; only a regular file is opened for reading, through this fd.
        where = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"pid file {path} does not exist"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Refused(f"pid file {path} is a symbolic link: refused")
        return f"pid file {path} cannot be read: {exc.strerror}"
    fd = -1
    try:
        st = os.fstat(where)
        if stat.S_ISLNK(st.st_mode):  # O_PATH | O_NOFOLLOW opens the link itself
            return Refused(f"pid file {path} is a symbolic link: refused")
        if not stat.S_ISREG(st.st_mode):
            return Refused(f"pid file {path} is not a regular file: refused")
        if st.st_size > PIDFILE_MAX:
            return Refused(f"pid file {path} is larger than {PIDFILE_MAX} bytes: refused")
        if st.st_uid != uid:
            return Refused(f"pid file {path} belongs to uid {st.st_uid}, not to the service's user: refused")
        fd = os.open(f"/proc/self/fd/{where}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        data = os.read(fd, PIDFILE_MAX + 1)
    except OSError as exc:
        return f"pid file {path} cannot be read: {exc.strerror}"
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(where)
    line = data.split(b"\n", 1)[0].strip()
    pid = parse_pid(line.decode("ascii", "replace"))
    if pid is None:
        return f"pid file {path} does not hold a pid" if line else f"pid file {path} is empty"
    return pid


def foreground_hint(exe: str) -> str:
    name = os.path.basename(exe)
    flag = FOREGROUND.get(name)
    how = f"run it in the foreground ({flag})" if flag else "run it in the foreground (its no-daemon flag)"
    return f"{how}, or give --pidfile so that pmon2 knows which process is the service"


class Follower:
    """The per-service state of following (Track), the reload windows, and the decisions at a main
    process's exit. Calls back into the supervisor only through _hand_over, _claim_main_pid, _event and
    services: the supervisor's glue stays a few lines."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.tracks: dict[int, Track] = {}
        self.results: dict[int, Handover] = {}  # the last reload window's outcome, per service
        # (pid, start ticks) of the processes each service retired, newest last (retiring, retired)
        self.former: dict[int, collections.deque[tuple[int, int]]] = {}
        # (user, group) of a spec -> the ids its pid file is read as (_read_pidfile); None: as pmond
        self._identities: dict[tuple[str | None, str | None], tuple[int, int, list[int]] | None] = {}

    def marker(self, svc: Service) -> tuple[str, int]:
        return self.sup.instance_id, svc.id

    def track(self, svc: Service) -> Track:
        """The state of the service's current main process; a new one once the main has changed. A launched
        process leads its own process group (in the session of the intermediate that started it); one that
        does not was handed over to before a restart of pmond: its group's leader is pinned again if it is
        still there."""
        tr = self.tracks.get(svc.id)
        if tr is None or tr.main != svc.pid:
            if tr is not None:
                self._end_window(tr, Handover(False, f"{svc.name} was started again", tr.main))
                tr.close()
            pid = svc.pid or 0
            tr = self.tracks[svc.id] = Track(main=pid, session=pid, pgrp=pid)
            st = procfs.read_stat(pid) if pid else None
            if st is not None:
                tr.session = st.session
                if st.pgrp != pid:
                    tr.pgrp, tr.handed, tr.leader_fd = st.pgrp, True, self._pin_leader(st.pgrp)
        return tr

    def forget(self, svc_id: int) -> None:
        tr = self.tracks.pop(svc_id, None)
        if tr is not None:
            self._end_window(tr, Handover(False, "the service was deleted"))
            tr.close()
        self.results.pop(svc_id, None)
        self.former.pop(svc_id, None)
        self._drop_window_record(svc_id)

    # the reload window

    def open_window(self, svc: Service) -> Window:
        """Open a reload window on the service's main process, before the signal is sent (a child forked
        at once is seen). A window still open is closed first."""
        tr = self.track(svc)
        self._end_window(tr, Handover(False, "a newer reload took over"))
        loop = asyncio.get_running_loop()
        timeout = float(svc.spec.get("reload_timeout", 30.0))
        win = Window(svc_id=svc.id, main=tr.main, deadline=loop.time() + timeout, timeout=timeout,
                     since_ticks=boot_ticks() - 1, result=loop.create_future())
        tr.window = win
        self._record_window(svc, win)
        win.task = loop.create_task(self._poll(svc, tr, win))
        return win

    def close_window(self, svc: Service, message: str) -> None:
        tr = self.tracks.get(svc.id)
        if tr is not None:
            self._end_window(tr, Handover(False, message, tr.main))

    def reloaded(self, svc: Service, message: str) -> None:
        """The service said its reload in place is complete (sd_notify RELOADING=1, then READY=1): the reload
        window ends with success (`reload --wait` returns `message`), and an exit of the main process from
        now on is a crash again, not a handover."""
        tr = self.tracks.get(svc.id)
        if tr is not None and tr.window is not None and tr.main == svc.pid:
            self._end_window(tr, Handover(True, message, tr.main, tr.main))

    async def wait(self, win: Window, timeout: float) -> Handover:
        """Until the window `win` ends (a handover, or why none), `timeout` seconds at most."""
        remaining = win.deadline - asyncio.get_running_loop().time()
        if timeout >= remaining:
            timeout = remaining + 1.0  # the window closes first, with its own reason
        try:
            return await asyncio.wait_for(asyncio.shield(win.result), timeout)
        except TimeoutError:
            return Handover(False, f"no handover within {timeout:g} s: pid {win.main} still serves (pmond follows "
                            f"one until reload_timeout, {win.timeout:g} s after the reload; {IN_PLACE})", win.main)

    async def _poll(self, svc: Service, tr: Track, win: Window) -> None:
        """The window's life: look at the main's children on poll_delay's schedule until Window.settled
        (then only check, every SETTLED_S, that it still is), and close the window at its deadline or once
        the main is not the service's any more. Its pidfds are released at the end."""
        loop = asyncio.get_running_loop()
        opened, delay = loop.time(), 0.0
        try:
            while not win.result.done():
                if svc.pid != win.main or not svc.alive:
                    self._finish(win, Handover(False, f"process {win.main} is no longer {svc.name}'s main "
                                               "process", win.main))
                    return
                now = loop.time()
                if now >= win.deadline:
                    self._finish(win, Handover(False, f"no handover within {win.timeout:g} s: pid {win.main} still "
                                               f"serves ({IN_PLACE})", win.main))
                    return
                if not win.settled():
                    self._hold_children(win)
                if win.settled():
                    wait = SETTLED_S
                else:
                    wait = delay = poll_delay(now - opened, delay)
                await asyncio.sleep(min(wait, win.deadline - now))
        finally:
            self._release(win)

    def _hold_children(self, win: Window) -> None:
        """Pin the main's children and theirs (and those of the children already held, which may have left
        the main for a reaper) with pidfds: after the main exits their link to it is gone. Records when it
        looked (`Window.looked`, before reading: a process started since may have been missed)."""
        if len(win.held) >= HELD_MAX:
            return
        win.looked = boot_ticks()
        for child, st in procfs.descendants([win.main, *win.held], HELD_MAX).items():
            if child in win.held:
                continue
            if len(win.held) >= HELD_MAX:
                return
            fd = pin(child, st.starttime)  # pinned, and the same process that was found under the main
            if fd is not None:
                win.held[child] = fd
                win.ticks[child] = st.starttime
                if st.starttime >= win.since_ticks:
                    win.fresh.add(child)

    @staticmethod
    def _release(win: Window) -> None:
        for fd in win.held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        win.held.clear()
        win.ticks.clear()
        win.fresh.clear()

    def _finish(self, win: Window, outcome: Handover) -> None:
        if win.result.done():
            return
        win.result.set_result(outcome)
        self._drop_window_record(win.svc_id)
        self.results[win.svc_id] = outcome
        tr = self.tracks.get(win.svc_id)
        if tr is not None and tr.window is win:
            tr.window = None

    def _end_window(self, tr: Track, outcome: Handover) -> None:
        """Close the track's window, if open, with `outcome`; its polling stops and its pidfds are closed."""
        win, tr.window = tr.window, None
        if win is not None:
            self._finish(win, outcome)
            if win.task is not None and not win.task.done() and win.task is not asyncio.current_task():
                win.task.cancel()
            self._release(win)

    # A reload window outlives a SIGKILL of pmond: <run dir>/reload/<service id> holds "main start_ticks
    # boot_id deadline(wall clock) since_ticks timeout", written when it opens, removed when it ends. A
    # pmond that adopts the old main process (still draining) then follows its successor at its exit.

    def _window_dir(self) -> str | None:
        config = getattr(self.sup, "config", None)
        return os.path.join(config.paths.run_dir, "reload") if config is not None else None

    def _record_window(self, svc: Service, win: Window) -> None:
        directory = self._window_dir()
        if directory is None or svc.start_ticks is None:
            return
        line = (f"{win.main} {svc.start_ticks} {procfs.boot_id()} {time.time() + win.timeout:.3f} "
                f"{win.since_ticks} {win.timeout:g}\n")
        tmp = os.path.join(directory, f".{svc.id}.tmp")
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(directory, str(svc.id)))
        except OSError as exc:  # the window works; only a pmond killed during it would not know of it
            log.warning("%s: cannot record the reload window: %s", svc.name, exc.strerror)

    def _drop_window_record(self, svc_id: int) -> None:
        directory = self._window_dir()
        if directory is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, str(svc_id)))

    def restore_window(self, svc: Service) -> None:
        """At the adoption of a running main process: the window a killed pmond recorded for this very
        process, if it is still open, becomes its window again, and looks at the main's children again (what
        the reload forked while no pmond looked is found by marker, session or group, not by executable).
        Read once here, not at every exit: a crash's restart path does no file I/O for it."""
        directory = self._window_dir()
        if directory is None:
            return
        try:
            with open(os.path.join(directory, str(svc.id)), "rb") as fh:
                fields = fh.read(256).split()
            main, ticks, boot, deadline, since, timeout = (int(fields[0]), int(fields[1]), fields[2].decode(),
                                                           float(fields[3]), int(fields[4]), float(fields[5]))
        except (OSError, ValueError, IndexError, UnicodeDecodeError):
            return
        left = deadline - time.time()
        if (main, ticks, boot) != (svc.pid, svc.start_ticks, procfs.boot_id()) or left <= 0:
            self._drop_window_record(svc.id)
            return
        loop = asyncio.get_running_loop()
        tr = self.track(svc)
        win = tr.window = Window(svc_id=svc.id, main=main, deadline=loop.time() + left, timeout=timeout,
                                 since_ticks=since, result=loop.create_future())
        win.task = loop.create_task(self._poll(svc, tr, win))  # it looks again from now on (_exe_since)

    def result(self, svc: Service) -> dict[str, Any] | None:
        got = self.results.get(svc.id)
        return got.as_dict() if got is not None else None

    # the start window (the daemonize pattern's) and the executable rule

    def launched(self, svc: Service) -> None:
        """pmond has just launched the service's main process (Supervisor._start): look at its children for
        its start window (min_uptime, at least DAEMONIZE_WINDOW_MIN), on start_look_delay's schedule, as a
        reload window does, but with no pidfd: each child is recorded as pid -> start ticks (`Track.seen`), and when
        it looked (`Track.looked`). No /proc read before this returns: the launch stays fast."""
        tr = self.track(svc)
        if tr.start_task is not None:
            tr.start_task.cancel()
            tr.start_task = None
        if tr.handed or not svc.pid:
            return
        tr.start_task = asyncio.get_running_loop().create_task(self._look_at_start(svc, tr))

    async def _look_at_start(self, svc: Service, tr: Track) -> None:
        loop = asyncio.get_running_loop()
        opened, delay = loop.time(), 0.0
        end = opened + max(float(svc.spec.get("min_uptime", 1.0)), DAEMONIZE_WINDOW_MIN)
        while svc.alive and svc.pid == tr.main and self.tracks.get(svc.id) is tr:
            now = loop.time()
            if now >= end:
                return
            tr.looked = boot_ticks()
            for child, st in procfs.descendants([tr.main], HELD_MAX).items():
                if len(tr.seen) < HELD_MAX:
                    tr.seen.setdefault(child, st.starttime)
            delay = start_look_delay(delay)
            await asyncio.sleep(min(delay, end - now))

    @staticmethod
    def _exe_since(tr: Track, win: Window | None) -> int | None:
        """From when (boot ticks) an orphan may be taken for the successor by its executable alone
        (find_successor's `exe_since`), or None: not at all. Only while looking at the main's children is
        going on (a reload window `win` not settled, or the start window), and only for a process started at
        or after the last look: one started before it that was the main's child would have been held or
        seen. That bounds the span in which a stranger of the same uid and executable could be taken to one
        poll interval (POLL_MAX_S at most), instead of the whole window."""
        if win is not None:
            return max(win.since_ticks, win.looked) if win.looked is not None and not win.settled() else None
        if tr.start_task is not None and not tr.start_task.done() and tr.looked is not None:
            return tr.looked
        return None

    # the main process's exit

    def on_main_exit(self, svc: Service, pid: int, pidfd: int) -> bool:
        """Called when the main process `pid` has exited, before anything else: True when a successor was
        handed over to (then the exit is no crash), False when the exit goes on as a crash or a stop."""
        tr = self.track(svc)
        win = tr.window
        if svc.status not in (Status.RUNNING, Status.STARTING) or svc.desired != "running":
            self._end_window(tr, Handover(False, f"process {pid} exited while {svc.name} was stopping", pid))
            return False
        in_window = win is not None and asyncio.get_running_loop().time() < win.deadline
        spec = svc.spec
        runtime = time.time() - svc.started_at if svc.started_at else None
        pidfile = self._pidfile_path(svc)
        launched = not tr.handed
        early = launched and runtime is not None and runtime <= max(float(spec.get("min_uptime", 1.0)),
                                                                    DAEMONIZE_WINDOW_MIN)
        # The cases: a reload window (any exit but a crash); a launch that exits 0, Type=forking (a pid file)
        # or, early, the daemonize pattern; a followed process's exit when a pid file may name its successor.
        status = watch.exit_status_now(pid, pidfd) if in_window or (launched and (pidfile is not None or early)) \
            else None
        if in_window and status is not None and crashed(status, spec):
            # The OOM killer or a fault, not the end of a reload: whatever the main left is no successor.
            self._end_window(tr, Handover(False, f"process {pid} was killed by {status.signal_name()}: a crash, "
                                          "not a handover", pid))
            return False
        code = status.code if status is not None and not in_window else None
        forking = launched and pidfile is not None and code == 0
        daemonized = launched and pidfile is None and early and code == 0
        reread = pidfile is not None and (forking or in_window or not launched)
        if not (in_window or forking or daemonized or reread):
            self._end_window(tr, Handover(False, f"process {pid} exited and left no successor", pid))
            return False
        tr.known.clear()
        self._reread_group(tr, pid, pidfd)  # a daemon's setsid after the handover moved it
        # The successor search: the old main's session and group, the children a reload window held or a
        # start window saw (not the descendants found at the last handover: stale by now), never another
        # service's main.
        kin = Kin(uid=svc.uid, marker=self.marker(svc), main=pid, session=tr.session, pgrp=tr.pgrp,
                  known=tr.seen | (win.live() if win is not None else {}), others=self._other_mains(svc))
        # Who adopts the main's orphans: init, pmond's own reaper (a subreaper such as systemd --user
        # adopts pmond's services too), and the main's parent when its zombie still says.
        gone = procfs.read_stat(pid)
        reapers = {1, os.getppid()} | ({gone.ppid} if gone is not None and not watch.reaped(pidfd) else set())
        since = win.since_ticks if in_window and win is not None else None
        exe_since = self._exe_since(tr, win if in_window else None)
        top, found = find_successor(kin, since_ticks=self._start_ticks(svc),
                                    exe=file_id(spec["exe"]) if exe_since is not None else None,
                                    until_ticks=boot_ticks() + 1, exe_since=exe_since, reapers=reapers,
                                    prefer_since=since)
        tr.known = {p: st.starttime for p, st in found.items()}
        refused, tried = False, set()
        if reread:
            assert pidfile is not None
            named = self._read_pidfile(svc, pidfile)
            if isinstance(named, Refused):
                self.sup._event(svc, "reload", str(named), pidfile=pidfile, refused=True)
                refused = True
            st = procfs.read_stat(named) if isinstance(named, int) and named != pid else None
            if st is not None and st.alive:  # a stale file (the previous run's pid) is no claim
                tr.pattern = "forking" if forking else None
                if self.sup._claim_main_pid(svc, st.pid, f"pid file {pidfile}") is None:
                    return True
                tried.add(st.pid)
        fd = pin(top, found[top].starttime) if top is not None and (in_window or forking or daemonized) else None
        if fd is None:
            self._end_window(tr, Handover(False, f"process {pid} exited and left no successor", pid))
            return False
        if in_window:
            why = "reload"
        elif forking:
            why = f"Type=forking: process {pid} exited 0; its pid file {pidfile} names no process of it yet"
            tr.pattern = "forking"
        else:
            why = f"process {pid} exited 0 after {runtime or 0:.2f} s and left process {top}: it daemonized itself"
            tr.pattern = "daemonize"
        self.sup._hand_over(svc, top, fd, why)
        if forking and not refused:
            assert pidfile is not None
            self._watch_pidfile(svc, pidfile, tried)
        return True

    def _watch_pidfile(self, svc: Service, path: str, tried: set[int]) -> None:
        """Type=forking: the pid file is written after the launched process exits (nginx writes it from its
        master). Read it every PIDFILE_POLL_S until it names a process, `reload_timeout` at most."""
        async def poll() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + float(svc.spec.get("reload_timeout", 30.0))
            last = ""
            while loop.time() < deadline:
                if svc.id not in self.sup.services or not svc.alive or svc.status not in (Status.RUNNING,
                                                                                           Status.STARTING):
                    return
                named = self._read_pidfile(svc, path)
                if named == svc.pid:
                    return
                if isinstance(named, Refused):
                    self.sup._event(svc, "reload", str(named), pidfile=path, refused=True)
                    return
                if isinstance(named, str):
                    last = named
                elif named not in tried:  # a refused pid is refused once, not at every look
                    st = procfs.read_stat(named)
                    if st is not None and st.alive:
                        tried.add(named)
                        refusal = self.sup._claim_main_pid(svc, named, f"pid file {path}")
                        if refusal is None:
                            return
                        last = refusal
                    else:
                        last = f"no process {named} runs"  # not written yet: the previous run's pid
                await asyncio.sleep(PIDFILE_POLL_S)
            self.sup._event(svc, "reload", f"pid file {path} named no process of the service within "
                            f"{svc.spec.get('reload_timeout', 30.0):g} s ({last}); pmon2 follows process "
                            f"{svc.pid}", pid=svc.pid, pidfile=path)

        self.track(svc).pidfile_task = asyncio.get_running_loop().create_task(poll())

    def _read_pidfile(self, svc: Service, path: str) -> int | str:
        """read_pidfile as the service's user (its uid, gid and groups, when pmond is root and the service
        runs as another user): a pid file is a path the service's user chose, and pmond must read nothing
        that user could not (nor tell whether it exists, its type or size, beyond what that user may see)."""
        key = (svc.spec.get("user"), svc.spec.get("group"))
        if key not in self._identities:
            try:
                self._identities[key] = sockets._identity(svc.spec)
            except SpawnError as exc:
                return Refused(f"pid file {path} not read: {exc.message}")
        with sockets._acting_as(self._identities[key]):
            return read_pidfile(path, svc.uid)

    def _pidfile_path(self, svc: Service) -> str | None:
        path = svc.spec.get("pidfile")
        return os.path.normpath(os.path.join(svc.spec["cwd"], path)) if path else None

    def _start_ticks(self, svc: Service) -> int:
        if svc.start_ticks is not None:
            return svc.start_ticks
        st = procfs.read_stat(svc.pid) if svc.pid else None
        return st.starttime if st is not None else 0

    # membership (systemd's rule for MAINPID= and PIDFile=)

    def kin(self, svc: Service) -> Kin:
        """What the membership rule (Kin.check) compares a process with for the service now: its current
        main process (none when it runs none), that one's session and group, the pids a reload window holds
        or a start window saw, or the last handover found (by pid and start time)."""
        others = lambda: self._other_mains(svc)  # noqa: E731 - made only when a check gets that far
        if not svc.alive or not svc.pid:
            return Kin(uid=svc.uid, marker=self.marker(svc), others=others)
        tr = self.track(svc)
        known = tr.known | tr.seen | (tr.window.live() if tr.window is not None else {})
        return Kin(uid=svc.uid, marker=self.marker(svc), main=svc.pid, session=tr.session, pgrp=tr.pgrp,
                   known=known, others=others)

    def _other_mains(self, svc: Service) -> dict[int, str]:
        return {s.pid: s.name for s in self.sup.services.values() if s is not svc and s.alive and s.pid}

    def membership(self, svc: Service, pid: int) -> str | None:
        """systemd's rule for MAINPID= and PIDFile=: None when process `pid` is alive and the service's
        (Kin.check, as its uid), else why not. The caller holds a pidfd on `pid`."""
        st, why = self.kin(svc).check(pid)
        if why == GONE or (why is None and (st is None or not st.alive)):
            return f"no process {pid} runs"
        return why

    def claim(self, svc: Service, pid: int) -> tuple[int | None, str | None]:
        """(a pidfd on `pid`, None) when it may become the service's main process, else (None, why)."""
        if svc.status not in (Status.RUNNING, Status.STARTING):
            return None, f"{svc.name} is {svc.status.value}"
        fd = pin(pid)
        if fd is None:
            return None, f"no process {pid} runs"
        why = self.membership(svc, pid)
        if why is not None:
            os.close(fd)
            return None, why
        return fd, None

    # processes the service retired

    def retiring(self, svc: Service, pid: int, ticks: int | None = None) -> None:
        """Process `pid` (started at `ticks`; read now when None) is the service's and no longer its main
        process: handed over away from (handed_over), or stopped by a roll beside the main one (the old
        process, or a new one that never got ready: rolling.retire). What it still says on the notify
        socket (a retiring server's STOPPING=1) is its own business, not the service's (`retired`)."""
        if ticks is None:
            st = procfs.read_stat(pid)
            if st is None:
                return
            ticks = st.starttime
        former = self.former.setdefault(svc.id, collections.deque(maxlen=RETIRED_KEPT))
        if (pid, ticks) not in former:
            former.append((pid, ticks))

    def retired(self, svc: Service, st: procfs.Stat) -> bool:
        """Whether process `st` is one the service retired (`retiring`: the same pid and start time), or
        of the process group such a process leads, unless that is the current main's group (a successor
        that did not call setsid stays in its predecessor's group)."""
        former = self.former.get(svc.id)
        if not former or (svc.alive and st.pid == svc.pid):
            return False
        if (st.pid, st.starttime) in former:
            return True
        if st.pgrp == st.pid or not any(st.pgrp == pid for pid, _ in former):
            return False
        main = procfs.read_stat(svc.pid) if svc.alive and svc.pid else None
        return main is None or main.pgrp != st.pgrp

    # after a handover

    def handed_over(self, svc: Service, old_pid: int | None, old_fd: int | None, pid: int,
                    why: str) -> dict[str, Any]:
        """The supervisor made `pid` the main process (before it watches it): a new Track, with the group
        leader pinned when `pid` leads no group. Returns extra data for the event."""
        prev = self.tracks.get(svc.id)
        if old_pid is not None and old_pid != pid:
            self.retiring(svc, old_pid, svc.start_ticks if svc.pid == old_pid else None)
        st = procfs.read_stat(pid)
        session, pgrp = (st.session, st.pgrp) if st is not None else (pid, pid)
        pattern = prev.pattern if prev is not None else None
        known = dict(prev.known) if prev is not None else {}
        leader = None
        if pgrp != pid:
            if prev is not None and pgrp == prev.pgrp and prev.leader_fd is not None:
                leader, prev.leader_fd = prev.leader_fd, None
            elif pgrp == old_pid and old_fd is not None:
                leader = os.dup(old_fd)
            else:
                leader = self._pin_leader(pgrp)
        pidfile_task = prev.pidfile_task if prev is not None else None
        if prev is not None:
            self._end_window(prev, Handover(True, f"pid {old_pid} handed over to pid {pid}", old_pid, pid))
            prev.pidfile_task = None  # a pid file still awaited stays awaited
            prev.close()
        tr = self.tracks[svc.id] = Track(main=pid, session=session, pgrp=pgrp, handed=True, leader_fd=leader,
                                         known=known, pidfile_task=pidfile_task)
        extra: dict[str, Any] = {}
        if pattern == "daemonize":
            extra = {"pattern": "daemonize", "hint": foreground_hint(svc.spec["exe"])}
        elif pattern == "forking":
            extra = {"pattern": "forking"}
        tr.followed = {"pid": pid, "from_pid": old_pid, "why": why, "at": time.time(), **extra}
        if pgrp != pid:  # it may call setsid in a moment (nginx, after its parent's exit): look again then
            loop = asyncio.get_running_loop()
            for delay in REGROUP_LOOKS_S:
                loop.call_later(delay, self._regroup, svc, tr)
        return extra

    def _regroup(self, svc: Service, tr: Track) -> None:
        """A followed main that led no group at its handover, looked at again while it runs (one stat read):
        its group is then known before it dies, when its zombie may already be reaped and unreadable."""
        if self.tracks.get(svc.id) is tr and svc.pid == tr.main and svc.pidfd is not None:
            self._reread_group(tr, tr.main, svc.pidfd)

    @staticmethod
    def _pin_leader(pgrp: int) -> int | None:
        """A pidfd on a process group's leader (alive or a zombie), if it is still there."""
        try:
            fd = os.pidfd_open(pgrp)
        except OSError:
            return None
        st = procfs.read_stat(pgrp)
        if st is None or st.pgrp != pgrp or watch.reaped(fd):
            os.close(fd)
            return None
        return fd

    def group(self, svc: Service, pid: int, pidfd: int) -> tuple[int, int]:
        """(the process group id, a pidfd to signal it through) of the main process `pid`: its own when it
        leads its group (every launched service does), else its group leader's, pinned at the handover. A
        followed process whose leader could not be pinned gets its own pidfd (signal() then reaches it
        alone). The pidfd is not the caller's to close.

        The group is read again here, not only at the handover: a daemon forks, its parent exits, and
        only then does the child call setsid (nginx's ngx_daemon), so the group seen at the handover
        can be its parent's, soon empty, while the daemon and its workers run in a group of their own."""
        if svc.pid != pid:
            return pid, pidfd
        tr = self.track(svc)
        self._reread_group(tr, pid, pidfd)
        if tr.pgrp == pid:
            return pid, pidfd
        if tr.leader_fd is not None:
            return tr.pgrp, tr.leader_fd
        return pid, pidfd

    def _reread_group(self, tr: Track, pid: int, pidfd: int) -> None:
        """Bring the track's session and group up to date with those of its main process `pid` (a zombie's
        too: its group is where its leftovers are), leader pinned anew. Only while `pidfd` shows `pid`
        unreaped: the number, then, cannot be another process's."""
        st = procfs.read_stat(pid)
        if st is None or (st.pgrp == tr.pgrp and st.session == tr.session) or watch.reaped(pidfd):
            return
        tr.session = st.session
        if st.pgrp != tr.pgrp:
            if tr.leader_fd is not None:
                os.close(tr.leader_fd)
            tr.pgrp, tr.leader_fd = st.pgrp, None if st.pgrp == pid else self._pin_leader(st.pgrp)

    def signal(self, svc: Service, sig: int) -> int | None:
        """Send `sig` to the service's main process's group (Follower.group: the group it leads, or the one
        it was handed over in; it alone when neither can be reached: watch.signal_tree). The one way to
        signal a running service's processes at once; a stop's sequence is watch.stop_group. Returns the
        group id signalled, None when no process runs."""
        if svc.pid is None or svc.pidfd is None:
            return None
        pgid, fd = self.group(svc, svc.pid, svc.pidfd)
        watch.signal_tree(fd, pgid, sig)
        return pgid

    # views and recovery

    def describe(self, svc: Service) -> dict[str, Any] | None:
        """How the service's main process came to be followed (desc, why), while it still is the main."""
        tr = self.tracks.get(svc.id)
        if tr is None or tr.followed is None or tr.main != svc.pid or not svc.alive:
            return None
        return dict(tr.followed)

    def _named_after_restart(self, svc: Service, st: procfs.Stat) -> bool:
        """Whether process `st`, named by the service's pid file after a restart of pmond, may be adopted as
        its main process: by the membership rule with no main to compare with (Kin.check: its uid, never
        pmond nor its launcher nor another service's main, its verified marker); or, for a daemon that
        rewrote its environment, one that carries no marker at all (another service's or another pmond's
        makes it theirs), whose parent is a reaper (it left whatever started it) and that runs the service's
        executable. Other services' mains are those of the database too: the rows not loaded yet."""
        others = self._recorded_mains(svc)
        if st.pid in others or st.pid == os.getpid() or pmonds_own(st):
            return False
        _, why = Kin(uid=svc.uid, marker=self.marker(svc), others=others).check(st.pid, st=st)
        if why is None:
            return True
        return why != GONE and uid_of(st.pid) == svc.uid and carries_marker(st.pid) is False \
            and st.ppid in (1, os.getppid()) and file_id(f"/proc/{st.pid}/exe") == file_id(svc.spec["exe"])

    def _recorded_mains(self, svc: Service) -> dict[int, str]:
        """pid -> name of the other services' main processes: those running, and those the database
        records (at start-up, the rows not loaded yet), each by pid and start time. For start-up only."""
        mains = self._other_mains(svc)
        store = getattr(self.sup, "store", None)
        if store is not None:
            for row in store.load_services():
                pid, ticks = row.get("pid"), row.get("start_ticks")
                if row["id"] != svc.id and pid and pid not in mains:
                    st = procfs.read_stat(pid)
                    if st is not None and st.starttime == ticks:
                        mains[pid] = row["name"]
        return mains

    def after_restart(self, svc: Service, marked: list[int], record_ticks: int | None) -> tuple[int, int, str] | None:
        """pmond restarted, the recorded main process is gone: a successor to adopt rather than start a
        duplicate (pmond was killed during a handover). (pid, pidfd, why) of the topmost process that carries
        the service's marker, or that its pid file names (and _named_after_restart accepts), runs as its uid
        and started after the recorded main; None if there is none."""
        if svc.status not in (Status.RUNNING, Status.STARTING, Status.STOPPING) or svc.start_ticks is None \
                or svc.boot_id != procfs.boot_id():
            return None
        since = max(svc.start_ticks, record_ticks or 0)
        members: dict[int, procfs.Stat] = {}
        for pid in marked:
            st = procfs.read_stat(pid)
            if st is not None and st.alive and st.starttime >= since and uid_of(pid) == svc.uid:
                members[pid] = st
        top = topmost(members)
        path = self._pidfile_path(svc)
        if path is not None:
            named = self._read_pidfile(svc, path)
            st = procfs.read_stat(named) if isinstance(named, int) else None
            if st is not None and st.alive and st.starttime >= since and (
                    st.pid in members or self._named_after_restart(svc, st)):
                top = st.pid
                members.setdefault(st.pid, st)
        if top is None:
            return None
        fd = pin(top, members[top].starttime)
        if fd is None:
            return None
        return top, fd, f"found after pmond restarted: process {svc.pid} is gone"

    def held_pidfds(self, svc: Service) -> dict[int, int]:
        """{pid: a new pidfd} of each process the service's open reload window holds that has not exited
        (the successor a reload forked, even one that called setsid): a stop signals them beside the main's
        group (sweep.py). The caller closes the pidfds."""
        tr = self.tracks.get(svc.id)
        win = tr.window if tr is not None else None
        out: dict[int, int] = {}
        for pid, fd in (win.held.items() if win is not None else ()):
            if not watch.has_exited(fd):
                try:
                    out[pid] = os.dup(fd)
                except OSError:
                    break
        return out
