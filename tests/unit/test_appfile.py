"""App files, the CLI's side (issue 12): parsing TOML, YAML and JSON, [defaults], variables, paths, env files,
every problem named with its line, the plan's rendering, dump's TOML, the schema and docs/app-file.md, and the
CLI commands apply, dump, schema, update, scale and restart --update-env against a fake pmond."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pmon2 import appfile, cli, spec
from pmon2.appfile import AppFileError
from pmon2.client import ApiError

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/dev", "LANG": "C.UTF-8", "LC_TIME": "C", "TZ": "UTC",
       "SSH_AUTH_SOCK": "/tmp/agent", "PMON2_HOME": "/x", "SECRET_OF_SHELL": "s", "DB_PASSWORD": "pw"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(path: Path, environ: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    return appfile.load(str(path), ENV if environ is None else environ, **kwargs)


def services(path: Path, environ: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in load(path, environ)["services"]}


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(AppFileError) as exc:
        load(path, environ)
    return [str(p) for p in exc.value.problems]


# reading a file


def test_toml_defaults_paths_and_request_shape(tmp_path: Path) -> None:
    f = write(tmp_path, "app/pmon2.toml", """
        [defaults]
        kill_timeout = 10
        env = { APP_ENV = "production", SHARED = "d" }

        [services.api]
        command = ["./bin/api", "--listen", "127.0.0.1:8080"]
        env = { SHARED = "mine", LOG_LEVEL = "info" }
        stop_signal = "INT"
        log_max_size = "1M"

        [services.web]
        command = "node 'my server.js' --port ${port}"
        cwd = "web"
        kill_timeout = 3
        instances = 4
        port = 3000
        """)
    body = load(f, prune=True, dry_run=True)
    assert body["source"] == str(f) and body["prune"] is True and body["dry_run"] is True
    api, web = body["services"]
    assert api == {"name": "api", "argv": ["./bin/api", "--listen", "127.0.0.1:8080"], "cwd": str(tmp_path / "app"),
                   "env": {"PATH": "/usr/bin:/bin", "HOME": "/home/dev", "LANG": "C.UTF-8", "LC_TIME": "C",
                           "TZ": "UTC", "APP_ENV": "production", "SHARED": "mine", "LOG_LEVEL": "info"},
                   "kill_timeout": 10.0, "stop_signal": "SIGINT", "log_max_size": 1 << 20}
    assert web["argv"] == ["node", "my server.js", "--port", "${port}"]  # split, then ${port} left for pmond
    assert web["cwd"] == str(tmp_path / "app" / "web")
    assert (web["kill_timeout"], web["instances"], web["port"]) == (3.0, 4, 3000)
    assert web["env"]["SHARED"] == "d"
    # every object is what pmond's own check takes as it is
    for svc in body["services"]:
        assert spec.check_body(svc, spec.SERVICE_FIELDS) == svc


def test_the_three_formats_of_the_docs_example_give_the_same_services(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("API_KEY=k1\n")
    bodies = []
    for name, text in (("a.toml", appfile.EXAMPLE_TOML), ("a.yaml", appfile.EXAMPLE_YAML),
                       ("a.yml", appfile.EXAMPLE_YAML), ("a.json", appfile.EXAMPLE_JSON)):
        (tmp_path / name).write_text(text)
        body = load(tmp_path / name)
        bodies.append(body["services"])
    assert bodies[0] == bodies[1] == bodies[2] == bodies[3]
    by_name = {s["name"]: s for s in bodies[0]}
    assert list(by_name) == ["migrate", "api", "web", "worker"]
    assert by_name["api"]["env"]["DATABASE_URL"] == "postgres://app:pw@127.0.0.1/app"
    assert by_name["api"]["env"]["API_KEY"] == "k1"
    assert by_name["worker"]["argv"][-1] == "${instance}" and by_name["worker"]["stop_signal"] == "SIGINT"


def test_absolute_paths_stay_and_symlinked_dirs_are_not_resolved(tmp_path: Path) -> None:
    real = tmp_path / "releases" / "r1"
    real.mkdir(parents=True)
    (tmp_path / "current").symlink_to(real)
    write(real, "pmon2.toml", """
        [services.a]
        command = "/bin/sleep 100"
        cwd = "/srv/a/../b"
        log = "logs/a.log"
        """)
    body = load(tmp_path / "current" / "pmon2.toml")
    assert body["source"] == str(tmp_path / "current" / "pmon2.toml")
    svc = body["services"][0]
    assert svc["cwd"] == "/srv/b" and svc["log"] == "logs/a.log"  # log: relative to cwd, as with run


def test_command_string_and_list(tmp_path: Path) -> None:
    f = write(tmp_path, "a.toml", r"""
        [services.s1]
        command = "sh -c 'echo $$HOME ${HOME}' \"two words\" back\\ slash"
        [services.s2]
        command = ["sh", "-c", "echo $$HOME && echo ${HOME}"]
        [services.s3]
        command = "./bin/app ${ARGS}"
        """)
    got = services(f, dict(ENV, ARGS="a b"))
    assert got["s1"]["argv"] == ["sh", "-c", "echo $HOME /home/dev", "two words", "back slash"]
    assert got["s2"]["argv"] == ["sh", "-c", "echo $HOME && echo /home/dev"]
    assert got["s3"]["argv"] == ["./bin/app", "a b"]  # split first: a value with spaces stays one argument


@pytest.mark.parametrize(("text", "expected"), [
    ("plain", "plain"), ("$$", "$"), ("a$$b", "a$b"), ("$$$$", "$$"), ("${HOME}", "/home/dev"),
    ("x${HOME}y", "x/home/devy"), ("${NOPE:-fallback}", "fallback"), ("${HOME:-fallback}", "/home/dev"),
    ("${NOPE:-}", ""), ("$HOME", "$HOME"), ("cost: 5$", "cost: 5$"), ("$${HOME}", "${HOME}"),
    ("${instance}-${port}", "${instance}-${port}"), ("${EMPTY}", ""),
])
def test_expand(text: str, expected: str) -> None:
    assert appfile.expand(text, dict(ENV, EMPTY="").get, per_instance=True) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("${NOPE}", "${NOPE} is not set in your environment"), ("${", "without its '}'"),
    ("${1X}", "does not name a variable"), ("${A B}", "does not name a variable"), ("${}", "does not name"),
    ("${instance:-0}", "takes no default"),
])
def test_expand_errors(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        appfile.expand(text, ENV.get, per_instance=True)


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    f = write(tmp_path, "a.yaml", """
        x-base: &base
          kill_timeout: 3
          restart: on-failure
        services:
          a:
            <<: *base
            command: [./a]
            kill_timeout: 9
          b:
            <<: *base
            command: ./b
        """.replace("x-base", "defaults"))
    got = services(f)
    assert (got["a"]["kill_timeout"], got["a"]["restart"], got["b"]["kill_timeout"]) == (9.0, "on-failure", 3.0)


def test_per_instance_variables_only_in_command_and_env(tmp_path: Path) -> None:
    f = write(tmp_path, "a.toml", """
        [services.w]
        command = ["./w", "--id", "${instance}"]
        env = { PORT_COPY = "${port}" }
        log = "w-${instance}.log"
        """)
    assert problems(f) == [f"{f}:4: services.w.log: ${{instance}} is expanded per instance only in command and env"]


def test_environment_layers(tmp_path: Path) -> None:
    write(tmp_path, "conf/base.env", """
        # a comment
        A=from-base
        B=${A}-and-more
        export C="quoted ${HOME}"
        D='single ${NOT_EXPANDED} $$'
        E=
        """)
    write(tmp_path, "conf/override.env", "A=from-override\nONLY=x\n")
    f = write(tmp_path, "a.toml", """
        [defaults]
        env_file = ["conf/base.env", "conf/override.env"]
        env = { E = "from-defaults" }

        [services.default-inherit]
        command = "x"

        [services.every]
        command = "x"
        inherit_env = true
        env = { ONLY = "env wins" }

        [services.none]
        command = "x"
        inherit_env = false
        env_file = "conf/override.env"

        [services.some]
        command = "x"
        inherit_env = ["PATH", "LC_*", "SSH_*", "PMON2_*"]
        env_file = []
        """)
    got = services(f)
    assert got["default-inherit"]["env"] == {
        "PATH": "/usr/bin:/bin", "HOME": "/home/dev", "LANG": "C.UTF-8", "LC_TIME": "C", "TZ": "UTC",
        "A": "from-override", "B": "from-base-and-more", "C": "quoted /home/dev", "D": "single ${NOT_EXPANDED} $$",
        "E": "from-defaults", "ONLY": "x"}
    every = spec.service_env(ENV)
    assert got["every"]["env"] == {**every, **got["default-inherit"]["env"], "ONLY": "env wins"}
    assert "SSH_AUTH_SOCK" not in got["every"]["env"] and "PMON2_HOME" not in got["every"]["env"]
    assert got["none"]["env"] == {"A": "from-override", "ONLY": "x", "E": "from-defaults"}
    # the login session's variables and PMON2_* are never inherited, even when named
    assert got["some"]["env"] == {"PATH": "/usr/bin:/bin", "LC_TIME": "C", "E": "from-defaults"}


def test_env_file_problems_name_their_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, ".env", "GOOD=1\nBAD=${MISSING}\nNOVALUE\n")
    f = write(tmp_path, "a.toml", """
        [services.a]
        command = "x"
        env_file = ".env"

        [services.b]
        command = "x"
        env_file = ["nothere.env"]
        """)
    assert problems(f) == [
        f"{f}:7: services.b.env_file[0]: {tmp_path}/nothere.env: cannot read it: No such file or directory",
        f"{tmp_path}/.env:2: BAD: ${{MISSING}} is not set in your environment (write ${{MISSING:-default}} for a "
        "default, $$ for a literal $)",
        f"{tmp_path}/.env:3: NOVALUE: has no value (write KEY= for an empty one)",
    ]


def test_env_file_paths_are_shown_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "deploy/.env", "X=${NOPE}\n")
    write(tmp_path, "deploy/a.toml", '[services.a]\ncommand = "x"\nenv_file = ".env"\n')
    with pytest.raises(AppFileError) as exc:
        appfile.load("deploy/a.toml", ENV)
    assert str(exc.value.problems[0]).startswith("deploy/.env:1: X: ${NOPE} is not set")


# every problem, with its line


BAD_TOML = """\
[defaults]
kill_timout = 10
log_keep = "x"

