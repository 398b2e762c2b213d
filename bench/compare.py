#!/usr/bin/env python3
"""pmon2 side by side with pm2 and supervisor, in one run, on this machine.

    .venv/bin/python bench/compare.py [--install-peers] [--peers-1000] [--trials 20] [--json PATH]

What it measures, for each manager (pmon2 always; pm2 and supervisor when found in bench/.peers/ or
on PATH, or installed there by --install-peers):

- restart latency after SIGKILL: the bench kills a service's process and spins on /proc until the
  replacement has exec'd (found by its unique command line `sleep <unique number>`); median and p95;
- list latency: wall-clock of the whole CLI process (`pmon2 ls`, `pm2 ls`/`pm2 jlist`,
  `supervisorctl status`) with 10, 100 and 1,000 services; median of N runs after one warm-up;
- daemon RSS (VmRSS) and idle CPU (CPU time summed over the daemon's threads, from schedstat in ns,
  over a window in which the bench sends nothing) with 0, 10, 100 (and 1,000) services;
- the number of service processes after the daemon is SIGKILLed and started again (duplicates?).

Every manager runs in a scratch home (PMON2_HOME, PM2_HOME, a private supervisord.conf and socket)
and never touches ~/.pm2, a global supervisord or another pmond. Everything started is killed by pid
at the end: the daemons, every process whose command line carries one of this run's unique numbers,
and every process whose environment carries this run's marker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, ".peers")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SLEEP = shutil.which("sleep") or "/usr/bin/sleep"
KEEP_HOMES = False  # --keep-homes: leave each manager's scratch home (its logs) for a post-mortem
MARK_VAR = "PMON2_BENCH_RUN"  # set in the environment of everything the bench starts

# /proc


def read_bytes(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def sleep_number(cmdline: bytes | None) -> int | None:
    """The number of a `sleep N` process (any path to sleep), else None. Zombies have no cmdline."""
    if not cmdline:
        return None
    parts = cmdline.split(b"\0")
    if len(parts) == 3 and parts[2] == b"" and parts[0].rsplit(b"/", 1)[-1] == b"sleep" and parts[1].isdigit():
        return int(parts[1])
    return None


def find_sleepers(numbers: set[int]) -> dict[int, list[int]]:
    """number -> pids of live `sleep number` processes."""
    found: dict[int, list[int]] = {}
    for pid in all_pids():
        n = sleep_number(read_bytes(f"/proc/{pid}/cmdline"))
        if n is not None and n in numbers:
            found.setdefault(n, []).append(pid)
    return found


def has_marker(pid: int, marker: bytes) -> bool:
    env = read_bytes(f"/proc/{pid}/environ")
    return bool(env) and marker in env.split(b"\0")


def status_field(pid: int, name: str) -> int | None:
    text = read_bytes(f"/proc/{pid}/status")
    if text is None:
        return None
    for line in text.decode().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def pss_kib(pid: int) -> int | None:
    text = read_bytes(f"/proc/{pid}/smaps_rollup")
    for line in (text or b"").decode().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def helpers(pid: int) -> list[int]:
    """The daemon's descendants that are not services (pmond's launcher and the child it forks ahead)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = read_bytes(f"/proc/{p}/task/{p}/children") or b""
        for k in map(int, kids.split()):
            cl = read_bytes(f"/proc/{k}/cmdline") or b""
            if not cl.startswith(b"sleep\0") and SLEEP.encode() not in cl.split(b"\0")[0]:
                out.append(k)
                todo.append(k)
    return out


