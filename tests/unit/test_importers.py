"""`pmon2 import FILE` (issue 12, requirement 6): pm2 ecosystem files, supervisord.conf with its includes, and
Procfiles with .env, converted to app-file documents: each fixture to an exact document and an exact list of
what did not map, then the rules one by one."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pmon2 import appfile, cli
from pmon2.importers import formats, pm2, procfile, supervisord
from pmon2.importers.formats import ConvertError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "import"
PM2 = str(FIXTURES / "pm2")
SUP = str(FIXTURES / "supervisor")
PROC = str(FIXTURES / "procfile")
PATH = "/usr/local/bin:/usr/bin:/bin"
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(autouse=True)
def _plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same PATH everywhere: supervisor's %(ENV_PATH)s and pm2's lookups of programs depend on it."""
    monkeypatch.setenv("PATH", PATH)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def applies(document: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    """The document passes every check of `pmon2 apply` (appfile.load): the services it would send."""
    target = tmp_path / "converted.toml"
    target.write_text(formats.to_toml(document))
    return appfile.load(str(target), environ={"PATH": PATH})["services"]


# the fixtures, whole


PM2_CONFIG_JS = {
    "shop-api": {"command": ["node", "--max-old-space-size=256", f"{PM2}/server.js"], "cwd": PM2,
                 "env": {"NODE_ENV": "production", "DATABASE_URL": "postgres://shop:s3cret@localhost:5432/shop",
                         "NODE_APP_INSTANCE": "${instance}"},
                 "kill_timeout": 4, "log": f"{PM2}/logs/shop-api-out.log", "instances": 2, "port": 3000},
    "mailer": {"command": ["python3", f"{PM2}/mailer.py", "--queue", "mail", "--batch", "50"], "cwd": PM2,
               "env": {"SMTP_HOST": "localhost", "MAIL_FROM": "Shop <shop@example.com>", "PYTHONUNBUFFERED": "1"},
               "max_restarts": 10, "min_uptime": 10, "backoff_base": 2},
    "nightly-report": {"command": ["sleep", "100000"], "cwd": PM2, "restart": "no"},
}
PM2_CONFIG_JS_UNMAPPED = [
    ("deploy", "pm2 deploy (git pull and hooks on remote hosts) is not part of pmon2"),
    ("shop-api.exec_mode", "pmon2 has no cluster mode: use instances with a port (done: each instance gets its own "
                           "PORT = 3000 + its number)"),
    ("shop-api.error_file", f"merge_logs: stdout and stderr both go to one file, {PM2}/logs/shop-api-out.log"),
    ("shop-api.max_memory_restart", "not in pmon2 yet: no restart on memory use"),
    ("shop-api.listen_timeout", "goes with wait_ready: with a `ready` check, `start_timeout` is the limit"),
    ("shop-api.time", "pmon2 does not put a time in front of log lines"),
    ("nightly-report.cron_restart", "not in pmon2 yet: no restarts on a schedule (a cron job can run "
                                    "`pmon2 restart NAME`)"),
    ("nightly-report.watch", "not in pmon2 yet: pmon2 does not restart a service when its files change"),
    ("nightly-report.ignore_watch", "not in pmon2 yet: goes with watch"),
]


@needs_node
def test_pm2_config_js_with_env_production(tmp_path: Path) -> None:
    fmt, document, unmapped = formats.convert(f"{PM2}/ecosystem.config.js", env_name="production")
    assert fmt == "pm2"
    assert document == {"defaults": {}, "services": PM2_CONFIG_JS}
    assert list(document["services"]) == ["shop-api", "mailer", "nightly-report"]  # the file's order
    assert unmapped == PM2_CONFIG_JS_UNMAPPED
    assert [s["name"] for s in applies(document, tmp_path)] == ["shop-api", "mailer", "nightly-report"]


@needs_node
def test_pm2_config_js_without_env_keeps_env_and_names_the_others() -> None:
    _, document, unmapped = formats.convert(f"{PM2}/ecosystem.config.js")
    assert document["services"]["shop-api"]["env"] == {"NODE_ENV": "development", "NODE_APP_INSTANCE": "${instance}"}
    assert ("shop-api.env_production", "another environment: `pmon2 import FILE --env production` uses it") \
        in unmapped


def test_pm2_json(tmp_path: Path) -> None:
    shell = "bash" if shutil.which("bash") else "sh"
    _, document, unmapped = formats.convert(f"{PM2}/ecosystem.json", env_name="staging")
    assert document == {"defaults": {}, "services": {
        "api": {"command": ["python3", "-X", "dev", f"{PM2}/api.py", "--workers", "2", "--log-level", "info"],
                "cwd": PM2,
                "env": {"APP_ENV": "staging", "FEATURE_FLAGS": '{"beta":true}', "PYTHONUNBUFFERED": "1",
                        "NODE_APP_INSTANCE": "${instance}"},
                "restart": "on-failure", "success_exit_codes": [0], "backoff_base": 0.1, "kill_timeout": 1.6,
                "log_dir": f"{PM2}/logs", "instances": 2, "port": 8100},
        "queue-worker": {"command": ["python3", f"{PM2}/queue_worker.py", "--queue", "default", "--price-cap", "$$5"],
                         "cwd": PM2, "env": {"PYTHONUNBUFFERED": "1"}, "max_restarts": 5, "min_uptime": 5,
                         "tags": ["workers"]},
        "heartbeat": {"command": [shell, "-c", "sleep 100000"], "cwd": PM2},
    }}
    assert unmapped == [
        ("api.env_production", "another environment: `pmon2 import FILE --env production` uses it"),
        ("api.out_file", f"pmon2 names the file itself: {PM2}/logs/api:N-out.log, one per instance N, not "
                         f"{PM2}/logs/api-out.log"),
        ("api.error_file", f"pmon2 names the file itself: {PM2}/logs/api:N-err.log, one per instance N, not "
                           f"{PM2}/logs/api-err.log"),
        ("api.log_date_format", "pmon2 does not put a time in front of log lines"),
        ("api.max_memory_restart", "not in pmon2 yet: no restart on memory use"),
        ("queue worker.name", "renamed to 'queue-worker': 'queue worker': ' ' is not allowed (letters, digits and "
                              ". _ - @ +, at most 64 characters, not starting with '.' or '-', not only digits)"),
        ("queue worker.wait_ready", "pmon2 has no ready message: set `ready` to a tcp://, http:// or exec: check"),
        ("heartbeat.treekill", "pmon2 always signals the whole process group"),
    ]
    sent = {s["name"]: s for s in applies(document, tmp_path)}
    assert sent["queue-worker"]["argv"][-1] == "$5"  # a $ of the source reaches the service as it was
    assert sent["api"]["env"]["NODE_APP_INSTANCE"] == "${instance}"  # left for pmond, per instance


def test_pm2_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    _, document, unmapped = formats.convert(f"{PM2}/ecosystem.yaml")
    assert document == {"defaults": {}, "services": {
        "bot": {"command": ["node", f"{PM2}/bot.js"], "cwd": PM2,
                "env": {"NODE_ENV": "production", "SLACK_TOKEN": "xoxb-not-a-real-token",
                        **({"NODE_APP_INSTANCE": "${instance}"} if (os.cpu_count() or 1) > 1 else {})},
                "min_uptime": 2, "kill_timeout": 3, "log": f"{PM2}/logs/bot.log",
                **({"instances": os.cpu_count()} if (os.cpu_count() or 1) > 1 else {})},
        "scraper": {"command": ["bash", f"{PM2}/scraper.sh"], "cwd": PM2, "user": "www-data", "group": "www-data",
                    "log_dir": f"{PM2}/logs"},
    }}
    assert unmapped == [
        ("scraper.out_file", "pmon2 always keeps a service's output: it goes to pmon2's log dir"),
        ("scraper.error_file", f"pmon2 names the file itself: {PM2}/logs/scraper-err.log, not "
                               f"{PM2}/logs/scraper-errors.log"),
        ("scraper.cron_restart", "not in pmon2 yet: no restarts on a schedule (a cron job can run "
                                 "`pmon2 restart NAME`)"),
        ("scraper.max_memory_restart", "not in pmon2 yet: no restart on memory use"),
    ]
    applies(document, tmp_path)


def test_supervisord_conf_with_include_numprocs_and_group(tmp_path: Path) -> None:
    fmt, document, unmapped = formats.convert(f"{SUP}/supervisord.conf")
    assert fmt == "supervisord"
    base_env = {"APP_ENV": "production", "TZ": "UTC"}
    assert document == {"defaults": {}, "services": {
        "scheduler": {"command": ["sleep", "100000"], "cwd": "/", "env": base_env, "autostart": False,
                      "restart": "no"},
        "web": {"command": ["python3", "-u", f"{SUP}/conf.d/../app/web.py", "--port=${port}", "--name=web"],
                "cwd": f"{SUP}/app",
                "env": {**base_env, "PYTHONPATH": f"{SUP}/conf.d/../app", "WEB_CONCURRENCY": "2",
                        "GREETING": "hello, world"},
                "user": "www-data", "max_restarts": 5, "min_uptime": 5, "kill_timeout": 30, "stop_signal": "SIGQUIT",
                "log_dir": f"{SUP}/logs", "log_max_size": "20M", "log_keep": 5, "instances": 3,
                "port": 8000, "tags": ["shop"]},
        "worker": {"command": ["python3", f"{SUP}/conf.d/../app/worker.py", "--queue=default", "--concurrency=4"],
                   "cwd": f"{SUP}/app",
                   "env": {**base_env, "BROKER_URL": "redis://localhost:6379/0", "PATH": f"/srv/shop/venv/bin:{PATH}",
                           "DISCOUNT": "10%"},
                   "restart": "on-failure", "success_exit_codes": [0, 3], "min_uptime": 10, "kill_timeout": 600,
                   "stop_signal": "SIGTERM", "log_dir": f"{SUP}/logs", "tags": ["shop"]},
    }}
    assert unmapped == [
        ("eventlistener:memmon", "pmon2 has no event listeners"),
        ("program:scheduler.stopasgroup", "pmon2 always signals the whole process group, never the main process "
                                          "alone"),
        ("program:scheduler.stdout_logfile", "pmon2 always keeps a service's output: it goes to pmon2's log dir"),
        ("program:scheduler.process_name", "the service is named 'scheduler', not 'cron-0': pmon2 has one name per "
                                           "service"),
        ("program:web.stopasgroup", "pmon2 always signals the whole process group: nothing to set"),
        ("program:web.killasgroup", "pmon2 always signals the whole process group: nothing to set"),
        ("program:web.stdout_logfile", f"one file per process: pmon2 names the files itself, in {SUP}/logs"),
        ("program:web.redirect_stderr", "pmon2 keeps stderr apart, in NAME:N-err.log"),
        ("program:worker.priority", "pmon2 orders starts by depends_on, not by priority"),
        ("program:worker.umask", "pmon2 has no umask setting: a service gets pmond's"),
    ]
    sent = {s["name"]: s for s in applies(document, tmp_path)}
    assert sent["web"]["argv"][3] == "--port=${port}" and sent["web"]["port"] == 8000


def test_procfile_with_dotenv(tmp_path: Path) -> None:
    fmt, document, unmapped = formats.convert(f"{PROC}/Procfile")
    assert fmt == "procfile"
    env = {"DATABASE_URL": "postgres://shop:s3cret@localhost:5432/shop", "SECRET_KEY": "dev-only-not-secret",
           "LOG_LEVEL": "info", "GREETING": "hello $$USER", "WEB_CONCURRENCY": "2"}
    assert document == {"defaults": {}, "services": {
        "web": {"command": ["sh", "-c", "python3 app/web.py --port $$PORT --workers $${WEB_CONCURRENCY:-2}"],
                "cwd": PROC, "env": env, "port": 5000},
        "worker": {"command": ["sh", "-c", "python3 app/worker.py --queue default 2>&1"], "cwd": PROC, "env": env,
                   "port": 5100},
        "clock": {"command": ["sh", "-c", "sleep 100000"], "cwd": PROC, "env": env, "port": 5200},
    }}
    assert unmapped == [("Procfile:5", "release: Heroku runs release once per deploy, before the other processes; "
                                       "pmon2 has no deploy phase: run it before pmon2 apply")]
    sent = {s["name"]: s for s in applies(document, tmp_path)}
    assert sent["web"]["argv"][2] == "python3 app/web.py --port $PORT --workers ${WEB_CONCURRENCY:-2}"
    assert sent["web"]["env"]["GREETING"] == "hello $USER"


# format detection and output


@pytest.mark.parametrize(("name", "text", "fmt"), [
    ("Procfile", "web: x\n", "procfile"), ("Procfile.dev", "web: x\n", "procfile"),
    ("ecosystem.config.js", "", "pm2"), ("pm2.json", "{}", "pm2"), ("apps.yml", "apps: []", "pm2"),
    ("supervisord.conf", "", "supervisord"), ("app.ini", "", "supervisord"),
    ("processes", "[program:x]\ncommand=sleep 1\n", "supervisord"),
    ("processes", '{"apps": [{"script": "a.js"}]}', "pm2"), ("processes", "web: ./bin/web\n", "procfile"),
])
def test_detect(tmp_path: Path, name: str, text: str, fmt: str) -> None:
    assert formats.detect(write(tmp_path / name, text)) == fmt


def test_detect_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="not a file pmon2 can import"):
        formats.detect(write(tmp_path / "notes", "hello world\n"))
    with pytest.raises(ConvertError, match="no such file"):
        formats.convert(str(tmp_path / "missing.json"))


