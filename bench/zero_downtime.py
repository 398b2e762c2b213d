#!/usr/bin/env python3
"""Zero-downtime reloads under load (issue 13, part 6): failed requests, refused connections and p99
latency while a service is reloaded every 2 s, against the same service at rest, side by side with pm2.

    .venv/bin/python bench/zero_downtime.py [--install-peers] [--scenarios all] [--duration 30] [--json PATH]

Each scenario starts one HTTP service on 127.0.0.1 under its manager, in a scratch home, then runs Debian's
`wrk` (`-t1 -c50 --latency`, a Lua script for exact percentiles) twice for `--duration` seconds: once at
rest (the steady state), once while the bench runs the manager's reload command every `--interval`
seconds (the next reload starts at once if the previous one took longer). Scenarios (`--scenarios`, comma
separated; `pmon2`, `pm2` and `all` select groups):

- `go`: tests/fixtures/graceful/main.go (a Go server that re-execs itself on SIGUSR2 and passes it the
  listening socket; the new copy calls setsid unless --no-go-setsid), built with `go build` into the
  scratch dir; `pmon2 run --reload-signal USR2 BIN`, reloaded by `pmon2 reload --wait`, which returns once
  pmond follows the new process (a handover, not a crash);
- `python`: uvicorn (bench/apps/uvicorn_fds.py, which runs uvicorn on the LISTEN_FDS sockets: see there
  why not `uvicorn --fd 3`; bench/apps/asgi_app.py says READY=1 on $NOTIFY_SOCKET) with
  `--listen tcp://127.0.0.1:PORT --instances 4 --ready notify`: `pmon2 reload` rolls the instances;
- `python-gunicorn`: the same with gunicorn (bench/apps/wsgi_app.py; gunicorn reads LISTEN_FDS itself and
  says READY=1 itself; sync worker, so no keep-alive);
- `nginx`: nginx-light, `daemon off;`, a private prefix and conf, `--reload-signal HUP`;
- `nginx-pidfile`: the same nginx with `daemon on;` and `--pidfile` (systemd's Type=forking);
- `nginx-daemon`: `daemon on;` without `--pidfile`: pmond must detect the daemonize pattern;
- `pm2-2`, `pm2-4`: pm2's `reload` of a Node cluster app (bench/apps/node_http.js, which closes
  gracefully on SIGINT) with 2 and 4 workers.

For every run it records wrk's requests, socket errors (connect / read / write / timeout) and non-2xx
answers, and latency percentiles; "failed requests" = read + write + timeout errors + non-2xx answers
(each is a request sent and not answered with a 2xx: a connection reset or closed under a request in
flight, or a request not answered within `--timeout`); "refused connections" = connect errors; and the CPU
time of the manager's own processes (pmond and its launcher; pm2's daemon, which is also the cluster's
master). `--modes keepalive,close` repeats both runs with `Connection: close` (a connection per request):
a keep-alive connection that a server closes between two requests fails the request wrk has already sent
on it (the HTTP/1.1 close race, which real clients retry and wrk does not), so the second mode shows what
is left once the servers' keep-alive handling is out of the picture. After the reloads it records what the
manager thinks (pmon2: `ls --json` and the events by kind, so a handover counted as a crash shows; pm2:
`jlist`), whether the service still answers, and, after `pmon2 del` / `pm2 delete`, the processes left
running.

Everything runs under /tmp/bench-zd/ (the Python venv with uvicorn and gunicorn: /tmp/bench-zd/venv;
each run: /tmp/bench-zd/run-<marker>/, removed at the end unless --keep). Every process started carries
the run's marker in its environment (BENCH_ZD_RUN; not a PMON2_* name, which `pmon2 run` keeps out of a
service's environment), and each scenario ends by SIGKILLing, by pid, every process whose environment
carries the marker or whose command line names the run's scratch dir (nginx rewrites its environ for its
process titles), and every other process of their sessions. `--install-peers` installs pm2 with npm into
bench/.peers/npm (as compare.py does) and uvicorn, uvloop, httptools and gunicorn with pip into the
scratch venv; nothing globally. The table goes to stdout, every figure to the JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APPS = os.path.join(HERE, "apps")
sys.path.insert(0, HERE)

import compare  # noqa: E402  (bench/compare.py: /proc helpers, peers, machine facts)
from compare import all_pids, check, log, read_bytes  # noqa: E402

SCRATCH = "/tmp/bench-zd"
MARK_VAR = "BENCH_ZD_RUN"
GO_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "graceful", "main.go")
WRK_SCRIPT = os.path.join(APPS, "wrk_report.lua")
PY_PACKAGES = ["uvicorn", "uvloop", "httptools", "gunicorn"]
SCENARIOS = ["go", "python", "python-gunicorn", "nginx", "nginx-pidfile", "nginx-daemon", "pm2-2", "pm2-4"]
GROUPS = {"all": SCENARIOS, "pmon2": SCENARIOS[:6], "pm2": ["pm2-2", "pm2-4"]}
MODES = {"keepalive": "keep-alive", "close": "Connection: close"}
# The targets (0 failed requests, 0 refused connections under reloads): its three services, in every setup
TARGETS = {"go": "a Go graceful-restart server", "python": "a Python app (uvicorn), --listen, 4 instances rolling",
           "python-gunicorn": "a Python app (gunicorn), --listen, 4 instances rolling",
           "nginx": "nginx reloaded by HUP (daemon off)", "nginx-pidfile": "nginx reloaded by HUP (--pidfile)",
           "nginx-daemon": "nginx reloaded by HUP (daemon on, detected)"}


class Skip(Exception):
    """A scenario that cannot run here (a tool or a fixture missing): reported, not failed."""


# processes


def state_of(pid: int) -> str | None:
    stat = read_bytes(f"/proc/{pid}/stat")
    return stat.rsplit(b")", 1)[1].split()[0].decode() if stat else None


def alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 reaps orphans 1-2 s late here)."""
    return state_of(pid) not in (None, "Z", "X")


