"""A lost, emptied, rolled-back or damaged database never goes unnoticed, and `pmon2 daemon recover`
rebuilds it from the running services (issue 10, requirements 5 and 6).

Every service process carries PMON2_SERVICE=<instance id>:<service id>. pmond refuses to start when live
processes carry its marker with an id its database never handed out; `pmon2 daemon recover` rebuilds
those services from /proc and the launch records (<run dir>/launches/<id>).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

# Live processes only: a killed detached process lingers as a zombie for 1-2 s here (conftest).
DEAD = ("Z", "X", "x")


# helpers


def _state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[0]


def _alive(pid: int) -> bool:
    state = _state(pid)
    return state is not None and state not in DEAD


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _session(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rpartition(")")[2].split()[3])


def _start_ticks(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rpartition(")")[2].split()[19])


def marked(pmon: Any, service_id: int) -> list[int]:
    """Live processes carrying exactly PMON2_SERVICE=<this home's instance>:<service_id>(:<tag>)."""
    entry = pmon.service_marker() + str(service_id).encode()
    return sorted(p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                  if any(e == entry or e.startswith(entry + b":") for e in _environ(p)) and _alive(p))


def daemon_processes(pmon: Any) -> list[int]:
    """Live pmond (and launcher) processes of this home: they carry PMON2_HOME; services do not."""
    entry = f"PMON2_HOME={pmon.home}".encode()
    me = os.getpid()
    return [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if p != me and entry in _environ(p) and _alive(p)]


def kill_daemon(pmon: Any) -> None:
    pid = pmon.daemon_pid()
    assert pid, "pmond is not running"
    os.kill(pid, signal.SIGKILL)
    pmon.wait_dead(pid, what="pmond")
    # Its launcher notices the lost socket and goes too; wait, so no writer of the database is left.
    pmon.wait_for(lambda: not daemon_processes(pmon), 5.0, message="pmond's processes to end")


def drop_wal(pmon: Any, shm: bool = True) -> None:
    for suffix in ("-wal", "-shm") if shm else ("-wal",):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{pmon.db_path}{suffix}")


