"""The crash harness's tools: a raw HTTP client that can leave a request in flight, a pmond this test
starts and SIGKILLs itself (or that SIGKILLs itself at a named point), a census of the processes that
carry this pmond's service marker, and the invariant check that follows every crash (see
test_crash_harness.py for what it proves).

A census counts a process when it is alive (not a zombie: PID 1 reaps late on these machines) and its
environment holds PMON2_SERVICE=<this pmond's instance id>:<service id>(:<tag>). A service's main process leads
its own process group (pid == pgrp); `sleep` services have no children, so every marked process should
be the main process of a service that pmond lists.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import DEAD_STATES, read_stat
from procs import is_alive as alive

# Statuses in which a stopped service may rest; `stopping` and `backoff` are on their way somewhere.
AT_REST_STOPPED = ("stopped", "exited", "errored")


# raw HTTP over pmond's socket


@dataclass
class Answer:
    """What came back on a connection: `status` is None when pmond died before its whole answer was sent."""

    status: int | None
    body: Any = None
    raw: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def send(sock_path: Path, method: str, path: str, body: Any = None) -> socket.socket:
    """Connect and send one request; returns at once, leaving the answer to `collect`, so that the
    caller can SIGKILL pmond while pmond works on it."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5.0)
        sock.connect(str(sock_path))
        sock.sendall(head + payload)
    except BaseException:
        sock.close()
        raise
    return sock


def collect(sock: socket.socket, timeout: float = 15.0) -> Answer:
    """Read until pmond closes the connection (it answers and closes; a dead pmond's end is closed by
    the kernel). An answer is complete only with its whole Content-Length body."""
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return Answer(None, raw=raw)
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Answer(None, raw=raw)
    length = next((int(v.strip()) for n, _, v in (ln.partition(":") for ln in lines[1:])
                   if n.strip().lower() == "content-length" and v.strip().isdigit()), None)
    if length is None or len(body) < length:
        return Answer(None, raw=raw)
    try:
        data = json.loads(body[:length]) if length else None
    except ValueError:
        return Answer(None, raw=raw)
    return Answer(status, data, raw)


def request(sock_path: Path, method: str, path: str, body: Any = None, timeout: float = 15.0) -> Answer:
    return collect(send(sock_path, method, path, body), timeout)


# /proc


def facts(pid: int) -> str:
    """What /proc says of a process, in one line: state, parent, group, session, command, marker."""
    st = read_stat(pid)
    if st is None:
        return "no such process"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        mark = next((e.decode(errors="replace") for e in env if e.startswith(b"PMON2_SERVICE=")), "no marker")
        home = next((e.decode(errors="replace") for e in env if e.startswith(b"PMON2_HOME=")), "")
    except OSError as exc:
        cmd, mark, home = "?", f"environ unreadable: {exc.strerror}", ""
    return (f"state {st[2]}, ppid {st[3]}, pgrp {st[4]}, sid {st[5]}, comm {st[1]!r}, cmdline {cmd!r}, {mark}"
            f"{', ' + home if home else ''}")


@dataclass(frozen=True)
class Marked:
    pid: int
    sid: int  # the service id in its marker
    pgrp: int

    @property
    def leader(self) -> bool:
        return self.pid == self.pgrp


def scan(marker: bytes, home: Path, daemon: int | None) -> tuple[list[Marked], list[int]]:
    """One pass over /proc: the census (every live process whose environment carries `marker`,
    b"PMON2_SERVICE=<instance id>:"), and the strays: pmond's own helpers left behind, that is live
    processes started under this PMON2_HOME (pmond, its launcher, the launcher's child and the
    intermediates carry it; services do not) other than the current pmond (`daemon`) and its
    descendants. A killed pmond's launcher ends when it reads the end of its socket, and an
    intermediate when its ack pipe closes: neither may linger."""
    home_entry = f"PMON2_HOME={home}".encode()
    marked, strays = [], []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # <service id>:<tag>; the judge counts every process that claims the marker, tag checked or not
        value = next((e[len(marker):].split(b":")[0] for e in env if e.startswith(marker)), None)
        helper = home_entry in env
        if value is None and not helper:
            continue
        st = read_stat(int(name))
        if st is None or st[2] in DEAD_STATES:
            continue
        if value is not None and value.isdigit():
            marked.append(Marked(int(name), int(value), int(st[4])))
        if helper:
            pid, ancestors = int(name), []
            for _ in range(4):  # pmond -> launcher -> its child -> an intermediate
                up = read_stat(pid)
                if up is None:
                    break
                pid = int(up[3])
                ancestors.append(pid)
            if int(name) != daemon and daemon not in ancestors:
                strays.append(int(name))
    return marked, strays


