"""Issue 11: several services per command (ids, names, globs, all; all or nothing; concurrently),
names (Unicode, reserved words, unique regardless of case, rename), run --cwd."""

from __future__ import annotations

import os
import time
from typing import Any


def test_stop_start_restart_all_and_globs(pmon: Any) -> None:
    for name in ("web-1", "web-2", "worker"):
        pmon.run("run", "sleep", "848481", "--name", name)
    out = pmon.run("stop", "web-*")
    assert out.stdout.splitlines() == ["web-1 stopped", "web-2 stopped"]
    status = {s["name"]: s["status"] for s in pmon.services()}
    assert status == {"web-1": "stopped", "web-2": "stopped", "worker": "running"}
    out = pmon.run("start", "web-1", "web-2")
    assert len(out.stdout.splitlines()) == 2
    before = {s["name"]: s["pid"] for s in pmon.services()}
    out = pmon.run("restart", "all")
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["web-1", "web-2", "worker"]
    after = {s["name"]: s["pid"] for s in pmon.services()}
    assert all(after[n] != before[n] and pmon.is_alive(after[n]) for n in after)


def test_a_ref_that_matches_nothing_does_nothing(pmon: Any) -> None:
    a = pmon.start_service("sleep", "848482", "--name", "alpha")
    bad = pmon.run("stop", "alpha", "nosuch", check=False)
    assert bad.returncode != 0 and "nosuch" in bad.stderr and bad.stderr.count("\n") == 1
    bad = pmon.run("stop", "alpha", "zz-*", check=False)
    assert bad.returncode != 0 and "zz-*" in bad.stderr
    assert pmon.desc("alpha")["status"] == "running" and pmon.is_alive(a["pid"])


def test_one_failure_makes_the_exit_status_non_zero(pmon: Any) -> None:
    pmon.run("run", "sleep", "848483", "--name", "up")
    pmon.run("run", "sleep", "848484", "--name", "down")
    pmon.run("stop", "down")
    out = pmon.run("reload", "up", "down", check=False)
    assert out.returncode == 1
    assert "to up" in out.stdout and "down" in out.stderr and "not running" in out.stderr


def test_restart_all_runs_concurrently(pmon: Any) -> None:
    slow = pmon.script("slow.py", """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), sys.exit(0)))
        while True:
            time.sleep(0.1)
    """)
    for i in range(4):
        pmon.run("run", str(slow), "--name", f"slow{i}")
    time.sleep(0.3)  # let each install its handler: a SIGTERM before that kills it at once
    began = time.monotonic()
    pmon.run("restart", "all")
    took = time.monotonic() - began
    assert took < 3.0, f"restart of 4 services that each take 1 s to stop took {took:.1f} s: not concurrent"


def test_del_all_asks_on_a_terminal_and_y_skips(pmon: Any) -> None:
    pmon.run("run", "sleep", "848485", "--name", "keep")
    refused = pmon.run("del", "all", check=False)  # stdin is not a terminal here
    assert refused.returncode != 0 and "-y" in refused.stderr
    assert [s["name"] for s in pmon.services()] == ["keep"]
    pmon.run("del", "-y", "all")
    assert pmon.services() == []


def test_names_rules_and_rename(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "848486", "--name", "web-一二三", "--json")
    assert svc["name"] == "web-一二三" and svc["out_log"].endswith("web-一二三-out.log")
    for name, rule in (("", "must not be empty"), (".hidden", "may not begin with '.'"),
                       ("-dash", "may not begin with '-'"), ("x" * 65, "at most 64"), ("all", "selects services"),
                       ("ALL", "selects services"), ("٣", "only digits"), ("a:b", "instances")):
        bad = pmon.run("run", "sleep", "1", "--name", name, check=False)
        assert bad.returncode != 0 and rule in bad.stderr, (name, bad.stderr)
        assert bad.stderr.count("\n") == 1
    taken = pmon.run("run", "sleep", "1", "--name", "WEB-一二三", check=False)
    assert taken.returncode != 0 and "taken" in taken.stderr
    # A non-ASCII digit ref is a name, never an id.
    missing = pmon.run("desc", "²", check=False)
    assert missing.returncode != 0 and "no service" in missing.stderr
    out = pmon.run("rename", "web-一二三", "web-new")
    assert "web-new" in out.stdout
    again = pmon.desc("web-new")
    assert again["pid"] == svc["pid"] and again["out_log"] == svc["out_log"]


def test_a_stored_name_that_breaks_the_rules_keeps_working_and_rename_fixes_it(pmon: Any) -> None:
    pmon.run("run", "sleep", "848487", "--name", "legacy")
    pmon.run("daemon", "stop")
    import sqlite3

    db = sqlite3.connect(str(pmon.db_path))
    db.execute("UPDATE services SET name = 'all' WHERE name = 'legacy'")
    db.commit()
    db.close()
    assert [s["name"] for s in pmon.services()] == ["all"]
    pmon.run("rename", "1", "legacy-fixed")
    assert [s["name"] for s in pmon.services()] == ["legacy-fixed"]


def test_run_cwd(pmon: Any) -> None:
    sub = pmon.work / "sub"
    sub.mkdir()
    svc = pmon.start_service("--cwd", "sub", "sleep", "848488", "--name", "incwd", "--json")
    assert svc["cwd"] == str(sub) and os.readlink(f"/proc/{svc['pid']}/cwd") == str(sub)
    bad = pmon.run("run", "--cwd", "nope", "sleep", "1", check=False)
    assert bad.returncode != 0 and "no such directory" in bad.stderr


def test_del_all_reads_yes_on_a_terminal(pmon: Any) -> None:
    pmon.run("run", "sleep", "848489", "--name", "tty")
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.execve(pmon.cmd()[0], [*pmon.cmd("del", "all")], dict(pmon.env))
    out = b""
    deadline = time.monotonic() + 10
    while b"[y/N]" not in out and time.monotonic() < deadline:
        out += os.read(fd, 1024)
    os.write(fd, b"y\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert pmon.services() == []
