"""`pmon2 import FILE` under a real pmond (issue 12, requirement 6): a pm2 ecosystem (.json and .config.js), a
supervisord.conf with an [include] and numprocs, and a Procfile with .env. Each one runs, and its services
match the source: names, argv, cwd, env, instances (read from /proc, not only from pmond's view)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "import"


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


def cmdline(pid: int) -> list[str]:
    """argv of a process; a program found in PATH shows by its name (a pyenv shim execs the real python3)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    return [os.path.basename(argv[0]), *argv[1:]] if argv and not argv[0].startswith(".") else argv


def runs(pmon: Any, pid: int, argv: list[str]) -> None:
    """Process `pid` runs `argv` (waiting out a PATH shim, such as pyenv's, that execs the real program)."""
    pmon.wait_for(lambda: cmdline(pid) == argv, timeout=5, message=lambda: f"{pid} to run {argv}: {cmdline(pid)}")


def cwd_of(pid: int) -> str:
    return str(Path(f"/proc/{pid}/cwd").readlink())


def prepare(pmon: Any, kind: str) -> Path:
    """The fixture tree, copied where the services may write (their logs), and pmond up with POST /v1/apply."""
    from pmon2 import paths
    from pmon2.client import ApiError, Client

    tree = pmon.work / kind
    shutil.copytree(FIXTURES / kind, tree)
    pmon.run("daemon", "start")
    client = Client(paths.resolve({"PMON2_HOME": str(pmon.home)}))
    try:
        client.request("POST", "/v1/apply", {}, autostart=False)
    except ApiError as exc:
        if exc.status == 404:
            pytest.skip("POST /v1/apply answers 404: pmond's apply endpoint has not landed")
    return tree


def running(pmon: Any, names: set[str]) -> dict[str, dict[str, Any]]:
    """Wait until exactly `names` exist and every one runs; their views, by name."""
    def check() -> dict[str, dict[str, Any]] | None:
        services = {s["name"]: s for s in pmon.services()}
        if set(services) == names and all(s["status"] == "running" and pmon.is_alive(s["pid"])
                                          for s in services.values()):
            return services
        return None

    return pmon.wait_for(check, timeout=10, message=lambda: f"{sorted(names)} all running: {pmon.services()}")


def logged(pmon: Any, path: Path, *needles: str) -> None:
    """Every needle shows in the log file (each service prints a line once it started)."""
    def check() -> bool:
        return path.exists() and all(n in path.read_text() for n in needles)

    pmon.wait_for(check, timeout=5, message=lambda: f"{needles} in {path}: "
                  f"{path.read_text() if path.exists() else 'no file'!r}")


def test_import_pm2_ecosystem_json(pmon: Any) -> None:
    tree = prepare(pmon, "pm2")
    out = pmon.run("import", str(tree / "ecosystem.json"), "--env", "production").stdout
    assert "ecosystem.json: pm2 ecosystem file, 3 services: api, queue-worker, heartbeat" in out
    assert "not mapped: api.max_memory_restart: not in pmon2 yet" in out
    assert "+ create api (2 instances)" in out and "applied: 3 created" in out
    services = running(pmon, {"api:0", "api:1", "queue-worker", "heartbeat"})

    for i in (0, 1):
        pid = services[f"api:{i}"]["pid"]
        runs(pmon, pid, ["python3", "-X", "dev", str(tree / "api.py"), "--workers", "2", "--log-level", "info"])
        assert cwd_of(pid) == str(tree)
        env = environ(pid)
        assert (env["PORT"], env["NODE_APP_INSTANCE"]) == (str(8100 + i), str(i))  # increment_var PORT
        assert (env["APP_ENV"], env["FEATURE_FLAGS"], env["PYTHONUNBUFFERED"]) == ("production", '{"beta":true}', "1")
    worker = pmon.desc("queue-worker")
    runs(pmon, worker["pid"], ["python3", str(tree / "queue_worker.py"), "--queue", "default", "--price-cap", "$5"])
    assert worker["tags"] == ["workers"] and worker["source"] == str(tree / "ecosystem.json")
    shell = "bash" if shutil.which("bash") else "sh"  # a script with a space is a command line for pm2
    assert pmon.desc("heartbeat")["argv"] == [shell, "-c", "sleep 100000"]
    api = pmon.desc("api:0")
    assert (api["restart"], api["kill_timeout"]) == ("on-failure", 1.6)
    logged(pmon, tree / "logs" / "api:0-out.log", "on port 8100")  # log_dir: pmon2 names the files
    logged(pmon, tree / "logs" / "api:1-out.log", "on port 8101")

    again = pmon.run("import", str(tree / "ecosystem.json"), "--env", "production").stdout
    assert "applied: 0 created, 0 changed, 3 unchanged" in again
    assert {s["name"]: s["pid"] for s in pmon.services()} == {n: s["pid"] for n, s in services.items()}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: .config.js files need it")