def kill_exactly(pid: int, sid: int, marker: bytes) -> None:
    """SIGKILL `pid` only if it is still the marked process of service `sid` (checked through a pidfd,
    so a reused pid is never hit)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if any(m.pid == pid and m.sid == sid for m in census_of(pid, marker)):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def census_of(pid: int, marker: bytes) -> list[Marked]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return []
    value = next((e[len(marker):].split(b":")[0] for e in env.split(b"\0") if e.startswith(marker)), None)
    st = read_stat(pid)
    if value is None or not value.isdigit() or st is None or st[2] in DEAD_STATES:
        return []
    return [Marked(pid, int(value), int(st[4]))]


# pmond, started and SIGKILLed by the harness

# Named kill points: a pmond that SIGKILLs itself at one precise instant, for deterministic versions of
# what the random harness may hit. They wrap pmond's internals from outside (no hook in pmond); if one
# of these names changes, pmond fails to start with an AttributeError in harness-pmond.out.
KILL_PRELUDE = """
import os, signal, sys
sys.modules.setdefault("ssl", None)
from pmon2.daemon import launches, spawn, supervisor

def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""
KILL_POINTS = {
    # A user's restart, after the old process is gone and before the new one is launched.
    "restart_between_stop_and_start": """
orig = supervisor.Supervisor._start
async def _start(self, svc, **kw):
    if kw.get("restart") and kw.get("user_initiated"):
        die()
    return await orig(self, svc, **kw)
supervisor.Supervisor._start = _start
""",
    # The launch record is written, the intermediate not yet acknowledged (it kills the service).
    "launch_recorded_not_acked": """
orig = launches.LaunchRecords.write
def write(self, record):
    orig(self, record)
    die()
launches.LaunchRecords.write = write
""",
    # The service is acknowledged and runs (its parent is init), nothing about it is in the database yet.
    "acked_not_saved": """
orig = spawn.Pending.finish
async def finish(self, record=None):
    await orig(self, record)
    die()
spawn.Pending.finish = finish
""",
    # A launch is under way (sent to the launcher or forked), its report not yet read.
    "launch_sent_not_reported": """
async def finish(self, record=None):
    die()
spawn.Pending.finish = finish
""",
    # A handover (daemon/follow.py): the old main process has exited inside a reload window and its successor
    # is found and pinned; nothing of the handover is recorded yet (no launch record, no database row).
    "handover_begun": """
def _hand_over(self, svc, pid, pidfd, why):
    die()
supervisor.Supervisor._hand_over = _hand_over
""",
    # A handover done in memory and in the launch record; the database still names the old process.
    "handover_recorded": """
orig = supervisor.Supervisor._hand_over
def _hand_over(self, svc, pid, pidfd, why):
    orig(self, svc, pid, pidfd, why)
    die()
supervisor.Supervisor._hand_over = _hand_over
""",
    # Right after a stop's process group is gone (in a stop, restart or del), before anything else.
    "after_the_stop": """
orig = supervisor.Supervisor._terminate
async def _terminate(self, svc, force):
    await orig(self, svc, force)
    die()
supervisor.Supervisor._terminate = _terminate
""",
    # A roll (rolling.py): the new process is started, recorded (<id>.surge) and acknowledged, not yet ready
    # nor the service's main process; the old one still serves.
    "mid-roll": """
from pmon2.daemon import rolling
async def wait_new_ready(*args, **kwargs):
    die()
rolling.wait_new_ready = wait_new_ready
""",
    # A roll: the new process is the service's (handed over), the old one recorded (<id>.retire) and not
    # yet signalled.
    "mid-roll-retiring": """
from pmon2.daemon import rolling
orig = rolling.retire
async def retire(sup, svc, pid, pidfd, why, force=False, **more):
    if why == "replaced by a rolling restart":
        die()
    return await orig(sup, svc, pid, pidfd, why, force, **more)
rolling.retire = retire
""",
}
KILL_MAIN = """
from pmon2.daemon.main import main
sys.exit(main([]))
"""