def cpu_figures(pid: int) -> dict[str, int] | None:
    """CPU time of a process: ticks (utime+stime, all threads ever) and ns and context switches summed
    over its live threads (schedstat: ns precision, where 10 ms ticks are too coarse for idle)."""
    stat = read_bytes(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    out = {"ticks": int(fields[11]) + int(fields[12]), "ns": 0, "ctxt": 0, "threads": 0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        sched = read_bytes(f"/proc/{pid}/task/{tid}/schedstat")
        if sched:
            out["ns"] += int(sched.split()[0])
        status = read_bytes(f"/proc/{pid}/task/{tid}/status")
        if status:
            for line in status.decode().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    out["ctxt"] += int(line.split()[1])
        out["threads"] += 1
    return out


class PidWatch:
    """New pids since the last call: /proc/sys/kernel/ns_last_pid (a 1 µs read), or a /proc diff."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/sys/kernel/ns_last_pid", os.O_RDONLY)
        except OSError:
            self.fd = None
        self.pid_max = int(read_bytes("/proc/sys/kernel/pid_max") or b"4194304")
        self.reset()

    def reset(self) -> None:
        if self.fd is not None:
            self.last = int(os.pread(self.fd, 32, 0))
        else:
            self.known = set(all_pids())

    def new(self) -> list[int]:
        if self.fd is None:
            now = set(all_pids())
            fresh = sorted(now - self.known)
            self.known = now
            return fresh
        cur = int(os.pread(self.fd, 32, 0))
        if cur == self.last:
            return []
        if cur > self.last:
            fresh = list(range(self.last + 1, cur + 1))
        else:  # wrapped around pid_max
            fresh = list(range(self.last + 1, self.pid_max)) + list(range(1, cur + 1))
        self.last = cur
        return fresh

    def last_pid(self) -> int | None:
        return int(os.pread(self.fd, 32, 0)) if self.fd is not None else None


def kill_and_wait(pids: PidWatch, pid: int, number: int, timeout: float) -> tuple[float, int] | None:
    """SIGKILL `pid`, then poll until a new process runs `sleep number`: (ms, new pid), or None.

    The loop yields the CPU between looks. A pure busy loop measures itself: the killed process is
    woken on the poller's core and waits for the scheduler to preempt the poller, which added about
    3 ms to every manager's figure here (kill to pidfd-readable: 3.3 ms spinning, 0.31 ms yielding,
    0.30 ms blocked in poll)."""
    want = str(number).encode()
    candidates: list[int] = []
    pids.reset()
    t0 = time.perf_counter_ns()
    os.kill(pid, signal.SIGKILL)
    deadline = t0 + int(timeout * 1e9)
    spins = 0
    while True:
        os.sched_yield()
        candidates.extend(pids.new())
        i = 0
        while i < len(candidates):
            c = candidates[i]
            cl = read_bytes(f"/proc/{c}/cmdline")
            if cl is None:
                if os.path.exists(f"/proc/{c}"):
                    i += 1  # a failed read of a live process (mid-exec): look again next time
                else:
                    candidates.pop(i)  # gone
                continue
            if cl.endswith(b"\0" + want + b"\0") and sleep_number(cl) == number:
                return (time.perf_counter_ns() - t0) / 1e6, c
            i += 1
        spins += 1
        if spins % 256 == 0 and time.perf_counter_ns() > deadline:
            return None


# statistics


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), 3), "p95": round(pct(values, 95), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


# running things


def timed(argv: list[str], env: dict[str, str], timeout: float = 300.0,
          cwd: str | None = None) -> tuple[float, int, str, float]:
    """Wall-clock ms of a whole CLI process, its exit code, its stderr tail and its CPU ms (user + sys
    from wait4: far less sensitive than wall-clock to what else runs on the machine). Output goes to
    temporary files, read and dropped."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        ms = (time.perf_counter() - t0) * 1000
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-400:].decode(errors="replace")
    return ms, proc.returncode, tail, (usage.ru_utime + usage.ru_stime) * 1000


def check(argv: list[str], env: dict[str, str], timeout: float = 600.0, cwd: str | None = None) -> str:
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-800:]}"
                           f"{proc.stdout.decode(errors='replace')[-400:]}")
    return proc.stdout.decode(errors="replace")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# the managers


class Manager:
    name = "?"

    def __init__(self, numbers: list[int], marker: str, tag: str) -> None:
        self.numbers = numbers  # numbers[i] is the unique argument of service i
        self.marker = marker
        self.home = tempfile.mkdtemp(prefix=f"pmbench-{tag}-", dir="/tmp")
        self.env = dict(os.environ, **{MARK_VAR: marker})
        self.count = 0
        self.daemon_pids: set[int] = set()
        self.max_size = 10**9  # the largest service count it is benchmarked with

    # to implement
    def start(self) -> None: ...
    def add(self, upto: int) -> None: ...
    def daemon_pid(self) -> int | None: ...
    def list_commands(self) -> dict[str, list[str]]: ...
    def restart_daemon(self) -> None: ...
    def version(self) -> str: ...

    def remember_daemon(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid = self.daemon_pid()
            if pid and os.path.exists(f"/proc/{pid}"):
                self.daemon_pids.add(pid)
                return pid
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no daemon pid after 30 s")

    def wait_services(self, n: int, timeout: float = 300.0) -> dict[int, int]:
        """Wait until each of the first n services has exactly one live process: number -> pid."""
        want = set(self.numbers[:n])
        deadline = time.monotonic() + timeout
        while True:
            found = find_sleepers(want)
            if len(found) == n and all(len(p) == 1 for p in found.values()):
                return {k: v[0] for k, v in found.items()}
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {len(found)} of {n} services up after {timeout:g} s")
            time.sleep(0.1)

    def teardown(self) -> None:
        """Kill the daemons first (so nothing restarts), then every process of this instance, by pid."""
        marker = f"{MARK_VAR}={self.marker}".encode()
        me = os.getpid()
        for pid in self.daemon_pids | {self.daemon_pid() or 0}:
            if pid and pid != me and has_marker(pid, marker):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        mine = set(self.numbers)
        for _ in range(5):
            victims = [p for p in all_pids() if p != me and (
                sleep_number(read_bytes(f"/proc/{p}/cmdline")) in mine or has_marker(p, marker))]
            if not victims:
                break
            for p in victims:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.2)
        if not KEEP_HOMES:
            shutil.rmtree(self.home, ignore_errors=True)