def cmdline(pid: int) -> str:
    return (read_bytes(f"/proc/{pid}/cmdline") or b"").replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for k in map(int, (read_bytes(f"/proc/{p}/task/{p}/children") or b"").split()):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


class Run:
    """This run: its marker, its scratch dir, the environment of everything it starts."""

    def __init__(self, keep: bool) -> None:
        self.marker = f"{os.getpid()}-{random.randrange(1 << 30)}"
        os.makedirs(SCRATCH, exist_ok=True)
        self.dir = os.path.join(SCRATCH, f"run-{self.marker}")
        os.makedirs(self.dir)
        self.keep = keep
        self.env = dict(os.environ, **{MARK_VAR: self.marker})
        self.env.pop("PMON2_HOME", None)

    def ours(self, pid: int) -> bool:
        if pid == os.getpid():
            return False
        # The marker, or the run dir in the environment (pmond keeps only PMON2_HOME of its caller's; pm2's
        # daemon has PM2_HOME) or in the command line (nginx overwrites its environ with its titles).
        env = read_bytes(f"/proc/{pid}/environ") or b""
        if f"{MARK_VAR}={self.marker}".encode() in env.split(b"\0") or self.dir.encode() in env:
            return True
        return self.dir.encode() in (read_bytes(f"/proc/{pid}/cmdline") or b"")

    def processes(self) -> list[int]:
        return [p for p in all_pids() if self.ours(p) and alive(p)]

    def kill_all(self) -> int:
        """SIGKILL by pid every process of this run and every process of their sessions (never our own
        session: wrk and this script live there). Returns how many were killed."""
        own_sid = os.getsid(0)
        killed: set[int] = set()
        for _ in range(10):
            victims = set(self.processes())
            sids = set()
            for p in victims:
                with contextlib.suppress(OSError):
                    sids.add(os.getsid(p))
            sids.discard(own_sid)
            if sids:
                for p in all_pids():
                    with contextlib.suppress(OSError):
                        if p != os.getpid() and os.getsid(p) in sids and alive(p):
                            victims.add(p)
            if not victims:
                break
            for p in victims:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
                    killed.add(p)
            time.sleep(0.3)
        return len(killed)

    def close(self) -> None:
        self.kill_all()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(port: int, timeout: float = 1.0) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_http(port: int, timeout: float) -> float:
    t0 = time.monotonic()
    while not http_ok(port):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"nothing answers 200 on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def first_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]


# the scenarios


class Scenario:
    name = "?"
    manager = "?"

    def __init__(self, run: Run, args: argparse.Namespace) -> None:
        self.run = run
        self.args = args
        self.port = free_port()
        self.dir = os.path.join(run.dir, self.name)
        os.makedirs(self.dir)
        self.env = dict(run.env)

    def describe(self) -> str: ...
    def prepare(self) -> None: ...
    def start(self) -> None: ...
    def reload_argv(self) -> list[str]: ...
    def versions(self) -> dict[str, str]: ...
    def state(self) -> dict[str, object]: ...
    def finish(self) -> dict[str, object]: ...

    def diagnose(self) -> dict[str, object]:
        """What the manager says when a scenario failed."""
        return {}

    def manager_pids(self) -> list[int]:
        """The manager's own processes (its daemon and helpers, not the service's), for its CPU time."""
        return []