class Daemon:
    """One pmond at a time for a pmon2 home, started as the CLI starts it (own session, cwd /) but as
    this process's child, so it is SIGKILLed and reaped at once, with no CLI start-up in the loop."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = home / "harness-pmond.out"

    @property
    def sock_path(self) -> Path:
        return self.home / "run" / "pmond.sock"

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / "pmond.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def spawn(self, kill_point: str | None = None) -> subprocess.Popen[bytes]:
        """Start pmond and return at once (it is recovering, not yet listening). With `kill_point` (a key
        of KILL_POINTS), this pmond SIGKILLs itself when it gets there."""
        assert self.pid is None, "a pmond of ours is already running"
        (self.home / "run").mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "pmon2.daemon"]
        if kill_point is not None:
            argv = [sys.executable, "-c", KILL_PRELUDE + KILL_POINTS[kill_point] + KILL_MAIN]
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True, cwd="/", env=self.env)
        return self.proc

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until this pmond answers GET /v1/version (its recovery is done by then); fails if it exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise AssertionError(f"pmond exited with {code} while starting: {self.tail(self.out, 5)}")
            with contextlib.suppress(OSError):
                answer = request(self.sock_path, "GET", "/v1/version", timeout=5.0)
                if answer.ok and answer.body.get("pid") == self.proc.pid:
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(f"pmond did not answer within {timeout:g} s: {self.tail(self.out, 5)}")
            time.sleep(0.005)

    def start(self, timeout: float = 20.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL pmond (the crash) and reap it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        """Stop this pmond (services keep running: the pmon fixture's teardown kills them by pid and by
        marker) and reap it, so that no zombie of it outlives the test."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.api("POST", "/v1/daemon/shutdown")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait()

    def api(self, method: str, path: str, body: Any = None) -> Answer:
        return request(self.sock_path, method, path, body)

    def services(self) -> list[dict[str, Any]]:
        answer = self.api("GET", "/v1/services")
        assert answer.status == 200, f"GET /v1/services: {answer}"
        return answer.body

    @staticmethod
    def tail(path: Path, lines: int, since: int = 0) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(since)
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no file)"
        return "\n".join(text.splitlines()[-lines:])


def busy_sleep(seconds: float) -> None:
    """Sleep with sub-millisecond precision: the scheduler for the bulk, a spin for the last 0.3 ms."""
    end = time.perf_counter() + seconds
    if seconds > 0.0015:
        time.sleep(seconds - 0.0013)
    while time.perf_counter() < end:
        pass


# the invariants


@dataclass
class Verdict:
    """What is wrong now. Each entry is one offending service or process, described in one line."""

    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    untracked: list[str] = field(default_factory=list)
    broken_acks: list[str] = field(default_factory=list)  # an answered request whose effect is undone
    # Not wrong yet but not at rest: `backoff`/`stopping`, or stopped with a process still there. At the
    # settling deadline these count as stuck.
    unsettled: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.untracked or self.broken_acks or self.unsettled)

    def lines(self) -> list[str]:
        return [f"{kind}: {line}" for kind in ("lost", "duplicates", "untracked", "broken_acks", "unsettled")
                for line in getattr(self, kind)]


@dataclass
class Acked:
    """A request that got its answer before the kill, and what that answer promised."""

    op: str
    name: str
    status: int


