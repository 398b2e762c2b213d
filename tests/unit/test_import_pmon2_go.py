"""`pmon2 import pmon2-go`, the pure parts: Go's argv split, its config, its database read without a write,
names, the plan checked through the spec model, process identity against a fake /proc, the Go pmond's
detection and the exact systemd commands."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from pmon2 import importers
from pmon2 import spec as model
from pmon2.errors import PmonError
from pmon2.importers import pmon2_go as go
from pmon2.render.detail import imported_text

NEWER = ('CREATE TABLE "process" ("id" integer primary key autoincrement,"created_at" datetime,"updated_at" datetime,'
         '"deleted_at" datetime,"pid" integer,"log" varchar(255),"name" varchar(255),"process_file" varchar(255),'
         '"args" varchar(255),"status" varchar(255),"auto_restart" bool,"uid" varchar(255),"username" varchar(255),'
         '"gid" varchar(255))')
OLDER = ('CREATE TABLE "process" ("id" integer primary key autoincrement,"created_at" datetime,"updated_at" datetime,'
         '"deleted_at" datetime,"pid" integer,"log" varchar(255),"name" varchar(255),"process_file" varchar(255),'
         '"args" varchar(255),"status" varchar(255))')


# Go's argv


@pytest.mark.parametrize(("args", "argv"), [
    ("", ["/bin/app"]),  # `if len(extArgs) > 0`: no split, so no empty argument
    ("a", ["/bin/app", "a"]),
    ("-prjHome=/srv -p 80", ["/bin/app", "-prjHome=/srv", "-p", "80"]),
    ("a  b", ["/bin/app", "a", "", "b"]),  # strings.Split keeps the empty string between two spaces
    ("a ", ["/bin/app", "a", ""]),
    (" a", ["/bin/app", "", "a"]),
    (" ", ["/bin/app", "", ""]),
])
def test_go_argv_splits_as_go_does(args: str, argv: list[str]) -> None:
    assert go.go_argv("/bin/app", args) == argv


# config


def test_parse_config() -> None:
    text = ('# ----\n# pmon2 config\ndata: "/srv/pmon2/data"   # data dir\nlogs: /var/log/pmon2/log # logs\n'
            "sock: '/var/run/it''s.sock'\n  nested: x\n- item\nbin: \"/a\\\"b\"\n")
    assert go.parse_config(text) == {"data": "/srv/pmon2/data", "logs": "/var/log/pmon2/log",
                                     "sock": "/var/run/it's.sock", "bin": '/a"b'}


def make_db(path: Path, schema: str = NEWER, rows: tuple[dict, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute(schema)
    for row in rows:
        db.execute(f"INSERT INTO process ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    db.commit()
    db.close()
    return path


def test_locate_a_database_a_config_a_data_dir_or_pmon2_conf(tmp_path: Path) -> None:
    db = make_db(tmp_path / "data" / "db" / "data.db")
    conf = tmp_path / "config.yml"
    conf.write_text(f"data: {tmp_path / 'data'}\n")
    assert go.locate(str(db), {}).database == str(db)
    assert go.locate(str(conf), {}) == go.Source(str(db), str(conf), [])
    assert go.locate(str(tmp_path / "data"), {}).database == str(db)
    assert go.locate(None, {"PMON2_CONF": str(conf)}).config == str(conf)
    (tmp_path / "empty.yml").write_text("logs: /x\n")
    with pytest.raises(PmonError, match="/etc/pmon2/data"):
        go.locate(str(tmp_path / "empty.yml"), {})  # the default data dir, which has no database here
    with pytest.raises(PmonError, match="no Pmon2"):
        go.locate(str(tmp_path), {})


# the database


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_read_both_schemas_without_writing(tmp_path: Path) -> None:
    new = make_db(tmp_path / "new" / "data.db", NEWER, (
        {"name": "a", "pid": 11, "process_file": "/bin/a", "args": "x", "status": "running", "auto_restart": 0,
         "uid": "33", "username": "www-data", "gid": "33", "log": "/var/log/a.log"},
        {"name": "b", "pid": 0, "process_file": "/bin/b", "args": "", "status": "Stopped", "auto_restart": 1,
         "deleted_at": "2026-01-01 00:00:00+00:00"},
    ))
    old = make_db(tmp_path / "old" / "data.db", OLDER, (
        {"name": "c", "pid": None, "process_file": "/bin/c", "args": "a  b", "status": "failed"},))
    before = digest(new.parent), digest(old.parent)
    rows, columns = go.read_database(str(new))
    assert "auto_restart" in columns
    assert [(r.name, r.pid, r.status, r.auto_restart, r.username, go.deleted(r)) for r in rows] == [
        ("a", 11, "running", False, "www-data", False), ("b", None, "stopped", True, None, True)]
    rows, columns = go.read_database(str(old))
    assert "auto_restart" not in columns and rows[0].auto_restart is None and rows[0].args == "a  b"
    assert (digest(new.parent), digest(old.parent)) == before


def test_a_wal_database_is_read_through_a_copy(tmp_path: Path) -> None:
    """Rows still in the -wal are seen, and neither the database nor its -wal is touched (no checkpoint)."""
    path = tmp_path / "data.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute(NEWER)
    db.execute("INSERT INTO process (name, pid, process_file, args, status) VALUES ('w', 5, '/bin/w', '', 'running')")
    db.commit()
    before = digest(tmp_path)
    assert (tmp_path / "data.db-wal").stat().st_size > 0
    try:
        rows, _ = go.read_database(str(path))
        assert [r.name for r in rows] == ["w"]
        assert digest(tmp_path) == before
    finally:
        db.close()


def test_not_a_pmon2_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(PmonError, match="no table `process`"):
        go.read_database(str(path))


# names


def test_names_are_made_valid_and_free() -> None:
    taken = {"api", "all"}
    assert go.pmon2_name("worker", "/bin/worker", 1, taken) == ("worker", None)
    name, why = go.pmon2_name("my app!", "/bin/x", 2, taken)
    assert name == "my-app" and "not allowed" in why
    assert go.pmon2_name("Api", "/bin/x", 3, taken)[0] == "Api-3"  # names are unique regardless of case
    assert go.pmon2_name("all", "/bin/x", 4, taken)[0] == "all-go"
    assert go.pmon2_name("123", "/bin/x", 5, taken)[0] == "123-go"
    assert go.pmon2_name("", "/srv/bin/gin", 6, taken)[0] == "gin"
    assert go.pmon2_name("...", "/srv/bin/...", 7, taken)[0] == "pmon2-go-7"
    long = go.pmon2_name("x" * 100, "/bin/x", 8, taken)[0]
    assert len(long) == model.NAME_MAX_CHARS
    assert {"worker", "my-app", "api-3", "all-go", "123-go", "gin", "pmon2-go-7"} <= taken


# the plan


def row(**kw: object) -> go.Row:
    base = {"id": 1, "name": "api", "pid": 42, "process_file": "/srv/bin/api", "args": "-p 80", "status": "running"}
    return go.Row(**(base | kw))  # type: ignore[arg-type]


def restarts(body: dict) -> bool:
    """restart = "always" / "no" (issue 12), or the older autorestart."""
    return body["restart"] != "no" if "restart" in body else body["autorestart"]


def test_plan_builds_checked_requests(tmp_path: Path) -> None:
    rows = [row(), row(id=2, name="cron", pid=None, status="stopped", auto_restart=False, username="nobody",
                       log="/var/log/cron.log"),
            row(id=3, name="gone", deleted_at="2026-01-01"), row(id=4, name="rel", process_file="bin/x"),
            row(id=5, name="nul", args="a\0b")]
    plans = go.plan(rows, str(tmp_path / "data.db"), set(), {"PATH": "/bin", "SSH_AUTH_SOCK": "/x", "PMON2_HOME": "/h"})
    by = {p.go_name: p for p in plans}
    assert set(by) == {"api", "cron", "rel", "nul"}  # the deleted row is left out
    api = by["api"].body
    assert api is not None
    assert api["argv"] == ["/srv/bin/api", "-p", "80"] and api["pid"] == 42 and api["start"] is True
    assert api["cwd"] == "/srv/bin" and restarts(api) and api["env"] == {"PATH": "/bin"}
    assert api["imported_from"] == {"tool": "pmon2-go", "source": str(tmp_path / "data.db"), "row": 1, "name": "api"}
    cron = by["cron"].body
    assert cron is not None
    assert (cron["start"], restarts(cron), cron["user"], cron["log"], cron["pid"]) == (
        False, False, "nobody", "/var/log/cron.log", None)
    assert by["rel"].body is None and "absolute" in (by["rel"].problem or "")
    assert by["nul"].body is None and "NUL" in (by["nul"].problem or "")


def test_adopt_fields_are_checked_by_the_spec_model() -> None:
    ok = {"argv": ["/bin/a"], "pid": 7, "start": True,
          "imported_from": {"tool": "pmon2-go", "source": "/d.db", "row": 3, "name": "a b"}}
    assert model.check_body(ok, model.ADOPT_FIELDS) == ok
    for bad, field in (({"pid": 0}, "pid"), ({"pid": True}, "pid"), ({"pid": 1 << 23}, "pid"),
                       ({"start": 1}, "start"), ({"imported_from": {"tool": "pm2"}}, "imported_from"),
                       ({"imported_from": {"tool": "pmon2-go", "source": "/d", "row": -1}}, "imported_from"),
                       ({"imported_from": {"tool": "pmon2-go", "source": "/d", "row": 1, "x": 1}}, "imported_from")):
        with pytest.raises(model.FieldError) as info:
            model.check_body(ok | bad, model.ADOPT_FIELDS)
        assert info.value.field == field


# identity, against a fake /proc


def stat_line(pid: int, comm: str, state: str = "S", pgrp: int | None = None) -> str:
    fields = [str(n * 1000) for n in range(3, 53)]
    fields[0], fields[1], fields[2], fields[3] = state, "1", str(pid if pgrp is None else pgrp), str(pid)
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def fake_process(proc: Path, pid: int, argv: list[str], state: str = "S", pgrp: int | None = None,
                 exe: str | None = None) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(stat_line(pid, os.path.basename(argv[0])[:15], state, pgrp))
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    if exe is not None:
        (d / "exe").symlink_to(exe)


def test_identify(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    script = tmp_path / "worker.py"
    script.write_text("#!/usr/bin/python3 -u\nimport time\n")
    env_script = tmp_path / "tool"
    env_script.write_text("#!/usr/bin/env node\n")
    fake_process(proc, 10, ["/srv/api", "a", "", "b"])
    fake_process(proc, 11, ["/usr/bin/python3", "-u", str(script), "x"])
    fake_process(proc, 12, ["node", str(env_script)])
    fake_process(proc, 13, ["/srv/api", "a", "", "b"], state="Z")
    fake_process(proc, 14, ["/srv/api", "a", "", "b"], pgrp=1)
    fake_process(proc, 15, ["/bin/sleep", "9"])
    p = str(proc)
    assert importers.identify(10, ["/srv/api", "a", "", "b"], p).same
    assert not importers.identify(10, ["/srv/api", "a", "b"], p).same  # the empty argument counts
    assert importers.identify(11, [str(script), "x"], p).same
    assert importers.identify(12, [str(env_script)], p).same
    assert "zombie" in importers.identify(13, ["/srv/api", "a", "", "b"], p).why
    assert "process group" in importers.identify(14, ["/srv/api", "a", "", "b"], p).why
    assert "something else" in importers.identify(15, ["/srv/api"], p).why
    assert "no process" in importers.identify(99, ["/srv/api"], p).why


def test_runs_file(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 20, ["/srv/api", "-p", "1"])
    fake_process(proc, 21, ["api", "-p", "2"], exe="/srv/api")
    fake_process(proc, 22, ["/srv/api"], state="Z")
    fake_process(proc, 23, ["/srv/other"])
    assert importers.runs_file("/srv/api", proc=str(proc)) == [20, 21]
    assert importers.runs_file("/srv/api", exclude={20}, proc=str(proc)) == [21]


# the Go pmond


def test_find_go_pmonds_by_executable(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 30, ["/usr/local/pmon2/bin/pmond"], exe="/usr/local/pmon2/bin/pmond")
    fake_process(proc, 31, ["/usr/bin/python3", "-IS", "/usr/bin/pmond"], exe="/usr/bin/python3.11")  # ours
    fake_process(proc, 32, ["/opt/pmond"])  # exe unreadable: judged by argv[0]
    fake_process(proc, 33, ["/opt/pmond"], state="Z", exe="/opt/pmond")
    assert go.find_go_pmonds(str(proc)) == [30, 32]


def test_unit_cgroup_path(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cgroup").write_text("0::/system.slice/pmon2.service\n")
    (proc / "8").mkdir()
    (proc / "8" / "cgroup").write_text("12:pids:/system.slice/pmon2.service\n1:name=systemd:/system.slice/pmon2.service"
                                       "\n0::/system.slice/pmon2.service\n")
    assert go.unit_cgroup_path(7, str(proc)) == "/system.slice/pmon2.service"
    assert go.unit_cgroup_path(8, str(proc)) == "/system.slice/pmon2.service"


def test_systemd_steps_move_every_other_process_into_a_scope(tmp_path: Path) -> None:
    cg = tmp_path / "pmon2.service"
    cg.mkdir()
    (cg / "cgroup.procs").write_text("100\n205\n201\n")
    d = go.GoDaemon(100, "/usr/local/pmon2/bin/pmond", "systemd", "pmon2.service", str(cg))
    assert d.steps() == [
        ["busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
         "StartTransientUnit", "ssa(sv)a(sa(sv))", "pmon2-adopted.scope", "fail", "1", "PIDs", "au", "2", "201", "205",
         "0"],
        ["systemctl", "stop", "pmon2.service"], ["systemctl", "disable", "pmon2.service"]]
    assert go.move_command([7], attach=True)[5:] == ["AttachProcessesToUnit", "ssau", "pmon2-adopted.scope", "", "1",
                                                     "7"]
    upstart = go.GoDaemon(5, None, "upstart", job=["pmond", "EXEC=/x"])
    assert upstart.steps() == [["initctl", "stop", "pmond", "EXEC=/x"]]
    assert go.GoDaemon(5, None, "none").steps() == [["kill", "-TERM", "5"]]


# the report


def test_render_and_desc_text() -> None:
    report = {"dry_run": True, "database": "/d.db", "config": None, "schema": "newer", "stop_old": [], "notes": [],
              "go_pmond": [], "ignored": [{"go_name": "old", "why": "deleted in Pmon2 (x)"}],
              "services": [{"go_name": "a", "name": "a", "outcome": "adopted", "pid": 5, "id": None},
                           {"go_name": "b c", "name": "b-c", "renamed": "' ' is not allowed", "outcome": "stopped",
                            "pid": None, "go_status": "stopped", "id": None},
                           {"go_name": "d", "name": "d", "outcome": "not_imported", "pid": None, "why": "busy"}]}
    text = go.render(report)
    assert "would adopt" in text and "would leave stopped" in text and "would not import" in text
    assert "renamed 'b c' to 'b-c'" in text and "ignored" in text
    svc = {"name": "a", "pid": 5, "imported_from": {"tool": "pmon2-go", "source": "/d.db", "row": 3, "name": "a",
                                                    "at": "2026-12-01T10:00:00.000Z", "adopted_pid": 5}}
    assert imported_text(svc).startswith("imported from Pmon2 (Go) on 2026-12-01 (row 3 of /d.db)")
    assert "without a marker" in imported_text(svc)
    assert "without a marker" not in imported_text(svc | {"pid": 6})