class Pmon2Scenario(Scenario):
    manager = "pmon2"
    service = "svc"
    why_ref = "svc"  # what `pmon2 why` is asked about when the scenario fails

    def __init__(self, *a: object) -> None:
        super().__init__(*a)
        self.home = os.path.join(self.dir, "home")
        self.env |= {"PMON2_HOME": self.home, "NO_COLOR": "1"}
        venv_cli = os.path.join(ROOT, ".venv", "bin", "pmon2")
        self.cli = [venv_cli] if os.path.exists(venv_cli) else [sys.executable, "-m", "pmon2"]

    def pmon2(self, *argv: str, timeout: float = 120) -> str:
        return check([*self.cli, *argv], self.env, timeout=timeout, cwd=self.dir)

    def run_argv(self) -> list[str]:
        """`pmon2 run` flags, `--`, the command: the flags first, as some may only stand before the command."""
        ...

    def start(self) -> None:
        self.pmon2("daemon", "start")
        self.pmon2("run", *self.run_argv())

    def reload_argv(self) -> list[str]:
        return [*self.cli, "reload", self.service]

    def versions(self) -> dict[str, str]:
        return {"pmon2": first_line([*self.cli, "version"], self.env), "pmon2_commit": compare.git_commit() or "?"}

    def daemon_pid(self) -> int | None:
        text = read_bytes(os.path.join(self.home, "run", "pmond.pid"))
        return int(text) if text and text.strip().isdigit() else None

    def state(self) -> dict[str, object]:
        services = json.loads(self.pmon2("ls", "--json"))
        events = json.loads(self.pmon2("events", "--json", "-n", "5000"))
        kinds: dict[str, int] = {}
        for e in events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        handovers = [e for e in events if e["kind"] == "reload" and "handed over" in (e.get("message") or "")]
        return {
            "services": [{k: s.get(k) for k in ("name", "pid", "status", "restarts", "processes", "last_error")}
                         for s in services],
            "restarts": sum(s.get("restarts") or 0 for s in services),
            "events_by_kind": kinds,
            "handovers": len(handovers),
            "last_events": [f"{e['service']}: {e['kind']}: {e['message']}" for e in events[-12:]],
        }

    def manager_pids(self) -> list[int]:
        daemon = self.daemon_pid()
        if not daemon:
            return []
        return [daemon, *(p for p in descendants(daemon) if b"pmon2" in (read_bytes(f"/proc/{p}/cmdline") or b""))]

    def diagnose(self) -> dict[str, object]:
        out: dict[str, object] = {}
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            out["why"] = self.pmon2("why", self.why_ref)[-1500:]
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            out["events"] = self.pmon2("events", "-n", "30")[-3000:]
        logs = os.path.join(self.home, "logs")
        for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            if name.endswith("-err.log"):
                with open(os.path.join(logs, name), "rb") as fh:
                    out[name] = fh.read()[-800:].decode(errors="replace")
        return out

    def finish(self) -> dict[str, object]:
        """`pmon2 del all -y`, then the processes of the run still alive besides pmond and its helpers."""
        t0 = time.monotonic()
        out: dict[str, object] = {}
        try:
            self.pmon2("del", "all", "-y", timeout=120)
            out["del_s"] = round(time.monotonic() - t0, 2)
        except RuntimeError as e:
            out["del_error"] = str(e)[:300]
        daemon = self.daemon_pid()
        keep = {daemon} | descendants(daemon) if daemon else set()
        deadline = time.monotonic() + 5
        while True:
            left = [p for p in self.run.processes() if p not in keep]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        out["left_after_del"] = len(left)
        out["left_cmdlines"] = [cmdline(p)[:120] for p in left[:5]]
        return out


