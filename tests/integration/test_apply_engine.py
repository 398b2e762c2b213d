"""Issue 12, pmond's side of `pmon2 apply` and `pmon2 dump`: POST /v1/apply and GET /v1/dump over the Unix
socket, on real processes. Idempotence (the same pids after a re-apply), minimal restarts, prune of this
file's services only, dry runs, all-or-nothing validation, depends_on with its three conditions, failures
that stop only dependents, the dump round trip, and the caller rule."""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import pytest

from pmon2.daemon.supervisor import Supervisor
from procs import free_port

from .peer import request
from .peer import request_as as _request_as

NEEDED = ("request_fields", "groups", "update", "scale", "wait_for")
MISSING = [m for m in NEEDED if not hasattr(Supervisor, m)]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"Supervisor lacks {', '.join(MISSING)} (the lead's part)")

SRC = "/srv/app/pmon2.toml"
OTHER = "/srv/other/pmon2.toml"
NOBODY = 65534


def api(pmon: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request over pmond's socket: (status, JSON)."""
    return request(str(pmon.socket), method, path, body, timeout=120)


def apply(pmon: Any, services: list[dict[str, Any]], source: str = SRC, expect: int = 200,
          **flags: Any) -> dict[str, Any]:
    code, out = api(pmon, "POST", "/v1/apply", {"source": source, "services": services, **flags})
    assert code == expect, out
    return out


def actions(out: dict[str, Any]) -> dict[str, tuple[str, bool, bool]]:
    return {r["name"]: (r["action"], r["restart"], r["ok"]) for r in out["plan"]}


def pids(pmon: Any) -> dict[str, int]:
    return {s["name"]: s["pid"] for s in pmon.services()}


@pytest.fixture
def up(pmon: Any) -> Any:
    pmon.run("daemon", "start")
    return pmon


def sleeper(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "argv": ["sleep", str(random.randrange(10**8, 10**9))], "cwd": "/tmp", **fields}


def test_apply_then_reapply_touches_nothing(up: Any) -> None:
    file = [sleeper("db"), sleeper("web", instances=2, depends_on={"db": "started"}), sleeper("cache")]
    out = apply(up, file)
    assert out["summary"] == {"create": 3, "change": 0, "unchanged": 0, "remove": 0, "failed": 0}
    assert [r["name"] for r in out["plan"]] == ["db", "web", "cache"] and out["dry_run"] is False
    before = pids(up)
    assert set(before) == {"db", "web:0", "web:1", "cache"} and all(map(up.is_alive, before.values()))
    starts = len(up.db_rows("SELECT id FROM events WHERE kind IN ('start', 'restart')"))
    t0 = time.monotonic()
    again = apply(up, file)
    assert time.monotonic() - t0 < 2.0
    assert again["summary"] == {"create": 0, "change": 0, "unchanged": 3, "remove": 0, "failed": 0}
    assert pids(up) == before
    assert len(up.db_rows("SELECT id FROM events WHERE kind IN ('start', 'restart')")) == starts


def test_a_change_restarts_only_that_service_and_kill_timeout_restarts_nothing(up: Any) -> None:
    file = [sleeper("a", env={"LOG_LEVEL": "info"}), sleeper("b", env={"LOG_LEVEL": "info"}), sleeper("c")]
    apply(up, file)
    before = pids(up)
    file[1] = dict(file[1], env={"LOG_LEVEL": "debug"})
    file[2] = dict(file[2], kill_timeout=17)
    dry = apply(up, file, dry_run=True)
    assert actions(dry) == {"a": ("unchanged", False, True), "b": ("change", True, True), "c": ("change", False, True)}
    assert pids(up) == before
    out = apply(up, file)
    assert actions(out) == actions(dry)
    assert {r["name"]: r["fields"] for r in out["plan"]} == {"a": [], "b": ["env"], "c": ["kill_timeout"]}
    after = pids(up)
    assert after["a"] == before["a"] and after["c"] == before["c"] and after["b"] != before["b"]
    up.wait_dead(before["b"])
    assert up.desc("c")["kill_timeout"] == 17


def test_prune_removes_only_this_files_services(up: Any) -> None:
    manual = up.start_service("sleep", str(random.randrange(10**8, 10**9)), "--name", "manual")
    apply(up, [sleeper("theirs")], source=OTHER)
    x = sleeper("x")
    apply(up, [x, sleeper("y")])
    kept = pids(up)
    out = apply(up, [x])
    assert actions(out) == {"x": ("unchanged", False, True)}  # without prune, y stays
    assert "y" in pids(up)
    out = apply(up, [x], prune=True)
    assert actions(out) == {"y": ("remove", False, True), "x": ("unchanged", False, True)}
    now = pids(up)
    assert set(now) == {"manual", "theirs", "x"} and now["manual"] == manual["pid"]
    up.wait_dead(kept["y"])


def test_a_dry_run_changes_nothing(up: Any) -> None:
    out = apply(up, [sleeper("a"), sleeper("b", depends_on={"a": "started"})], dry_run=True)
    assert out["dry_run"] is True and actions(out) == {"a": ("create", False, True), "b": ("create", False, True)}
    assert up.services() == []


def test_an_invalid_file_changes_nothing_and_names_every_problem(up: Any) -> None:
    apply(up, [sleeper("a")])
    before = pids(up)
    code, out = api(up, "POST", "/v1/apply", {"source": SRC, "services": [
        sleeper("a", kill_timeout=1), sleeper("b", depends_on={"c": "started"}),
        sleeper("c", depends_on={"b": "ready"}), sleeper("d", depends_on={"nope": "started"}),
        sleeper("e", instances=0), {"name": "f", "argv": ["x"], "restrat": "no"}, {"argv": ["sleep", "1"]}]})
    assert code == 400 and out["error"]["code"] == "bad_request"
    problems = out["error"]["problems"]
    assert problems == [
        "services.e.instances: must be a whole number from 1 to 1000",
        "services.f.restrat: unknown field; did you mean 'restart'?",
        "services[6]: name is required",
        "services.d.depends_on: 'nope' is not a service of this file",
        "services.b.depends_on: a cycle: b -> c -> b",
    ]
    assert out["error"]["message"].startswith("5 problems, nothing was applied: services.e.instances")
    assert pids(up) == before and up.desc("a").get("kill_timeout") != 1


def test_another_files_service_is_not_taken_over(up: Any) -> None:
    apply(up, [sleeper("shared")], source=OTHER)
    pid = pids(up)["shared"]
    code, out = api(up, "POST", "/v1/apply", {"source": SRC, "services": [sleeper("shared"), sleeper("mine")]})
    assert code == 409 and out["error"]["code"] == "conflict", out
    assert out["error"]["problems"][0].startswith(f"services.shared: service 'shared' comes from {OTHER}")
    assert pids(up) == {"shared": pid}
    # A service made by `run` is taken over, without a restart.
    manual = up.start_service("sleep", str(random.randrange(10**8, 10**9)), "--name", "manual")
    code, dumped = api(up, "GET", "/v1/dump")  # its fields as `run` gave them
    fields = next(s for s in dumped["services"] if s["name"] == "manual")
    out = apply(up, [fields])
    assert [(r["name"], r["action"], r["fields"], r["restart"]) for r in out["plan"]] == [
        ("manual", "change", ["source"], False)]
    assert pids(up)["manual"] == manual["pid"]
    assert actions(apply(up, [fields])) == {"manual": ("unchanged", False, True)}


def test_a_failed_start_stops_only_its_dependents(up: Any) -> None:
    out = apply(up, [{"name": "broken", "argv": ["/nonexistent/prog"], "cwd": "/tmp"},
                     sleeper("needs-broken", depends_on={"broken": "started"}), sleeper("independent"),
                     sleeper("needs-independent", depends_on={"independent": "started"})])
    by = {r["name"]: r for r in out["plan"]}
    assert out["summary"]["failed"] == 2 and out["summary"]["create"] == 4
    assert by["broken"]["error"]["code"] == "spawn_failed"
    assert by["needs-broken"]["error"]["code"] == "dependency_failed"
    assert "dependency 'broken' failed" in by["needs-broken"]["error"]["message"]
    assert by["independent"]["ok"] and by["needs-independent"]["ok"]
    running = pids(up)
    assert set(running) == {"independent", "needs-independent"} and all(map(up.is_alive, running.values()))


def test_depends_on_started_ready_and_completed_on_real_processes(up: Any) -> None:
    try:
        import pmon2.daemon.probes  # noqa: F401
    except ImportError:
        pytest.skip("pmon2.daemon.probes (readiness checks) is not there yet")
    port = free_port()
    work = up.work
    server = up.script("server.py", f"""
        import socket, time
        time.sleep(1.0)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", {port}))
        s.listen(16)
        open("{work}/listening", "w").write(repr(time.time()))
        while True:
            c, _ = s.accept()
            c.close()
    """)
    app = up.script("app.py", f"""
        import time
        open("{work}/app-started", "w").write(repr(time.time()))
        time.sleep(100000)
    """)
    logger = sleeper("logger")
    file = [
        {"name": "app", "argv": [str(app)], "cwd": str(work),
         "depends_on": {"server": "ready", "step": "completed", "logger": "started"}},
        {"name": "step", "argv": ["sh", "-c", f"echo done >> {work}/step.txt"], "cwd": str(work), "restart": "no"},
        {"name": "server", "argv": [sys.executable, str(server)], "cwd": str(work),
         "ready": f"tcp://127.0.0.1:{port}", "start_timeout": 30},
        logger,
    ]
    t0 = time.time()
    out = apply(up, file)
    assert out["summary"]["failed"] == 0, out
    assert [r["name"] for r in out["plan"]] == ["step", "server", "logger", "app"]
    started = float(up.wait_for(lambda: (work / "app-started").read_text(), timeout=30))
    listening = float((work / "listening").read_text())
    assert started >= listening >= t0 + 0.9  # the ready gate held app back until the port listened
    assert (work / "step.txt").read_text() == "done\n"
    statuses = {s["name"]: s["status"] for s in up.services()}
    assert statuses["step"] == "exited" and statuses["server"] == "running"
    # Applied again: nothing runs twice.
    again = apply(up, file)
    assert again["summary"]["unchanged"] == 4
    time.sleep(0.3)
    assert (work / "step.txt").read_text() == "done\n"


def test_a_readiness_check_that_never_passes_is_a_failed_start(up: Any) -> None:
    try:
        import pmon2.daemon.probes  # noqa: F401
    except ImportError:
        pytest.skip("pmon2.daemon.probes (readiness checks) is not there yet")
    port = free_port()
    out = apply(up, [sleeper("deaf", ready=f"tcp://127.0.0.1:{port}", start_timeout=1),
                     sleeper("after", depends_on={"deaf": "ready"}), sleeper("other")])
    by = {r["name"]: r for r in out["plan"]}
    assert not by["deaf"]["ok"] and by["deaf"]["error"]["message"].startswith("not ready: ")
    assert by["after"]["error"]["code"] == "dependency_failed" and by["other"]["ok"]


def test_scale_through_apply_keeps_the_running_instances(up: Any) -> None:
    file = [sleeper("web", instances=2)]
    apply(up, file)
    before = pids(up)
    out = apply(up, [dict(file[0], instances=3)])
    assert [(r["name"], r["action"], r["fields"], r["restart"]) for r in out["plan"]] == [
        ("web", "change", ["instances"], False)]
    after = pids(up)
    assert set(after) == {"web:0", "web:1", "web:2"}
    assert after["web:0"] == before["web:0"] and after["web:1"] == before["web:1"]


def test_dump_round_trip_and_masking(up: Any) -> None:
    apply(up, [sleeper("db", env={"DB_PASSWORD": "hunter2", "URL": "postgres://u:pw@h/db"}, kill_timeout=7),
               sleeper("web", instances=2, depends_on={"db": "started"}, tags=["front"], restart="on-failure"),
               sleeper("job", autostart=False)])
    code, first = api(up, "GET", "/v1/dump")
    assert code == 200 and first["masked"] is False
    by_name = {s["name"]: s for s in first["services"]}
    assert sorted(by_name) == ["db", "job", "web"]  # in id order, which concurrent creates decide
    db = by_name["db"]
    assert db["env"] == {"DB_PASSWORD": "hunter2", "URL": "postgres://u:pw@h/db"} and db["source"] == SRC
    assert by_name["web"]["instances"] == 2 and by_name["job"]["autostart"] is False
    code, masked = api(up, "GET", "/v1/dump?masked=true")
    assert next(s for s in masked["services"] if s["name"] == "db")["env"] == {
        "DB_PASSWORD": "***", "URL": "postgres://u:***@h/db"}
    # The dump applied again changes nothing...
    assert apply(up, first["services"])["summary"]["unchanged"] == 3
    # ...and on an empty pmond it makes the same services, field for field.
    apply(up, [], prune=True)
    assert up.services() == []
    out = apply(up, first["services"])
    assert out["summary"] == {"create": 3, "change": 0, "unchanged": 0, "remove": 0, "failed": 0}
    code, second = api(up, "GET", "/v1/dump")
    assert {s["name"]: s for s in second["services"]} == by_name
    assert api(up, "GET", "/v1/dump?masked=maybe")[0] == 400


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pmond as root, a client as nobody")


@needs_root
def test_a_caller_other_than_root_applies_services_as_itself_only(pmon: Any) -> None:
    (pmon.home / "config.toml").write_text('allow_users = ["nobody"]\n')
    pmon.run("daemon", "start")
    for d in (pmon.home, pmon.home / "run"):
        os.chmod(d, 0o711)
    sock = str(pmon.socket)
    apply(pmon, [sleeper("rootsvc")])
    body = {"source": "/tmp/nobody.toml", "services": [sleeper("mine", env={"MY_TOKEN": "s3cret"}),
                                                        sleeper("as-root", user="root")]}
    code, err = _request_as(NOBODY, sock, "POST", "/v1/apply", body)
    assert code == 403 and "as-root" in err["error"]["message"] and "yourself" in err["error"]["message"], err
    assert {s["name"] for s in pmon.services()} == {"rootsvc"}
    body["services"].pop()
    code, out = _request_as(NOBODY, sock, "POST", "/v1/apply", body)
    assert code == 200 and out["summary"]["create"] == 1, out
    mine = pmon.desc("mine")
    assert mine["user"] == "nobody" and pmon.uid_of(mine["pid"]) == NOBODY
    # Its own services only: root's is neither changed nor pruned, and its name is taken.
    code, out = _request_as(NOBODY, sock, "POST", "/v1/apply", dict(body, prune=True))
    assert code == 200 and [(r["name"], r["action"]) for r in out["plan"]] == [("mine", "unchanged")], out
    code, out = _request_as(NOBODY, sock, "POST", "/v1/apply", {"source": "/tmp/nobody.toml", "services": [
        sleeper("rootsvc")]})
    assert code == 409 and "another user's" in out["error"]["message"], out
    code, dumped = _request_as(NOBODY, sock, "GET", "/v1/dump")
    assert code == 200 and [s["name"] for s in dumped["services"]] == ["mine"]
    assert dumped["services"][0]["env"] == {"MY_TOKEN": "s3cret"}  # its own: in clear
