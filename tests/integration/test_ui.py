"""The interface (issue 4): tables, colours, errors that suggest the fix, logs, completion, dashboard."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")
BIN = Path(sys.executable).parent


def test_ls_is_coloured_only_when_asked(pmon: Any) -> None:
    pmon.start_service("sleep", "717171", "--name", "colour")
    plain = pmon.run("ls").stdout  # piped, NO_COLOR=1
    assert "colour" in plain and not ANSI.search(plain)
    env = {k: v for k, v in pmon.env.items() if k != "NO_COLOR"}
    forced = pmon.run("ls", env=env | {"FORCE_COLOR": "1"}).stdout
    assert "\x1b[32;1mrunning" in forced  # running is green
    both = pmon.run("ls", env=env | {"FORCE_COLOR": "1", "NO_COLOR": "1"}).stdout
    assert not ANSI.search(both)
    lines = plain.strip().splitlines()
    assert len({len(line) for line in lines}) == 1, "table lines differ in width"


def test_empty_list_prints_a_hint(pmon: Any) -> None:
    out = pmon.run("ls").stdout.strip()
    assert out.startswith("no services yet") and "pmon2 run" in out


def test_unknown_service_suggests_the_close_name(pmon: Any) -> None:
    pmon.start_service("sleep", "727272", "--name", "api")
    proc = pmon.run("stop", "apy", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "pmon2: no service 'apy'; did you mean 'api'?"


def test_unknown_command_suggests_the_close_one(pmon: Any) -> None:
    proc = pmon.run("restrat", "api", check=False)
    assert proc.returncode == 2
    assert proc.stderr == "pmon2: unknown command 'restrat'; did you mean 'restart'? (see 'pmon2 --help')\n"
    proc = pmon.run("zzz", check=False)
    assert proc.returncode == 2 and "one of " in proc.stderr and "_names" not in proc.stderr
    assert not pmon.pidfile.exists(), "a mistyped command must not start pmond"


def test_every_command_has_help_with_an_example(pmon: Any) -> None:
    overview = pmon.run()
    assert overview.returncode == 0 and "run" in overview.stdout and "monit" in overview.stdout
    for command in ("run", "ls", "desc", "start", "stop", "restart", "reload", "del", "log", "logf", "flush",
                    "events", "why", "monit", "completion", "version", "daemon", "startup", "unstartup"):
        out = pmon.run(command, "--help").stdout
        assert "example:" in out and f"pmon2 {command}" in out, command


def test_desc_masks_secrets(pmon: Any) -> None:
    env = dict(pmon.env, API_TOKEN="hunter2", DB_PASSWORD="swordfish", PLAIN_SETTING="visible")
    pmon.run("run", "sleep", "737373", "--name", "masked", env=env)
    out = pmon.run("desc", "masked").stdout
    assert "API_TOKEN=***" in out and "DB_PASSWORD=***" in out and "PLAIN_SETTING=visible" in out
    assert "hunter2" not in out and "swordfish" not in out
    for field in ("cpu", "memory", "restart policy", "stdout log", "stderr log", "last exit", "uptime"):
        assert field in out


def test_log_tags_streams_and_services(pmon: Any) -> None:
    for name in ("one", "two"):
        pmon.run("run", "--name", name, "sh", "-c", f"echo {name}-out; echo {name}-err >&2; sleep 1000")
    pmon.wait_for(lambda: "two-err" in pmon.run("log", "two").stdout, message="the logs of two")
    both = pmon.run("log").stdout
    assert "one out | one-out" in both and "one err | one-err" in both and "two out | two-out" in both
    single = pmon.run("log", "one").stdout
    assert "out | one-out" in single and "err | one-err" in single
    assert "two-out" not in single


def _follow(pmon: Any, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(pmon.cmd("logf", *args), env=pmon.env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _read_until(proc: subprocess.Popen[bytes], needle: str, timeout: float = 5.0) -> str:
    """Read logf's raw output (no Python buffering that select cannot see) until `needle` appears."""
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"logf never printed {needle!r}; it printed:\n{seen[-2000:].decode()}", pytrace=False)
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"logf ended before printing {needle!r}:\n{seen[-2000:].decode()}", pytrace=False)
            seen += chunk
    return seen.decode()


def test_logf_follows_across_copytruncate_and_rename(pmon: Any) -> None:
    ticker = pmon.script("ticker", """
        import itertools, sys, time
        for i in itertools.count():
            print(f"tick {i}", flush=True)
            time.sleep(0.05)
    """)
    svc = pmon.start_service(str(ticker), "--name", "ticker")
    out_log = Path(svc["out_log"])
    proc = _follow(pmon, "ticker")
    try:
        _read_until(proc, "tick 3")
        # copytruncate, as logrotate and pmond's own rotation do it
        shutil.copy(out_log, str(out_log) + ".1")
        os.truncate(out_log, 0)
        pmon.wait_for(lambda: out_log.stat().st_size > 0, message="the service to write again")
        before = out_log.read_text().split()[1] if out_log.read_text() else "0"
        _read_until(proc, f"tick {int(before) + 2}")
        # rename + create: the service keeps its old file, a new one appears at the path
        os.rename(out_log, str(out_log) + ".2")
        out_log.write_text("written to the new file\n")
        _read_until(proc, "written to the new file")
    finally:
        proc.kill()
        proc.wait()