[services.web]
command = "node 'server.js"
instances = 0
env = { PORT = 8080 }

[services.api]
command = ["./api", "${MISSING}"]
restart = "sometimes"
depends_on = { api = "ready" }

[services."bad name"]
command = "x"

[services.w2]
argv = ["x"]

[services.Web]
command = "x"
"""

BAD_TOML_PROBLEMS = [
    "2: defaults.kill_timout: unknown key 'kill_timout'; did you mean 'kill_timeout'?",
    "3: defaults.log_keep: must be a whole number, not a string",
    "6: services.web.command: cannot be split with shell rules: no closing quotation",
    "7: services.web.instances: must be a whole number from 1 to 1000",
    "8: services.web.env.PORT: PORT must be a string, not an integer (environment values are strings: quote it)",
    "11: services.api.command[1]: ${MISSING} is not set in your environment (write ${MISSING:-default} for a "
    "default, $$ for a literal $)",
    "12: services.api.restart: must be one of 'always', 'on-failure', 'no', not 'sometimes'",
    "13: services.api.depends_on.api: a service cannot wait for itself",
    "15: services.\"bad name\": not a service name: 'bad name': ' ' is not allowed (letters, digits and . _ - @ +, "
    "at most 64 characters, not starting with '.' or '-', not only digits)",
    "18: services.w2: no command: give command = [\"./bin/app\", \"--flag\"] or command = \"./bin/app --flag\"",
    "19: services.w2.argv: unknown key 'argv': an app file writes command",
    "21: services.Web: 'web' and 'Web' differ only in case: names are unique regardless of case",
]


def test_every_problem_of_a_toml_file_with_its_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(BAD_TOML)
    assert problems(f, {}) == [f"{f}:{p}" for p in BAD_TOML_PROBLEMS]


def test_every_problem_of_a_yaml_file_with_its_line(tmp_path: Path) -> None:
    f = write(tmp_path, "bad.yaml", """
        defaults:
          kill_timout: 10
        services:
          web:
            command: ./x
            restart: no
            instances: 0
            tags: [ok, "no good"]
            env:
              DEBUG: yes
          api:
            command: [./api, "${MISSING}"]
          cycle-a:
            command: x
            depends_on: {cycle-b: started}
          cycle-b:
            command: x
            depends_on: {cycle-a: ready}
        """)
    assert problems(f, {}) == [
        f"{f}:2: defaults.kill_timout: unknown key 'kill_timout'; did you mean 'kill_timeout'?",
        f"{f}:6: services.web.restart: must be one of 'always', 'on-failure', 'no', not False (YAML reads a bare "
        "yes, no, on or off as a boolean: quote it)",
        f"{f}:7: services.web.instances: must be a whole number from 1 to 1000",
        f"{f}:8: services.web.tags: 'no good': ' ' is not allowed (letters, digits and . _ - @ +, at most 64 "
        "characters, not starting with '.' or '-', not only digits)",
        f"{f}:10: services.web.env.DEBUG: DEBUG must be a string, not a boolean (YAML reads a bare yes, no, on or "
        "off as a boolean: quote it)",
        f"{f}:12: services.api.command[1]: ${{MISSING}} is not set in your environment (write ${{MISSING:-default}} "
        "for a default, $$ for a literal $)",
        f"{f}:15: services.cycle-a.depends_on: a cycle: cycle-a -> cycle-b -> cycle-a",
    ]


def test_json_problems_have_no_line_but_their_path(tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"services": {"web": {"command": "x", "instances": 0, "kill_timeout": "5"}}}))
    assert problems(f) == [f"{f}: services.web.instances: must be a whole number from 1 to 1000",
                           f"{f}: services.web.kill_timeout: must be a number of seconds, not a string"]


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("a.toml", "[services.a]\ncommand = \n", ":2: not valid TOML: Invalid value"),
    ("a.toml", "[services.a]\ncommand = 'x'\ncommand = 'y'\n", ":3: not valid TOML: Cannot overwrite a value"),
    ("a.yaml", "services:\n  a: [\n", ":3: not valid YAML: while parsing"),
    ("a.yaml", "services:\n  a:\n    command: x\n  a:\n    command: y\n", ":4: services.a: appears twice"),
    ("a.json", '{\n "services": }', ":2: not valid JSON: Expecting value"),
    ("a.json", '{"services": {}, "services": {}}', ": key 'services' appears twice in the same object"),
    ("a.ini", "[x]", ": unknown format: name the file *.toml, *.yaml, *.yml or *.json"),
    ("a.toml", "[defaults]\n", ": no services: add a [services.NAME] table for each (services = {} for none)"),
    ("a.toml", "services = 3\n", ":1: services: must be a table of services, one per name: [services.web]"),
    ("a.toml", "service = {}\n", ":1: service: unknown key 'service'; did you mean 'services'?"),
    ("a.toml", "services = {}\n[defaults]\ncommand = 'x'\n", ":3: defaults.command: each service names its own"),
    ("a.toml", "[services]\na = 'x'\n", ":2: services.a: must be a table of fields: command = ..."),
    ("a.yaml", "- a\n", ": must be a table of [services.NAME] tables"),
    ("a.json", '{"services": {}, "$schema": 5}', ': "$schema": must be a string'),
])
def test_file_level_problems(tmp_path: Path, name: str, text: str, expected: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    got = problems(f)
    assert any(p.startswith(f"{f}{expected}") for p in got), got


def test_unreadable_and_not_utf8(tmp_path: Path) -> None:
    assert problems(tmp_path / "missing.toml") == [f"{tmp_path}/missing.toml: cannot read it: No such file or "
                                                   "directory"]
    f = tmp_path / "latin.toml"
    f.write_bytes(b'[services.a]\ncommand = "caf\xe9"\n')
    assert problems(f)[0].startswith(f"{f}: not UTF-8 text")


def test_an_empty_services_table_is_a_file_with_no_services(tmp_path: Path) -> None:
    f = write(tmp_path, "a.toml", "services = {}\n")
    assert load(f)["services"] == []


def test_schema_key_and_bom_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text('\ufeff{"$schema": "./s.json", "services": {"a": {"command": ["x"]}}}')
    assert [s["name"] for s in load(f)["services"]] == ["a"]


def test_toml_lines_scanner() -> None:
    text = textwrap.dedent('''
        # comment
        [services."my.app"]
        command = "x"
        note = """
        fake = 1
        """
        'literal key' = 2
        a.b . c = 3
        [services.other.env]
        KEY = "v"
        ''')
    lines = appfile.toml_lines(text)
    assert lines(("services", "my.app")) == 3
    assert lines(("services", "my.app", "command")) == 4
    assert lines(("services", "my.app", "fake")) == 3  # inside a multi-line string: not a key
    assert lines(("services", "my.app", "literal key")) == 8
    assert lines(("services", "my.app", "a", "b", "c")) == 9
    assert lines(("services", "other", "env", "KEY")) == 11
    assert lines(("services", "other", "env", "NONE")) == 10
    assert lines(("nothing",)) is None


def test_dotted_paths() -> None:
    assert appfile.dotted(("services", "web.1", "command", 0)) == 'services."web.1".command[0]'
    assert appfile.dotted(("services", "数据")) == 'services."数据"'


# the plan


PLAN = {"plan": [
    {"name": "web", "action": "create", "fields": [], "restart": False, "ok": True},
    {"name": "api", "action": "change", "fields": ["env", "kill_timeout"], "restart": True, "ok": True},
    {"name": "db", "action": "unchanged", "fields": [], "restart": False, "ok": True},
    {"name": "old", "action": "remove", "fields": [], "restart": False, "ok": True},
], "summary": {"create": 1, "change": 1, "unchanged": 1, "remove": 1, "failed": 0}}


def test_render_plan() -> None:
    out, err = appfile.render_plan(PLAN, [{"name": "web", "instances": 3}, {"name": "api"}], dry_run=False)
    assert out == ["+ create web (3 instances)", "~ change api: env, kill_timeout (restart)", "= unchanged db",
                   "- remove old", "applied: 1 created, 1 changed (1 restart), 1 unchanged, 1 removed"]
    assert err == [] and not appfile.failed(PLAN)
    out, _ = appfile.render_plan(PLAN, [], dry_run=True)
    assert out[-1] == "plan: 1 to create, 1 to change (1 restart), 1 unchanged, 1 to remove; nothing was changed " \
                      "(--dry-run)"


def test_render_plan_failures() -> None:
    answer = {"plan": [{"name": "web", "action": "create", "fields": [], "restart": False, "ok": False,
                        "error": {"code": "spawn_failed", "message": "command not found: ./web"}}],
              "summary": {"create": 1, "change": 0, "unchanged": 0, "remove": 0, "failed": 1}}
    out, err = appfile.render_plan(answer, [{"name": "web"}], dry_run=False)
    assert out == ["+ create web: failed", "applied: 1 created, 0 changed, 0 unchanged, 1 failed"]
    assert err == ["pmon2: web: command not found: ./web"]
    assert appfile.failed(answer)


# dump


def dumped_service(**fields: Any) -> dict[str, Any]:
    # A service of GET /v1/dump: `instances` only for a group (pmond's request_fields), even of one.
    base = {"id": 3, "name": "api", "pid": 1234, "status": "running", "argv": ["./bin/api", "--port", "8080"],
            "cwd": "/srv/api", "env": {"A": "1"}, "user": "root", "restart": "always", "autorestart": True,
            "kill_timeout": 5.0, "stop_signal": "SIGTERM", "reload_signal": "SIGUSR2", "tags": [],
            "depends_on": {}, "success_exit_codes": [0], "source": "/srv/pmon2.toml", "log": None,
            "instance_of": None, "out_log": "/var/log/pmon2/api-out.log"}
    return base | fields


def test_dump_leaves_out_defaults_but_never_cwd() -> None:
    data = appfile.dump_services([dumped_service(cwd="/", env={}), dumped_service(name="web", instances=3, tags=["w"])])
    assert data["defaults"] == {"inherit_env": False}
    assert data["services"]["api"] == {"command": ["./bin/api", "--port", "8080"], "cwd": "/", "user": "root",
                                       "kill_timeout": 5.0, "source": "/srv/pmon2.toml"}
    assert data["services"]["web"]["instances"] == 3 and data["services"]["web"]["tags"] == ["w"]


def test_dump_then_load_gives_the_same_fields(tmp_path: Path) -> None:
    svcs = [dumped_service(env={"A": "1", "QUOTE": 'x"y', "URL": "postgres://u:p@h/db", "I": "${instance}"},
                           restart="on-failure", success_exit_codes=[0, 3], depends_on={"db": "ready"},
                           log_max_size=1 << 20, ready="tcp://127.0.0.1:8080", group="adm"),
            dumped_service(name="db", argv=["postgres", "-D", "/var/lib/pg data"], cwd="/", env={}, source=None,
                           instances=2, port=5432)]
    text = appfile.dump_toml({"services": svcs}, masked=False)
    assert text.startswith("# pmon2 dump")
    f = tmp_path / "dump.toml"
    f.write_text(text)
    got = services(f)
    fields = [f.name for f in spec.SERVICE_FIELDS if f.name not in ("name", "autorestart")]
    for svc in svcs:
        back = got[svc["name"]]
        expected = {k: svc[k] for k in fields if svc.get(k) is not None and (k in ("argv", "cwd", "env") or
                                                                             svc[k] != spec.SERVICE[k].default)}
        assert back == {"name": svc["name"], **expected}
    assert got["api"]["source"] == "/srv/pmon2.toml" and "source" not in got["db"]  # apply's source: the file


@pytest.mark.parametrize("value", ["plain", 'q"uote', "back\\slash", "new\nline", "tab\t", "\x7f\x01\x1f",
                                   "é数据\u2028", "${instance} $$", "", "'single'", '"""', "a = b # c"])
