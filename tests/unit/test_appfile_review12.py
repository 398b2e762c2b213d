"""REVIEW12's findings on app files, dump and the client, without a pmond: `$` kept through dump and apply,
a group of one dumped as a group, depends_on keys in decomposed Unicode, inputs built to break the CLI
(deep nesting, YAML alias bombs, an env_file or app file that is a device or a FIFO, a file too large), and
pmond's answer read when it refused a request before reading all of it (413)."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pmon2 import appfile, spec
from pmon2.appfile import AppFileError
from pmon2.client import ApiError, Client
from pmon2.errors import DaemonUnreachable
from pmon2.paths import resolve

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/dev"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(AppFileError) as exc:
        appfile.load(str(path), ENV if environ is None else environ)
    return [str(p) for p in exc.value.problems]


def dumped(**fields: Any) -> dict[str, Any]:
    """A service of GET /v1/dump (pmond's request_fields): `instances` only for a group."""
    return {"name": "pw", "argv": ["sh", "-c", "exec sleep 1"], "cwd": "/srv", "env": {}, "user": "root"} | fields


# finding 4: dump escapes `$`


@pytest.mark.parametrize("argv, env", [
    (["sh", "-c", "exec sleep 1 # ${HOME} $HOME $$ $"], {"DB_PASSWORD": "pa$$w0rd", "TRAILING": "x$"}),
    (["sh", "-c", "exec sleep 73712${WORKER_SUFFIX:-02}"], {"UNSET": "${NOT_SET_ANYWHERE}"}),  # a Procfile's
    (["app", "--id", "${instance}", "--port=${port}", "$${instance}", "${instance"], {"I": "${instance}-${port}",
                                                                                   "LITERAL": "$${port}"}),
])
def test_dump_then_load_keeps_every_dollar(tmp_path: Path, argv: list[str], env: dict[str, str]) -> None:
    svc = dumped(argv=argv, env=env, cwd="/srv/$app", log="/var/log/${instance}.log", source="/srv/${X}/a.toml",
                 ready="exec:test -e $HOME/ready")
    f = tmp_path / "dump.toml"
    f.write_text(appfile.dump_toml({"services": [svc]}, masked=False))
    [back] = appfile.load(str(f), ENV)["services"]
    assert (back["argv"], back["env"], back["cwd"], back["log"], back["source"], back["ready"]) == (
        argv, env, svc["cwd"], svc["log"], svc["source"], svc["ready"])


def test_pmonds_placeholders_stay_readable_in_command_and_env_only() -> None:
    assert appfile.escape_dollars(["${instance}", "${port}", "$${port}", "${HOME}"], per_instance=True) == [
        "${instance}", "${port}", "$$${port}", "$${HOME}"]
    assert appfile.escape_dollars({"$K": "${instance}"}) == {"$K": "$${instance}"}  # keys are never expanded
    assert appfile.escape_dollars([3, True, None]) == [3, True, None]


# finding 9: a group of one stays a group in the dump


def test_a_group_of_one_is_dumped_with_its_instances() -> None:
    table = appfile.dump_services([dumped(name="web", instances=1), dumped(name="plain")])["services"]
    assert table["web"]["instances"] == 1 and "instances" not in table["plain"]


# finding 10: depends_on keys are names, NFC-normalised


def test_depends_on_keys_are_normalised_as_names() -> None:
    assert spec.SERVICE["depends_on"].validate({"cafe\u0301": "started"}) == {"caf\u00e9": "started"}


def test_depends_on_a_name_written_decomposed(tmp_path: Path) -> None:
    f = write(tmp_path, "a.toml", """
        [services."cafe\\u0301"]
        command = "sleep 1"

        [services.app]
        command = "sleep 1"
        depends_on = { "cafe\\u0301" = "started" }
    """)
    app = {s["name"]: s for s in appfile.load(str(f), ENV)["services"]}["app"]
    assert app["depends_on"] == {"caf\u00e9": "started"}
    f.write_text('[services."caf\\u00e9"]\ncommand = "sleep 1"\ndepends_on = { "cafe\\u0301" = "started" }\n')
    assert any("a service cannot wait for itself" in p for p in problems(f))


# finding 12: input built to break the CLI


@pytest.mark.parametrize("levels", [100, 50_000])  # deeper than MAX_DEPTH; deeper than the parsers' recursion
@pytest.mark.parametrize("fmt", ["json", "toml", "yaml"])
def test_deep_nesting_is_one_problem(tmp_path: Path, fmt: str, levels: int) -> None:
    deep = "[" * levels + "]" * levels
    text = {"json": '{"services": {"a": {"command": ' + deep + "}}}",
            "toml": "[services.a]\ncommand = " + deep + "\n",
            "yaml": "services:\n  a:\n    command: " + deep + "\n"}[fmt]
    f = tmp_path / f"deep.{fmt}"
    f.write_text(text)
    assert problems(f) == [f"{f}: nested too deeply: at most {appfile.MAX_DEPTH} levels"]


def test_nesting_through_an_alias_counts_at_its_deepest_place(tmp_path: Path) -> None:
    inner = "[" * 60 + "]" * 60
    f = write(tmp_path, "a.yaml", f"x-deep: &d {inner}\nservices:\n  a:\n    command: [[[[[[*d]]]]]]\n")
    assert problems(f) == [f"{f}: nested too deeply: at most {appfile.MAX_DEPTH} levels"]


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ['x0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 strings
    lines += ["services:", "  a:", "    command: sleep 1", "    tags: *l8"]
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    assert problems(f) == [f"{f}: too large: more than 1,000,000 values once its aliases are expanded"]
    assert time.monotonic() - t0 < 1


def test_an_alias_inside_itself_is_refused(tmp_path: Path) -> None:
    f = write(tmp_path, "a.yaml", "services:\n  a:\n    command: sleep 1\n    tags: &t [x, *t]\n")
    assert problems(f) == [f"{f}: an alias refers to a node that holds it (a cycle)"]


def test_aliases_used_a_few_times_are_fine(tmp_path: Path) -> None:
    f = write(tmp_path, "a.yaml", """
        services:
          a: {command: sleep 1, env: &env {A: "1", B: "2"}}
          b: {command: sleep 2, env: *env}
    """)
    assert [s["env"]["B"] for s in appfile.load(str(f), {})["services"]] == ["2", "2"]


def test_an_env_file_that_is_a_device_a_fifo_or_a_directory(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.env"
    os.mkfifo(fifo)  # no writer: reading it would wait forever
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO"), (str(tmp_path), "a directory")):
        f = write(tmp_path, "a.toml", f'[services.a]\ncommand = "sleep 1"\nenv_file = "{path}"\n')
        assert problems(f) == [f"{f}:3: services.a.env_file: {path}: not a regular file: {kind}"]


def test_an_app_file_that_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pmon2.toml"
    os.mkfifo(fifo)
    assert problems(fifo) == [f"{fifo}: not a regular file: a FIFO"]


def test_a_file_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(appfile, "MAX_FILE_SIZE", 1 << 20)
    f = tmp_path / "big.env"
    f.write_text("A=" + "x" * (1 << 20) + "\n")
    with pytest.raises(AppFileError, match=r"big.env: larger than 1 MiB"):
        appfile.read_env_file(str(f), {})


def test_an_env_file_through_a_symbolic_link_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "real.env").write_bytes(b"A=1\r\nB=${A}2\r\n")
    (tmp_path / "link.env").symlink_to(tmp_path / "real.env")
    assert appfile.read_env_file(str(tmp_path / "link.env"), {}) == {"A": "1", "B": "12"}


# finding 11: an answer sent before the request was read whole


def serve_once(path: str, answer: bytes | None) -> threading.Thread:
    """A server for one connection: it reads the request's head, answers `answer` (None: nothing) and closes
    with the body unread, as pmond does with a body over its limit."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        if answer is not None:
            conn.sendall(answer)
        conn.close()
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def client_at(tmp_path: Path) -> Client:
    client = Client(resolve({"PMON2_HOME": str(tmp_path)}))
    os.makedirs(os.path.dirname(client.paths.socket), exist_ok=True)
    return client


def test_pmonds_answer_to_a_body_too_large_is_read(tmp_path: Path) -> None:
    client = client_at(tmp_path)
    body = b'{"error": {"code": "too_large", "message": "the request body is over 4194304 bytes"}}'
    thread = serve_once(client.paths.socket, b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\n"
                                             b"Connection: close\r\n\r\n%s" % (len(body), body))
    with pytest.raises(ApiError) as exc:
        client.request("POST", "/v1/apply", {"big": "x" * (8 << 20)}, autostart=False)
    thread.join(5)
    assert exc.value.status == 413 and exc.value.code == "too_large"
    assert exc.value.message.startswith("the request body is over 4194304 bytes (this one: 83886")


def test_a_connection_lost_while_sending_is_said(tmp_path: Path) -> None:
    client = client_at(tmp_path)
    thread = serve_once(client.paths.socket, None)
    with pytest.raises(DaemonUnreachable, match="lost the connection to pmond"):
        client.request("POST", "/v1/apply", {"big": "x" * (8 << 20)}, autostart=False)
    thread.join(5)
