"""pmond itself: its status, its API on the Unix socket, and services outliving it."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time

from pmon2 import __version__


def http_get(path, target):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b"\r\n")[0].split()[1])
    return status, head.decode("latin-1"), body


def test_daemon_status_json(pmon):
    proc = pmon.run("daemon", "status", "--json", check=False)
    assert proc.returncode == 3, "daemon status must not start pmond"
    assert json.loads(proc.stdout)["running"] is False
    pmon.run("daemon", "start")
    info = pmon.json("daemon", "status", "--json")
    assert info["running"] is True
    assert info["pid"] == pmon.daemon_pid() and pmon.is_alive(info["pid"])
    assert info["socket"] == str(pmon.socket)
    assert info["version"] == __version__
    assert info["services"] == 0 and info["mode"] == "home"
    out = pmon.run("daemon", "start").stdout
    assert "already" in out and str(info["pid"]) in out


def test_api_over_the_unix_socket(pmon):
    svc = pmon.start_service("sleep", "31501", "--name", "api")
    mode = stat.S_IMODE(os.stat(pmon.socket).st_mode)
    assert stat.S_ISSOCK(os.stat(pmon.socket).st_mode)
    assert mode == 0o600, f"socket mode {mode:o}"
    status, head, body = http_get(pmon.socket, "/v1/services")
    assert status == 200, head
    services = json.loads(body)
    assert isinstance(services, list) and [s["pid"] for s in services] == [svc["pid"]]
    status, _, body = http_get(pmon.socket, "/v1/services/nosuch")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, body = http_get(pmon.socket, "/v1/nothing-here")
    assert status == 404
    status, _, body = http_get(pmon.socket, "/v1/version")
    assert status == 200 and json.loads(body) == {"version": __version__, "pid": pmon.daemon_pid()}


def test_services_survive_daemon_stop_and_are_adopted(pmon):
    svc = pmon.start_service("sleep", "31502", "--name", "survivor")
    pid, daemon = svc["pid"], pmon.daemon_pid()
    out = pmon.run("daemon", "stop").stdout
    assert "services keep running" in out
    pmon.wait_dead(daemon, timeout=5.0, what="pmond")
    assert pmon.is_alive(pid), "stopping pmond killed the service"
    assert pmon.ppid(pid) == 1
    assert pmon.run("daemon", "status", check=False).returncode == 3

    after = pmon.services()  # starts a new pmond
    new_daemon = pmon.daemon_pid()
    assert new_daemon and new_daemon != daemon and pmon.is_alive(new_daemon)
    assert len(after) == 1
    assert after[0]["pid"] == pid and after[0]["status"] == "running" and after[0]["restarts"] == 0
    assert pmon.is_alive(pid) and pmon.ppid(pid) == 1

    # The adopted process is watched like any other: kill it, it comes back.
    os.kill(pid, signal.SIGKILL)
    back = pmon.wait_service("survivor", lambda s: s["pid"] not in (None, pid) and s["status"] == "running",
                             timeout=2.0, what="a restart of the adopted service")
    assert back["restarts"] == 1


def test_services_survive_a_daemon_crash(pmon):
    svc = pmon.start_service("sleep", "31503", "--name", "crashsafe")
    daemon = pmon.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    pmon.wait_dead(daemon, what="pmond")
    assert pmon.is_alive(svc["pid"])
    t0 = time.monotonic()
    after = pmon.services()
    assert time.monotonic() - t0 < 5.0
    assert after[0]["pid"] == svc["pid"] and after[0]["restarts"] == 0
    assert pmon.daemon_pid() not in (None, daemon)


def test_service_that_died_while_pmond_was_down_is_started_again(pmon):
    svc = pmon.start_service("sleep", "31504", "--name", "orphan")
    daemon = pmon.daemon_pid()
    pmon.run("daemon", "stop")
    pmon.wait_dead(daemon, what="pmond")
    os.kill(svc["pid"], signal.SIGKILL)
    pmon.wait_dead(svc["pid"])
    pmon.run("daemon", "start")
    after = pmon.wait_service("orphan", lambda s: s["status"] == "running" and s["pid"],
                              what="a new process after pmond came back")
    assert after["pid"] != svc["pid"] and pmon.is_alive(after["pid"])
    assert after["restarts"] == 1
    assert after["last_exit"]["source"] == "unknown"


def test_stopped_service_stays_stopped_across_daemon_restart(pmon):
    pmon.start_service("sleep", "31505", "--name", "parked")
    pmon.run("stop", "parked")
    daemon = pmon.daemon_pid()
    pmon.run("daemon", "stop")
    pmon.wait_dead(daemon, what="pmond")
    svc = pmon.desc("parked")
    assert svc["status"] == "stopped" and svc["pid"] is None