def test_toml_round_trip_of_awkward_values() -> None:
    document = {"defaults": {}, "services": {
        "web.api": {"command": ["sh", "-c", 'echo "a\\b"\tdone\n'], "cwd": "/srv/é", "env": {"A.B": "x=y", "Q": "'"},
                    "instances": 2, "min_uptime": 1.5, "autostart": False, "tags": ["a", "b"]},
        "ctl": {"command": ["\x01"], "env": {}},
    }}
    text = formats.to_toml(document, ["a comment", "another: with: colons"])
    assert text.startswith("# a comment\n# another: with: colons\n")
    assert tomllib.loads(text) == {"services": {"web.api": document["services"]["web.api"],
                                                "ctl": {"command": ["\x01"]}}}


def test_service_names_are_mended_and_unique() -> None:
    taken: set[str] = set()
    unmapped: formats.Unmapped = []
    assert formats.service_name("api", taken, unmapped, "a") == "api"
    assert formats.service_name("API", taken, unmapped, "b") == "API-2"
    assert formats.service_name("my app:v2", taken, unmapped, "c") == "my-app-v2"
    assert formats.service_name("123", taken, unmapped, "d") == "app-123"
    assert [k for k, _ in unmapped] == ["b", "c", "d"]


# pm2, rule by rule


