"""The spec model: strict checks of every field, CLI text parsing, masking, the schema."""

from __future__ import annotations

import math

import pytest

from pmon2 import spec
from pmon2.errors import BadRequest


@pytest.mark.parametrize("name", ["api", "A", "_x", "0day", "web.1", "a-b_c.d", "x" * 64, "web-一二三", "svc@2",
                                  "a+b", "数据", "café"])
def test_name_ok(name):
    assert spec.check_name(name) == name


@pytest.mark.parametrize(("name", "rule"), [
    ("", "must not be empty"), (".hidden", "may not begin with '.'"), ("-x", "may not begin with '-'"),
    ("a b", "' ' is not allowed"), ("a/b", "'/' is not allowed"), ("x" * 65, "at most 64 characters"),
    ("a\tb", "is not allowed"), ("api\n", "is not allowed"), ("123", "only digits"), ("٣٣", "only digits"),
    ("web:0", "reserved for instances"), ("é" * 65, "too long"), ("\U0001F600" * 33, "128 bytes"),
])
def test_name_bad_says_the_rule(name, rule):
    with pytest.raises(ValueError, match=rule):
        spec.check_name(name)


def test_name_is_nfc():
    assert spec.check_name("cafe\u0301") == "caf\u00e9"


@pytest.mark.parametrize(("ref", "expected"), [("3", 3), ("0042", 42), ("²", None), ("٣", None), ("api", None),
                                               ("9" * 19, None)])
def test_parse_id_ascii_digits_only(ref, expected):
    assert spec.parse_id(ref) == expected


@pytest.mark.parametrize(("body", "field"), [
    ({"name": ["a"]}, "name"), ({"name": 5}, "name"), ({"cwd": 5}, "cwd"), ({"cwd": "rel/dir"}, "cwd"),
    ({"user": ["root"]}, "user"), ({"log_max_size": math.inf}, "log_max_size"),
    ({"log_max_size": 1e400}, "log_max_size"),
    ({"log_max_size": 1e400}, "log_max_size"),
    ({"log_max_size": "10Q"}, "log_max_size"), ({"log_max_size": True}, "log_max_size"),
    ({"log_keep": "3"}, "log_keep"), ({"log_keep": 3.0}, "log_keep"), ({"log_keep": -1}, "log_keep"),
    ({"autorestart": "false"}, "autorestart"), ({"autorestart": 0}, "autorestart"),
    ({"min_uptime": "1"}, "min_uptime"), ({"kill_timeout": -1}, "kill_timeout"),
    ({"kill_timeout": math.nan}, "kill_timeout"), ({"kill_timeout": 86401}, "kill_timeout"),
    ({"argv": "sleep 1"}, "argv"), ({"argv": []}, "argv"), ({"argv": [""]}, "argv"), ({"argv": ["a\0b"]}, "argv"),
    ({"argv": ["sleep", 1]}, "argv"), ({"env": []}, "env"), ({"env": {"A": 1}}, "env"), ({"env": {"A=B": "x"}}, "env"),
    ({"stop_signal": "NOPE"}, "stop_signal"), ({"stop_signal": True}, "stop_signal"),
    ({"stop_signal": "²"}, "stop_signal"),
])
def test_service_fields_strict(body, field):
    with pytest.raises(BadRequest) as exc:
        spec.check_body(body, spec.SERVICE_FIELDS)
    assert exc.value.message.startswith(f"{field}: ")


def test_force_must_be_json_true():
    assert spec.check_body({"force": True}, spec.STOP_FIELDS) == {"force": True}
    for value in ("false", "true", 1, 0, None, []):
        with pytest.raises(BadRequest, match="force: must be true or false"):
            spec.check_body({"force": value}, spec.STOP_FIELDS)


def test_unknown_field_and_non_object_body():
    with pytest.raises(BadRequest, match="unknown field 'forse'"):
        spec.check_body({"forse": True}, spec.STOP_FIELDS)
    for body in ([], "x", 3):
        with pytest.raises(BadRequest, match="must be a JSON object"):
            spec.check_body(body, spec.STOP_FIELDS)  # type: ignore[arg-type]
    assert spec.check_body(None, spec.STOP_FIELDS) == {}


