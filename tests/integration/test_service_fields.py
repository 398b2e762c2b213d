"""Issue 12, the service fields pmond honours: restart modes and success codes, max_restarts,
instances with ${instance} and port, tag: and group selectors, update and scale, readiness
(`starting` until a check passes), autostart, reload_signal."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from pmon2.client import Client
from pmon2.paths import resolve
from procs import free_port


def api(pmon: Any) -> Client:
    """A client of this test's pmond (started first by the CLI, with this test's environment: a Client
    that had to start pmond itself would start it with the test process's own environment)."""
    if not pmon.socket.exists():
        pmon.run("daemon", "start")
    return Client(resolve({"PMON2_HOME": str(pmon.home)}))


def test_restart_on_failure_restarts_a_failure_not_a_success(pmon: Any) -> None:
    pmon.run("run", "--restart", "on-failure", "--name", "ok", "sh", "-c", "sleep 0.3; exit 0")
    pmon.run("run", "--restart", "on-failure", "--name", "bad", "sh", "-c", "sleep 0.3; exit 3")
    pmon.wait_service("ok", lambda s: s["status"] == "exited", timeout=10, what="exited for good")
    pmon.wait_service("bad", lambda s: s["restarts"] >= 1, timeout=10, what="restarted after exit 3")
    assert pmon.desc("ok")["restarts"] == 0
    # A code listed as success is a success.
    api(pmon).request("POST", "/v1/services", {"argv": ["sh", "-c", "sleep 0.3; exit 3"], "cwd": str(pmon.work),
                                               "name": "three", "restart": "on-failure",
                                               "success_exit_codes": [0, 3]})
    pmon.wait_service("three", lambda s: s["status"] == "exited", timeout=10, what="exit 3 counted as success")
    assert pmon.desc("three")["restarts"] == 0


def test_max_restarts_gives_up_with_errored(pmon: Any) -> None:
    pmon.run("run", "--max-restarts", "2", "--name", "flaky", "sh", "-c", "exit 1")
    svc = pmon.wait_service("flaky", lambda s: s["status"] == "errored", timeout=15, what="errored")
    assert svc["restarts"] == 2
    kinds = [e["kind"] for e in pmon.json("events", "flaky", "--json")]
    assert "give_up" in kinds
    pmon.holds(lambda: pmon.desc("flaky")["status"] == "errored", 0.5, message="it stays errored")


def test_instances_ports_and_the_group_selector(pmon: Any) -> None:
    port = free_port() // 10 * 10  # leave room for +1, +2
    out = pmon.run("run", "--instances", "3", "--port", str(port), "--name", "web", "--tag", "front",
                   "sh", "-c", "echo instance=${instance} port=$PORT; sleep 100000")
    assert "2 more instances" in out.stdout
    names = {s["name"]: s for s in pmon.services()}
    assert set(names) == {"web:0", "web:1", "web:2"}
    for i in range(3):
        log = names[f"web:{i}"]["out_log"]
        pmon.wait_for(lambda log=log, i=i: f"instance={i} port={port + i}" in open(log).read(), timeout=5,
                      message=f"web:{i} to print its instance and port")
    assert pmon.run("stop", "web").stdout.splitlines() == ["web:0 stopped", "web:1 stopped", "web:2 stopped"]
    assert len(pmon.run("start", "tag:front").stdout.splitlines()) == 3
    missing = pmon.run("stop", "tag:nope", check=False)
    assert missing.returncode != 0 and "tag" in missing.stderr


def test_scale_up_and_down(pmon: Any) -> None:
    pmon.run("run", "--instances", "2", "--name", "w", "sleep", "100000")
    group = api(pmon).request("POST", "/v1/services/w/scale", {"instances": 4})
    assert [s["name"] for s in group["services"]] == ["w:0", "w:1", "w:2", "w:3"]
    assert all(pmon.is_alive(s["pid"]) for s in group["services"])
    gone_pid = group["services"][3]["pid"]
    shrunk = api(pmon).request("POST", "/v1/services/w/scale", {"instances": 1})
    assert shrunk["removed"] == ["w:3", "w:2", "w:1"] and [s["name"] for s in shrunk["services"]] == ["w:0"]
    pmon.wait_dead(gone_pid, what="the highest instance")
    # A plain service scales into instances.
    pmon.run("run", "--name", "solo", "sleep", "100000")
    grown = api(pmon).request("POST", "/v1/services/solo/scale", {"instances": 2})
    assert [s["name"] for s in grown["services"]] == ["solo:0", "solo:1"]


