"""REVIEW12: services as code broken as a pm2 / supervisor / docker-compose user, and as an attacker, would.

Each `xfail(strict=True)` test shows a bug of the current code (its reason names it); the others assert what
held and no other test covers: import -> dump -> apply of pm2 and supervisor files, YAML with env_file and
defaults re-applied, and an env_file that the caller may not read (a symbolic link to /etc/shadow) read
as a user other than root.

Real pmonds and real processes, through the `pmon` fixture; a user other than root is `nobody`, reached with
peer.request_as (the API) or a forked child that dropped to it (the CLI's side, appfile.load)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from procs import free_port

from .peer import request_as

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pmond as root, a client as nobody")


def write(pmon: Any, name: str, text: str) -> Path:
    path = pmon.work / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def plan_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The plan's lines, sorted, then the summary."""
    lines = proc.stdout.splitlines()
    return [*sorted(lines[:-1]), *lines[-1:]]


def pids(pmon: Any) -> dict[str, int]:
    return {s["name"]: s["pid"] for s in pmon.services()}


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def allow_nobody(pmon: Any) -> str:
    """pmond as root that `nobody` may reach; its socket path."""
    (pmon.home / "config.toml").write_text('allow_users = ["nobody"]\n')
    pmon.run("daemon", "start")
    for d in (pmon.home, pmon.home / "run"):
        os.chmod(d, 0o711)
    return str(pmon.socket)


def limited(megabytes: int) -> Any:
    """preexec_fn: an address-space limit, so that a CLI that reads without bound fails fast, not the host."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))
    return limit


def cli(pmon: Any, *args: str, megabytes: int = 400, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The CLI under an address-space limit (for inputs built to exhaust memory)."""
    return subprocess.run(pmon.cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=str(pmon.work),
                          env=pmon.env, stdin=subprocess.DEVNULL, preexec_fn=limited(megabytes))


# 1. idempotence and round trips


def test_dump_then_apply_of_the_dump_keeps_dollar_signs(pmon: Any) -> None:
    f = write(pmon, "pmon2.toml", """
        [services.pw]
        command = ["sh", "-c", "exec sleep 7371201 # $${HOME}"]
        env = { DB_PASSWORD = "pa$$$$w0rd" }
    """)
    pmon.run("apply", str(f))
    stored = json.loads(pmon.run("desc", "pw", "--json", "--show-env").stdout)
    assert stored["env"]["DB_PASSWORD"] == "pa$$w0rd" and stored["argv"][2].endswith("# ${HOME}")
    before = pids(pmon)
    dump = pmon.work / "dump.toml"
    dump.write_text(pmon.run("dump").stdout)
    proc = pmon.run("apply", str(dump), check=False)
    after = json.loads(pmon.run("desc", "pw", "--json", "--show-env").stdout)
    assert (after["env"]["DB_PASSWORD"], after["argv"]) == (stored["env"]["DB_PASSWORD"], stored["argv"])
    assert plan_lines(proc) == ["= unchanged pw", "applied: 0 created, 0 changed, 1 unchanged"]
    assert pids(pmon) == before


def test_import_procfile_then_dump_then_apply_changes_nothing(pmon: Any) -> None:
    tree = pmon.work / "shop"
    tree.mkdir()
    (tree / "Procfile").write_text("worker: exec sleep 73712${WORKER_SUFFIX:-02}\n")
    pmon.run("import", str(tree / "Procfile"))
    before = pids(pmon)
    dump = pmon.work / "dump.toml"
    dump.write_text(pmon.run("dump").stdout)
    env = {k: v for k, v in pmon.env.items() if k != "WORKER_SUFFIX"}
    proc = pmon.run("apply", str(dump), check=False, env=env)
    assert plan_lines(proc) == ["= unchanged worker", "applied: 0 created, 0 changed, 1 unchanged"], proc.stderr
    assert pids(pmon) == before


