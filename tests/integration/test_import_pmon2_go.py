"""`pmon2 import pmon2-go`: a live Pmon2 (Go) installation taken over, not a process restarted (issue 14).

The Go Pmon2 is played by the test: a database with its schema (gorm's snake_case `process` table, with and
without the four newer columns) and real processes started as Pmon2 starts them (setsid, orphaned to init
by a double fork, the argv of their rows). A foreign `pmond` is a copy of sleep under that name. systemd and
upstart are stand-ins on PATH that record the calls they receive (this machine runs neither).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import is_alive

from .peer import request_as

NEWER = ('CREATE TABLE "process" ("id" integer primary key autoincrement,"created_at" datetime,"updated_at" datetime,'
         '"deleted_at" datetime,"pid" integer,"log" varchar(255),"name" varchar(255),"process_file" varchar(255),'
         '"args" varchar(255),"status" varchar(255),"auto_restart" bool,"uid" varchar(255),"username" varchar(255),'
         '"gid" varchar(255))')
OLDER = ('CREATE TABLE "process" ("id" integer primary key autoincrement,"created_at" datetime,"updated_at" datetime,'
         '"deleted_at" datetime,"pid" integer,"log" varchar(255),"name" varchar(255),"process_file" varchar(255),'
         '"args" varchar(255),"status" varchar(255))')
INDEX = 'CREATE INDEX idx_process_deleted_at ON "process"(deleted_at)'
NOBODY = 65534


class GoPmon2:
    """A Pmon2 (Go) installation as it is left on disk, with real processes it 'started'."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.home = home  # the pmon fixture's PMON2_HOME: processes carrying it are swept by its cleanup
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.data = root / "data"
        (self.data / "db").mkdir(parents=True)
        self.db = self.data / "db" / "data.db"
        self.pidfds: dict[int, int] = {}

    def program(self, name: str, script: str | None = None) -> str:
        """A copy of sleep named `name`, or a Python script with a #! line."""
        path = self.bin / name
        if script is None:
            shutil.copyfile(shutil.which("sleep") or "/bin/sleep", path)
        else:
            path.write_text(f"#!{sys.executable}\n{script}")
        path.chmod(0o755)
        return str(path)

    def spawn(self, argv: list[str], **env: str) -> int:
        """Start `argv` as Pmon2 does: in a new session (setsid), orphaned to init by a double fork. Returns
        once the program has been exec'd (the close-on-exec pipe reaches EOF), holding a pidfd on it."""
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GO_PMON2_TEST": "1",
                   "PMON2_HOME": str(self.home), **env}
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            try:
                os.close(r)
                child = os.fork()
                if child == 0:
                    try:
                        os.setsid()
                        os.chdir(self.root)
                        null = os.open(os.devnull, os.O_RDWR)
                        for fd in (0, 1, 2):
                            os.dup2(null, fd)
                        os.execve(argv[0], argv, environ)
                    finally:
                        os._exit(127)
                os.write(w, f"{child}\n".encode())
            finally:
                os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 64):
            data += chunk
        os.close(r)
        os.waitpid(middle, 0)
        pid = int(data.split()[0])
        self.pidfds[pid] = os.pidfd_open(pid)
        return pid

    def create(self, rows: list[dict[str, Any]], schema: str = NEWER) -> None:
        db = sqlite3.connect(self.db)
        db.execute(schema)
        db.execute(INDEX)
        for row in rows:
            row = {"created_at": "2026-11-01 10:00:00.000000000+00:00", "updated_at": "2026-11-01 10:00:00+00:00",
                   "log": str(self.root / f"{row['name'][:8]}.log"), **row}
            db.execute(f"INSERT INTO process ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
        db.commit()
        db.close()

    def fingerprint(self) -> dict[str, str]:
        """Every file under the data dir with the hash of its bytes: no write, no -wal, -shm or -journal."""
        return {str(p.relative_to(self.data)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.data.rglob("*")) if p.is_file()}

    def alive(self, pid: int) -> bool:
        return is_alive(pid)

    def kill_all(self) -> None:
        for fd in self.pidfds.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        self.pidfds.clear()


@pytest.fixture
def go(pmon: Any, tmp_path: Path) -> Iterator[GoPmon2]:
    installation = GoPmon2(tmp_path / "go", pmon.home)
    try:
        yield installation
    finally:
        installation.kill_all()


def import_json(pmon: Any, *args: str, rc: int = 0, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = pmon.run("import", "pmon2-go", *args, "--json", check=False, env=env)
    assert proc.returncode == rc, f"rc {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    report = json.loads(proc.stdout)
    report["by_name"] = {s["go_name"]: s for s in report["services"]}
    return report


def standins(tmp: Path, **scripts: str) -> Path:
    """Stand-in commands on PATH: each records `name args...` in $STANDIN_LOG, then runs its body."""
    d = tmp / "standin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = d / name
        path.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "{name} $*" >> "$STANDIN_LOG"\n{body}\n')
        path.chmod(0o755)
    return d


# the import itself


def test_live_processes_are_adopted_in_place_and_the_rest_sorted_out(pmon: Any, go: GoPmon2) -> None:
    api = go.program("api")
    worker = go.program("worker.py", "import time\ntime.sleep(100002)\n")
    pyapp = go.bin / "pyapp"
    pyapp.symlink_to(sys.executable)
    gone, busy, old, cron = go.program("gone"), go.program("busy"), go.program("old"), go.program("cron")
    noauto = go.program("noauto")
    p_api = go.spawn([api, "100001"], SERVICE_SECRET_TOKEN="t0k", GO_SVC="api")
    p_worker = go.spawn([worker, "a", "", "b"])  # a script, and Go's "a  b": a, "", b
    p_pyapp = go.spawn([str(pyapp), "-c", "__import__('time').sleep(100003)", "", "z"])
    stranger = go.spawn(["/bin/sleep", "100099"])  # holds the pid of a row whose process is gone
    p_busy_other = go.spawn([busy, "100098"])  # runs the program of a dead row, with other arguments
    p_deleted = go.spawn([old, "100004"])
    p_noauto = go.spawn([noauto, "100005"])
    go.create([
        {"name": "api", "pid": p_api, "process_file": api, "args": "100001", "status": "running", "auto_restart": 1,
         "uid": "0", "username": "", "gid": "0"},
        {"name": "worker py", "pid": p_worker, "process_file": worker, "args": "a  b", "status": "running",
         "auto_restart": 1},
        {"name": "pyapp", "pid": p_pyapp, "process_file": str(pyapp),
         "args": "-c __import__('time').sleep(100003)  z", "status": "failed", "auto_restart": 1},
        {"name": "gone", "pid": stranger, "process_file": gone, "args": "100006", "status": "running",
         "auto_restart": 1},
        {"name": "busy", "pid": 0, "process_file": busy, "args": "100007", "status": "failed", "auto_restart": 1},
        {"name": "old", "pid": p_deleted, "process_file": old, "args": "100004", "status": "running",
         "auto_restart": 1, "deleted_at": "2026-11-02 10:00:00+00:00"},
        {"name": "cron", "pid": 0, "process_file": cron, "args": "100008", "status": "stopped", "auto_restart": 1},
        {"name": "noauto", "pid": p_noauto, "process_file": noauto, "args": "100005", "status": "running",
         "auto_restart": 0},
    ])
    before = go.fingerprint()

    report = import_json(pmon, str(go.db), rc=1)  # rc 1: `busy` could not be imported
    by = report["by_name"]
    assert go.fingerprint() == before, "the Go database was written"
    assert report["schema"] == "newer" and [r["go_name"] for r in report["ignored"]] == ["old"]
    assert {n: s["outcome"] for n, s in by.items()} == {
        "api": "adopted", "worker py": "adopted", "pyapp": "adopted", "gone": "started", "busy": "not_imported",
        "cron": "stopped", "noauto": "adopted"}, (pmon.log_dir / "pmond.log").read_text()[-3000:]
    assert by["worker py"]["name"] == "worker-py" and by["worker py"]["renamed"]
    assert f"process {p_busy_other} runs {busy}" in by["busy"]["why"]
    assert any(f"process {stranger} not adopted" in n for n in by["gone"]["notes"])

    services = {s["name"]: s for s in pmon.services()}
    assert set(services) == {"api", "worker-py", "pyapp", "gone", "cron", "noauto"}
    for name, pid in (("api", p_api), ("worker-py", p_worker), ("pyapp", p_pyapp), ("noauto", p_noauto)):
        assert (services[name]["pid"], services[name]["restarts"], services[name]["status"]) == (pid, 0, "running")
    assert services["gone"]["status"] == "running" and services["gone"]["pid"] not in (None, stranger)
    assert services["cron"]["status"] == "stopped" and services["cron"]["pid"] is None
    assert services["noauto"]["autorestart"] is False and services["api"]["autorestart"] is True
    assert services["noauto"].get("restart", "no") == "no" and services["api"].get("restart", "always") == "always"
    # Strangers, the deleted row's process and the other `busy` run on, never signalled.
    for pid in (stranger, p_busy_other, p_deleted):
        assert go.alive(pid), f"process {pid} was signalled"
    assert all(s["pid"] not in (stranger, p_busy_other, p_deleted) for s in services.values())

    api_view = pmon.json("desc", "api", "--json", "--show-env")
    assert api_view["env"]["GO_SVC"] == "api" and api_view["cwd"] == str(go.root)  # from /proc/PID
    assert api_view["imported_from"]["adopted_pid"] == p_api and api_view["imported_from"]["row"] == 1
    assert api_view["out_log"] == str(go.root / "api.log")
    text = pmon.run("desc", "api").stdout
    assert "imported from Pmon2 (Go) on 20" in text and "adopted without a marker" in text
    assert any(e["kind"] == "adopt" for e in pmon.json("events", "api", "--json"))

    # From now on pmon2 supervises them: a kill -9 is a restart.
    os.kill(p_api, signal.SIGKILL)
    back = pmon.wait_service("api", lambda s: s["status"] == "running" and s["pid"] not in (None, p_api),
                             what="a restart after kill -9")
    assert back["restarts"] == 1
    assert "adopted without a marker" not in pmon.run("desc", "api").stdout  # a process pmon2 started
    assert services["worker-py"]["pid"] == p_worker and go.alive(p_worker)

    # A second import takes nothing twice.
    again = import_json(pmon, str(go.db), rc=1)
    assert all(s["outcome"] == "not_imported" for s in again["services"])
    assert all(s.get("already_imported") for s in again["services"] if s["go_name"] != "busy")
    assert len(pmon.services()) == 6 and go.fingerprint() == before


def test_an_older_database_without_the_newer_columns(pmon: Any, go: GoPmon2) -> None:
    a, b = go.program("alpha"), go.program("beta")
    pa, pb = go.spawn([a, "100011"]), go.spawn([b, "100012"])
    go.create([{"name": "alpha", "pid": pa, "process_file": a, "args": "100011", "status": "running"},
               {"name": "beta", "pid": pb, "process_file": b, "args": "100012", "status": "running"}], OLDER)
    before = go.fingerprint()
    report = import_json(pmon, str(go.db))
    assert report["schema"].startswith("older") and go.fingerprint() == before
    assert {s["go_name"]: (s["outcome"], s["pid"]) for s in report["services"]} == {
        "alpha": ("adopted", pa), "beta": ("adopted", pb)}
    for svc in pmon.services():
        assert svc["restarts"] == 0 and svc["autorestart"] is True and svc["pid"] in (pa, pb)


def test_config_file_and_pmon2_conf_lead_to_the_database(pmon: Any, go: GoPmon2) -> None:
    a = go.program("alpha")
    pa = go.spawn([a, "100013"])
    go.create([{"name": "alpha", "pid": pa, "process_file": a, "args": "100013", "status": "running"}])
    conf = go.root / "config.yml"
    conf.write_text(f'# pmon2 config\ndata: "{go.data}"   # data dir\nlogs: "/var/log/pmon2"\n')
    report = import_json(pmon, "--dry-run", env=dict(pmon.env, PMON2_CONF=str(conf)))
    assert report["database"] == str(go.db) and report["config"] == str(conf)
    assert report["by_name"]["alpha"]["outcome"] == "adopted"


def test_dry_run_changes_nothing(pmon: Any, go: GoPmon2) -> None:
    a, c = go.program("alpha"), go.program("cron")
    pa = go.spawn([a, "100021"])
    go.create([{"name": "alpha", "pid": pa, "process_file": a, "args": "100021", "status": "running"},
               {"name": "down", "pid": 0, "process_file": a, "args": "100022", "status": "failed"},
               {"name": "cron", "pid": 0, "process_file": c, "args": "100023", "status": "stopped"}])
    before = go.fingerprint()
    report = import_json(pmon, str(go.db), "--dry-run", rc=1)
    assert report["dry_run"] is True
    assert {s["go_name"]: s["outcome"] for s in report["services"]} == {
        "alpha": "adopted", "down": "not_imported", "cron": "stopped"}  # `down`: alpha runs its program
    assert go.fingerprint() == before
    assert not pmon.pidfile.exists() and not (pmon.home / "data").exists(), "the dry run started pmond"
    text = pmon.run("import", "pmon2-go", str(go.db), "--dry-run", check=False).stdout
    assert "would adopt" in text and "would leave stopped" in text and "nothing changed" in text
    assert go.alive(pa) and not pmon.pidfile.exists()


def test_pmond_checks_the_pid_itself(pmon: Any, go: GoPmon2) -> None:
    """pmond does not trust the CLI: a request naming a stranger's pid adopts nothing and signals nothing."""
    from pmon2.client import Client
    from pmon2.paths import resolve

    a = go.program("alpha")
    stranger = go.spawn(["/bin/sleep", "100031"])
    own = go.spawn([a, "100032"])
    pmon.run("daemon", "start")
    client = Client(resolve(pmon.env))
    origin = {"tool": "pmon2-go", "source": str(go.db), "row": 1, "name": "x"}
    answer = client.request("POST", "/v1/adopt", {"argv": [a, "100031"], "name": "x", "cwd": str(go.root),
                                                  "pid": stranger, "imported_from": origin})
    assert answer["outcome"] == "stopped" and answer["pid"] is None and go.alive(stranger)
    assert any("not adopted" in n and "not signalled" in n for n in answer["notes"])
    # The process that runs the argv is adopted; a second claim on it is refused.
    answer = client.request("POST", "/v1/adopt", {"argv": [a, "100032"], "name": "y", "cwd": str(go.root),
                                                  "pid": own})
    assert answer["outcome"] == "adopted" and answer["pid"] == own
    with pytest.raises(Exception, match="already service"):
        client.request("POST", "/v1/adopt", {"argv": [a, "100032"], "name": "z", "pid": own})


# the Go pmond


def fake_pmond(go: GoPmon2) -> int:
    """A `pmond` that is not pmon2's: a copy of sleep under that name (its /proc/PID/exe says pmond)."""
    d = go.root / "usr-local-pmon2-bin"
    d.mkdir()
    exe = d / "pmond"
    shutil.copyfile(shutil.which("sleep") or "/bin/sleep", exe)
    exe.chmod(0o755)
    return go.spawn([str(exe), "100090"])


def two_services(go: GoPmon2) -> tuple[int, int]:
    a, b = go.program("alpha"), go.program("beta")
    pa, pb = go.spawn([a, "100041"]), go.spawn([b, "100042"])
    go.create([{"name": "alpha", "pid": pa, "process_file": a, "args": "100041", "status": "running"},
               {"name": "beta", "pid": pb, "process_file": b, "args": "100042", "status": "running"}])
    return pa, pb


def test_a_running_go_pmond_makes_the_import_refuse(pmon: Any, go: GoPmon2) -> None:
    pa, pb = two_services(go)
    daemon = fake_pmond(go)
    before = go.fingerprint()
    proc = pmon.run("import", "pmon2-go", str(go.db), check=False, env=dict(pmon.env, PMON2_IMPORT_INIT="none"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"pmond runs (pid {daemon}" in proc.stderr and f"kill -TERM {daemon}" in proc.stderr
    assert "--stop-old" in proc.stderr and "Traceback" not in proc.stderr
    assert go.alive(daemon) and go.alive(pa) and go.alive(pb)
    assert go.fingerprint() == before and not pmon.pidfile.exists()
    # The dry run says so too, and still shows the plan.
    report = import_json(pmon, str(go.db), "--dry-run", env=dict(pmon.env, PMON2_IMPORT_INIT="none"))
    assert report["go_pmond"][0]["pid"] == daemon and report["go_pmond"][0]["steps"] == [f"kill -TERM {daemon}"]


def test_stop_old_by_hand_signals_the_go_pmond_only(pmon: Any, go: GoPmon2) -> None:
    pa, pb = two_services(go)
    daemon = fake_pmond(go)
    report = import_json(pmon, str(go.db), "--stop-old", env=dict(pmon.env, PMON2_IMPORT_INIT="none"))
    assert not go.alive(daemon)
    assert report["stop_old"] == [f"sent SIGTERM to the Go pmond (pid {daemon}) only"]
    assert go.alive(pa) and go.alive(pb)
    assert sorted(s["pid"] for s in pmon.services()) == sorted([pa, pb])


def test_stop_old_under_systemd_moves_the_services_out_then_stops_the_unit(pmon: Any, go: GoPmon2,
                                                                         tmp_path: Path) -> None:
    pa, pb = two_services(go)
    daemon = fake_pmond(go)
    cgroup = tmp_path / "cgroup" / "system.slice" / "pmon2.service"
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text(f"{daemon}\n{pa}\n{pb}\n")
    log, states = tmp_path / "calls.log", tmp_path / "states.log"
    # The stand-in systemd: busctl moves the pids (cgroup.procs keeps pmond alone) and notes whether pmond
    # was frozen meanwhile; `systemctl stop` stops the unit's main process as systemd does (SIGTERM, then SIGCONT).
    path = standins(
        tmp_path,
        busctl=f'cut -d" " -f3 /proc/{daemon}/stat >> "{states}"; echo {daemon} > "{cgroup}/cgroup.procs"; '
               'echo \'o "/org/freedesktop/systemd1/job/42"\'',
        systemctl=f'[ "$1" = stop ] && kill -TERM {daemon} && kill -CONT {daemon}; exit 0')
    env = dict(pmon.env, PATH=f"{path}:{pmon.env['PATH']}", STANDIN_LOG=str(log), PMON2_IMPORT_INIT="systemd",
               PMON2_IMPORT_CGROUP=str(cgroup))
    before = go.fingerprint()
    report = import_json(pmon, str(go.db), "--stop-old", env=env)
    calls = log.read_text().splitlines()
    assert calls == [
        "busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager "
        f"StartTransientUnit ssa(sv)a(sa(sv)) pmon2-adopted.scope fail 1 PIDs au 2 {min(pa, pb)} {max(pa, pb)} 0",
        "systemctl stop pmon2.service",
        "systemctl disable pmon2.service",
    ]
    assert states.read_text().split() == ["T"], "pmond was not frozen while its services moved"
    pmon.wait_dead(daemon)
    assert go.alive(pa) and go.alive(pb), "a managed process died"
    assert {s["go_name"]: (s["outcome"], s["pid"]) for s in report["services"]} == {
        "alpha": ("adopted", pa), "beta": ("adopted", pb)}
    assert go.fingerprint() == before


def test_a_failed_systemd_step_resumes_the_go_pmond(pmon: Any, go: GoPmon2, tmp_path: Path) -> None:
    pa, pb = two_services(go)
    daemon = fake_pmond(go)
    cgroup = tmp_path / "cgroup" / "pmon2.service"
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text(f"{daemon}\n{pa}\n")
    path = standins(tmp_path, busctl='echo "Access denied" >&2; exit 1', systemctl="exit 0")
    env = dict(pmon.env, PATH=f"{path}:{pmon.env['PATH']}", STANDIN_LOG=str(tmp_path / "calls.log"),
               PMON2_IMPORT_INIT="systemd", PMON2_IMPORT_CGROUP=str(cgroup))
    proc = pmon.run("import", "pmon2-go", str(go.db), "--stop-old", check=False, env=env)
    assert proc.returncode == 1 and "Access denied" in proc.stderr, proc.stderr
    assert "systemctl" not in (tmp_path / "calls.log").read_text()
    assert go.alive(daemon) and Path(f"/proc/{daemon}/stat").read_text().rpartition(")")[2].split()[0] != "T"
    assert go.alive(pa) and go.alive(pb) and pmon.services() == []


def test_stop_old_under_upstart_stops_its_job(pmon: Any, go: GoPmon2, tmp_path: Path) -> None:
    pa, pb = two_services(go)
    daemon = fake_pmond(go)
    log = tmp_path / "calls.log"
    path = standins(tmp_path, initctl=(
        f'case "$1" in list) echo "pmond (/usr/local/pmon2/bin/pmond) start/running, process {daemon}";; '
        f'stop) kill -TERM {daemon};; esac'))
    env = dict(pmon.env, PATH=f"{path}:{pmon.env['PATH']}", STANDIN_LOG=str(log), PMON2_IMPORT_INIT="upstart")
    report = import_json(pmon, str(go.db), "--stop-old", env=env)
    assert log.read_text().splitlines() == ["initctl list", "initctl stop pmond EXEC=/usr/local/pmon2/bin/pmond"]
    pmon.wait_dead(daemon)
    assert go.alive(pa) and go.alive(pb)
    assert sorted(s["pid"] for s in report["services"]) == sorted([pa, pb])


# who may import


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pmond as root, a client as nobody")
def test_adoption_is_roots_alone(pmon: Any, go: GoPmon2) -> None:
    a = go.program("alpha")
    pa = go.spawn([a, "100051"])
    (pmon.home / "config.toml").write_text('allow_users = ["nobody"]\n')
    pmon.run("daemon", "start")
    for d in (pmon.home, pmon.home / "run"):
        os.chmod(d, 0o711)
    status, _ = request_as(NOBODY, str(pmon.socket), "POST", "/v1/adopt",
                           {"argv": [a, "100051"], "pid": pa, "name": "alpha"})
    assert status == 403 and pmon.services() == [] and go.alive(pa)
