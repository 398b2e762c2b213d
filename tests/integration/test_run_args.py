"""How `pmon2 run` splits its own flags from the service's argv, and --user."""

from __future__ import annotations

import json
import os
import pwd

import pytest

ARGV_DUMP = """
import json, os, sys, time
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "argv-" + os.path.basename(__file__) + ".json")
with open(out + ".tmp", "w") as fh:
    json.dump({"argv": sys.argv[1:], "uid": os.getuid()}, fh)
os.rename(out + ".tmp", out)
while True:
    time.sleep(1)
"""


def _dumper(pmon, name="dump", directory=None):
    path = pmon.script(name, ARGV_DUMP, directory)
    result = path.parent / f"argv-{name}.json"
    return path, result


def _argv(pmon, result):
    return pmon.wait_for(lambda: result.exists() and json.loads(result.read_text()),
                         message=f"the service to write {result.name}")["argv"]


def test_args_are_split_with_shell_rules(pmon):
    script, result = _dumper(pmon)
    svc = pmon.start_service(str(script), "--args", "a 'b c' d", "--name", "quoted")
    assert _argv(pmon, result) == ["a", "b c", "d"]
    assert svc["argv"] == [str(script), "a", "b c", "d"]


def test_flags_after_the_command(pmon):
    _, result = _dumper(pmon)
    svc = pmon.start_service("./dump", "x", "--name", "foo")
    assert svc["name"] == "foo"
    assert _argv(pmon, result) == ["x"]
    assert [s["name"] for s in pmon.services()] == ["foo"]


def test_unknown_flags_go_to_the_service(pmon):
    _, result = _dumper(pmon)
    svc = pmon.start_service("./dump", "--port", "8080")
    assert svc["name"] == "dump"
    assert _argv(pmon, result) == ["--port", "8080"]


def test_double_dash_passes_pmon_flags_through(pmon):
    _, result = _dumper(pmon)
    svc = pmon.start_service("./dump", "--name", "outer", "--", "--name", "inner", "--json")
    assert svc["name"] == "outer"
    assert _argv(pmon, result) == ["--name", "inner", "--json"]


def test_short_flags_before_the_command_only(pmon):
    _, result = _dumper(pmon)
    svc = pmon.start_service("-n", "short", "./dump", "-n", "5")
    assert svc["name"] == "short"
    assert _argv(pmon, result) == ["-n", "5"]


def test_pmon2_style_args_and_user_root(pmon):
    if os.geteuid() != 0:
        pytest.skip("needs root: --user root")
    _, result = _dumper(pmon, "gin", pmon.work / "bin")
    svc = pmon.start_service("./bin/gin", "--args", "-prjHome=/srv", "--user", "root")
    assert svc["name"] == "gin" and svc["user"] == "root"
    assert _argv(pmon, result) == ["-prjHome=/srv"]
    assert pmon.uid_of(svc["pid"]) == 0


def test_user_nobody(pmon):
    if os.geteuid() != 0:
        pytest.skip("needs root: --user needs pmond to run as root")
    nobody = pwd.getpwnam("nobody")
    os.chmod(pmon.home, 0o711)  # the service enters its cwd (pmon.work) as nobody
    svc = pmon.start_service("sleep", "31201", "--user", "nobody", "--name", "lowly")
    assert svc["user"] == "nobody"
    assert pmon.uid_of(svc["pid"]) == nobody.pw_uid
    assert pmon.ppid(svc["pid"]) == 1


def test_unknown_user_is_one_line_error(pmon):
    proc = pmon.run("run", "sleep", "31202", "--user", "no-such-user-xyz", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "pmon2: no such user: no-such-user-xyz\n"
    assert pmon.services() == []


def test_log_option_puts_both_streams_in_one_file(pmon):
    logfile = pmon.work / "both.log"
    pmon.script("talk", """
        import sys, time
        print("to-out", flush=True)
        print("to-err", file=sys.stderr, flush=True)
        time.sleep(1000)
        """)
    svc = pmon.start_service("./talk", "--log", "both.log")
    assert svc["out_log"] == svc["err_log"] == str(logfile)
    pmon.wait_for(lambda: "to-out" in logfile.read_text() and "to-err" in logfile.read_text(),
                  message="both streams in both.log")


def test_log_dir_option(pmon):
    pmon.script("talk", """
        import time
        print("hello-dir", flush=True)
        time.sleep(1000)
        """)
    svc = pmon.start_service("./talk", "--log_dir", "mylogs", "--name", "t2")
    assert svc["out_log"] == str(pmon.work / "mylogs" / "t2-out.log")
    pmon.wait_for(lambda: "hello-dir" in (pmon.work / "mylogs" / "t2-out.log").read_text(),
                  message="the line in mylogs/t2-out.log")