def pm2_app(tmp_path: Path, app: dict[str, Any], env_name: str | None = None) -> tuple[dict[str, Any], list]:
    import json

    path = write(tmp_path / "ecosystem.json", json.dumps({"apps": [app]}))
    document, unmapped = pm2.convert(path, env_name=env_name)
    (service,) = document["services"].values()
    return service, unmapped


@pytest.mark.parametrize(("value", "ms"), [(1500, 1500), ("2000", 2000), ("10s", 10_000), ("1m", 60_000),
                                           ("1h", 3_600_000), (0.5, 0.5)])
def test_pm2_durations(value: Any, ms: float) -> None:
    assert pm2._ms(value, "k") == ms


@pytest.mark.parametrize(("value", "count"), [(None, 1), (3, 3), ("4", 4), ("max", 8), (0, 8), (-1, 7), (-20, 1)])
def test_pm2_instances(monkeypatch: pytest.MonkeyPatch, value: Any, count: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert pm2._instances(value) == count


def test_pm2_script_on_path_runs_as_it_is_and_missing_ones_are_said(tmp_path: Path) -> None:
    service, unmapped = pm2_app(tmp_path, {"name": "n", "script": "sleep", "args": ["5"]})
    assert service["command"] == ["sleep", "5"] and not unmapped
    service, unmapped = pm2_app(tmp_path, {"name": "n", "script": "dist/main.js"})
    assert service["command"] == ["node", f"{tmp_path}/dist/main.js"]
    assert unmapped == [("n.script", f"{tmp_path}/dist/main.js does not exist (yet)")]


def test_pm2_interpreters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "tool", "#!/bin/sh\nexec sleep 9\n")
    write(tmp_path / "plain", "console.log(1)\n")
    write(tmp_path / "job.py", "")
    assert pm2_app(tmp_path, {"script": "tool"})[0]["command"] == [f"{tmp_path}/tool"]
    assert pm2_app(tmp_path, {"script": "plain"})[0]["command"] == ["node", f"{tmp_path}/plain"]
    service, _ = pm2_app(tmp_path, {"script": "./job.py", "interpreter": "/opt/venv/bin/python"})
    assert service["command"] == ["/opt/venv/bin/python", f"{tmp_path}/job.py"]
    assert service["env"] == {"PYTHONUNBUFFERED": "1"}
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda n: None if n == "python" else real_which(n))
    assert pm2_app(tmp_path, {"script": "job.py"})[0]["command"] == ["python3", f"{tmp_path}/job.py"]
    service, unmapped = pm2_app(tmp_path, {"name": "x", "script": "tool", "interpreter": "none",
                                           "interpreter_args": "-v"})
    assert service["command"] == [f"{tmp_path}/tool"]
    assert unmapped == [("x.interpreter_args", 'there is no interpreter (interpreter = "none") to give them to')]