class GoScenario(Pmon2Scenario):
    name = "go"
    service = why_ref = "go"

    def describe(self) -> str:
        return ("tests/fixtures/graceful/main.go (re-execs itself on SIGUSR2, passing the listener"
                f"{'; the new copy calls setsid' if self.args.go_setsid else ''}), "
                "`pmon2 run --reload-signal USR2 BIN`, `pmon2 reload --wait go`")

    def prepare(self) -> None:
        if not shutil.which("go"):
            raise Skip("go not found (Debian: golang-go)")
        if not os.path.exists(self.args.go_source):
            raise Skip(f"{self.args.go_source} not found")
        self.bin = os.path.join(self.dir, "graceful")
        cache = os.path.join(SCRATCH, "go")
        env = dict(self.env, GOCACHE=os.path.join(cache, "cache"), GOPATH=os.path.join(cache, "path"),
                   GO111MODULE="off", CGO_ENABLED="0")
        check(["go", "build", "-o", self.bin, self.args.go_source], env, timeout=300)

    def run_argv(self) -> list[str]:
        flags = [f"-addr=127.0.0.1:{self.port}", *(["-setsid"] if self.args.go_setsid else [])]
        return ["--name", self.service, "--reload-signal", "USR2", "--kill-timeout", "10", "--", self.bin, *flags]

    def reload_argv(self) -> list[str]:
        # --wait: the command returns once pmond follows the new copy (or says why not), so its time is the
        # handover's, and a handover that fails makes it fail.
        return [*self.cli, "reload", "--wait", self.service]

    def versions(self) -> dict[str, str]:
        return super().versions() | {"go": first_line(["go", "version"])}

    def state(self) -> dict[str, object]:
        out = super().state()
        out["go_processes"] = sum(1 for p in all_pids() if alive(p) and cmdline(p).startswith(self.bin))
        return out


class PythonScenario(Pmon2Scenario):
    name = "python"
    service = "py"
    why_ref = "py:0"
    server = "uvicorn"

    def describe(self) -> str:
        how = "`uvicorn --fd 3`" if self.args.uvicorn_cli else "uvicorn through bench/apps/uvicorn_fds.py"
        return (f"{how}, `--listen tcp://127.0.0.1:PORT --instances {self.args.py_instances} --ready "
                f"{self.args.py_ready}`, `pmon2 reload py` (a roll)")

    def prepare(self) -> None:
        self.exe = os.path.join(self.args.venv, "bin", self.server)
        if not os.path.exists(self.exe):
            raise Skip(f"{self.exe} not found (use --install-peers)")

    def command(self) -> list[str]:
        if self.args.uvicorn_cli:
            return [self.exe, "--fd", "3", "--app-dir", APPS, "--log-level", "warning", "--no-access-log",
                    "asgi_app:app"]
        return [os.path.join(self.args.venv, "bin", "python"), os.path.join(APPS, "uvicorn_fds.py"), "asgi_app:app"]

    def run_argv(self) -> list[str]:
        argv = ["--name", self.service, "--listen", f"tcp://127.0.0.1:{self.port}",
                "--instances", str(self.args.py_instances), "--kill-timeout", "10"]
        if self.args.py_ready != "none":
            argv += ["--ready", self.args.py_ready]
        return [*argv, "--", *self.command()]

    def versions(self) -> dict[str, str]:
        return super().versions() | {self.server: first_line([self.exe, "--version"])}

    def state(self) -> dict[str, object]:
        out = super().state()
        main = self.command()[1 if self.server == "uvicorn" and not self.args.uvicorn_cli else 0]
        out["server_processes"] = sum(1 for p in self.run.processes() if main in cmdline(p))
        return out


class GunicornScenario(PythonScenario):
    name = "python-gunicorn"
    server = "gunicorn"

    def describe(self) -> str:
        return (f"gunicorn (sync worker), `--listen tcp://127.0.0.1:PORT --instances {self.args.py_instances} "
                f"--ready {self.args.py_ready}`, `pmon2 reload py` (a roll)")

    def command(self) -> list[str]:
        return [self.exe, "--chdir", APPS, "--workers", "1", "--log-level", "warning", "wsgi_app:app"]


NGINX_CONF = """\
daemon {daemon};
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
"""


class NginxScenario(Pmon2Scenario):
    name = "nginx"
    service = why_ref = "nginx"
    daemon = "off"

    def describe(self) -> str:
        return "nginx-light, `daemon off;`, a private prefix and conf, `--reload-signal HUP`, `pmon2 reload nginx`"

    def prepare(self) -> None:
        self.exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "")
        if not self.exe:
            raise Skip("nginx not found (Debian: nginx-light)")
        os.makedirs(os.path.join(self.dir, "tmp"))
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as fh:
            fh.write(NGINX_CONF.format(daemon=self.daemon, dir=self.dir, port=self.port))
        check([self.exe, "-t", *self.nginx_args()], self.env)

    def nginx_args(self) -> list[str]:
        return ["-p", self.dir, "-c", self.conf, "-e", os.path.join(self.dir, "error.log")]

    def run_argv(self) -> list[str]:
        return ["--name", self.service, "--reload-signal", "HUP", "--stop-signal", "QUIT",
                "--", self.exe, *self.nginx_args()]

    def versions(self) -> dict[str, str]:
        return super().versions() | {"nginx": first_line([self.exe, "-v"])}

    def state(self) -> dict[str, object]:
        out = super().state()
        text = read_bytes(os.path.join(self.dir, "nginx.pid"))
        out["nginx_pidfile"] = int(text) if text and text.strip().isdigit() else None
        out["nginx_masters"] = sum(1 for p in self.run.processes() if cmdline(p).startswith("nginx: master"))
        return out