class Pmon2(Manager):
    name = "pmon2"

    def __init__(self, *a: object) -> None:
        super().__init__(*a)
        self.env |= {"PMON2_HOME": self.home, "NO_COLOR": "1"}
        venv_cli = os.path.join(ROOT, ".venv", "bin", "pmon2")
        self.cli = [venv_cli] if os.path.exists(venv_cli) else [sys.executable, "-m", "pmon2"]
        self.socket = os.path.join(self.home, "run", "pmond.sock")

    def version(self) -> str:
        return check([*self.cli, "version"], self.env).splitlines()[0].split()[-1]

    def start(self) -> None:
        check([*self.cli, "daemon", "start"], self.env)
        self.remember_daemon()

    def daemon_pid(self) -> int | None:
        text = read_bytes(os.path.join(self.home, "run", "pmond.pid"))
        return int(text) if text and text.strip().isdigit() else None

    def api(self, method: str, path: str, body: object = None) -> object:
        """The same request `pmon2 run` sends, without 50 ms of CLI start-up per service (setup only)."""
        payload = b"" if body is None else json.dumps(body).encode()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        try:
            s.connect(self.socket)
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
            data = b"".join(iter(lambda: s.recv(65536), b""))
        finally:
            s.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if status >= 400:
            raise RuntimeError(f"pmond answered {status}: {rest[:300]!r}")
        return json.loads(rest)

    def add(self, upto: int) -> None:
        for i in range(self.count, upto):
            self.api("POST", "/v1/services", {"argv": ["sleep", str(self.numbers[i])], "cwd": self.home,
                                              "env": self.env, "autorestart": True, "name": f"s{i}"})
        self.count = upto

    def list_commands(self) -> dict[str, list[str]]:
        return {"pmon2 ls": [*self.cli, "ls"], "pmon2 ls --json": [*self.cli, "ls", "--json"]}

    def restart_daemon(self) -> None:
        check([*self.cli, "daemon", "start"], self.env)

    def everyday(self) -> list[tuple[str, list[str]]]:
        """Every everyday command, against the biggest table: each must still answer."""
        n = self.count
        mid, last, extra = f"s{n // 2}", f"s{n - 1}", f"s{n - 2}"
        spare = self.numbers[-1]  # reserved by the caller for this
        return [
            ("ls", ["ls"]), ("ls --json", ["ls", "--json"]), ("desc", ["desc", mid]),
            ("desc --json", ["desc", mid, "--json"]), ("log", ["log", mid, "-n", "5"]),
            ("events", ["events", mid, "-n", "20"]), ("why", ["why", mid]), ("stop", ["stop", last]),
            ("start", ["start", last]), ("restart", ["restart", extra]),
            ("reload", ["reload", mid, "--sig", "CONT"]),
            ("run", ["run", "sleep", str(spare), "--name", "extra"]), ("del", ["del", "extra"]),
            ("daemon status", ["daemon", "status"]), ("version", ["version"]),
        ]


class Pm2(Manager):
    name = "pm2"

    def __init__(self, bin_path: str, *a: object) -> None:
        super().__init__(*a)
        self.bin = bin_path
        # PM2_HOME in a scratch dir: never ~/.pm2, never a pm2 daemon that is not ours.
        self.env |= {"PM2_HOME": self.home}

    def version(self) -> str:
        pkg = os.path.join(os.path.dirname(os.path.realpath(self.bin)), "..", "package.json")
        try:
            with open(pkg) as fh:
                return json.load(fh)["version"]
        except (OSError, ValueError, KeyError):
            return "?"

    def start(self) -> None:
        check([self.bin, "ping"], self.env)
        self.remember_daemon()

    def daemon_pid(self) -> int | None:
        text = read_bytes(os.path.join(self.home, "pm2.pid"))
        return int(text) if text and text.strip().isdigit() else None

    def add(self, upto: int) -> None:
        apps = [{"name": f"s{i}", "script": SLEEP, "args": str(self.numbers[i]), "interpreter": "none",
                 "autorestart": True, "cwd": self.home} for i in range(self.count, upto)]
        path = os.path.join(self.home, f"apps-{self.count}-{upto}.json")
        with open(path, "w") as fh:
            json.dump({"apps": apps}, fh)
        check([self.bin, "start", path], self.env, cwd=self.home)
        self.count = upto

    def list_commands(self) -> dict[str, list[str]]:
        return {"pm2 ls": [self.bin, "ls"], "pm2 jlist": [self.bin, "jlist"]}

    def restart_daemon(self) -> None:
        # What `pm2 startup`'s boot unit runs: the dump written by `pm2 save` before the crash.
        check([self.bin, "resurrect"], self.env, cwd=self.home)

    def before_daemon_kill(self) -> None:
        check([self.bin, "save"], self.env, cwd=self.home)