def judge(services: list[dict[str, Any]], procs: list[Marked], acked: list[Acked],
          helpers: list[int] | None = None) -> Verdict:
    """The invariants, on one listing and one census taken right after it.

    - lost: a service whose desired state is running is not `running` with a live pid;
    - duplicates: more than one live marked group leader for one service id;
    - untracked: a live marked process of a service pmond does not list, or that is not the current
      process of its service (or in its group), or of a service whose desired state is stopped;
    - broken_acks: an answered `del` whose service is listed, an answered `stop` whose service is not
      stopped or still has a process, an answered `run`/`start`/`restart` whose service is not listed
      or not desired running;
    - untracked also: a helper of a killed pmond (launcher, intermediate) still alive (`helpers`);
    - unsettled: desired running but in `backoff`/`stopping`, or desired stopped and not yet at rest
      (the caller waits on these; still so at its deadline, they are stuck).
    """
    v = Verdict()
    v.untracked += [f"helper process {pid} ({(read_stat(pid) or ['', '?'])[1]}) of a killed pmond"
                    for pid in helpers or []]
    by_id = {s["id"]: s for s in services}
    leaders: dict[int, list[int]] = {}
    for p in procs:
        if p.leader:
            leaders.setdefault(p.sid, []).append(p.pid)
    for s in services:
        tag = f"{s['name']} (id {s['id']}, desired {s['desired']}, status {s['status']}, pid {s['pid']})"
        mine = leaders.get(s["id"], [])
        if len(mine) > 1:
            v.duplicates.append(f"{tag}: {len(mine)} live main processes {sorted(mine)}")
        if s["desired"] == "running":
            if s["status"] != "running" or not alive(s["pid"]):
                (v.unsettled if s["status"] in ("backoff", "stopping") else v.lost).append(tag)
            elif s["pid"] not in mine:
                v.lost.append(f"{tag}: its pid is not a marked group leader of its own (leaders {mine})")
        elif s["status"] not in AT_REST_STOPPED:
            v.unsettled.append(tag)
    for p in procs:
        s = by_id.get(p.sid)
        if s is None:
            v.untracked.append(f"process {p.pid} (pgrp {p.pgrp}) of service id {p.sid}, which pmond does not list")
        elif s["desired"] == "stopped" or s["status"] != "running":
            v.untracked.append(f"process {p.pid} (pgrp {p.pgrp}) of {s['name']} (id {p.sid}), which is "
                               f"{s['status']} (desired {s['desired']})")
        elif p.pid != s["pid"] and p.pgrp != s["pid"]:
            v.untracked.append(f"process {p.pid} (pgrp {p.pgrp}) of {s['name']} (id {p.sid}), whose "
                               f"current pid is {s['pid']}")
    for ack in acked:
        listed = next((s for s in services if s["name"] == ack.name), None)
        what = f"{ack.op} {ack.name} answered {ack.status}"
        if ack.op == "del" and listed is not None:
            v.broken_acks.append(f"{what}, yet it is listed: {listed['status']}, desired {listed['desired']}")
        elif ack.op == "stop":
            if listed is None:
                v.broken_acks.append(f"{what}, yet it is no longer listed")
            elif listed["desired"] != "stopped" or listed["status"] not in AT_REST_STOPPED:
                v.broken_acks.append(f"{what}, yet it is {listed['status']}, desired {listed['desired']}")
            elif leaders.get(listed["id"]):
                v.broken_acks.append(f"{what}, yet its processes {leaders[listed['id']]} run")
        elif ack.op in ("run", "start", "restart"):
            if listed is None:
                v.broken_acks.append(f"{what}, yet it is not listed")
            elif listed["desired"] != "running":
                v.broken_acks.append(f"{what}, yet it is desired {listed['desired']}")
    return v


# the harness


OPS = ("run", "start", "stop", "restart", "del", "crash", "recovery", "mixed")


@dataclass
class Step:
    """One iteration: the operation, its target, where the kill landed, and what came back."""

    n: int
    op: str
    name: str
    delay_ms: float
    answer: int | None = None
    crashes: int = 1
    verdict: Verdict | None = None
    # The events the killed pmond recorded for this step: where in the operation the kill landed.
    landed: str = ""