def test_toml_values_read_back(value: str) -> None:
    import tomllib

    text = f"{appfile.toml_key(value or 'k')} = {appfile.toml_value(value)}\n"
    assert tomllib.loads(text) == {value or "k": value}
    for other in (0, 5.5, 1e-05, 86400.0, True, False, [], ["a", 1], {}, {"a.b": "c", "d": "e"}):
        assert tomllib.loads(f"k = {appfile.toml_value(other)}") == {"k": other}


def test_masked_dump_says_so() -> None:
    text = appfile.dump_toml({"services": [dumped_service(env={"API_TOKEN": "***"})]}, masked=True)
    assert "--masked" in text and 'API_TOKEN = "***"' in text


# schema and docs


def test_docs_are_generated_from_the_model() -> None:
    doc = (ROOT / "docs" / "app-file.md").read_text()
    assert doc == appfile.markdown(), "docs/app-file.md is stale: pmon2 schema --format markdown > docs/app-file.md"
    for field in spec.app_file_fields():
        assert f"| `{field.name}` |" in doc


def test_schema_lists_every_field_of_the_model() -> None:
    schema = spec.app_file_schema()
    service = schema["properties"]["services"]["additionalProperties"]
    assert list(service["properties"]) == [f.name for f in spec.app_file_fields()]
    assert service["required"] == ["command"] and service["additionalProperties"] is False
    assert "command" not in schema["properties"]["defaults"]["properties"]
    for name in ("argv", "name", "autorestart"):
        assert name not in service["properties"]
    assert service["properties"]["kill_timeout"]["x-unit"] == "s"
    assert service["properties"]["inherit_env"]["default"] == list(spec.INHERIT_ENV)