class NginxPidfileScenario(NginxScenario):
    name = "nginx-pidfile"
    daemon = "on"

    def describe(self) -> str:
        return "nginx-light, `daemon on;`, `--pidfile` (Type=forking), `--reload-signal HUP`, `pmon2 reload nginx`"

    def run_argv(self) -> list[str]:
        return ["--pidfile", os.path.join(self.dir, "nginx.pid"), *super().run_argv()]


class NginxDaemonScenario(NginxScenario):
    name = "nginx-daemon"
    daemon = "on"

    def describe(self) -> str:
        return ("nginx-light, `daemon on;` without `--pidfile` (pmond detects the daemonize pattern), "
                "`--reload-signal HUP`, `pmon2 reload nginx`")


class Pm2Scenario(Scenario):
    manager = "pm2"
    workers = 2

    def __init__(self, *a: object) -> None:
        super().__init__(*a)
        self.home = os.path.join(self.dir, "home")
        os.makedirs(self.home)
        self.env |= {"PM2_HOME": self.home}  # never ~/.pm2

    def describe(self) -> str:
        return f"bench/apps/node_http.js in pm2's cluster mode, {self.workers} workers, `pm2 reload web`"

    def prepare(self) -> None:
        self.bin = compare.find_pm2()
        if not self.bin:
            raise Skip("pm2 not found (use --install-peers)")
        if not shutil.which("node"):
            raise Skip("node not found")

    def start(self) -> None:
        eco = os.path.join(self.dir, "ecosystem.json")
        with open(eco, "w") as fh:
            json.dump({"apps": [{"name": "web", "script": os.path.join(APPS, "node_http.js"),
                                 "exec_mode": "cluster", "instances": self.workers,
                                 "env": {"PORT": str(self.port), MARK_VAR: self.run.marker}}]}, fh)
        check([self.bin, "start", eco], self.env, cwd=self.dir)

    def reload_argv(self) -> list[str]:
        return [self.bin, "reload", "web"]

    def versions(self) -> dict[str, str]:
        return {"pm2": compare.Pm2.version(self), "node": first_line(["node", "-v"])}  # type: ignore[arg-type]

    def state(self) -> dict[str, object]:
        procs = json.loads(check([self.bin, "jlist"], self.env, cwd=self.dir))
        return {"workers": [{"pid": p.get("pid"), "status": p.get("pm2_env", {}).get("status"),
                             "restart_time": p.get("pm2_env", {}).get("restart_time")} for p in procs]}

    def manager_pids(self) -> list[int]:
        text = read_bytes(os.path.join(self.home, "pm2.pid"))
        return [int(text)] if text and text.strip().isdigit() else []

    def finish(self) -> dict[str, object]:
        out: dict[str, object] = {}
        with contextlib.suppress(RuntimeError):
            check([self.bin, "delete", "all"], self.env, cwd=self.dir)
        text = read_bytes(os.path.join(self.home, "pm2.pid"))
        god = int(text) if text and text.strip().isdigit() else None
        time.sleep(2)
        left = [p for p in self.run.processes() if p != god and "node_http.js" in cmdline(p)]
        out["left_after_del"] = len(left)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            check([self.bin, "kill"], self.env, cwd=self.dir, timeout=30)
        return out


class Pm2FourScenario(Pm2Scenario):
    name = "pm2-4"
    workers = 4


class Pm2TwoScenario(Pm2Scenario):
    name = "pm2-2"


KINDS: dict[str, type[Scenario]] = {
    "go": GoScenario, "python": PythonScenario, "python-gunicorn": GunicornScenario, "nginx": NginxScenario,
    "nginx-pidfile": NginxPidfileScenario, "nginx-daemon": NginxDaemonScenario, "pm2-2": Pm2TwoScenario,
    "pm2-4": Pm2FourScenario,
}


# wrk