@dataclass
class Tally:
    crashes: int = 0
    lost: int = 0
    duplicates: int = 0
    untracked: int = 0
    broken_acks: int = 0
    stuck: int = 0
    steps: list[Step] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    seconds: float = 0.0
    by_op: dict[str, int] = field(default_factory=dict)
    answered: int = 0

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.by_op.items()))
        return (f"crash harness: {self.crashes} crashes of pmond in {len(self.steps)} steps ({ops}; "
                f"{self.answered} answered before the kill), {self.seconds:.1f} s: lost {self.lost}, "
                f"duplicates {self.duplicates}, untracked {self.untracked}, broken acks {self.broken_acks}, "
                f"stuck {self.stuck}")

    def landings(self) -> str:
        """How often each operation was cut after which of its events ('-': before any)."""
        counts: dict[str, int] = {}
        for st in self.steps:
            key = f"{st.op}[{st.landed or '-'}]"
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


class Harness:
    """Drives one pmon2 home: picks an operation, sends it, SIGKILLs pmond `delay` later, starts pmond
    again, waits for recovery to settle and judges the invariants; after a violation it reports it and
    repairs the state (so each one is counted once)."""

    def __init__(self, home: Path, env: dict[str, str], marker: bytes, work: Path, rng: random.Random,
                 delay_ms: tuple[float, float] = (0.0, 5.0), settle_s: float = 8.0, whole_op: float = 0.0,
                 no_launcher: float = 0.0, log: Callable[[str], None] = print) -> None:
        """`delay_ms`: the range the kill delay is drawn from. `whole_op`: the share of steps whose
        delay is drawn instead from 0 to 1.3 times the operation's own duration, measured on this
        machine before the loop (calibrate), so that kills also land after the launch record, the ack,
        the database writes and the answer of operations slower than `delay_ms`. `no_launcher`: the
        share of pmond starts without the launcher."""
        self.daemon = Daemon(home, env)
        self.home = home
        self.marker = marker
        self.work = work
        self.rng = rng
        self.delay_ms = delay_ms
        self.settle_s = settle_s
        self.log = log
        self.tally = Tally()
        self.serial = 0
        self.path = env.get("PATH", os.defpath)
        self.whole_op = whole_op
        self.no_launcher = no_launcher
        self.span_ms: dict[str, float] = {}

    # set-up

    def run_body(self, name: str) -> dict[str, Any]:
        self.serial += 1
        return {"argv": ["sleep", str(3_000_000 + self.serial)], "name": name, "cwd": str(self.work),
                "env": {"PATH": self.path}, "min_uptime": 0}

    def populate(self, count: int) -> None:
        for _ in range(count):
            name = self.new_name()
            answer = self.daemon.api("POST", "/v1/services", self.run_body(name))
            assert answer.status == 201, f"run {name}: {answer}"
        self.settle([], strict=True)

    def new_name(self) -> str:
        return f"c{self.serial + 1}"

    # one crash

    def pick(self, services: list[dict[str, Any]], ops: tuple[str, ...],
             weights: dict[str, float]) -> tuple[str, dict[str, Any] | None]:
        running = [s for s in services if s["status"] == "running"]
        stopped = [s for s in services if s["desired"] == "stopped"]
        choices: list[tuple[str, dict[str, Any] | None]] = []
        w: list[float] = []
        for op in ops:
            if op == "run" and len(services) < 6:
                choices.append((op, None))
                w.append(weights.get(op, 1.0) * (5 if len(services) < 3 else 1))
            elif op == "start" and stopped:
                choices.append((op, self.rng.choice(stopped)))
                w.append(weights.get(op, 1.0))
            elif op in ("stop", "crash") and running:
                choices.append((op, self.rng.choice(running)))
                w.append(weights.get(op, 1.0))
            elif ((op in ("restart", "recovery") and services) or (op == "del" and len(services) > 3)
                  or (op == "mixed" and len(services) >= 2)):
                choices.append((op, self.rng.choice(services)))
                w.append(weights.get(op, 1.0))
        assert choices, f"no operation possible on {services}"
        return self.rng.choices(choices, weights=w)[0]

    def events_after(self, mark: int) -> list[tuple[int, str, str]]:
        """(id, service, kind) of the events recorded after event id `mark`; mark -1: [(the last id, "", "")]."""
        db = sqlite3.connect(f"file:{self.home / 'data' / 'pmon2.db'}?mode=ro", uri=True, timeout=2.0)
        try:
            if mark < 0:
                return [(db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0], "", "")]
            return db.execute("SELECT id, service, kind FROM events WHERE id > ? ORDER BY id", (mark,)).fetchall()
        finally:
            db.close()

    def calibrate(self, ops: tuple[str, ...], rounds: int = 3) -> dict[str, float]:
        """How long each operation takes here, uninterrupted (the median of `rounds`), in ms; for the
        crash-restart, from the SIGKILL of the service to the `restart` event of its successor; for the
        recovery, pmond's start-up until it answers. With `ops` only ("restart",), only restarts."""
        samples: dict[str, list[float]] = {}

        def timed(op: str, method: str, path: str, body: Any = None) -> Answer:
            t0 = time.perf_counter()
            answer = self.daemon.api(method, path, body)
            samples.setdefault(op, []).append((time.perf_counter() - t0) * 1000)
            assert answer.ok, f"{op}: {answer}"
            return answer

        if set(ops) == {"restart"}:
            name = self.new_name()
            timed("run", "POST", "/v1/services", self.run_body(name))
            for _ in range(rounds):
                timed("restart", "POST", f"/v1/services/{name}/restart")
            timed("del", "DELETE", f"/v1/services/{name}")
            rounds = 0
        for _ in range(rounds):
            name = self.new_name()
            svc = timed("run", "POST", "/v1/services", self.run_body(name)).body
            timed("restart", "POST", f"/v1/services/{name}/restart")
            timed("stop", "POST", f"/v1/services/{name}/stop")
            svc = timed("start", "POST", f"/v1/services/{name}/start").body
            mark = self.events_after(-1)[0][0]
            t0 = time.time()
            kill_exactly(svc["pid"], svc["id"], self.marker)
            deadline = time.monotonic() + 5
            while not (back := [e for e in self.events_after(mark) if e[1] == name and e[2] == "restart"]):
                assert time.monotonic() < deadline, "no restart after a crash"
                time.sleep(0.002)
            db = sqlite3.connect(f"file:{self.home / 'data' / 'pmon2.db'}?mode=ro", uri=True, timeout=2.0)
            try:
                at = db.execute("SELECT at FROM events WHERE id = ?", (back[0][0],)).fetchone()[0]
            finally:
                db.close()
            samples.setdefault("crash", []).append((at - t0) * 1000)
            timed("del", "DELETE", f"/v1/services/{name}")
            t0 = time.perf_counter()
            self.daemon.kill()
            self.daemon.start()
            samples.setdefault("recovery", []).append((time.perf_counter() - t0) * 1000)
        self.span_ms = {op: sorted(v)[len(v) // 2] for op, v in samples.items()}
        # Two or three operations at once, served one after the other by pmond's single loop.
        self.span_ms["mixed"] = 2 * self.span_ms["restart"]
        self.settle([], strict=True)
        return self.span_ms

    def crash_once(self, n: int, op: str, target: dict[str, Any] | None,
                   services: list[dict[str, Any]]) -> tuple[Step, list[Acked]]:
        mark = self.events_after(-1)[0][0]
        if op in self.span_ms and self.rng.random() < self.whole_op:
            delay = self.rng.uniform(0.0, 1.3 * self.span_ms[op]) / 1000.0
        else:
            delay = self.rng.uniform(*self.delay_ms) / 1000.0
        name = target["name"] if target is not None else self.new_name()
        step = Step(n, op, name, round(delay * 1000, 3))
        in_flight: list[tuple[str, str, socket.socket]] = []
        if op == "recovery":
            # pmond dies while recovering: first down with a service killed meanwhile, so the recovery
            # has a start to make; the new pmond is SIGKILLed 0-10 ms after the first line its recovery
            # logs (adopting or finding a service gone), among its adoptions and restarts.
            assert target is not None
            self.daemon.kill()
            if target["status"] == "running":
                kill_exactly(target["pid"], target["id"], self.marker)
            step.delay_ms = round(self.rng.uniform(0.0, 2 * self.delay_ms[1]), 3)
            size = self.daemon.log_path.stat().st_size
            self.spawn_daemon()
            deadline = time.monotonic() + 20
            while self.daemon.log_path.stat().st_size == size and time.monotonic() < deadline:
                time.sleep(0.0002)
            busy_sleep(step.delay_ms / 1000.0)
            self.daemon.kill()
            step.crashes = 2
        else:
            # `mixed`: two or three services at once, each with its own operation, all in flight together;
            # or a crash-restart and a user's command on one service.
            running = [s for s in services if s["status"] == "running"]
            if op == "mixed" and running and self.rng.random() < 0.3:
                # One service crashes and a user's command on it arrives while pmond restarts it.
                svc = self.rng.choice(running)
                plan = [("crash", svc), (self.rng.choice(("stop", "restart", "del")), svc)]
            elif op == "mixed":
                targets = self.rng.sample(services, min(len(services), self.rng.choice((2, 3))))
                plan = [(self.rng.choice(("start",) if s["desired"] == "stopped" else ("stop", "restart", "crash")),
                         s) for s in targets]
                step.name = ",".join(f"{o}:{s['name']}" for o, s in plan)
            else:
                plan = [(op, target)]
            for sub, svc in plan:
                if sub == "crash":
                    assert svc is not None
                    kill_exactly(svc["pid"], svc["id"], self.marker)
                    continue
                ref = svc["name"] if svc is not None else name
                method, path = {"run": ("POST", "/v1/services"), "start": ("POST", f"/v1/services/{ref}/start"),
                                "stop": ("POST", f"/v1/services/{ref}/stop"),
                                "restart": ("POST", f"/v1/services/{ref}/restart"),
                                "del": ("DELETE", f"/v1/services/{ref}")}[sub]
                body = self.run_body(name) if sub == "run" else None
                in_flight.append((sub, ref, send(self.daemon.sock_path, method, path, body)))
            busy_sleep(delay)
            self.daemon.kill()
        names = {ref for _, ref, _ in in_flight} | {name}
        step.landed = "+".join(kind for _, service, kind in self.events_after(mark) if service in names)
        acked = []
        for sub, ref, sock in in_flight:
            answer = collect(sock, timeout=5.0)
            step.answer = answer.status if len(in_flight) == 1 else step.answer
            if answer.ok:
                acked.append(Acked(sub, ref, answer.status or 0))
        self.tally.crashes += step.crashes
        self.tally.by_op[op] = self.tally.by_op.get(op, 0) + 1
        self.tally.answered += len(acked)
        return step, acked

    def spawn_daemon(self) -> None:
        """Start pmond; a quarter of the time without its launcher (PMON2_LAUNCHER=0), so that pmond forks
        each intermediate itself (also what happens while a new launcher is not ready yet)."""
        self.daemon.env["PMON2_LAUNCHER"] = "0" if self.rng.random() < self.no_launcher else "1"
        self.daemon.spawn()

    def settle(self, acked: list[Acked], strict: bool = False) -> tuple[Verdict, list[dict[str, Any]],
                                                                         list[Marked]]:
        """Poll the listing and the census until every invariant holds and nothing is in motion, or
        until settle_s; returns the last verdict."""
        deadline = time.monotonic() + self.settle_s
        while True:
            services = self.daemon.services()
            procs, strays = scan(self.marker, self.home, self.daemon.pid)
            verdict = judge(services, procs, acked, strays)
            if verdict.ok or time.monotonic() >= deadline:
                break
            if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
                break
            time.sleep(0.02)
        if strict:
            assert verdict.ok, "\n".join(verdict.lines())
        return verdict, services, procs

    def iterate(self, n: int, ops: tuple[str, ...], weights: dict[str, float]) -> Step:
        log_mark = self.daemon.log_path.stat().st_size if self.daemon.log_path.exists() else 0
        services = self.daemon.services()
        op, target = self.pick(services, ops, weights)
        step, acked = self.crash_once(n, op, target, services)
        self.spawn_daemon()
        self.daemon.wait_ready()
        verdict, services, procs = self.settle(acked)
        step.verdict = verdict
        self.tally.steps.append(step)
        if not verdict.ok:
            self.tally.lost += len(verdict.lost)
            self.tally.stuck += len(verdict.unsettled)
            self.tally.duplicates += len(verdict.duplicates)
            self.tally.untracked += len(verdict.untracked)
            self.tally.broken_acks += len(verdict.broken_acks)
            self.report(step, verdict, services, procs, log_mark)
            self.repair(services, procs)
        return step

    # after a violation

    def report(self, step: Step, verdict: Verdict, services: list[dict[str, Any]], procs: list[Marked],
               log_mark: int) -> None:
        names = ({part.rpartition(":")[2] for part in step.name.split(",")}
                 | {s["name"] for s in services if any(s["name"] in line for line in verdict.lines())})
        lines = [f"step {step.n}: {step.op} {step.name}, pmond SIGKILLed {step.delay_ms} ms after "
                 f"{'the request' if step.op not in ('crash', 'recovery') else 'the service kill'}"
                 f" (answer: {step.answer})", *("  " + ln for ln in verdict.lines()),
                 f"  listing: {[(s['id'], s['name'], s['desired'], s['status'], s['pid']) for s in services]}",
                 f"  census (pid, service id, pgrp): {[(p.pid, p.sid, p.pgrp) for p in procs]}",
                 *(f"  pid {pid}: {facts(pid)}" for pid in sorted({s["pid"] for s in services if s["pid"]}
                                                                  - {p.pid for p in procs})),
                 "  pmond.log since the step:",
                 *("    " + ln for ln in self.daemon.tail(self.daemon.log_path, 40, log_mark).splitlines())]
        try:
            db = sqlite3.connect(f"file:{self.home / 'data' / 'pmon2.db'}?mode=ro", uri=True, timeout=2.0)
            try:
                for name in sorted(names):
                    rows = db.execute("SELECT id, at, kind, message FROM events WHERE service = ? "
                                      "ORDER BY id DESC LIMIT 12", (name,)).fetchall()
                    lines.append(f"  events of {name}, newest first:")
                    lines += [f"    #{r[0]} {r[1]:.3f} {r[2]}: {r[3]}" for r in rows]
            finally:
                db.close()
        except sqlite3.Error as exc:
            lines.append(f"  events: {exc}")
        text = "\n".join(lines)
        self.tally.reports.append(text)
        self.log(text)

    def repair(self, services: list[dict[str, Any]], procs: list[Marked]) -> None:
        """Undo a violation so that the next steps start clean: kill what is untracked or duplicated,
        start what is lost, delete again what an answered del left listed."""
        by_id = {s["id"]: s for s in services}
        for pid in scan(self.marker, self.home, self.daemon.pid)[1]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            s = by_id.get(p.sid)
            if s is None or s["status"] != "running" or (p.pid != s["pid"] and p.pgrp != s["pid"]):
                kill_exactly(p.pid, p.sid, self.marker)
        for s in services:
            if s["desired"] == "running" and s["status"] != "running":
                self.daemon.api("POST", f"/v1/services/{s['name']}/start")
            if s["desired"] == "stopped" and s["status"] not in AT_REST_STOPPED:
                self.daemon.api("POST", f"/v1/services/{s['name']}/stop")
        step = self.tally.steps[-1]
        if step.op == "del" and step.verdict is not None and step.verdict.broken_acks:
            self.daemon.api("DELETE", f"/v1/services/{step.name}")
        self.settle([], strict=True)

    def run(self, crashes: int, budget_s: float, ops: tuple[str, ...] = OPS,
            weights: dict[str, float] | None = None, initial: int = 4) -> Tally:
        start = time.monotonic()
        self.daemon.start()
        if self.whole_op > 0:
            spans = self.calibrate(ops)
            self.log("operation times here (ms, median): " + ", ".join(f"{k} {v:.1f}" for k, v in spans.items()))
        self.populate(initial)
        n = 0
        while self.tally.crashes < crashes and time.monotonic() - start < budget_s:
            n += 1
            self.iterate(n, ops, weights or {})
        self.tally.seconds = time.monotonic() - start
        return self.tally

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.close()