class Supervisor(Manager):
    name = "supervisor"

    def __init__(self, bindir: str, *a: object) -> None:
        super().__init__(*a)
        self.supervisord = os.path.join(bindir, "supervisord")
        self.supervisorctl = os.path.join(bindir, "supervisorctl")
        self.conf = os.path.join(self.home, "supervisord.conf")
        os.makedirs(os.path.join(self.home, "programs"))
        os.makedirs(os.path.join(self.home, "logs"))
        # A private config and socket: never a global supervisord.
        with open(self.conf, "w") as fh:
            fh.write(f"""[unix_http_server]
file={self.home}/supervisor.sock

[supervisord]
logfile={self.home}/supervisord.log
pidfile={self.home}/supervisord.pid
childlogdir={self.home}/logs
directory={self.home}
minfds=16384
minprocs=4096

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{self.home}/supervisor.sock

[include]
files = {self.home}/programs/*.ini
""")

    def version(self) -> str:
        return check([self.supervisord, "--version"], self.env).strip()

    def start(self) -> None:
        check([self.supervisord, "-c", self.conf], self.env, cwd=self.home)
        self.remember_daemon()
        self.wait_ctl()

    def wait_ctl(self) -> None:
        deadline = time.monotonic() + 30
        while subprocess.run([self.supervisorctl, "-c", self.conf, "pid"], env=self.env,
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("supervisord does not answer")
            time.sleep(0.1)

    def daemon_pid(self) -> int | None:
        text = read_bytes(os.path.join(self.home, "supervisord.pid"))
        return int(text) if text and text.strip().isdigit() else None

    def add(self, upto: int) -> None:
        for i in range(self.count, upto):
            with open(os.path.join(self.home, "programs", f"s{i}.ini"), "w") as fh:
                fh.write(f"[program:s{i}]\ncommand={SLEEP} {self.numbers[i]}\nautorestart=true\n")
        check([self.supervisorctl, "-c", self.conf, "update"], self.env)
        self.count = upto

    def list_commands(self) -> dict[str, list[str]]:
        return {"supervisorctl status": [self.supervisorctl, "-c", self.conf, "status"]}

    def restart_daemon(self) -> None:
        check([self.supervisord, "-c", self.conf], self.env, cwd=self.home)
        self.wait_ctl()


# the measurements
#
# The managers run side by side and every measurement is interleaved across them (idle windows at the
# same time, list runs and restart trials in turn), so a busy moment on the machine hits them alike.


def idle_all(mgrs: list[Manager], seconds: float, settle: float, pids: PidWatch) -> dict[str, dict[str, object]]:
    """Daemon RSS and CPU over one window, the same for every daemon, in which the bench sends nothing."""
    time.sleep(settle)
    daemons = {m.name: m.remember_daemon() for m in mgrs}
    load_a = os.getloadavg()[0]
    def figures(pid: int) -> dict[str, int] | None:
        """The daemon's CPU plus its helper processes' (which sleep when idle, but say so)."""
        own = cpu_figures(pid)
        for h in helpers(pid) if own else []:
            more = cpu_figures(h)
            for key in ("ns", "ticks", "ctxt") if more else ():
                own[key] += more[key]  # type: ignore[index,operator]
        return own

    before = {n: figures(p) for n, p in daemons.items()}
    last_a, t_a = pids.last_pid(), time.monotonic()
    time.sleep(seconds)
    after = {n: figures(p) for n, p in daemons.items()}
    last_b, t_b = pids.last_pid(), time.monotonic()
    dt = t_b - t_a
    spawned = (last_b - last_a) % pids.pid_max if last_a is not None and last_b is not None else None
    out = {}
    for name, pid in daemons.items():
        a, b = before[name], after[name]
        if a is None or b is None:
            raise RuntimeError(f"{name}: daemon {pid} vanished during the idle window")
        rss = status_field(pid, "VmRSS")
        extra = helpers(pid)
        extra_rss = sum(status_field(h, "VmRSS") or 0 for h in extra)
        pss = [pss_kib(x) for x in (pid, *extra)]
        out[name] = {"rss_kib": rss, "rss_mib": round(rss / 1024, 2) if rss else None,
                     "helpers": len(extra), "helpers_rss_mib": round(extra_rss / 1024, 2),
                     "pss_mib": round(pss[0] / 1024, 2) if pss[0] else None,
                     "pss_with_helpers_mib": round(sum(x or 0 for x in pss) / 1024, 2) if pss[0] else None,
                     "cpu_pct": round(100 * (b["ns"] - a["ns"]) / (dt * 1e9), 4),
                     "cpu_pct_ticks": round(100 * (b["ticks"] - a["ticks"]) / CLK_TCK / dt, 4),
                     "wakeups_per_s": round((b["ctxt"] - a["ctxt"]) / dt, 2), "threads": b["threads"],
                     "window_s": round(dt, 2), "processes_started_on_machine": spawned,
                     "loadavg_1m": round(load_a, 2)}
    return out


def list_all(mgrs: list[Manager], runs: int) -> dict[str, dict[str, dict[str, object]]]:
    """Wall-clock of each list command, one run of each in turn, after one warm-up run of each."""
    cmds = [(m, label, argv) for m in mgrs for label, argv in m.list_commands().items()]
    times: dict[tuple[str, str], list[float]] = {(m.name, label): [] for m, label, _ in cmds}
    codes: dict[tuple[str, str], set[int]] = {(m.name, label): set() for m, label, _ in cmds}
    cpus: dict[tuple[str, str], list[float]] = {(m.name, label): [] for m, label, _ in cmds}
    for m, _label, argv in cmds:
        timed(argv, m.env, cwd=m.home)  # warm-up: page cache, .pyc, compile caches
    for r in range(runs):
        for m, label, argv in cmds[r % len(cmds):] + cmds[:r % len(cmds)]:
            ms, rc, _err, cpu = timed(argv, m.env, cwd=m.home)
            times[(m.name, label)].append(ms)
            cpus[(m.name, label)].append(cpu)
            codes[(m.name, label)].add(rc)
    out: dict[str, dict[str, dict[str, object]]] = {}
    for (name, label), t in times.items():
        out.setdefault(name, {})[label] = summary(t) | {
            "cpu_median": round(statistics.median(cpus[(name, label)]), 1), "exit_codes": sorted(codes[(name, label)]),
            "runs_ms": [round(x, 2) for x in t]}
    return out


class Trials:
    """Restart trials on one manager: services' processes killed in turn, each at least `min_age` s
    old (past every manager's min uptime / startsecs, so no back-off is involved)."""

    def __init__(self, mgr: Manager, n_services: int, rotate: int = 5, min_age: float = 1.5) -> None:
        self.mgr = mgr
        self.n = n_services
        self.current = mgr.wait_services(n_services)
        self.pool = mgr.numbers[:min(rotate, n_services)]
        self.born = dict.fromkeys(self.pool, time.monotonic())
        self.min_age = min_age
        self.lat: list[float] = []
        self.failures = 0

    def one(self, pids: PidWatch, timeout: float = 10.0) -> None:
        number = min(self.pool, key=lambda k: self.born[k])
        wait = self.born[number] + self.min_age - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        got = kill_and_wait(pids, self.current[number], number, timeout)
        if got is None:
            self.failures += 1
            self.current[number] = self.mgr.wait_services(self.n, timeout=30)[number]
        else:
            self.lat.append(got[0])
            self.current[number] = got[1]
        self.born[number] = time.monotonic()

    def result(self) -> dict[str, object]:
        return summary(self.lat) | {"failures": self.failures, "services": self.n,
                                    "trials_ms": [round(x, 3) for x in self.lat]}


def restarts_all(mgrs: list[Manager], n_services: int, trials: int, pids: PidWatch,
                 gap: float = 0.25) -> dict[str, dict[str, object]]:
    runs = [Trials(m, n_services) for m in mgrs]
    time.sleep(1.5)
    for t in range(trials):
        for run in runs[t % len(runs):] + runs[:t % len(runs)]:
            time.sleep(gap)  # let the previous restart's follow-up work (logs, store) finish
            run.one(pids)
    return {run.mgr.name: run.result() for run in runs}


def daemon_kill_test(mgr: Manager, n: int) -> dict[str, object]:
    """SIGKILL the daemon, start it again the way its users do, count the service processes."""
    before = mgr.wait_services(n)
    time.sleep(1.5)
    if hasattr(mgr, "before_daemon_kill"):
        mgr.before_daemon_kill()
    pid = mgr.remember_daemon()
    os.kill(pid, signal.SIGKILL)
    while (read_bytes(f"/proc/{pid}/cmdline") or b"") != b"":
        time.sleep(0.02)
    survivors = sum(len(v) for v in find_sleepers(set(mgr.numbers[:n])).values())
    mgr.restart_daemon()
    mgr.remember_daemon()
    time.sleep(3.0)
    after = find_sleepers(set(mgr.numbers[:n]))
    count = sum(len(v) for v in after.values())
    same = sum(1 for k, v in after.items() if before.get(k) in v)
    return {"services": n, "processes_before": len(before), "alive_after_kill": survivors,
            "processes_after_restart": count, "duplicates": count - n, "original_pids_kept": same}


def everyday_commands(mgr: Pmon2) -> dict[str, dict[str, object]]:
    out = {}
    for label, args in mgr.everyday():
        ms, rc, err, _cpu = timed([*mgr.cli, *args], mgr.env, cwd=mgr.home)
        out[label] = {"ms": round(ms, 1), "exit_code": rc} | ({"stderr": err.strip()} if rc else {})
    return out


def bench_all(mgrs: list[Manager], sizes: list[int], restart_sizes: set[int], args: argparse.Namespace,
              pids: PidWatch) -> dict[str, dict[str, object]]:
    res: dict[str, dict[str, object]] = {
        m.name: {"version": m.version(), "idle": {}, "list_ms": {}, "restart_ms": {}, "setup_s": {}} for m in mgrs}
    for m in mgrs:
        m.start()
        log(f"{m.name}: daemon pid {m.remember_daemon()}")
    log(f"idle window, 0 services: {', '.join(m.name for m in mgrs)}")
    for name, fig in idle_all(mgrs, args.idle_seconds, args.settle, pids).items():
        res[name]["idle"]["0"] = fig
    for size in sizes:
        active = [m for m in mgrs if size <= m.max_size]
        for m in active:
            t0 = time.monotonic()
            m.add(size)
            m.wait_services(size)
            res[m.name]["setup_s"][str(size)] = round(time.monotonic() - t0, 1)
            log(f"{m.name}: {size} services up in {res[m.name]['setup_s'][str(size)]} s")
        names = ", ".join(m.name for m in active)
        log(f"idle window, {size} services: {names}")
        for name, fig in idle_all(active, args.idle_seconds, args.settle, pids).items():
            res[name]["idle"][str(size)] = fig
        runs = args.list_runs if size < 1000 else args.list_runs_1000
        log(f"list latency x{runs}, {size} services: {names}")
        for name, fig in list_all(active, runs).items():
            res[name]["list_ms"][str(size)] = fig
        if size in restart_sizes:
            log(f"{args.trials} restarts after SIGKILL each, {size} services: {names}")
            for name, fig in restarts_all(active, size, args.trials, pids).items():
                res[name]["restart_ms"][str(size)] = fig
        for m in active:
            if size == max(sizes) and isinstance(m, Pmon2):
                log(f"pmon2: every everyday command with {size} services")
                res[m.name]["commands"] = {"services": size, "results": everyday_commands(m)}
    return res


# peers


def find_pm2() -> str | None:
    local = os.path.join(PEERS, "npm", "node_modules", ".bin", "pm2")
    if os.path.exists(local):
        return local
    found = shutil.which("pm2")
    return found if found and "/shims/" not in found else None


def find_supervisor() -> str | None:
    local = os.path.join(PEERS, "venv", "bin")
    if os.path.exists(os.path.join(local, "supervisord")):
        return local
    found = shutil.which("supervisord")
    if found and "/shims/" not in found and os.path.exists(os.path.join(os.path.dirname(found), "supervisorctl")):
        return os.path.dirname(found)
    return None


def install_peers(pm2_spec: str, supervisor_spec: str) -> None:
    """Into bench/.peers/ only: npm --prefix and a venv. PM2_HOME points at a scratch dir meanwhile."""
    os.makedirs(PEERS, exist_ok=True)
    with open(os.path.join(PEERS, ".gitignore"), "w") as fh:
        fh.write("# scratch installs of the peers for bench/compare.py\n*\n")
    scratch = tempfile.mkdtemp(prefix="pmbench-install-", dir="/tmp")
    env = dict(os.environ, PM2_HOME=scratch)
    try:
        if shutil.which("npm"):
            log(f"installing {pm2_spec} into {PEERS}/npm")
            check(["npm", "install", "--prefix", os.path.join(PEERS, "npm"), "--no-audit", "--no-fund",
                   "--loglevel=error", pm2_spec], env)
        else:
            log("npm not found: pm2 skipped")
        venv = os.path.join(PEERS, "venv")
        if not os.path.exists(os.path.join(venv, "bin", "pip")):
            check([sys.executable, "-m", "venv", venv], env)
        log(f"installing {supervisor_spec} into {venv}")
        check([os.path.join(venv, "bin", "pip"), "install", "-q", supervisor_spec], env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# report


def machine() -> dict[str, object]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    mem = status_like("/proc/meminfo", "MemTotal")
    distro = "?"
    with contextlib.suppress(OSError), open("/etc/os-release") as fh:
        distro = next((line.split("=", 1)[1].strip().strip('"') for line in fh if line.startswith("PRETTY_NAME=")),
                      "?")
    node = None
    if shutil.which("node"):
        node = subprocess.run(["node", "-v"], capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "mem_gib": round(mem / 1024 / 1024, 1) if mem else None,
            "kernel": platform.release(), "os": distro, "python": platform.python_version(), "node": node,
            "loadavg_at_start": os.getloadavg(), "pid1": (read_bytes("/proc/1/comm") or b"?").decode().strip(),
            "euid": os.geteuid()}


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "src"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty src" if dirty else "")) or None


def status_like(path: str, key: str) -> int | None:
    with contextlib.suppress(OSError), open(path) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def get(d: object, *keys: str) -> object:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def targets(results: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    p = results.get("pmon2", {})
    pm2_restart = get(results.get("pm2", {}), "restart_ms", "10", "median")
    rows: list[tuple[str, object, float]] = [
        ("restart after SIGKILL, 10 services (median ms)", get(p, "restart_ms", "10", "median"), 5.0),
        ("restart after SIGKILL vs pm2 (ratio of medians)",
         (get(p, "restart_ms", "10", "median") / pm2_restart)
         if pm2_restart and get(p, "restart_ms", "10", "median") is not None else None, 0.6),
        ("pmon2 ls, 10 services (median ms)", get(p, "list_ms", "10", "pmon2 ls", "median"), 45.0),
        ("pmon2 ls, 100 services (median ms)", get(p, "list_ms", "100", "pmon2 ls", "median"), 50.0),
        ("pmon2 ls, 1000 services (median ms)", get(p, "list_ms", "1000", "pmon2 ls", "median"), 150.0),
        ("pmond RSS, 100 services (MiB)", get(p, "idle", "100", "rss_mib"), 20.0),
        ("pmond idle CPU, 100 services (% of a core)", get(p, "idle", "100", "cpu_pct"), 0.05),
        ("restart after SIGKILL, 1000 services (median ms)", get(p, "restart_ms", "1000", "median"), 10.0),
    ]
    cmds = get(p, "commands", "results")
    all_ok = None if not isinstance(cmds, dict) or get(p, "commands", "services") != 1000 \
        else all(v["exit_code"] == 0 for v in cmds.values())
    out = []
    for name, value, limit in rows:
        met = None if value is None else value <= limit
        out.append({"target": name, "limit": limit, "value": round(value, 4) if isinstance(value, float) else value,
                    "met": met})
    out.append({"target": "every everyday command answers with 1000 services", "limit": True, "value": all_ok,
                "met": all_ok})
    return out


def fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return (f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}") + unit
    return f"{v}{unit}"


def print_table(report: dict[str, object]) -> None:
    res: dict[str, dict[str, object]] = report["results"]  # type: ignore[assignment]
    names = list(res)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: object) -> None:
        rows.append((label, [fn(res[n]) for n in names]))  # type: ignore[operator]

    for size in report["settings"]["restart_sizes"]:  # type: ignore[index]
        row(f"restart after SIGKILL, {size} svc: median / p95 ms",
            lambda r, s=str(size): "-" if get(r, "restart_ms", s) is None else
            f"{fmt(get(r, 'restart_ms', s, 'median'))} / {fmt(get(r, 'restart_ms', s, 'p95'))}"
            + (f" ({get(r, 'restart_ms', s, 'failures')} lost)" if get(r, "restart_ms", s, "failures") else ""))
    for size in report["settings"]["sizes"]:  # type: ignore[index]
        row(f"list, {size} svc: median ms",
            lambda r, s=str(size): " / ".join(fmt(v.get("median")) for v in (get(r, "list_ms", s) or {}).values())
            or "-")
    for size in report["settings"]["sizes"]:  # type: ignore[index]
        row(f"list, {size} svc: CPU ms of the CLI (median)",
            lambda r, s=str(size): " / ".join(fmt(v.get("cpu_median")) for v in (get(r, "list_ms", s) or {}).values())
            or "-")
    for size in ["0", *map(str, report["settings"]["sizes"])]:  # type: ignore[index]
        row(f"daemon RSS, {size} svc: MiB", lambda r, s=size: fmt(get(r, "idle", s, "rss_mib")))
    for size in ["0", *map(str, report["settings"]["sizes"])]:  # type: ignore[index]
        row(f"daemon + helper processes, {size} svc: PSS MiB (helpers' RSS)",
            lambda r, s=size: "-" if get(r, "idle", s) is None else
            f"{fmt(get(r, 'idle', s, 'pss_with_helpers_mib'))} ({fmt(get(r, 'idle', s, 'helpers_rss_mib'))})")
    for size in ["0", *map(str, report["settings"]["sizes"])]:  # type: ignore[index]
        row(f"idle CPU, {size} svc: % core (wakeups/s)",
            lambda r, s=size: "-" if get(r, "idle", s) is None else
            f"{fmt(get(r, 'idle', s, 'cpu_pct'))} ({fmt(get(r, 'idle', s, 'wakeups_per_s'))})")
    row("daemon SIGKILLed + restarted: processes / duplicates",
        lambda r: "-" if get(r, "daemon_kill") is None else
        f"{get(r, 'daemon_kill', 'processes_after_restart')} / {get(r, 'daemon_kill', 'duplicates')}")
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    print(f"{'':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols, strict=True)))
    for label, vals in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(vals, cols, strict=True)))
    print("list columns: " + "; ".join(f"{n}: {' / '.join(get(res[n], 'list_ms', '10') or {})}" for n in names))
    print("\ntargets (pmon2):")
    for t in report["targets"]:  # type: ignore[union-attr]
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {mark:<12} {t['target']}: {fmt(t['value'])} (target {'<= ' if t['limit'] is not True else ''}"
              f"{t['limit']})")


# main


def parse_sizes(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--managers", default="pmon2,pm2,supervisor", help="which to run (default: all found)")
    ap.add_argument("--install-peers", action="store_true", help="npm-install pm2 and pip-install supervisor "
                    "into bench/.peers/ first (never globally)")
    ap.add_argument("--pm2-spec", default="pm2@7")
    ap.add_argument("--supervisor-spec", default="supervisor>=4.2,<5")
    ap.add_argument("--trials", type=int, default=20, help="restarts after SIGKILL per size (default 20)")
    ap.add_argument("--sizes", default="10,100,1000", help="service counts (default 10,100,1000)")
    ap.add_argument("--restart-sizes", default="10,1000", help="sizes with restart trials (default 10,1000)")
    ap.add_argument("--peers-1000", action="store_true", help="also run the peers at sizes above 100 (slow)")
    ap.add_argument("--list-runs", type=int, default=10, help="runs per list command (default 10)")
    ap.add_argument("--list-runs-1000", type=int, default=5, help="runs per list command at 1000+ services")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window (default 10 s)")
    ap.add_argument("--settle", type=float, default=2.0, help="quiet time before each idle window (s)")
    ap.add_argument("--dup-services", type=int, default=20, help="services for the daemon-kill test")
    ap.add_argument("--pmon2-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for pmon2's CLI and pmond (for ablations, e.g. PMON2_EXIT_STATUS=pidfd)")
    ap.add_argument("--keep-homes", action="store_true", help="keep each manager's scratch home (logs) at the end")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"), help="where to write the results")
    args = ap.parse_args(argv)
    global KEEP_HOMES
    KEEP_HOMES = args.keep_homes

    if args.install_peers:
        install_peers(args.pm2_spec, args.supervisor_spec)
    sizes = parse_sizes(args.sizes)
    restart_sizes = set(parse_sizes(args.restart_sizes))
    wanted = [m.strip() for m in args.managers.split(",") if m.strip()]
    pm2_bin, sup_dir = find_pm2(), find_supervisor()
    pm2_home_before = os.path.exists(os.path.expanduser("~/.pm2"))

    # Unique numbers: `sleep <number>` names each service process; none may exist already.
    marker = f"{os.getpid()}-{random.randrange(1 << 30)}"
    while True:
        base = random.randrange(100_000, 900_000) * 10_000
        if not find_sleepers(set(range(base, base + 100_000))):
            break
    block = 10_000
    biggest = max(sizes) + 2
    pids = PidWatch()
    report: dict[str, object] = {
        "machine": machine(), "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pmon2_commit": git_commit(),
        "settings": {"trials": args.trials, "sizes": sizes, "restart_sizes": sorted(restart_sizes),
                     "list_runs": args.list_runs, "list_runs_1000": args.list_runs_1000,
                     "idle_seconds": args.idle_seconds, "settle_s": args.settle, "dup_services": args.dup_services,
                     "peers_1000": args.peers_1000,
                     "pmon2_env": args.pmon2_env, "pid_source": "ns_last_pid" if pids.fd is not None else "/proc diff"},
        "results": {}, "skipped": {},
    }
    live: list[Manager] = []

    def make(name: str, slot: int, tag: str) -> Manager:
        nums = list(range(base + slot * block, base + slot * block + biggest))
        if name == "pmon2":
            m: Manager = Pmon2(nums, marker, tag)
            m.env |= dict(kv.split("=", 1) for kv in args.pmon2_env)
        elif name == "pm2":
            m = Pm2(pm2_bin, nums, marker, tag)
        else:
            m = Supervisor(sup_dir, nums, marker, tag)
        if name != "pmon2" and not args.peers_1000:
            m.max_size = 100
        live.append(m)
        return m

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    names = []
    for name in ["pmon2", "pm2", "supervisor"]:
        if name not in wanted:
            continue
        if (name == "pm2" and not pm2_bin) or (name == "supervisor" and not sup_dir):
            report["skipped"][name] = "not installed (use --install-peers)"  # type: ignore[index]
            continue
        names.append(name)
    try:
        mgrs = [make(name, 2 * slot, name) for slot, name in enumerate(names)]
        try:
            report["results"] = results = bench_all(mgrs, sizes, restart_sizes, args, pids)
        finally:
            for m in mgrs:
                m.teardown()
                live.remove(m)
        for slot, name in enumerate(names):
            log(f"{name}: daemon SIGKILLed and started again, {args.dup_services} services")
            dup = make(name, 2 * slot + 1, name + "-dup")
            try:
                dup.start()
                dup.add(args.dup_services)
                results[name]["daemon_kill"] = daemon_kill_test(dup, args.dup_services)
            finally:
                dup.teardown()
                live.remove(dup)
    finally:
        for m in live:
            m.teardown()
    if not pm2_home_before and os.path.exists(os.path.expanduser("~/.pm2")):
        log("WARNING: ~/.pm2 appeared during the run")
    report["targets"] = targets(results)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