def parse_wrk(text: str) -> dict[str, object]:
    m = re.search(r"^ZD_JSON (\{.*\})$", text, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no ZD_JSON line: {text[-600:]}")
    raw = json.loads(m.group(1))
    # Cross-check with wrk's own text (it prints the socket errors and non-2xx only when there are some).
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock and [int(x) for x in sock.groups()] != [raw["connect"], raw["read"], raw["write"], raw["timeout"]]:
        raise RuntimeError(f"wrk's text and its Lua summary disagree: {sock.group(0)} vs {raw}")
    errors = {k: raw[k] for k in ("connect", "read", "write", "timeout")} | {"non_2xx": raw["status"]}
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"], "seconds": round(seconds, 2), "rps": round(raw["requests"] / seconds),
        "failed": raw["read"] + raw["write"] + raw["timeout"] + raw["status"], "refused": raw["connect"],
        "errors": errors,
        "latency_ms": {k: round(raw[f"{k}_us"] / 1000, 2) for k in ("mean", "p50", "p90", "p99", "p999", "max")},
    }


def cpu_ns(pids: list[int]) -> dict[int, int]:
    """CPU time so far of each live process (schedstat of its threads, ns)."""
    out = {}
    for p in pids:
        figures = compare.cpu_figures(p)
        if figures:
            out[p] = figures["ns"]
    return out


