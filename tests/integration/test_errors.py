"""Bad input: one line on stderr starting with `pmon2: `, a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def one_line_error(proc, code=1, contains=""):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stderr.startswith("pmon2: "), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), f"not one line: {proc.stderr!r}"
    assert contains.lower() in proc.stderr.lower(), proc.stderr
    return proc.stderr


UNKNOWN_SERVICE = [("stop", "nosuch"), ("stop", "-f", "nosuch"), ("desc", "nosuch"), ("del", "nosuch"),
                   ("restart", "nosuch"), ("start", "nosuch"), ("reload", "nosuch"), ("log", "nosuch"),
                   ("logf", "nosuch"), ("why", "nosuch"), ("events", "nosuch"), ("stop", "42")]


def test_unknown_service(pmon):
    for args in UNKNOWN_SERVICE:
        one_line_error(pmon.run(*args, check=False), contains="no service")


def test_unknown_service_suggests_a_close_name(pmon):
    pmon.start_service("sleep", "31301", "--name", "webapp")
    err = one_line_error(pmon.run("stop", "webap", check=False), contains="no service")
    assert "webapp" in err
    assert pmon.is_alive(pmon.services()[0]["pid"])


def test_duplicate_name(pmon):
    pmon.start_service("sleep", "31302", "--name", "dup")
    one_line_error(pmon.run("run", "sleep", "31303", "--name", "dup", check=False), contains="--name")
    assert len(pmon.services()) == 1


def test_missing_executable(pmon):
    one_line_error(pmon.run("run", "./no-such-program", check=False), contains="no such file")
    one_line_error(pmon.run("run", "no-such-program-xyz", check=False), contains="not found")
    assert pmon.services() == [], "a service that never ran must leave no trace"


def test_non_executable_file(pmon):
    (pmon.work / "plain.sh").write_text("#!/bin/sh\nsleep 1000\n")
    (pmon.work / "plain.sh").chmod(0o644)
    one_line_error(pmon.run("run", "./plain.sh", check=False), contains="not executable")
    one_line_error(pmon.run("run", str(pmon.work), check=False), contains="directory")
    assert pmon.services() == []


def test_exec_failure_reaches_the_user(pmon):
    # Executable bit set, but the interpreter in the shebang does not exist: execve fails.
    (pmon.work / "broken").write_text("#!/no/such/interpreter\n")
    (pmon.work / "broken").chmod(0o755)
    one_line_error(pmon.run("run", "./broken", check=False), contains="cannot start")
    assert pmon.services() == []


def test_bad_signal_for_reload(pmon):
    pid = pmon.start_service("sleep", "31304", "--name", "sig")["pid"]
    one_line_error(pmon.run("reload", "sig", "--sig", "FOO", check=False), contains="unknown signal")
    assert pmon.is_alive(pid) and pmon.desc("sig")["pid"] == pid


def test_bad_stop_signal_for_run(pmon):
    one_line_error(pmon.run("run", "sleep", "31305", "--stop-signal", "FOO", check=False),
                   contains="unknown signal")
    assert pmon.services() == []


def test_bad_kill_timeout(pmon):
    for value in ("abc", "-1", "1e9", "nan"):
        one_line_error(pmon.run("run", "sleep", "31306", f"--kill-timeout={value}", check=False),
                       contains="kill-timeout")
    one_line_error(pmon.run("run", "sleep", "31306", "--min-uptime", "soon", check=False), contains="min-uptime")
    assert pmon.services() == []


def test_flag_without_value_is_a_usage_error(pmon):
    one_line_error(pmon.run("run", "sleep", "31307", "--name", check=False), code=2, contains="--name")
    one_line_error(pmon.run("run", "--args", "x", check=False), code=2)
    one_line_error(pmon.run("run", check=False), code=2, contains="command")
    one_line_error(pmon.run("run", "--bogus", "sleep", check=False), code=2, contains="--bogus")


def test_invalid_name(pmon):
    one_line_error(pmon.run("run", "sleep", "31308", "--name", "bad name/x", check=False), contains="name")
    one_line_error(pmon.run("run", "sleep", "31308", "--name", "123", check=False), contains="name")
    assert pmon.services() == []


def test_argparse_usage_errors_exit_2(pmon):
    proc = pmon.run("stop", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = pmon.run("log", "x", "-n", "many", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_unreachable_daemon(pmon):
    blocker = pmon.work / "a-file"
    blocker.write_text("not a directory\n")
    env = dict(pmon.env, PMON2_HOME=str(blocker / "home"))
    for args in (("ls",), ("run", "sleep", "31309"), ("stop", "x"), ("daemon", "start")):
        proc = pmon.run(*args, check=False, env=env)
        one_line_error(proc)
        assert "not a directory" in proc.stderr.lower() or "cannot" in proc.stderr.lower(), proc.stderr
    proc = pmon.run("daemon", "status", check=False, env=env)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "not running" in proc.stdout
    assert not Path(blocker / "home").exists()


def test_daemon_that_cannot_start_reports_why(pmon):
    # The run dir can be created, but the data dir cannot: pmond itself fails at start-up.
    (pmon.home / "data").write_text("in the way\n")
    err = one_line_error(pmon.run("ls", check=False), contains="pmond")
    assert "data" in err


def test_no_traceback_on_broken_database(pmon):
    (pmon.home / "data").mkdir()
    (pmon.home / "data" / "pmon2.db").write_bytes(b"this is not sqlite" * 100)
    one_line_error(pmon.run("ls", check=False), contains="database")
    assert (pmon.home / "data" / "pmon2.db").read_bytes().startswith(b"this is not sqlite")


def test_cli_never_prints_a_traceback_on_a_dead_socket(pmon):
    # A stale socket file with nobody behind it: the CLI starts a fresh pmond.
    (pmon.home / "run").mkdir(mode=0o700)
    import socket as s
    sock = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    sock.bind(str(pmon.socket))
    sock.close()
    proc = pmon.run("ls", "--json", check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    daemon = pmon.daemon_pid()
    assert daemon and pmon.is_alive(daemon)


def test_version_without_daemon(pmon):
    proc = pmon.run("version")
    assert "pmond not running" in proc.stdout
    assert pmon.daemon_pid() is None, "version must not start pmond"
    out = subprocess.run([sys.executable, "-m", "pmon2", "--version"], capture_output=True, text=True,
                         env=pmon.env, cwd=pmon.work, check=True).stdout
    from pmon2 import __version__
    assert __version__ in out and os.path.exists(pmon.home)