def test_pm2_restart_keys(tmp_path: Path) -> None:
    service, _ = pm2_app(tmp_path, {"script": "sleep", "stop_exit_codes": 3, "autostart": False,
                                    "restart_delay": 30_000, "exp_backoff_restart_delay": 250})
    assert service["restart"] == "on-failure" and service["success_exit_codes"] == [3]
    assert service["autostart"] is False and service["backoff_base"] == 0.25 and "backoff_cap" not in service
    service, _ = pm2_app(tmp_path, {"script": "sleep", "restart_delay": 30_000, "autorestart": False})
    assert (service["restart"], service["backoff_base"], service["backoff_cap"]) == ("no", 30, 30)


def test_pm2_cluster_by_default_for_node_with_instances(tmp_path: Path) -> None:
    write(tmp_path / "app.js", "")
    service, unmapped = pm2_app(tmp_path, {"name": "a", "script": "app.js", "instances": 3, "port": 4000})
    assert (service["instances"], service["port"]) == (3, 4000) and "PORT" not in service["env"]
    assert [k for k, _ in unmapped] == ["a.exec_mode"]
    service, unmapped = pm2_app(tmp_path, {"name": "a", "script": "app.js", "instances": 3, "exec_mode": "fork",
                                           "increment_var": "WORKER_PORT", "env": {"WORKER_PORT": 10}})
    assert "port" not in service and service["env"]["WORKER_PORT"] == "10"
    assert unmapped == [("a.increment_var", "pmon2 adds the instance number to PORT only (`port`), not to "
                                            "WORKER_PORT")]