def load(url: str, args: argparse.Namespace, env: dict[str, str], duration: float, close: bool,
         reload_argv: list[str] | None, manager: Scenario | None = None) -> dict[str, object]:
    """One wrk run; with reload_argv, that command every args.interval s meanwhile (from this thread:
    the next one starts when it is due, or at once if the previous one overran). With `manager`, also the
    CPU time its daemon and helpers used meanwhile (the reload CLI processes are not counted)."""
    cpu0 = cpu_ns(manager.manager_pids()) if manager else {}
    argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{duration:g}s", "--latency", "--timeout",
            f"{args.timeout:g}s", "-s", WRK_SCRIPT, url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    reloads: list[dict[str, object]] = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out:
        t0 = time.monotonic()
        wrk = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        try:
            due = t0 + args.interval
            while reload_argv and due < t0 + duration - min(1.0, args.interval / 2) and wrk.poll() is None:
                time.sleep(max(0.0, due - time.monotonic()))
                r0 = time.monotonic()
                try:
                    p = subprocess.run(reload_argv, env=env, capture_output=True, text=True, timeout=120,
                                       stdin=subprocess.DEVNULL)
                    rc, said = p.returncode, (p.stderr.strip() if p.returncode else p.stdout.strip())
                except subprocess.TimeoutExpired:
                    rc, said = -1, "timed out after 120 s"
                r1 = time.monotonic()
                reloads.append({"at_s": round(r0 - t0, 2), "ms": round((r1 - r0) * 1000), "rc": rc,
                                "said": said.splitlines()[-1][:300] if said else ""})
                due = max(due + args.interval, r1)
            wrk.wait(timeout=duration + 60)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        out.seek(0)
        text = out.read().decode(errors="replace")
    res = parse_wrk(text)
    res["loadavg_at_start"] = load_start
    if manager:
        cpu1 = cpu_ns(list(cpu0))
        used = sum(cpu1[p] - cpu0[p] for p in cpu1)
        res["manager_cpu_ms"] = round(used / 1e6)
        res["manager_cpu_pct"] = round(used / 1e9 / res["seconds"] * 100, 2)  # type: ignore[operator]
    if reload_argv is not None:
        ok = [r for r in reloads if r["rc"] == 0]
        res["reloads"] = {"count": len(reloads), "ok": len(ok), "failed": len(reloads) - len(ok),
                          "median_ms": sorted(r["ms"] for r in reloads)[len(reloads) // 2] if reloads else None,
                          "each": reloads}
    res["wrk_text"] = text
    return res


def run_scenario(sc: Scenario, args: argparse.Namespace) -> dict[str, object]:
    """Start the service once; per mode (keep-alive, Connection: close) a steady run and a run with reloads;
    then the manager's view, and what is left after deleting the service."""
    out: dict[str, object] = {"scenario": sc.name, "manager": sc.manager, "what": sc.describe(),
                              "loadavg_at_start": os.getloadavg(), "modes": {}}
    url = f"http://127.0.0.1:{sc.port}/"
    try:
        sc.prepare()
        out["versions"] = sc.versions()
        t0 = time.monotonic()
        sc.start()
        wait_http(sc.port, 60)
        out["up_s"] = round(time.monotonic() - t0, 2)
        # Every steady run before the first reload: after a reload pmond watches the service for a while
        # (the reload window, reload_timeout), which a steady run must not count.
        modes: dict[str, dict[str, object]] = out["modes"]  # type: ignore[assignment]
        for mode in args.modes:
            if args.warmup > 0:
                load(url, args, sc.env, args.warmup, mode == "close", None)
            log(f"{sc.name}, {mode}: steady state, {args.duration:g} s")
            modes[mode] = {"steady": load(url, args, sc.env, args.duration, mode == "close", None, sc)}
        for mode in args.modes:
            log(f"{sc.name}, {mode}: reloading every {args.interval:g} s, {args.duration:g} s")
            modes[mode]["reloading"] = load(url, args, sc.env, args.duration, mode == "close", sc.reload_argv(), sc)
            time.sleep(args.settle)
            if not http_ok(sc.port, 2.0):
                raise RuntimeError(f"no answer on 127.0.0.1:{sc.port} {args.settle:g} s after the reloads")
        out["answers_after"] = True
        out["state_after"] = sc.state()
    except Skip as e:
        out["skipped"] = str(e)
    except Exception as e:  # a failed scenario is reported; the others still run
        out["error"] = f"{type(e).__name__}: {e}"[:1500]
        try:
            out["diagnosis"] = sc.diagnose()
        except Exception as e2:
            out["diagnosis"] = {"error": f"{type(e2).__name__}: {e2}"[:500]}
    finally:
        if "skipped" not in out:
            try:
                out["finish"] = sc.finish()
            except Exception as e:
                out["finish"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        out["killed_at_teardown"] = sc.run.kill_all()
    return out


# report


def verdict(r: dict[str, object], mode: str) -> bool | None:
    """0 failed requests, 0 refused connections, every reload accepted, and the service still answering."""
    rel = ((r.get("modes") or {}).get(mode) or {}).get("reloading")  # type: ignore[union-attr]
    if not isinstance(rel, dict):
        return None
    reloads = rel["reloads"]
    if not reloads["count"]:
        return None  # a run too short for a reload
    return (rel["failed"] == 0 and rel["refused"] == 0 and reloads["failed"] == 0 and reloads["ok"] > 0
            and bool(r.get("answers_after")))


def print_table(report: dict[str, object]) -> None:
    head = ["scenario", "mode", "req/s rest|reload", "failed rest|reload (read/write/timeout/non-2xx)",
            "refused", "p99 ms rest|reload", "max ms", "reloads ok/n (median ms)", "manager CPU % rest|reload"]
    rows, notes = [], []
    for r in report["results"]:  # type: ignore[union-attr]
        if r.get("skipped"):
            notes.append(f"{r['scenario']}: skipped: {r['skipped']}")
        if r.get("error"):
            notes.append(f"{r['scenario']}: ERROR: {r['error'][:300]}")
        for mode, m in (r.get("modes") or {}).items():
            if "reloading" not in m:
                continue
            st, rl = m["steady"], m["reloading"]
            e, rel = rl["errors"], rl["reloads"]
            rows.append([r["scenario"], mode, f"{st['rps']} | {rl['rps']}",
                         f"{st['failed']} | {rl['failed']} ({e['read']}/{e['write']}/{e['timeout']}/{e['non_2xx']})",
                         f"{st['refused']} | {rl['refused']}",
                         f"{st['latency_ms']['p99']} | {rl['latency_ms']['p99']}", f"{rl['latency_ms']['max']}",
                         f"{rel['ok']}/{rel['count']} ({rel['median_ms']})",
                         f"{st.get('manager_cpu_pct', '-')} | {rl.get('manager_cpu_pct', '-')}"])
        after = []
        state = r.get("state_after") or {}
        if "restarts" in state:
            after.append(f"restarts {state['restarts']}, handovers {state.get('handovers')}")
        if "workers" in state:
            after.append("restart_time " + "/".join(str(w["restart_time"]) for w in state["workers"]))
        fin = r.get("finish") or {}
        if "left_after_del" in fin:
            after.append(f"processes left after del: {fin['left_after_del']}")
        if after:
            notes.append(f"{r['scenario']}: after the reloads: " + "; ".join(after))
    if rows:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        for row in [head, *rows]:
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    for n in notes:
        print(n)
    print("\ntargets (issue 13: 0 failed requests and 0 refused connections under reloads every 2 s):")
    for t in report["targets"]:  # type: ignore[union-attr]
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {mark:<12} {t['target']}")


def install(args: argparse.Namespace) -> None:
    """pm2 into bench/.peers/npm (compare.py's way); uvicorn and gunicorn into the scratch venv. Nothing global."""
    if shutil.which("npm"):
        os.makedirs(compare.PEERS, exist_ok=True)
        with open(os.path.join(compare.PEERS, ".gitignore"), "w") as fh:
            fh.write("# scratch installs of the peers for bench/compare.py\n*\n")
        scratch = tempfile.mkdtemp(prefix="npm-", dir=SCRATCH)
        try:
            log(f"installing {args.pm2_spec} into {compare.PEERS}/npm")
            check(["npm", "install", "--prefix", os.path.join(compare.PEERS, "npm"), "--no-audit", "--no-fund",
                   "--loglevel=error", args.pm2_spec], dict(os.environ, PM2_HOME=scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        log("npm not found: pm2 skipped")
    if not os.path.exists(os.path.join(args.venv, "bin", "pip")):
        check([sys.executable, "-m", "venv", args.venv], os.environ.copy())
    log(f"installing {' '.join(PY_PACKAGES)} into {args.venv}")
    check([os.path.join(args.venv, "bin", "pip"), "install", "-q", *PY_PACKAGES], os.environ.copy(), timeout=900)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="all", help=f"comma separated: {', '.join(SCENARIOS)}; or the groups "
                    "pmon2, pm2, all (default all)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of each wrk run (default 30)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between reloads (default 2)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50; one wrk thread)")
    ap.add_argument("--timeout", type=float, default=10.0, help="wrk's request timeout in s (default 10): a "
                    "request answered later counts as failed")
    ap.add_argument("--modes", default="keepalive", help="comma separated: keepalive (wrk's default: 50 "
                    "connections, reused), close (`Connection: close`: a connection per request); default "
                    "keepalive")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load first (default 2)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after the reloads before the manager's "
                    "state is read (default 3)")
    ap.add_argument("--py-instances", type=int, default=4, help="instances of the Python app (default 4)")
    ap.add_argument("--py-ready", default="notify", help="`ready` of the Python app: notify (default), a check "
                    "such as tcp://..., or none")
    ap.add_argument("--go-setsid", action=argparse.BooleanOptionalAction, default=True, help="the Go server's "
                    "new copy calls setsid, leaving the old one's session: the issue's hardest case (default on)")
    ap.add_argument("--go-source", default=GO_FIXTURE, help="the Go server's source (default: the fixture, "
                    "tests/fixtures/graceful/main.go; its flags must be the same)")
    ap.add_argument("--uvicorn-cli", action="store_true", help="run `uvicorn --fd 3` itself rather than "
                    "bench/apps/uvicorn_fds.py (see there why)")
    ap.add_argument("--venv", default=os.path.join(SCRATCH, "venv"), help="the venv with uvicorn and gunicorn")
    ap.add_argument("--install-peers", action="store_true", help="npm-install pm2 into bench/.peers/ and "
                    "pip-install uvicorn and gunicorn into --venv first (never globally)")
    ap.add_argument("--pm2-spec", default="pm2@7")
    ap.add_argument("--keep", action="store_true", help="keep the run's scratch dir (homes, logs) at the end")
    ap.add_argument("--json", default=os.path.join(HERE, "results-zero-downtime.json"))
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        ap.error(f"--modes: use {', '.join(MODES)}")

    names: list[str] = []
    for part in (x.strip() for x in args.scenarios.split(",") if x.strip()):
        for n in GROUPS.get(part, [part]):
            if n not in KINDS:
                ap.error(f"unknown scenario {n!r}: use {', '.join([*SCENARIOS, *GROUPS])}")
            if n not in names:
                names.append(n)
    if not shutil.which("wrk"):
        print("wrk not found (Debian: apt-get install wrk)", file=sys.stderr)
        return 1
    os.makedirs(SCRATCH, exist_ok=True)
    if args.install_peers:
        install(args)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    run = Run(args.keep)
    report: dict[str, object] = {
        "machine": compare.machine(), "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pmon2_commit": compare.git_commit(),
        "wrk": first_line(["wrk", "-v"]),
        "settings": {k: getattr(args, k) for k in (
            "duration", "interval", "connections", "timeout", "modes", "warmup", "settle", "py_instances", "py_ready",
            "uvicorn_cli", "go_setsid", "go_source")},
        "results": [],
    }
    try:
        for n in names:
            log(f"{n}: start (load average {os.getloadavg()[0]:.2f})")
            report["results"].append(run_scenario(KINDS[n](run, args), args))  # type: ignore[union-attr]
    finally:
        run.close()
    by_name = {r["scenario"]: r for r in report["results"]}  # type: ignore[union-attr]
    report["targets"] = [{"scenario": n, "mode": mode, "target": f"{what} ({n}, {MODES[mode]})",
                          "met": verdict(by_name[n], mode) if n in by_name else None}
                         for n, what in TARGETS.items() for mode in args.modes]
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"load average at start: {report['machine']['loadavg_at_start']}")  # type: ignore[index]
    print_table(report)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