def test_query_limit():
    assert spec.check_query({}, (spec.LIMIT,)) == {"limit": 50}
    assert spec.check_query({"limit": ["7"]}, (spec.LIMIT,)) == {"limit": 7}
    for bad in ("²", "٣", "0", "100001", "-1", "1.5", ""):
        with pytest.raises(BadRequest, match="limit: "):
            spec.check_query({"limit": [bad]}, (spec.LIMIT,))
    with pytest.raises(BadRequest, match="unknown query parameter"):
        spec.check_query({"lmit": ["3"]}, (spec.LIMIT,))


def test_cli_text_parsing_names_the_flag():
    assert spec.SERVICE["kill_timeout"].from_text("2.5") == 2.5
    assert spec.SERVICE["log_keep"].from_text("3") == 3
    assert spec.SERVICE["log_max_size"].from_text("10M") == 10 << 20
    assert spec.SERVICE["stop_signal"].from_text("hup") == "SIGHUP"
    with pytest.raises(BadRequest, match="--kill-timeout: must be a number"):
        spec.SERVICE["kill_timeout"].from_text("soon")
    with pytest.raises(BadRequest, match="--log-keep: must be a whole number"):
        spec.SERVICE["log_keep"].from_text("²")
    with pytest.raises(BadRequest, match="--name: must not be empty"):
        spec.SERVICE["name"].from_text("")


def test_mask_env():
    env = {"API_KEY": "k1", "DB_PASSWORD": "p", "github_token": "t", "MY_SECRET_X": "s", "PATH": "/bin",
           "DATABASE_URL": "postgres://app:pw@db/x", "REDIS": "redis://:hunter2@cache:6379/0",
           "PLAIN": "http://example.com/a:b@c", "AWS_SESSION": "x", "PRIVATE_PEM": "-----BEGIN",
           "SMTP_PASS": "x", "HTTP_AUTHORIZATION": "Basic x"}
    masked = spec.mask_env(env)
    assert masked["API_KEY"] == masked["DB_PASSWORD"] == masked["github_token"] == masked["MY_SECRET_X"] == "***"
    assert masked["AWS_SESSION"] == masked["PRIVATE_PEM"] == masked["SMTP_PASS"] == "***"
    assert masked["HTTP_AUTHORIZATION"] == "***"
    assert masked["PATH"] == "/bin"
    assert masked["DATABASE_URL"] == "postgres://app:***@db/x"
    assert masked["REDIS"] == "redis://:***@cache:6379/0"
    assert masked["PLAIN"] == "http://example.com/a:b@c"  # no userinfo before the host: nothing to hide
    assert "pw" not in str(masked) and "hunter2" not in str(masked)


def test_service_env_drops_session_and_pmon2_variables():
    env = {"PATH": "/bin", "SSH_AUTH_SOCK": "/tmp/agent", "SSH_CONNECTION": "1 2 3 4", "DISPLAY": ":0",
           "XDG_SESSION_ID": "3", "PMON2_HOME": "/x", "PMON2_SERVICE": "a:1", "LANG": "C.UTF-8"}
    assert spec.service_env(env) == {"PATH": "/bin", "LANG": "C.UTF-8"}


def test_json_schema_derives_from_the_fields():
    schema = spec.json_schema()
    assert set(schema["properties"]) == {f.name for f in spec.SERVICE_FIELDS}
    assert schema["additionalProperties"] is False and schema["required"] == ["argv"]
    assert schema["properties"]["kill_timeout"]["x-unit"] == "s"
    assert all(p["description"] for p in schema["properties"].values())


def test_docs_api_table_is_generated_from_the_model():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    block = text.split("<!-- generated from pmon2/spec.py: SERVICE_FIELDS -->\n", 1)[1].split("\n<!-- end", 1)[0]
    assert block == spec.markdown_table(), "docs/api.md is stale: paste spec.markdown_table() into it"