def test_pm2_logs(tmp_path: Path) -> None:
    service, unmapped = pm2_app(tmp_path, {"name": "a", "script": "sleep", "out_file": "/var/log/a.log",
                                           "error_file": "/var/log/a.log"})
    assert service["log"] == "/var/log/a.log" and not unmapped
    service, unmapped = pm2_app(tmp_path, {"name": "a", "script": "sleep", "out_file": "/var/log/a/out.log",
                                           "error_file": "/srv/err.log"})
    assert service["log_dir"] == "/var/log/a"
    assert unmapped == [("a.out_file", "pmon2 names the file itself: /var/log/a/a-out.log, not /var/log/a/out.log"),
                        ("a.error_file", "pmon2 keeps both logs in one directory: err goes to /var/log/a/a-err.log, "
                                         "not /srv/err.log")]
    service, unmapped = pm2_app(tmp_path, {"name": "a", "script": "sleep", "log_file": "all.log",
                                           "out_file": "/dev/null"})
    assert service["log"] == f"{tmp_path}/all.log"
    assert [k for k, _ in unmapped] == ["a.out_file"]


def test_pm2_file_shapes(tmp_path: Path) -> None:
    path = write(tmp_path / "process.json", '[{"script": "sleep", "args": "1"}, {"script": "sleep"}]')
    document, unmapped = pm2.convert(path)
    assert list(document["services"]) == ["sleep", "sleep-2"]
    assert unmapped == [("sleep.name", "renamed to 'sleep-2': 'sleep' is used by another service of this file")]
    path = write(tmp_path / "one.json", '{"name": "solo", "script": "sleep"}')
    assert list(pm2.convert(path)[0]["services"]) == ["solo"]
    path = write(tmp_path / "pmon2.json", '{"services": {"web": {"command": "x"}}}')
    with pytest.raises(ConvertError, match="a pmon2 app file already: use pmon2 apply"):
        pm2.convert(path)
    path = write(tmp_path / "noscript.json", '{"apps": [{"name": "x"}]}')
    with pytest.raises(ConvertError, match="x: no script"):
        pm2.convert(path)