def sql(pmon: Any, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Write to the store from the test, as a user with sqlite3 would; only while pmond is stopped."""
    pmon.wait_for(lambda: not daemon_processes(pmon), 5.0, message="pmond to be stopped before the edit")
    db = sqlite3.connect(pmon.db_path, timeout=2.0)
    try:
        for statement, params in statements:
            db.execute(statement, params)
        db.commit()
    finally:
        db.close()


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, f"expected a failure, got exit 0: {proc.stdout!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmon2: "), f"not a one-line error: {proc.stderr!r}"
    return lines[0]


def by_name(pmon: Any) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in pmon.services()}


def sleeper(pmon: Any, name: str, *flags: str, **kwargs: Any) -> dict[str, Any]:
    return pmon.start_service(*flags, "sleep", str(random.randint(100_000, 900_000)), "--name", name, **kwargs)


SPEC_FIELDS = ("id", "name", "pid", "argv", "cwd", "out_log", "err_log", "user")


# 1. an emptied database


@pytest.mark.parametrize("how", ["truncated", "removed"])
def test_emptied_database_is_refused_and_daemon_recover_rebuilds_both_services(pmon: Any, how: str) -> None:
    alpha = sleeper(pmon, "alpha")
    beta = sleeper(pmon, "beta", "--log", "beta.log")  # one log for both streams, in the work dir
    env_before = {n: pmon.json("desc", n, "--json", "--show-env")["env"] for n in ("alpha", "beta")}
    kill_daemon(pmon)
    if how == "truncated":
        os.truncate(pmon.db_path, 0)
    else:
        pmon.db_path.unlink()
    drop_wal(pmon)

    for _ in range(2):  # refused every time, not only once
        line = one_line_error(pmon.run("ls", check=False))
        assert "pmon2 daemon recover" in line, line
        assert f"{alpha['id']} (pid {alpha['pid']})" in line and f"{beta['id']} (pid {beta['pid']})" in line, line
        pmon.wait_for(lambda: not daemon_processes(pmon), 5.0, message="the refusing pmond to be gone")
        assert pmon.run("daemon", "status", check=False).returncode == 3
        assert _alive(alpha["pid"]) and _alive(beta["pid"]), "a refusing pmond touched the services"

    rec = pmon.run("daemon", "recover")
    assert "restored alpha" in rec.stdout and "restored beta" in rec.stdout, rec.stdout
    for what in ("not restored", "autorestart", "kill_timeout", "restart count"):
        assert what in rec.stdout, f"{what!r} missing from the report: {rec.stdout!r}"

    after = by_name(pmon)
    assert sorted(after) == ["alpha", "beta"]
    for old in (alpha, beta):
        new = after[old["name"]]
        assert {k: new[k] for k in SPEC_FIELDS} == {k: old[k] for k in SPEC_FIELDS}
        assert (new["status"], new["restarts"]) == ("running", 0), new
        assert marked(pmon, old["id"]) == [old["pid"]], "a duplicate or a missing process"
        assert pmon.json("desc", old["name"], "--json", "--show-env")["env"] == env_before[old["name"]]

    # A new service does not take a rebuilt one's id.
    gamma = sleeper(pmon, "gamma")
    assert gamma["id"] > max(alpha["id"], beta["id"])

    # The rebuilt service is supervised: a crash is restarted.
    os.kill(alpha["pid"], signal.SIGKILL)
    back = pmon.wait_service("alpha", lambda s: s["status"] == "running" and s["pid"] not in (None, alpha["pid"]),
                             what="a restart after SIGKILL")
    assert back["restarts"] == 1 and back["argv"] == alpha["argv"]
    pmon.wait_for(lambda: marked(pmon, alpha["id"]) == [back["pid"]], 5.0,
                  message="exactly one process of alpha")


def test_the_ledger_of_a_rebuilt_service_shows_its_recovery(pmon: Any) -> None:
    svc = sleeper(pmon, "ledgered")
    kill_daemon(pmon)
    os.truncate(pmon.db_path, 0)
    drop_wal(pmon)
    pmon.run("daemon", "recover")
    kinds = [e["kind"] for e in pmon.json("events", "ledgered", "-n", "50", "--json")]
    assert "recover" in kinds, f"`pmon2 events ledgered` does not show the rebuild: {kinds}"
    assert pmon.desc("ledgered")["pid"] == svc["pid"]


def test_without_launch_records_names_are_made_up_and_the_rest_is_rebuilt(pmon: Any) -> None:
    """The run dir is a tmpfs that may be emptied (a user's XDG_RUNTIME_DIR at logout): no names then."""
    svc = sleeper(pmon, "nameless")
    kill_daemon(pmon)
    os.truncate(pmon.db_path, 0)
    drop_wal(pmon)
    for record in (pmon.home / "run" / "launches").iterdir():
        record.unlink()
    assert "pmon2 daemon recover" in one_line_error(pmon.run("ls", check=False))
    rec = pmon.run("daemon", "recover")
    assert f"recovered-{svc['id']}" in rec.stdout, rec.stdout
    new = pmon.desc(f"recovered-{svc['id']}")
    assert (new["id"], new["pid"], new["argv"], new["out_log"]) == (svc["id"], svc["pid"], svc["argv"], svc["out_log"])
    assert marked(pmon, svc["id"]) == [svc["pid"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a service of another user")
def test_a_service_of_another_user_is_rebuilt_with_its_user(pmon: Any) -> None:
    svc = sleeper(pmon, "other", "--user", "nobody", cwd="/")
    assert svc["user"] == "nobody" and pmon.uid_of(svc["pid"]) == 65534
    kill_daemon(pmon)
    os.truncate(pmon.db_path, 0)
    drop_wal(pmon)
    pmon.run("daemon", "recover")
    new = pmon.desc("other")
    assert {k: new[k] for k in SPEC_FIELDS} == {k: svc[k] for k in SPEC_FIELDS}
    os.kill(svc["pid"], signal.SIGKILL)
    back = pmon.wait_service("other", lambda s: s["status"] == "running" and s["pid"] not in (None, svc["pid"]),
                             what="a restart as nobody")
    assert pmon.uid_of(back["pid"]) == 65534


def test_a_script_service_is_rebuilt_and_restarts(pmon: Any) -> None:
    """The kernel shows a #! script as `interpreter script`: the rebuilt service must still run it."""
    pmon.script("svc.py", """
        import sys, time
        print("up", flush=True)
        time.sleep(100000)
    """)
    svc = pmon.start_service("./svc.py", "--name", "scripted")
    kill_daemon(pmon)
    os.truncate(pmon.db_path, 0)
    drop_wal(pmon)
    pmon.run("daemon", "recover")
    new = pmon.desc("scripted")
    assert (new["id"], new["pid"], new["cwd"], new["out_log"]) == (svc["id"], svc["pid"], svc["cwd"], svc["out_log"])
    # The kernel shows `interpreter /path/of/svc.py`, not the `./svc.py` typed: the same program.
    assert os.path.realpath(os.path.join(new["cwd"], new["argv"][-1])) == os.path.realpath(pmon.work / "svc.py")
    os.kill(svc["pid"], signal.SIGKILL)
    back = pmon.wait_service("scripted", lambda s: s["status"] == "running" and s["pid"] not in (None, svc["pid"]),
                             what="a restart of the rebuilt script")
    out = Path(svc["out_log"])
    pmon.wait_for(lambda: out.read_text().count("up") == 2, 5.0, message="the restarted script's first line")
    pmon.holds(lambda: pmon.desc("scripted")["pid"] == back["pid"], 1.0, message="the restarted script keeps running")


# 2. a rolled-back database (a lost -wal)


def test_rolled_back_database_is_refused_naming_the_lost_service_and_recover_brings_it_back(pmon: Any) -> None:
    first = sleeper(pmon, "first")
    pmon.run("daemon", "stop")
    sql(pmon, ("PRAGMA wal_checkpoint(TRUNCATE)", ()))  # `first` is in the main file for good
    assert pmon.desc("first")["pid"] == first["pid"]  # starts pmond again
    second = sleeper(pmon, "second")
    kill_daemon(pmon)
    drop_wal(pmon, shm=False)  # everything since the checkpoint is lost: `second` among it

    line = one_line_error(pmon.run("ls", check=False))
    assert f"{second['id']} (pid {second['pid']})" in line, line
    assert f"{first['id']} (pid" not in line, f"the service the database knows is listed as lost: {line}"
    assert "pmon2 daemon recover" in line, line
    assert not daemon_processes(pmon)
    assert _alive(first["pid"]) and _alive(second["pid"])

    rec = pmon.run("daemon", "recover")
    assert "restored second" in rec.stdout and "first" not in rec.stdout, rec.stdout
    after = by_name(pmon)
    for old in (first, second):
        new = after[old["name"]]
        assert {k: new[k] for k in SPEC_FIELDS} == {k: old[k] for k in SPEC_FIELDS}
        assert (new["status"], new["restarts"]) == ("running", 0), new
        assert marked(pmon, old["id"]) == [old["pid"]]
    assert any(e["kind"] == "adopt" for e in pmon.json("events", "first", "-n", "50", "--json"))


@pytest.mark.parametrize("command", ["del", "stop"])
def test_a_command_lost_with_the_wal_does_not_silently_start_the_service_again(pmon: Any, command: str) -> None:
    """A rollback also loses the user's last commands: a service deleted or stopped after the last checkpoint
    is in the database as running, its process gone. Starting it again silently undoes the user's command
    (a deleted job runs again, a stopped server takes its port back). pmond may refuse, or leave it down
    and say so; it must not start it."""
    undone = sleeper(pmon, "undone")
    keeper = sleeper(pmon, "keeper")
    pmon.run("daemon", "stop")
    sql(pmon, ("PRAGMA wal_checkpoint(TRUNCATE)", ()))
    assert pmon.desc("undone")["pid"] == undone["pid"]  # starts pmond again
    pmon.run(command, "undone")
    pmon.wait_dead(undone["pid"])
    kill_daemon(pmon)
    drop_wal(pmon, shm=False)  # the command's writes are lost

    pmon.run("ls", check=False)  # starts pmond, or is refused
    pmon.holds(lambda: not marked(pmon, undone["id"]), 1.5,
               message=f"the service the user ran `{command}` on must not run again")
    assert _alive(keeper["pid"])


def test_a_lost_service_with_no_process_left_is_not_forgotten_silently(pmon: Any) -> None:
    """A service created after the last checkpoint whose process is down when pmond starts (it crashed
    meanwhile): no marked process shows the rollback, but its launch record does (an id above any the
    database handed out). pmond must not drop that record without a word."""
    sleeper(pmon, "first")
    pmon.run("daemon", "stop")
    sql(pmon, ("PRAGMA wal_checkpoint(TRUNCATE)", ()))
    pmon.run("ls")
    second = sleeper(pmon, "second")
    kill_daemon(pmon)
    os.kill(second["pid"], signal.SIGKILL)
    pmon.wait_dead(second["pid"])
    drop_wal(pmon, shm=False)

    proc = pmon.run("ls", check=False)
    if proc.returncode != 0:
        line = one_line_error(proc)
        assert str(second["id"]) in line and "pmon2 daemon recover" in line, line
        return
    said = [e for e in pmon.json("events", "-n", "200", "--json")
            if e["service"] == "second" or "second" in e["message"]]
    assert said, f"service {second['id']} (second) vanished with the rollback and nothing says so"


# 3. a damaged database


GARBAGE = b"this is not an SQLite database, whatever pmond hoped\n" * 200


def test_garbage_database_is_refused_and_recover_keeps_it_aside_and_rebuilds(pmon: Any) -> None:
    svc = sleeper(pmon, "solo")
    kill_daemon(pmon)
    pmon.db_path.write_bytes(GARBAGE)
    drop_wal(pmon)

    line = one_line_error(pmon.run("ls", check=False))
    assert "pmon2 daemon recover" in line, line
    assert not daemon_processes(pmon)
    assert pmon.db_path.read_bytes() == GARBAGE, "a refusing pmond changed the damaged file"
    assert _alive(svc["pid"])

    report = pmon.json("daemon", "recover", "--json")
    # (Besides the service: a note that the database's last commands are lost with it.)
    services = [r for r in report if r["id"] is not None]
    assert [(r["id"], r["name"], r["pid"], r["restored"]) for r in services] == [(svc["id"], "solo", svc["pid"], True)]
    assert "autorestart" in report[0]["not_restored"], report
    aside = list(pmon.db_path.parent.glob(f"{pmon.db_path.name}.damaged-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [GARBAGE], aside
    new = pmon.desc("solo")
    assert {k: new[k] for k in SPEC_FIELDS} == {k: svc[k] for k in SPEC_FIELDS}
    assert marked(pmon, svc["id"]) == [svc["pid"]]


def test_database_with_damaged_pages_behind_a_sound_header_is_refused_and_recovered(pmon: Any) -> None:
    """The usual corruption: SQLite opens the file (page 1 is sound) and fails later, reading a table
    ("database disk image is malformed"). The same one-line refusal and the same recovery apply."""
    svc = sleeper(pmon, "torn")
    pmon.run("daemon", "stop")
    sql(pmon, ("PRAGMA wal_checkpoint(TRUNCATE)", ()))
    with contextlib.closing(sqlite3.connect(pmon.db_path)) as db:
        page = db.execute("PRAGMA page_size").fetchone()[0]
    data = pmon.db_path.read_bytes()
    assert len(data) > page
    pmon.db_path.write_bytes(data[:page] + (b"\xa5" * (len(data) - page)))
    drop_wal(pmon)

    line = one_line_error(pmon.run("ls", check=False))
    assert "pmon2 daemon recover" in line, line
    assert _alive(svc["pid"])
    rec = pmon.run("daemon", "recover", check=False)
    assert rec.returncode == 0 and "restored torn" in rec.stdout, (rec.stdout, rec.stderr)
    assert list(pmon.db_path.parent.glob(f"{pmon.db_path.name}.damaged-*"))
    assert pmon.desc("torn")["pid"] == svc["pid"]
    assert marked(pmon, svc["id"]) == [svc["pid"]]


# 4. leftovers of deleted services


ESCAPER = ["sh", "-c", "setsid sleep 100000 & exec sleep 100000"]


def escaped_child(pmon: Any, svc: dict[str, Any]) -> int:
    """The service's process that left its session (setsid) but still carries its marker."""
    def find() -> int | None:
        others = [p for p in marked(pmon, svc["id"]) if p != svc["pid"] and _session(p) == p]
        return others[0] if len(others) == 1 else None

    return pmon.wait_for(find, 5.0, message=f"the setsid child of {svc['name']}")


def test_del_kills_a_child_that_escaped_the_group(pmon: Any) -> None:
    svc = pmon.start_service("--name", "escaper", *ESCAPER)
    child = escaped_child(pmon, svc)
    pmon.run("del", "escaper")
    pmon.wait_dead(svc["pid"], what="the main process")
    pmon.wait_dead(child, what="the escaped child")
    assert marked(pmon, svc["id"]) == []


def test_leftovers_of_a_deleted_service_are_killed_at_start_with_a_ledger_event(pmon: Any) -> None:
    gone = pmon.start_service("--name", "gone", *ESCAPER)
    child = escaped_child(pmon, gone)
    keeper = sleeper(pmon, "keeper")
    assert keeper["id"] > gone["id"]  # so `gone`'s id is below the highest ever handed out
    pmon.run("daemon", "stop")
    sql(pmon, ("DELETE FROM services WHERE id = ?", (gone["id"],)))  # its row is gone, its processes run

    assert pmon.desc("keeper")["pid"] == keeper["pid"]  # starts pmond: no refusal
    pmon.wait_dead(gone["pid"], what="the deleted service's main process")
    pmon.wait_dead(child, what="the deleted service's escaped child")
    assert marked(pmon, gone["id"]) == []
    kills = [e for e in pmon.json("events", "-n", "200", "--json")
             if e["kind"] == "kill" and f"deleted service {gone['id']}" in e["message"]]
    assert {e["data"].get("pid") for e in kills} == {gone["pid"], child}, kills
    assert _alive(keeper["pid"]) and marked(pmon, keeper["id"]) == [keeper["pid"]]
    assert pmon.desc("keeper")["restarts"] == 0


def test_recover_takes_the_main_process_of_a_lost_service_not_its_escaped_child(pmon: Any) -> None:
    svc = pmon.start_service("--name", "split", *ESCAPER)
    child = escaped_child(pmon, svc)
    kill_daemon(pmon)
    os.truncate(pmon.db_path, 0)
    drop_wal(pmon)
    pmon.run("daemon", "recover")
    new = pmon.desc("split")
    # `sh -c '... & exec sleep'` is `sleep` by now: the command line is what the process shows.
    assert (new["id"], new["pid"], new["argv"]) == (svc["id"], svc["pid"], ["sleep", "100000"]), new
    assert marked(pmon, svc["id"]) == sorted([svc["pid"], child]), "a process was started or killed"
    pmon.run("del", "split")
    pmon.wait_dead(svc["pid"], what="the main process")
    pmon.wait_dead(child, what="the escaped child")


# 5. nothing to recover


def test_daemon_recover_with_pmond_running_has_nothing_to_do(pmon: Any) -> None:
    svc = sleeper(pmon, "fine")
    daemon = pmon.daemon_pid()
    rec = pmon.run("daemon", "recover")
    assert rec.returncode == 0 and "nothing to recover" in rec.stdout, rec.stdout
    assert pmon.daemon_pid() == daemon
    now = pmon.desc("fine")
    assert (now["pid"], now["restarts"], now["status"]) == (svc["pid"], 0, "running")


# 6. stored statuses after pmond was down


def test_desired_running_but_stored_stopped_is_started_while_exited_and_errored_stay(pmon: Any) -> None:
    svcs = {n: sleeper(pmon, n) for n in ("wanted", "ended", "failed")}
    pmon.run("daemon", "stop")
    for svc in svcs.values():
        os.kill(svc["pid"], signal.SIGKILL)
    for svc in svcs.values():
        pmon.wait_dead(svc["pid"])
    update = "UPDATE services SET status = ?, desired = 'running', pid = NULL, started_at = NULL WHERE id = ?"
    sql(pmon, (update, ("stopped", svcs["wanted"]["id"])), (update, ("exited", svcs["ended"]["id"])),
        (update, ("errored", svcs["failed"]["id"])))

    back = pmon.wait_service("wanted", lambda s: s["status"] == "running" and s["pid"], timeout=10,
                             what="a start (a user wanted it running)")
    assert back["pid"] != svcs["wanted"]["pid"] and _alive(back["pid"])
    assert marked(pmon, svcs["wanted"]["id"]) == [back["pid"]]

    def untouched() -> bool:
        now = by_name(pmon)
        return ((now["ended"]["status"], now["ended"]["pid"]) == ("exited", None)
                and (now["failed"]["status"], now["failed"]["pid"]) == ("errored", None)
                and not marked(pmon, svcs["ended"]["id"]) and not marked(pmon, svcs["failed"]["id"]))

    pmon.holds(untouched, 1.0, message="exited and errored services stay as they are")


def test_a_stop_that_pmond_died_in_is_finished_at_start(pmon: Any) -> None:
    """desired=stopped but the process still runs (pmond died between the two writes): stopped at start."""
    svc = sleeper(pmon, "halting")
    pmon.run("daemon", "stop")
    sql(pmon, ("UPDATE services SET desired = 'stopped', status = 'stopping' WHERE id = ?", (svc["id"],)))
    now = pmon.wait_service("halting", lambda s: s["status"] == "stopped", what="the stop to be finished")
    assert now["pid"] is None
    pmon.wait_dead(svc["pid"])
    pmon.holds(lambda: not marked(pmon, svc["id"]), 0.5, message="nothing started again")


# 7. the launch record is newer than the database


@pytest.mark.parametrize("row", ["dead", "stranger", "null"])
def test_the_launch_record_wins_over_an_older_row(pmon: Any, row: str) -> None:
    svc = sleeper(pmon, "recorded")
    record = pmon.home / "run" / "launches" / str(svc["id"])
    assert record.read_text().split()[0] == str(svc["pid"])
    pmon.run("daemon", "stop")
    stranger = None
    try:
        if row == "dead":
            gone = subprocess.Popen(["true"])
            gone.wait()
            values: tuple[Any, ...] = (gone.pid, "running")
        elif row == "stranger":
            # A live process of someone else, its identity stored exactly: it must not be taken.
            stranger = subprocess.Popen(["sleep", "1000"], start_new_session=True)
            sql(pmon, ("UPDATE services SET start_ticks = ? WHERE id = ?",
                       (_start_ticks(stranger.pid), svc["id"])))
            values = (stranger.pid, "running")
        else:  # pmond died after the launch record and before the row was written
            values = (None, "stopped")
        sql(pmon, ("UPDATE services SET pid = ?, status = ? WHERE id = ?", (*values, svc["id"])))

        now = pmon.desc("recorded")
        assert (now["pid"], now["status"], now["restarts"]) == (svc["pid"], "running", 0), now
        pmon.holds(lambda: marked(pmon, svc["id"]) == [svc["pid"]], 0.5, message="no duplicate, no restart")
        events = pmon.json("events", "recorded", "-n", "50", "--json")
        assert [e["kind"] for e in events].count("start") == 1, events
        assert any(e["kind"] == "adopt" and str(svc["pid"]) in e["message"] for e in events), events
        if stranger is not None:
            assert stranger.poll() is None, "the stranger was signalled"
        pmon.run("daemon", "stop")
        assert pmon.desc("recorded")["pid"] == svc["pid"], "the adopted pid was not stored"
    finally:
        if stranger is not None:
            stranger.kill()
            stranger.wait()