def test_flush_empties_logs_and_writing_goes_on(pmon: Any) -> None:
    ticker = pmon.script("ticker", """
        import itertools, time
        for i in itertools.count():
            print(f"line {i}", flush=True)
            time.sleep(0.05)
    """)
    svc = pmon.start_service(str(ticker), "--name", "flushme")
    out_log = Path(svc["out_log"])
    pmon.wait_for(lambda: out_log.stat().st_size > 200, message="some output")
    assert "emptied 2 log files" in pmon.run("flush", "flushme").stdout
    size_after = out_log.stat().st_size
    assert size_after < 100
    pmon.wait_for(lambda: out_log.stat().st_size > size_after, message="output after the flush")
    # O_APPEND: new lines start at the new end, no hole of NUL bytes
    assert b"\0" not in out_log.read_bytes()


def test_bash_completion_completes_commands_and_service_names(pmon: Any) -> None:
    pmon.start_service("sleep", "747474", "--name", "webapp")
    script = pmon.run("completion", "bash").stdout
    path = pmon.work / "pmon2.bash"
    path.write_text(script)
    env = dict(pmon.env, PATH=f"{BIN}{os.pathsep}{pmon.env['PATH']}")

    def complete(*words: str) -> list[str]:
        quoted = " ".join(f"'{w}'" for w in words)
        code = (f"source {path}; COMP_WORDS=(pmon2 {quoted}); COMP_CWORD={len(words)}; _pmon2; "
                'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.split()

    assert {"start", "stop", "status"} - set(complete("st")) == {"status"}
    assert complete("stop", "we") == ["webapp"]
    assert "--force" in complete("stop", "--f")
    assert "--no-autorestart" in complete("run", "--no")
    assert complete("daemon", "st") == ["start", "stop", "status"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion_scripts_parse(pmon: Any, shell: str) -> None:
    script = pmon.run("completion", shell).stdout
    assert "_names" in script and "restart" in script and "kill-timeout" in script
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    path = pmon.work / f"pmon2.{shell}"
    path.write_text(script)
    check = [exe, "-n", str(path)]
    proc = subprocess.run(check, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_names_for_completion_never_start_pmond(pmon: Any) -> None:
    proc = pmon.run("_names")
    assert proc.stdout == "" and pmon.daemon_pid() is None


def test_dashboard_restarts_the_selected_service_by_key(pmon: Any) -> None:
    pytest.importorskip("textual")
    from textual.widgets import DataTable

    from pmon2 import paths
    from pmon2.client import Client
    from pmon2.render.dashboard import Confirm, Dashboard

    svc = pmon.start_service("sleep", "757575", "--name", "dashed")
    client = Client(paths.resolve(pmon.env))

    async def drive() -> None:
        app = Dashboard(client, interval=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            table = app.query_one(DataTable)
            assert table.row_count == 1
            assert "dashed" in [str(c) for c in table.get_row_at(0)]
            await pilot.press("r")
            await pilot.pause(0.1)
            assert isinstance(app.screen, Confirm), "restart must ask first"
            await pilot.press("n")
            await pilot.pause(0.3)
            assert pmon.desc("dashed")["pid"] == svc["pid"], "a 'no' restarted it"
            await pilot.press("r")
            await pilot.pause(0.1)
            await pilot.press("y")
            for _ in range(50):
                await pilot.pause(0.1)
                if pmon.desc("dashed")["restarts"] == 1:
                    break
            after = pmon.desc("dashed")
            assert after["restarts"] == 1 and after["pid"] != svc["pid"] and after["status"] == "running"
            await pilot.press("q")

    asyncio.run(drive())


def test_fish_completion_completes_service_names(pmon: Any) -> None:
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed")
    pmon.start_service("sleep", "767676", "--name", "fishy")
    path = pmon.work / "pmon2.fish"
    path.write_text(pmon.run("completion", "fish").stdout)
    env = dict(pmon.env, PATH=f"{BIN}{os.pathsep}{pmon.env['PATH']}")

    def complete(line: str) -> list[str]:
        out = subprocess.run([fish, "--no-config", "-c", f"source {path}; complete -C '{line}'"], env=env,
                             capture_output=True, text=True, check=True).stdout
        return [row.split("\t")[0] for row in out.splitlines()]

    assert {"start", "stop"} <= set(complete("pmon2 st"))
    assert "fishy" in complete("pmon2 restart fi")