def test_import_then_dump_then_apply_changes_nothing_for_pm2_and_supervisor(pmon: Any) -> None:
    """What held: pm2 JSON (instances, increment_var, a '$' without braces, ms durations) and supervisor
    (numprocs, environment, exitcodes, a shared log file) come back from their dump unchanged."""
    (pmon.work / "logs").mkdir()
    eco = write(pmon, "ecosystem.json", """
        {"apps": [{"name": "api", "script": "/bin/sleep", "args": "7371301", "interpreter": "none",
                   "env": {"TOKEN": "a$b", "N": 5}, "instances": 2, "increment_var": "PORT", "kill_timeout": 1600},
                  {"name": "cron", "script": "/bin/sleep", "args": ["7371302"], "interpreter": "none",
                   "autorestart": false, "min_uptime": "5s", "max_restarts": 3}]}
    """)
    conf = write(pmon, "supervisord.conf", f"""
        [program:worker]
        command=/bin/sleep 73713%(process_num)02d
        numprocs=2
        process_name=%(program_name)s_%(process_num)02d
        environment=A="1",B="x y"
        directory=/tmp
        autorestart=unexpected
        exitcodes=0,3
        stopsignal=INT
        [program:web]
        command=/bin/sleep 7371399
        stdout_logfile={pmon.work}/logs/web.log
        redirect_stderr=true
    """)
    pmon.run("import", str(eco))
    pmon.run("import", str(conf))
    before = pids(pmon)
    assert set(before) == {"api:0", "api:1", "cron", "worker:0", "worker:1", "web"}
    dump = pmon.work / "dump.toml"
    dump.write_text(pmon.run("dump").stdout)
    assert plan_lines(pmon.run("apply", str(dump))) == [
        "= unchanged api", "= unchanged cron", "= unchanged web", "= unchanged worker",
        "applied: 0 created, 0 changed, 4 unchanged"]
    assert pids(pmon) == before


def test_yaml_with_env_file_and_defaults_applied_twice_touches_nothing(pmon: Any) -> None:
    """What held: YAML, [defaults] env merged key by key, an env_file with quotes and ${...} from earlier
    lines, instances with ${instance}, depends_on: the second apply changes nothing."""
    write(pmon, "app/.env", "export BASE=/srv\nDATA_DIR=\"${BASE}/data\"\nLITERAL='$NOT_EXPANDED'\n")
    f = write(pmon, "app/pmon2.yaml", """
        defaults:
          kill_timeout: 2
          env: {APP_ENV: production, LEVEL: info}
        services:
          db:
            command: sleep 7371401
            env_file: .env
          web:
            command: [sleep, "737140${instance}"]
            instances: 2
            env: {LEVEL: debug, WHO: "web-${instance}"}
            depends_on: {db: started}
    """)
    pmon.run("apply", str(f))
    before = pids(pmon)
    env = environ(before["web:1"])
    assert (env["APP_ENV"], env["LEVEL"], env["WHO"]) == ("production", "debug", "web-1")
    db = environ(before["db"])
    assert (db["DATA_DIR"], db["LITERAL"], db["LEVEL"]) == ("/srv/data", "$NOT_EXPANDED", "info")
    assert plan_lines(pmon.run("apply", str(f))) == ["= unchanged db", "= unchanged web",
                                                    "applied: 0 created, 0 changed, 2 unchanged"]
    assert pids(pmon) == before


def test_dump_of_a_group_scaled_to_one_keeps_its_names_on_a_fresh_pmond(pmon: Any) -> None:
    f = write(pmon, "pmon2.toml", '[services.web]\ncommand = "sleep 7371501"\ninstances = 2\n')
    pmon.run("apply", str(f))
    f.write_text('[services.web]\ncommand = "sleep 7371501"\ninstances = 1\n')
    pmon.run("apply", str(f))
    text = pmon.run("dump").stdout
    fresh = type(pmon)(Path(tempfile.mkdtemp(prefix="pm", dir="/tmp")))
    try:
        (fresh.work / "dump.toml").write_text(text)
        fresh.run("apply", str(fresh.work / "dump.toml"))
        assert sorted(pids(fresh)) == sorted(pids(pmon))
    finally:
        fresh.cleanup()


def test_autostart_turned_on_starts_the_service(pmon: Any) -> None:
    f = write(pmon, "pmon2.toml", '[services.job]\ncommand = "sleep 7371601"\nautostart = false\n')
    pmon.run("apply", str(f))
    assert pmon.desc("job")["status"] == "stopped"
    f.write_text('[services.job]\ncommand = "sleep 7371601"\nautostart = true\n')
    out = pmon.run("apply", str(f)).stdout
    assert "~ change job: autostart (start)" in out, out
    pmon.wait_service("job", lambda s: s["status"] == "running", timeout=2,
                      what="running once the file says autostart = true")


def test_scaling_a_stopped_group_leaves_it_stopped(pmon: Any) -> None:
    f = write(pmon, "pmon2.toml", '[services.web]\ncommand = "sleep 7371701"\ninstances = 2\n')
    pmon.run("apply", str(f))
    pmon.run("stop", "web")
    f.write_text('[services.web]\ncommand = "sleep 7371701"\ninstances = 3\n')
    pmon.run("apply", str(f))
    statuses = {s["name"]: s["status"] for s in pmon.services()}
    assert statuses == {"web:0": "stopped", "web:1": "stopped", "web:2": "stopped"}