def test_pm2_env_name_that_no_app_has(tmp_path: Path) -> None:
    _, unmapped = pm2_app(tmp_path, {"script": "sleep", "env_prod": {"A": "1"}}, env_name="production")
    assert unmapped == [("sleep.env_prod", "another environment: `pmon2 import FILE --env prod` uses it"),
                        ("--env", "no app has env_production: it added nothing")]


def test_pm2_config_js_without_node_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = write(tmp_path / "ecosystem.config.js", "module.exports = {apps: []}\n")
    with pytest.raises(ConvertError) as info:
        pm2.convert(path)
    assert "node is not installed" in info.value.message and "\n" not in info.value.message


@needs_node
def test_pm2_json_with_comments_and_esm_config(tmp_path: Path) -> None:
    text = '{\n  // pm2 reads this as JavaScript\n  "apps": [{"script": "sleep",},],\n}'
    path = write(tmp_path / "process.json", text)
    assert list(pm2.convert(path)[0]["services"]) == ["sleep"]
    path = write(tmp_path / "ecosystem.config.mjs", "export default {apps: [{name: 'esm', script: 'sleep'}]};\n")
    assert list(pm2.convert(path)[0]["services"]) == ["esm"]
    path = write(tmp_path / "broken.config.js", "module.exports = {apps: [\n")
    with pytest.raises(ConvertError, match="node could not load it"):
        pm2.convert(path)


# supervisor, rule by rule


def sup(tmp_path: Path, text: str) -> tuple[dict[str, Any], list]:
    document, unmapped = supervisord.convert(write(tmp_path / "supervisord.conf", text))
    return document["services"], unmapped


def test_supervisor_environment_syntax() -> None:
    assert supervisord.key_value_pairs('A="x, y",B=2,C=\'q\',D=/a/b:c', "e") == {
        "A": "x, y", "B": "2", "C": "q", "D": "/a/b:c"}
    with pytest.raises(ConvertError, match="unexpected end"):
        supervisord.key_value_pairs("A=1,B", "e")


def test_supervisor_defaults_are_supervisors(tmp_path: Path) -> None:
    services, unmapped = sup(tmp_path, "[program:app]\ncommand = /bin/sleep 5 ; the app\n")
    assert services == {"app": {"command": ["/bin/sleep", "5"], "cwd": "/", "restart": "on-failure",
                                 "success_exit_codes": [0]}}
    assert unmapped == []