def _doc_examples() -> list[tuple[str, str]]:
    doc = appfile.markdown()
    return re.findall(r"```(toml|yaml|json)\n(.*?)```", doc, re.DOTALL)


def _parse_example(kind: str, text: str) -> Any:
    import tomllib

    import yaml

    return {"toml": tomllib.loads, "yaml": yaml.safe_load, "json": json.loads}[kind](text)


def test_schema_validates_the_examples_of_the_docs() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = spec.app_file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    examples = _doc_examples()
    assert [k for k, _ in examples] == ["toml", "yaml", "json"]
    for kind, text in examples:
        jsonschema.validate(_parse_example(kind, text), schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("bad", [
    {"services": {"a": {"command": "x", "instance": 2}}}, {"services": {"a": {"cmd": "x"}}},
    {"services": {"a": {"command": "x", "restart": "sometimes"}}}, {"services": {"a:0": {"command": "x"}}},
    {"services": {"a": {"command": []}}}, {"defaults": {"command": "x"}, "services": {}}, {"service": {}},
])
def test_schema_refuses_what_apply_refuses(bad: dict[str, Any], tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, spec.app_file_schema(), cls=jsonschema.Draft202012Validator)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    assert problems(f)


# the CLI, against a fake pmond


class FakeClient:
    def __init__(self, answers: dict[tuple[str, str], Any] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls.append((method, path, body))
        answer = self.answers.get((method, path))
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            raise ApiError(404, "not_found", f"no such endpoint: {path}")
        return answer

    def service_path(self, ref: str, action: str = "") -> str:
        from pmon2.client import Client

        return Client.service_path(self, ref, action)  # type: ignore[arg-type]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(cli, "_client", lambda: client)
    return client


def test_apply_an_invalid_file_sends_nothing_and_exits_2(tmp_path: Path, fake: FakeClient,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(BAD_TOML)
    assert cli.main(["apply", str(f)]) == 2
    assert fake.calls == []
    err = capsys.readouterr().err.splitlines()
    assert err[:-1] == [f"{f}:{p}" for p in BAD_TOML_PROBLEMS]
    assert err[-1] == f"pmon2: 12 problems in {f}: nothing was applied"


def test_apply_sends_the_resolved_services_and_prints_the_plan(tmp_path: Path, fake: FakeClient,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "pmon2.toml", '[services.web]\ncommand = "./web"\ninstances = 3\n')
    fake.answers[("POST", "/v1/apply")] = PLAN
    assert cli.main(["apply", "pmon2.toml", "--prune", "--dry-run"]) == 0
    [(method, path, body)] = fake.calls
    assert (method, path) == ("POST", "/v1/apply")
    assert body["source"] == str(tmp_path / "pmon2.toml") and body["prune"] and body["dry_run"]
    assert body["services"][0]["argv"] == ["./web"] and body["services"][0]["cwd"] == str(tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("+ create web (3 instances)\n") and "nothing was changed (--dry-run)" in out
    assert cli.main(["apply", "pmon2.toml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == PLAN


def test_apply_exits_1_when_a_service_failed(tmp_path: Path, fake: FakeClient,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "a.toml", '[services.web]\ncommand = "./web"\n')
    fake.answers[("POST", "/v1/apply")] = {
        "plan": [{"name": "web", "action": "create", "fields": [], "restart": False, "ok": False,
                  "error": {"code": "spawn_failed", "message": "command not found: ./web"}}],
        "summary": {"create": 1, "change": 0, "unchanged": 0, "remove": 0, "failed": 1}}
    assert cli.main(["apply", str(f)]) == 1
    assert "pmon2: web: command not found: ./web" in capsys.readouterr().err
    assert cli.main(["apply", str(f), "--json"]) == 1


def test_pmonds_own_refusal_exits_2(tmp_path: Path, fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "a.toml", '[services.web]\ncommand = "./web"\ndepends_on = { db = "ready" }\n')
    message = "1 problem, nothing was applied: services.web.depends_on: no service 'db'"
    fake.answers[("POST", "/v1/apply")] = ApiError(400, "bad_request", message)
    assert cli.main(["apply", str(f)]) == 2
    assert capsys.readouterr().err == f"pmon2: {f}: {message}\n"


def test_an_older_pmond_without_the_endpoint_is_named(tmp_path: Path, fake: FakeClient,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "a.toml", '[services.web]\ncommand = "./web"\n')
    assert cli.main(["apply", str(f)]) == 1
    assert "the running pmond has no /v1/apply" in capsys.readouterr().err


def test_dump_cli(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answers[("GET", "/v1/dump")] = {"services": [dumped_service()]}
    assert cli.main(["dump"]) == 0
    out = capsys.readouterr().out
    assert '[services.api]\ncommand = ["./bin/api", "--port", "8080"]\ncwd = "/srv/api"\n' in out
    fake.answers[("GET", "/v1/dump")] = ApiError(403, "forbidden", "dump: env values of services you may not see")
    assert cli.main(["dump"]) == 1
    assert "pmon2 dump --masked" in capsys.readouterr().err
    fake.answers[("GET", "/v1/dump?masked=true")] = {"services": [dumped_service(env={"API_KEY": "***"})]}
    assert cli.main(["dump", "--masked"]) == 0
    assert "API_KEY" in capsys.readouterr().out


def test_schema_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == spec.app_file_schema()
    assert cli.main(["schema", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == appfile.markdown()


# update, scale, restart --update-env, run --env-file


@pytest.mark.parametrize(("tokens", "expected"), [
    (["--env", "A=1", "--restart"], ({"env": ["A=1"]}, None, True)),
    (["--restart", "on-failure"], ({"restart": "on-failure"}, None, False)),
    (["--restart=no", "--restart"], ({"restart": "no"}, None, True)),
    (["--kill-timeout", "3", "-u", "www"], ({"kill_timeout": "3", "user": "www"}, None, False)),
    (["--env-file", "a.env", "--env-file=b.env"], ({"env_file": ["a.env", "b.env"]}, None, False)),
    (["--", "./x", "--restart"], ({}, ["./x", "--restart"], False)),
    (["--cwd", "/srv", "./x", "-v"], ({"cwd": "/srv"}, ["./x", "-v"], False)),
    (["--json", "--no-autorestart"], ({"json": True, "no_autorestart": True}, None, False)),
])
def test_split_update_args(tokens: list[str], expected: tuple[Any, ...]) -> None:
    assert cli.split_update_args(tokens) == expected


@pytest.mark.parametrize(("tokens", "message"), [
    (["--name", "x"], "rename"), (["--frobnicate"], "update takes no --frobnicate"),
    (["--kill-timeout"], "needs a value"), (["--env-clear=1"], "takes no value"),
])
def test_split_update_args_refuses(tokens: list[str], message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        cli.split_update_args(tokens)


def test_update_fields_through_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/h")
    stored = {"env": {"KEEP": "1", "LOG_LEVEL": "info"}, "argv": ["./bin/api", "--old"]}
    (tmp_path / "x.env").write_text("FROM_FILE=${HOME}\n")
    opts, argv, _ = cli.split_update_args(["--env", "LOG_LEVEL=debug", "--env-file", str(tmp_path / "x.env"),
                                           "--kill-timeout", "7", "--args", "--port 9", "--stop-signal", "INT",
                                           "--no-autorestart", "--tag", "a", "--tag", "b"])
    fields = cli.update_fields(opts, argv, lambda: stored)
    assert fields == {"env": {"KEEP": "1", "LOG_LEVEL": "debug", "FROM_FILE": "/home/h"},
                      "argv": ["./bin/api", "--port", "9"], "restart": "no", "kill_timeout": 7.0,
                      "stop_signal": "SIGINT", "tags": ["a", "b"]}
    opts, argv, _ = cli.split_update_args(["--env-clear", "--env", "ONLY=1", "--", "./new", "x"])
    assert cli.update_fields(opts, argv, lambda: pytest.fail("no need to read the service")) == {
        "env": {"ONLY": "1"}, "argv": ["./new", "x"]}
    with pytest.raises(spec.FieldError, match="--kill-timeout"):
        cli.update_fields({"kill_timeout": "soon"}, None, lambda: stored)


def test_update_cli(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answers[("GET", "/v1/services/api?show_env=true")] = {"name": "api", "env": {"A": "1"}, "env_masked": False,
                                                               "argv": ["./api"]}
    fake.answers[("POST", "/v1/services/api/update")] = {
        "services": [{"name": "api", "pid": 42}], "restart_needed": True, "restarted": True}
    assert cli.main(["update", "api", "--env", "B=2", "--restart"]) == 0
    assert fake.calls[-1] == ("POST", "/v1/services/api/update",
                              {"fields": {"env": {"A": "1", "B": "2"}}, "restart": True})
    assert capsys.readouterr().out == "updated api: env\nrestarted api (pid 42)\n"
    fake.answers[("POST", "/v1/services/api/update")] = {
        "services": [{"name": "api", "pid": 42}], "restart_needed": True, "restarted": False}
    assert cli.main(["update", "--restart", "api", "--cwd", "/srv"]) == 0  # argparse's --restart before REF
    assert fake.calls[-1][2] == {"fields": {"cwd": "/srv"}, "restart": True}
    assert cli.main(["update", "api", "--kill-timeout", "9"]) == 0
    assert "takes effect at the next start" in capsys.readouterr().out
    assert cli.main(["update", "api"]) == 2
    assert "nothing to change" in capsys.readouterr().err


def test_update_of_a_group_reads_its_first_instance(fake: FakeClient) -> None:
    fake.answers[("GET", "/v1/services/web%3A0?show_env=true")] = {"name": "web:0", "env": {"I": "${instance}"},
                                                                 "env_masked": False}
    fake.answers[("POST", "/v1/services/web/update")] = {"services": [{"name": "web:0"}, {"name": "web:1"}],
                                                         "restart_needed": True, "restarted": False}
    assert cli.main(["update", "web", "--env", "X=1"]) == 0
    assert fake.calls[-1][2]["fields"]["env"] == {"I": "${instance}", "X": "1"}


def test_update_refuses_a_masked_env(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answers[("GET", "/v1/services/api?show_env=true")] = {"name": "api", "env": {"K": "***"}, "env_masked": True}
    assert cli.main(["update", "api", "--env", "B=2"]) == 1
    assert "masked" in capsys.readouterr().err and all(c[0] == "GET" for c in fake.calls)


def test_restart_update_env(fake: FakeClient, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(spec.os, "environ", {"NEW": "n", "OLD": "changed", "SSH_AUTH_SOCK": "x", "PMON2_HOME": "h"})
    fake.answers[("GET", "/v1/services/api?show_env=true")] = {"name": "api", "env": {"OLD": "o", "KEEP": "k"},
                                                               "env_masked": False}
    fake.answers[("POST", "/v1/services/api/update")] = {"services": [], "restart_needed": True, "restarted": False}
    fake.answers[("POST", "/v1/actions/restart")] = {"results": [{"ok": True, "service": {"name": "api", "pid": 7}}]}
    assert cli.main(["restart", "api", "--update-env"]) == 0
    assert fake.calls[1][2] == {"fields": {"env": {"OLD": "changed", "KEEP": "k", "NEW": "n"}}, "restart": False}
    assert fake.calls[2] == ("POST", "/v1/actions/restart", {"select": ["api"]})
    assert "restarted with your environment" in capsys.readouterr().out
    assert cli.main(["restart", "web-*", "--update-env"]) == 2


def test_scale_cli(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answers[("GET", "/v1/services")] = [{"name": "web:0", "instance_of": "web"}, {"name": "web:1",
                                                                                       "instance_of": "web"},
                                             {"name": "other"}]
    fake.answers[("POST", "/v1/services/web/scale")] = {
        "services": [{"name": f"web:{i}"} for i in range(4)], "removed": []}
    assert cli.main(["scale", "web", "4"]) == 0
    assert fake.calls[-1][2] == {"instances": 4}
    assert capsys.readouterr().out == "web: 4 instances; added web:2, web:3\n"
    fake.answers[("POST", "/v1/services/web/scale")] = {"services": [{"name": "web:0"}], "removed": ["web:1"]}
    assert cli.main(["scale", "web", "1"]) == 0
    assert capsys.readouterr().out == "web: 1 instance; removed web:1\n"
    assert cli.main(["scale", "web", "0"]) == 1
    assert "must be a whole number from 1 to 1000" in capsys.readouterr().err


def test_run_env_file(tmp_path: Path, fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.env").write_text("A=1\nB=${A}2\nC=from-file\n")
    opts, argv = cli.split_run_args(["--env-file", "a.env", "--env", "C=flag", "./app", "--env-file", "x"])
    assert opts == {"env_file": ["a.env"], "env": ["C=flag"]} and argv == ["./app", "--env-file", "x"]
    fake.answers[("POST", "/v1/services")] = {"name": "app", "id": 1, "pid": 2}
    assert cli.main(["run", "--env-clear", "--env-file", "a.env", "--env", "C=flag", "./app"]) == 0
    assert fake.calls[-1][2]["env"] == {"A": "1", "B": "12", "C": "flag"}
    assert cli.main(["run", "--env-file", "missing.env", "./app"]) == 2