def test_a_failed_rolling_change_is_finished_by_the_next_apply(pmon: Any) -> None:
    flag = pmon.work / "healthy"
    flag.touch()
    text = f"""
        [services.web]
        command = "sleep 7371801"
        instances = 2
        ready = "exec:test -e {flag}"
        start_timeout = 1
        env = {{ VERSION = "@V@" }}
    """
    f = write(pmon, "pmon2.toml", text.replace("@V@", "1"))
    pmon.run("apply", str(f))
    flag.unlink()  # the next version's check fails (a dependency down for a moment, say)
    f.write_text(textwrap.dedent(text.replace("@V@", "2")))
    failed = pmon.run("apply", str(f), check=False)
    assert failed.returncode == 1 and "not ready" in failed.stderr
    flag.touch()  # the problem is gone: apply the same file again
    again = pmon.run("apply", str(f), check=False)
    running = pids(pmon)
    assert {n: environ(p).get("VERSION") for n, p in running.items()} == {"web:0": "2", "web:1": "2"}, \
        f"desc says VERSION=2, the processes run the old one; the apply said: {again.stdout!r}"


# 2. bad input


def test_a_deeply_nested_file_is_a_one_line_error(pmon: Any) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    files = {"deep.json": '{"services": {"a": {"command": ' + deep + "}}}",
             "deep.toml": "[services.a]\ncommand = " + deep + "\n",
             "deep.yaml": "services:\n  a:\n    command: " + deep + "\n"}
    for name, text in files.items():
        path = pmon.work / name
        path.write_text(text)
        proc = pmon.run("apply", str(path), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 2, \
            f"{name}: {proc.returncode} {proc.stderr[-300:]!r}"
    assert pmon.daemon_pid() is None  # nothing was sent


def test_a_yaml_alias_bomb_is_refused_at_once(pmon: Any) -> None:
    lines = ['x0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 7)]
    lines += ["services:", "  a:", "    command: sleep 1", "    tags: *l6"]
    path = pmon.work / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 500
    t0 = time.monotonic()
    proc = cli(pmon, "apply", str(path), "--dry-run", megabytes=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, \
        proc.stderr[-300:]
    assert time.monotonic() - t0 < 5


def test_an_env_file_that_is_not_a_regular_file_is_refused(pmon: Any) -> None:
    f = write(pmon, "pmon2.toml", '[services.a]\ncommand = "sleep 1"\nenv_file = "/dev/zero"\n')
    proc = cli(pmon, "apply", str(f), "--dry-run", megabytes=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "/dev/zero" in proc.stderr, \
        proc.stderr[-300:]


def test_a_file_over_the_body_limit_says_so(pmon: Any) -> None:
    value = "x" * 4500
    text = "".join(f'[services.s{i}]\ncommand = "sleep 1"\nenv = {{ BIG = "{value}" }}\n\n' for i in range(1000))
    f = pmon.work / "many.toml"
    f.write_text(text)
    proc = pmon.run("apply", str(f), "--dry-run", check=False)
    assert proc.returncode != 0 and pmon.services() == []
    assert "Broken pipe" not in proc.stderr and "reset" not in proc.stderr, proc.stderr
    assert "too large" in proc.stderr or "4194304" in proc.stderr or "4 MiB" in proc.stderr, proc.stderr


def test_depends_on_a_unicode_name_written_decomposed(pmon: Any) -> None:
    f = write(pmon, "pmon2.toml", """
        [services."cafe\\u0301"]
        command = "sleep 7371901"

        [services.app]
        command = "sleep 7371902"
        depends_on = { "cafe\\u0301" = "started" }
    """)
    proc = pmon.run("apply", str(f), "--dry-run", check=False)
    assert proc.returncode == 0, proc.stderr
    assert plan_lines(proc)[:2] == ["+ create app", "+ create caf\u00e9"]


# 3. security: a user other than root


@needs_root
def test_an_env_file_the_caller_may_not_read_is_refused_without_its_content(pmon: Any) -> None:
    """What held: the CLI reads env files with the caller's rights, so a symbolic link to /etc/shadow (or a
    path through ..) in nobody's app file is a one-line error naming the file, and nothing of it leaks."""
    from dotenv import parser  # noqa: F401  (imported before the child drops root: /root is not nobody's)

    from pmon2 import appfile

    shared = Path(tempfile.mkdtemp(prefix="pmon2-review12-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        (shared / "secrets.env").symlink_to("/etc/shadow")
        app = shared / "pmon2.toml"
        app.write_text('[services.a]\ncommand = "sleep 1"\nenv_file = ["secrets.env", "../../etc/shadow"]\n')
        app.chmod(0o644)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nobody, then the CLI's own reading of the file
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                try:
                    appfile.load(str(app))
                    out = "loaded"
                except appfile.AppFileError as exc:
                    out = str(exc)
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            said = fh.read().decode()
        os.waitpid(pid, 0)
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)
    lines = said.splitlines()
    assert len(lines) == 2 and all("Permission denied" in line for line in lines), said
    assert "secrets.env" in lines[0] and "etc/shadow" in lines[1]
    assert "root:" not in said and "nobody:" not in said  # no line of /etc/shadow


@needs_root
def test_root_apply_never_turns_another_users_service_into_roots(pmon: Any) -> None:
    sock = allow_nobody(pmon)
    code, made = request_as(NOBODY, sock, "POST", "/v1/services",
                            {"argv": ["/bin/sleep", "7372001"], "cwd": "/tmp", "name": "api"})
    assert code == 201, made
    f = write(pmon, "pmon2.toml", '[services.api]\ncommand = "sleep 7372002"\n')
    proc = pmon.run("apply", str(f), check=False)
    svc = pmon.desc("api")
    assert svc["user"] == "nobody" and pmon.uid_of(svc["pid"]) == NOBODY, \
        f"nobody's api now runs as {svc['user']}; apply said {proc.stdout!r}"
    assert proc.returncode == 2 and "nobody" in proc.stderr


@needs_root
def test_a_root_service_never_logs_into_a_file_another_user_owns(pmon: Any) -> None:
    sock = allow_nobody(pmon)
    private = pmon.home / "private"
    private.mkdir(mode=0o700)  # a cwd nobody may not enter: its start fails, and no service is left
    code, out = request_as(NOBODY, sock, "POST", "/v1/apply", {"source": "/tmp/nobody.toml", "services": [
        {"name": "api", "argv": ["/bin/sleep", "7372101"], "cwd": str(private)}]})
    assert code == 200 and out["summary"]["failed"] == 1, out
    assert pmon.services() == []
    f = write(pmon, "pmon2.toml", '[services.api]\ncommand = ["sh", "-c", "echo ROOT_SECRET; exec sleep 7372102"]\n')
    pmon.run("apply", str(f))
    log = pmon.log_dir / "api-out.log"
    pmon.wait_for(lambda: "ROOT_SECRET" in log.read_text(), timeout=3)
    assert log.stat().st_uid == 0, f"root's service writes its output to a file of uid {log.stat().st_uid}"


# 4. depends_on and ready


def test_completed_on_a_service_that_restarts_always(pmon: Any) -> None:
    f = write(pmon, "pmon2.toml", """
        [services.migrate]
        command = ["sh", "-c", "exit 0"]
        start_timeout = 2

        [services.app]
        command = "sleep 7372201"
        depends_on = { migrate = "completed" }
    """)
    proc = pmon.run("apply", str(f), check=False)
    refused = proc.returncode == 2 and "restart" in proc.stderr  # checked: it would never stay completed
    ran = proc.returncode == 0 and "app" in pids(pmon)  # or: its first successful exit is the completion
    assert refused or ran, f"{proc.returncode}: {proc.stderr!r}"


def test_readiness_survives_a_pmond_crash(pmon: Any) -> None:
    port = free_port()  # nothing ever listens there
    text = f"""
        [services.deaf]
        command = "sleep 7372301"
        ready = "tcp://127.0.0.1:{port}"
        start_timeout = @T@

        [services.after]
        command = "sleep 7372302"
        depends_on = {{ deaf = "ready" }}
    """
    f = write(pmon, "pmon2.toml", text.replace("@T@", "30"))
    pmon.run("daemon", "start")
    applying = subprocess.Popen(pmon.cmd("apply", str(f)), cwd=str(pmon.work), env=pmon.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pmon.wait_for(lambda: any(s["name"] == "deaf" and s["status"] == "starting" and s["pid"]
                                  for s in pmon.services()), timeout=5, message="deaf started, not ready yet")
        daemon = pmon.daemon_pid()
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        applying.wait(timeout=10)
    finally:
        if applying.poll() is None:
            applying.kill()
            applying.wait()
    pmon.wait_dead(daemon, what="pmond")
    pmon.run("daemon", "start")
    assert pmon.desc("deaf")["status"] == "starting"
    f.write_text(textwrap.dedent(text.replace("@T@", "1")))
    proc = pmon.run("apply", str(f), check=False)
    assert proc.returncode == 1 and "after" not in pids(pmon), proc.stdout