def test_update_restarts_only_when_needed(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "100000", "--name", "u", "--json")
    kt = api(pmon).request("POST", "/v1/services/u/update", {"fields": {"kill_timeout": 9}, "restart": True})
    assert kt["restart_needed"] is False and kt["restarted"] is False
    assert pmon.desc("u")["pid"] == svc["pid"] and pmon.desc("u")["kill_timeout"] == 9
    env = api(pmon).request("POST", "/v1/services/u/update", {"fields": {"env": {"LEVEL": "debug"}},
                                                             "restart": True})
    assert env["restart_needed"] is True and env["restarted"] is True
    after = pmon.desc("u")
    assert after["pid"] != svc["pid"]
    environ = open(f"/proc/{after['pid']}/environ", "rb").read().split(b"\0")
    assert b"LEVEL=debug" in environ
    pmon.run("stop", "u")
    refused = api(pmon)
    try:
        refused.request("POST", "/v1/services/u/update", {"fields": {"kill_timeout": "soon"}})
        raise AssertionError("a bad field was accepted")
    except Exception as exc:  # the API's one-line error names the field
        assert "kill_timeout" in str(exc)


def test_readiness_shows_starting_until_the_port_listens(pmon: Any) -> None:
    port = free_port()
    server = pmon.script("late.py", f"""
        import socket, time
        time.sleep(1.0)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", {port}))
        s.listen()
        while True:
            c, _ = s.accept()
            c.close()
    """)
    pmon.run("run", "--ready", f"tcp://127.0.0.1:{port}", "--name", "late", str(server))
    assert pmon.desc("late")["status"] == "starting"
    pmon.wait_service("late", lambda s: s["status"] == "running", timeout=10, what="ready")
    kinds = [e["kind"] for e in pmon.json("events", "late", "--json")]
    assert "ready" in kinds


def test_a_start_that_never_gets_ready_fails_and_backs_off(pmon: Any) -> None:
    port = free_port()
    api(pmon).request("POST", "/v1/services", {"argv": ["sleep", "100000"], "cwd": str(pmon.work), "name": "never",
                                               "ready": f"tcp://127.0.0.1:{port}", "start_timeout": 0.5})
    svc = pmon.wait_service("never", lambda s: s["restarts"] >= 1, timeout=10, what="killed and started again")
    messages = [e["message"] for e in pmon.json("events", "never", "--json") if e["kind"] == "start_failed"]
    assert messages and "not ready" in messages[0]
    assert svc["status"] in ("starting", "backoff")


def test_autostart_false_and_reload_signal(pmon: Any) -> None:
    out = pmon.run("run", "--no-autostart", "--name", "later", "sleep", "100000")
    assert "not started" in out.stdout
    assert pmon.desc("later")["status"] == "stopped"
    got = pmon.work / "got"
    script = pmon.script("hup.py", f"""
        import signal, time
        signal.signal(signal.SIGHUP, lambda *_: open({str(got)!r}, "w").write("hup"))
        while True:
            time.sleep(0.1)
    """)
    pmon.run("run", "--reload-signal", "HUP", "--name", "hup", str(script))
    time.sleep(0.5)  # let it install its handler
    assert "SIGHUP" in pmon.run("reload", "hup").stdout
    pmon.wait_for(got.exists, message="the service to get SIGHUP")


def test_dependencies_and_new_fields_round_trip_in_desc(pmon: Any) -> None:
    api(pmon).request("POST", "/v1/services", {"argv": ["sleep", "100000"], "cwd": str(pmon.work), "name": "db"})
    api(pmon).request("POST", "/v1/services", {"argv": ["sleep", "100000"], "cwd": str(pmon.work), "name": "app",
                                               "depends_on": {"db": "started"}, "tags": ["b", "a"],
                                               "max_restarts": 5})
    app = pmon.desc("app")
    assert app["depends_on"] == {"db": "started"} and app["tags"] == ["a", "b"] and app["max_restarts"] == 5
    assert json.loads(pmon.run("desc", "app", "--json").stdout)["restart"] == "always"
    os.kill(app["pid"], signal.SIGKILL)
    pmon.wait_service("app", lambda s: s["restarts"] == 1, what="restarted")


def test_start_and_stop_all_follow_depends_on(pmon: Any) -> None:
    stamp = pmon.work / "order"
    port = free_port()
    db = pmon.script("db.py", f"""
        import socket, time
        time.sleep(0.8)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", {port}))
        s.listen()
        open({str(stamp)!r}, "a").write("db-ready\\n")
        while True:
            c, _ = s.accept()
            c.close()
    """)
    app = pmon.script("app.py", f"""
        import signal, sys, time
        open({str(stamp)!r}, "a").write("app-start\\n")
        def term(*_):
            open({str(stamp)!r}, "a").write("app-stop\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        while True:
            time.sleep(0.1)
    """)
    client = api(pmon)
    client.request("POST", "/v1/services", {"argv": [str(db)], "cwd": str(pmon.work), "name": "db",
                                            "ready": f"tcp://127.0.0.1:{port}", "autostart": False})
    client.request("POST", "/v1/services", {"argv": [str(app)], "cwd": str(pmon.work), "name": "app",
                                            "depends_on": {"db": "ready"}, "autostart": False})
    pmon.run("start", "all")
    pmon.wait_for(lambda: len(stamp.read_text().splitlines()) == 2, message="app to write its start")
    assert stamp.read_text().splitlines() == ["db-ready", "app-start"]  # app started once db was ready
    pmon.run("stop", "all")
    assert stamp.read_text().splitlines()[-1] == "app-stop"