def test_supervisor_process_num_ports_and_instances(tmp_path: Path) -> None:
    services, unmapped = sup(tmp_path, "[program:api]\ncommand=api --port 90%(process_num)02d --id %(process_num)d\n"
                                       "numprocs=4\nnumprocs_start=1\nprocess_name=api-%(process_num)d\n"
                                       "environment=SLOT=\"%(process_num)02d\"\n")
    api = services["api"]
    assert api["command"] == ["api", "--port", "${port}", "--id", "${instance}"]
    assert (api["port"], api["instances"], api["env"]) == (9001, 4, {"SLOT": "${instance}"})
    assert [k for k, _ in unmapped] == ["program:api.command", "program:api.environment",
                                        "program:api.environment", "program:api.process_name"]
    assert "from 1, pmon2 from 0" in unmapped[0][1] and "without its padding" in unmapped[2][1]
    with pytest.raises(ConvertError, match="must be present within process_name"):
        sup(tmp_path, "[program:x]\ncommand=x\nnumprocs=2\n"
                      "process_name=x\n")


def test_supervisor_expansions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_HOME", "/srv/app")
    services, _ = sup(tmp_path, "[program:a]\ncommand=%(ENV_APP_HOME)s/bin/a --name %(program_name)s --pct 5%%\n"
                                "directory=%(here)s\n")
    assert services["a"]["command"] == ["/srv/app/bin/a", "--name", "a", "--pct", "5%"]
    assert services["a"]["cwd"] == str(tmp_path)
    with pytest.raises(ConvertError, match=r"names 'ENV_NOPE' which cannot be expanded"):
        sup(tmp_path, "[program:a]\ncommand=%(ENV_NOPE)s\n")
    with pytest.raises(ConvertError, match="badly formatted"):
        sup(tmp_path, "[program:a]\ncommand=echo 50%\n")


def test_supervisor_include_is_relative_to_the_main_file(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "conf.d" / "b.conf", "[program:b]\ncommand=sleep 2\ndirectory=%(here)s\n")
    write(tmp_path / "etc" / "conf.d" / "a.conf", "[program:a]\ncommand=sleep 1\n")
    main = write(tmp_path / "etc" / "supervisord.conf", "[include]\nfiles = conf.d/*.conf missing/*.ini\n")
    document, unmapped = supervisord.convert(main)
    assert list(document["services"]) == ["a", "b"]
    assert document["services"]["b"]["cwd"] == str(tmp_path / "etc" / "conf.d")
    assert unmapped == [("include.files", f"no file matches {tmp_path}/etc/missing/*.ini")]


def test_supervisor_restart_logs_and_groups(tmp_path: Path) -> None:
    services, unmapped = sup(tmp_path, """
[group:jobs]
programs = a, b

[program:a]
command = a
autorestart = true
exitcodes = 0,2
stdout_logfile = /var/log/app/a.log
stderr_logfile = /var/log/app/a.log
stdout_logfile_maxbytes = 0
startretries = 0
stopsignal = int

[program:b]
command = b
autorestart = false
stdout_logfile = /var/log/b-out.log
stderr_logfile = NONE
redirect_stderr = false
""")
    assert services["a"] == {"command": ["a"], "cwd": "/", "success_exit_codes": [0, 2], "stop_signal": "SIGINT",
                             "log": "/var/log/app/a.log", "tags": ["jobs"]}
    assert services["b"] == {"command": ["b"], "cwd": "/", "restart": "no", "log_dir": "/var/log", "tags": ["jobs"]}
    assert unmapped == [
        ("program:a.startretries", "0 means never give up in pmon2 (max_restarts); supervisor gave up at once"),
        ("program:a.stdout_logfile_maxbytes", "0 (never rotate): pmon2 always rotates, above log_max_size"),
        ("program:b.stderr_logfile", "pmon2 always keeps a service's output: it goes to pmon2's log dir"),
    ]
    with pytest.raises(ConvertError, match="names unknown program c"):
        sup(tmp_path, "[group:g]\nprograms=c\n[program:a]\ncommand=a\n")
    with pytest.raises(ConvertError, match="invalid value 'sometimes'"):
        sup(tmp_path, "[program:a]\ncommand=a\nautorestart=sometimes\n")