def test_import_pm2_ecosystem_config_js(pmon: Any) -> None:
    tree = prepare(pmon, "pm2")
    out = pmon.run("import", str(tree / "ecosystem.config.js")).stdout
    assert "not mapped: shop-api.exec_mode: pmon2 has no cluster mode" in out
    assert "not mapped: nightly-report.cron_restart" in out
    services = running(pmon, {"shop-api:0", "shop-api:1", "mailer", "nightly-report"})
    for i in (0, 1):
        pid = services[f"shop-api:{i}"]["pid"]
        runs(pmon, pid, ["node", "--max-old-space-size=256", str(tree / "server.js")])
        env = environ(pid)
        assert (env["PORT"], env["NODE_APP_INSTANCE"], env["NODE_ENV"]) == (str(3000 + i), str(i), "development")
    mailer = services["mailer"]["pid"]
    runs(pmon, mailer, ["python3", str(tree / "mailer.py"), "--queue", "mail", "--batch", "50"])
    assert environ(mailer)["MAIL_FROM"] == "Shop <shop@example.com>" and cwd_of(mailer) == str(tree)
    runs(pmon, services["nightly-report"]["pid"], ["sleep", "100000"])
    assert pmon.desc("nightly-report")["restart"] == "no"
    logged(pmon, tree / "logs" / "shop-api-out.log", "shop-api 0 up on port 3000", "shop-api 1 up on port 3001")


def test_import_supervisord_conf_with_include_and_numprocs(pmon: Any) -> None:
    tree = prepare(pmon, "supervisor")
    web_conf = tree / "conf.d" / "web.conf"
    # user=www-data needs root and a tree that user may write its logs in; the user mapping has a unit test
    web_conf.write_text(re.sub(r"^user=.*\n", "", web_conf.read_text(), flags=re.M))
    out = pmon.run("import", str(tree / "supervisord.conf")).stdout
    assert "supervisord.conf: supervisor config, 3 services: scheduler, web, worker" in out
    assert "not mapped: eventlistener:memmon: pmon2 has no event listeners" in out
    assert "+ create web (3 instances)" in out

    def settled() -> dict[str, dict[str, Any]] | None:
        services = {s["name"]: s for s in pmon.services()}
        ok = set(services) == {"scheduler", "web:0", "web:1", "web:2", "worker"} and all(
            s["status"] == ("stopped" if n == "scheduler" else "running") for n, s in services.items())
        return services if ok else None

    services = pmon.wait_for(settled, timeout=10, message="web x3 and worker running, scheduler stopped (autostart)")
    for i in range(3):
        pid = services[f"web:{i}"]["pid"]
        runs(pmon, pid, ["python3", "-u", str(tree / "conf.d" / ".." / "app" / "web.py"), f"--port={8000 + i}",
                         "--name=web"])
        assert cwd_of(pid) == str(tree / "app")
        env = environ(pid)
        assert (env["GREETING"], env["WEB_CONCURRENCY"], env["APP_ENV"], env["TZ"]) == (
            "hello, world", "2", "production", "UTC")
        assert env["PYTHONPATH"] == str(tree / "conf.d" / ".." / "app")
    web = pmon.desc("web:0")
    assert (web["tags"], web["stop_signal"], web["kill_timeout"], web["min_uptime"]) == (["shop"], "SIGQUIT", 30, 5)
    worker = pmon.desc("worker")
    assert (worker["restart"], worker["success_exit_codes"], worker["tags"]) == ("on-failure", [0, 3], ["shop"])
    assert environ(worker["pid"])["DISCOUNT"] == "10%"
    for i in range(3):  # one log per process, as supervisor had (but named by pmon2)
        logged(pmon, tree / "logs" / f"web:{i}-out.log", f"--port={8000 + i}")
    logged(pmon, tree / "logs" / "worker-out.log", "worker --queue=default --concurrency=4 (redis://localhost:6379/0)")


def test_import_procfile_with_dotenv(pmon: Any) -> None:
    tree = prepare(pmon, "procfile")
    out = pmon.run("import", str(tree / "Procfile")).stdout
    assert "Procfile, 3 services: web, worker, clock" in out
    assert "not mapped: Procfile:5: release:" in out
    running(pmon, {"web", "worker", "clock"})
    for name, port, command in (("web", 5000, "python3 app/web.py --port $PORT --workers ${WEB_CONCURRENCY:-2}"),
                                ("worker", 5100, "python3 app/worker.py --queue default 2>&1"),
                                ("clock", 5200, "sleep 100000")):
        svc = pmon.desc(name)
        assert svc["argv"] == ["sh", "-c", command] and svc["cwd"] == str(tree)
        env = environ(svc["pid"])
        assert env["PORT"] == str(port)
        assert (env["SECRET_KEY"], env["LOG_LEVEL"], env["GREETING"]) == ("dev-only-not-secret", "info", "hello $USER")
        assert cwd_of(svc["pid"]) == str(tree)
    logged(pmon, pmon.log_dir / "web-out.log", "web --port 5000 --workers 2 (postgres://shop:s3cret@localhost:5432/shop)")
    logged(pmon, pmon.log_dir / "worker-out.log", "worker --queue default (info)")