def test_supervisor_without_programs(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match=r"no \[program:x\] section"):
        sup(tmp_path, "[supervisord]\nnodaemon=true\n")


# Procfile, rule by rule


@pytest.mark.parametrize(("text", "env"), [
    ("A=1\nB = two words \n", {"A": "1", "B": "two words"}),
    ("export A=1\n# comment\n\nB='x # y'\n", {"A": "1", "B": "x # y"}),
    ('A="line\\nnext" # note\nB=plain # note\n', {"A": "line\nnext", "B": "plain"}),
    ("A=${HOME}/x\nnot a line\nC=\n", {"A": "${HOME}/x", "C": ""}),
])
def test_dotenv(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    assert procfile.read_dotenv(write(tmp_path / ".env", text)) == env


def test_procfile_lines_ports_and_names(tmp_path: Path) -> None:
    write(tmp_path / ".env", "PORT=8000\nA=1\n")
    path = write(tmp_path / "Procfile", "web: ./bin/web\nthis is not a process\n2: ./bin/two\n")
    document, unmapped = procfile.convert(path, env_name="production")
    assert document["services"] == {
        "web": {"command": ["sh", "-c", "./bin/web"], "cwd": str(tmp_path), "env": {"A": "1"}, "port": 8000},
        "app-2": {"command": ["sh", "-c", "./bin/two"], "cwd": str(tmp_path), "env": {"A": "1"}, "port": 8100},
    }
    assert [k for k, _ in unmapped] == ["--env", "Procfile:2", "Procfile:3"]
    with pytest.raises(ConvertError, match="no `NAME: COMMAND` line"):
        procfile.convert(write(tmp_path / "empty" / "Procfile", "# nothing\n"))


# the CLI, without pmond: --to writes the app file and applies nothing


def test_cli_import_to_writes_an_app_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pmon2.toml"
    assert cli.main(["import", f"{PROC}/Procfile", "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Procfile, 3 services: web, worker, clock" in printed
    assert "not mapped: Procfile:5: release: Heroku runs release once per deploy" in printed
    assert f"wrote {out}" in printed
    text = out.read_text()
    assert text.startswith(f"# Imported by `pmon2 import` from {PROC}/Procfile (Procfile).\n")
    assert tomllib.loads(text) == {"services": formats.convert(f"{PROC}/Procfile")[1]["services"]}
    assert [s["name"] for s in appfile.load(str(out))["services"]] == ["web", "worker", "clock"]


def test_cli_import_dry_run_to_prints_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pmon2.toml"
    assert cli.main(["import", f"{SUP}/supervisord.conf", "--to", str(out), "--dry-run"]) == 0
    assert not out.exists()
    printed = capsys.readouterr().out
    assert printed.startswith("# Imported by `pmon2 import`") and "[services.web]\n" in printed
    assert tomllib.loads(printed) == {"services": formats.convert(f"{SUP}/supervisord.conf")[1]["services"]}


def test_cli_import_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["import", str(tmp_path / "nope.json")]) == 1
    assert capsys.readouterr().err == f"pmon2: {tmp_path}/nope.json: no such file\n"
    assert cli.main(["import", f"{PROC}/Procfile", "extra"]) == 2
    assert "only for `pmon2 import pmon2-go`" in capsys.readouterr().err
    big = write(tmp_path / "big" / "Procfile", "a: x\nb: y\n")
    write(tmp_path / "big" / ".env", "PORT=65500\n")
    assert cli.main(["import", big, "--to", str(tmp_path / "big.toml")]) == 0
    assert "not mapped: Procfile:2: its PORT would be 65600, not a port number" in capsys.readouterr().out


def test_a_fifo_or_a_device_is_refused_without_being_opened(tmp_path: Path) -> None:
    """A FIFO would hang `pmon2 import` forever and /dev/zero never end: neither is opened."""
    fifo = tmp_path / "Procfile"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(ConvertError, match="not a regular file"):
            formats.convert(path)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[include]\nfiles = {fifo}\n[program:a]\ncommand = sleep 1\n")
    with pytest.raises(ConvertError, match="not a regular file"):
        formats.convert(str(conf))
