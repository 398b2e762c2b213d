"""Following a successor instead of counting a crash (issue 13, parts 1 and 2; daemon/follow.py).

Real processes: a Go server that re-execs itself on SIGUSR2 and hands over its listening socket
(tests/fixtures/graceful/main.go, built once per session with `go build`), with and without setsid; a
shell that crashes while its background worker lives on (still a crash); nginx that daemonizes itself
(`daemon on`), with and without `--pidfile`; MAINPID= through a service's NOTIFY_SOCKET.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import children_of, free_port, is_alive, pgrp, ppid, session

Pmon = Any  # tests/conftest.py's helper (the `pmon` fixture)

pytestmark = pytest.mark.timeout(120)
GRACEFUL_SRC = Path(__file__).parents[1] / "fixtures" / "graceful" / "main.go"


def need(tool: str, package: str) -> str:
    """The path of `tool`; a test without it is skipped here, and fails in CI (CI installs it)."""
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: CI must install {package} (.ci/run)")
        pytest.skip(f"{tool} is not installed (apt install {package}); CI fails instead of skipping")
    return path


@pytest.fixture(scope="session")
def graceful(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The graceful-restart Go server, built once per test session."""
    go = need("go", "golang-go")
    out = tmp_path_factory.mktemp("graceful") / "graceful"
    env = dict(os.environ, CGO_ENABLED="0")
    if not os.access(os.path.expanduser("~"), os.W_OK):
        env["GOCACHE"] = str(out.parent / "gocache")
    built = subprocess.run([go, "build", "-o", str(out), str(GRACEFUL_SRC)], capture_output=True, text=True,
                           env=env, cwd=str(GRACEFUL_SRC.parent), timeout=600)
    assert built.returncode == 0, f"go build failed: {built.stderr}"
    return out


def has_marker(pid: int, entry: bytes) -> bool:
    """`entry`: PMON2_SERVICE=<instance>:<id>, followed in the environment by the marker's :<tag>."""
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(e == entry or e.startswith(entry + b":") for e in entries)


def get(port: int, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as answer:
        return answer.read().decode()


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def events(pmon: Pmon, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    out = pmon.json("events", name, "-n", "200", "--json")
    return [e for e in out if kind is None or e["kind"] == kind]


def marked(pmon: Pmon, service_id: int) -> list[int]:
    """Live processes that carry this service's PMON2_SERVICE marker."""
    entry = pmon.service_marker() + str(service_id).encode()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and is_alive(int(p)) and has_marker(int(p), entry)]


def serving_pid(port: int) -> int:
    return int(get(port).split()[0].removeprefix("pid="))


# a graceful re-exec on SIGUSR2, with and without setsid


@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "setsid"])
def test_a_go_server_that_re_execs_itself_on_usr2_is_followed(pmon: Pmon, graceful: Path, setsid: bool) -> None:
    port = free_port()
    flags = ["-addr", f"127.0.0.1:{port}"] + (["-setsid"] if setsid else [])
    svc = pmon.start_service("--name", "web", str(graceful), "--", *flags)
    first = svc["pid"]
    pmon.wait_for(lambda: serving_pid(port) == first, 10, message="the server to answer")

    pids = [first]
    for generation in (1, 2):  # twice: the second successor's group may be led by a process long gone
        done = pmon.run("reload", "web", "--wait")
        new = pmon.desc("web")
        assert new["pid"] != pids[-1], new
        assert f"web: pid {pids[-1]} handed over to pid {new['pid']}" in done.stdout, done.stdout
        pids.append(new["pid"])
        pmon.wait_dead(pids[-2], 10, what="the old copy")
        assert get(port) == f"pid={new['pid']} generation={generation}\n"
        if setsid:
            assert session(new["pid"]) == new["pid"], "the new copy should lead a session of its own"
        else:
            assert pgrp(new["pid"]) == first, "without setsid the new copy stays in the first copy's group"
        # Followed, not restarted: one serving copy, no restart, for a while.
        pmon.holds(lambda p=new["pid"]: (d := pmon.desc("web"))["pid"] == p and d["restarts"] == 0
                   and d["status"] == "running", 1.0, message="the new copy stays the service, unrestarted")
        assert marked(pmon, svc["id"]) == [new["pid"]]
    handovers = [e["message"] for e in events(pmon, "web", "reload") if "handed over" in e["message"]]
    assert handovers == [f"pid {pids[0]} handed over to pid {pids[1]} (reload)",
                         f"pid {pids[1]} handed over to pid {pids[2]} (reload)"], handovers
    assert not events(pmon, "web", "exit") and not events(pmon, "web", "restart")

    pmon.run("stop", "web")
    assert not is_alive(pids[-1]) and marked(pmon, svc["id"]) == []
    assert refused(port), "nothing may listen once the followed copy is stopped"
    assert pmon.desc("web")["status"] == "stopped"


@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "setsid"])
def test_pmond_killed_while_the_old_copy_drains_follows_the_successor_at_its_exit(
        pmon: Pmon, graceful: Path, setsid: bool) -> None:
    """pmond SIGKILLed after `reload` while the old copy still serves (-linger): the next pmond adopts the old
    copy, and at its exit follows the successor (the reload window is in the run dir), rather than count a
    crash and start a copy that cannot bind the port while the real one runs unsupervised."""
    port = free_port()
    flags = ["-addr", f"127.0.0.1:{port}", "-linger", "3s"] + (["-setsid"] if setsid else [])
    svc = pmon.start_service("--name", "web", str(graceful), "--", *flags)
    first = svc["pid"]
    pmon.wait_for(lambda: serving_pid(port) == first, 10, message="the server to answer")
    pmon.run("reload", "web")
    successor = pmon.wait_for(lambda: [p for p in marked(pmon, svc["id"]) if p != first], 10,
                              message="the new copy")[0]
    daemon = pmon.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGKILL)
    pmon.wait_dead(daemon, what="pmond")
    assert is_alive(first), "the old copy must still drain when the new pmond starts"
    assert pmon.desc("web")["pid"] == first  # a new pmond, which adopts the old copy
    pmon.wait_dead(first, 10, what="the old copy")
    view = pmon.wait_service("web", lambda s: s["pid"] == successor, 5, what="the successor followed")
    assert view["restarts"] == 0 and view["status"] == "running", view
    pmon.holds(lambda: (d := pmon.desc("web"))["pid"] == successor and d["restarts"] == 0, 1.0,
               message="no crash, no restart loop")
    assert marked(pmon, svc["id"]) == [successor]
    assert get(port).startswith(f"pid={successor} ")
    assert not events(pmon, "web", "exit") and not events(pmon, "web", "restart")
    pmon.run("stop", "web")
    assert not is_alive(successor) and refused(port)


def test_a_reload_without_a_handover_says_why_and_keeps_the_service(pmon: Pmon, graceful: Path) -> None:
    """SIGHUP is not the server's reload signal: it ends (Go's default for SIGHUP) and leaves no successor;
    `reload --wait` fails with that reason and the exit is a crash, restarted as usual. A window with no
    exit at all closes at reload_timeout."""
    port = free_port()
    svc = pmon.start_service("--name", "web", "--reload-timeout", "1", str(graceful), "--", "-addr",
                             f"127.0.0.1:{port}")
    pmon.wait_for(lambda: serving_pid(port) == svc["pid"], 10)
    sleeper = pmon.start_service("--name", "idle", "--reload-timeout", "0.5", "sleep", "600")
    waited = pmon.run("reload", "idle", "--sig", "CONT", "--wait", check=False)
    assert waited.returncode == 1
    assert (f"no handover within 0.5 s: pid {sleeper['pid']} still serves (a reload in place, such as nginx's "
            "HUP, has nothing to wait for: omit --wait)") in waited.stderr, waited.stderr

    crashed = pmon.run("reload", "web", "--sig", "HUP", "--wait", check=False)
    assert crashed.returncode == 1 and f"process {svc['pid']} exited and left no successor" in crashed.stderr
    after = pmon.wait_service("web", lambda s: s["status"] == "running" and s["restarts"] == 1, 10)
    assert after["pid"] != svc["pid"]


# A successor forked late in the window, when pmond looks at the main's children only every 0.25 s or has
# stopped looking: it calls setsid and its parent exits at once, so no look can hold it. It is still found,
# by the PMON2_SERVICE marker it inherited or, when it overwrote its environment with its process title as
# nginx and setproctitle do ("exe": the marker is gone with it), by its executable (follow.py). A process
# that merely runs with an empty environment is not taken that way: it cannot be told from a stranger.
LATE_FORK = """
import ctypes, os, signal, sys, time
def retitle():
    # setproctitle's way: the environment area the kernel laid out at exec, overwritten with a title
    fields = open("/proc/self/stat").read().rpartition(")")[2].split()
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end: stat(5) fields 50 and 51
    title = b"late: master process"
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, title, min(len(title), end - start - 1))
def reload(*_):
    time.sleep(float(sys.argv[1]))  # past the window's first 0.5 s of looking every 10 ms
    if sys.argv[2] == "exe":
        retitle()  # before the fork, as nginx does: no marker left to find the successor by
    if os.fork():
        os._exit(0)  # the old main exits as soon as the successor exists
    os.setsid()
    while True:
        time.sleep(1)
signal.signal(signal.SIGUSR2, reload)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("by", ["marker", "exe"])
def test_a_successor_forked_late_in_the_window_whose_parent_exits_at_once_is_followed(pmon: Pmon, by: str) -> None:
    script = pmon.script("late.py", LATE_FORK)
    svc = pmon.start_service("--name", "late", "--reload-signal", "USR2", sys.executable, str(script), "1.5", by)
    done = pmon.run("reload", "late", "--wait", timeout=20)
    new = pmon.desc("late")
    assert new["pid"] != svc["pid"] and f"pid {svc['pid']} handed over to pid {new['pid']}" in done.stdout, done
    assert session(new["pid"]) == new["pid"], "the successor left the old main's session"
    assert has_marker(new["pid"], pmon.service_marker() + str(svc["id"]).encode()) == (by == "marker")
    pmon.holds(lambda: (d := pmon.desc("late"))["pid"] == new["pid"] and d["restarts"] == 0
               and d["status"] == "running", 1.0, message="followed, not restarted")
    assert not events(pmon, "late", "exit") and not events(pmon, "late", "restart")
    pmon.run("stop", "late")
    assert not is_alive(new["pid"])


# a shell that crashes while its background worker lives on


@pytest.mark.parametrize(("after", "code"), [(0.2, 3), (1.5, 0)], ids=["crash", "exit-0-after-the-start-window"])
def test_a_shell_that_exits_with_its_worker_alive_is_a_crash_and_the_worker_is_not_adopted(
        pmon: Pmon, after: float, code: int) -> None:
    script = pmon.work / "job.sh"
    script.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {pmon.work}/worker.pid\nsleep {after}\nexit {code}\n")
    script.chmod(0o755)
    svc = pmon.json("run", "--json", "--name", "job", "--min-uptime", "1", str(script))
    worker_file = pmon.work / "worker.pid"
    worker = pmon.wait_for(lambda: int(worker_file.read_text()), 5)
    restarted = pmon.wait_service("job", lambda s: s["restarts"] >= 1 and s["pid"] not in (None, svc["pid"]), 10,
                                  what="restarted after the shell's exit")
    assert restarted["pid"] != worker, "the background worker was adopted"
    pmon.wait_dead(worker, 5, what="the worker left by the crashed shell")
    assert not [e for e in events(pmon, "job", "reload") if "handed over" in e["message"]]
    assert events(pmon, "job", "exit")
    pmon.run("del", "job")


# nginx that daemonizes itself


@pytest.fixture
def nginx_conf(pmon: Pmon) -> Iterator[tuple[Path, int]]:
    """A private nginx: prefix, configuration, pid file and port of its own (daemon not set: on)."""
    need("nginx", "nginx-light")
    prefix = pmon.work / "nginx"
    (prefix / "logs").mkdir(parents=True)
    port = free_port()
    (prefix / "nginx.conf").write_text(textwrap.dedent(f"""\
        worker_processes 2;
        pid {prefix}/nginx.pid;
        error_log {prefix}/logs/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {prefix}/body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            server {{ listen 127.0.0.1:{port}; location / {{ return 200 "nginx\\n"; }} }}
        }}
        """))
    yield prefix, port
    pid_file = prefix / "nginx.pid"  # a master left behind by a failed test: end it by its own pid file
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text()), 9)


def nginx_tree(master: int) -> list[int]:
    return [master, *(p for p in children_of(master))]


@pytest.mark.parametrize("with_pidfile", [False, True], ids=["detected", "pidfile"])
def test_nginx_that_daemonizes_is_followed_without_a_restart_loop(pmon: Pmon, nginx_conf: tuple[Path, int],
                                                                   with_pidfile: bool) -> None:
    prefix, port = nginx_conf
    nginx = need("nginx", "nginx-light")
    pidfile = ["--pidfile", str(prefix / "nginx.pid")] if with_pidfile else []
    pmon.run("run", "--name", "ng", *pidfile, nginx, "--", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
             "-g", "daemon on;")

    def master() -> int | None:
        text = (prefix / "nginx.pid").read_text().strip()
        return int(text) if text.isdigit() and is_alive(int(text)) else None

    pid = pmon.wait_for(master, 10, message="nginx's pid file")
    up = pmon.wait_service("ng", lambda s: s["pid"] == pid and s["status"] == "running", 10,
                           what="the master followed")
    handover = [e for e in events(pmon, "ng", "reload") if "handed over" in e["message"]]
    assert len(handover) == 1 and handover[0]["data"]["pid"] == pid, handover
    launched = handover[0]["data"]["from_pid"]  # the nginx that pmond started, which forked the master
    assert launched != pid and not is_alive(launched) and up["restarts"] == 0
    assert get(port) == "nginx\n"
    workers = children_of(pid)
    assert len(workers) == 2, f"nginx's workers: {workers}"
    # The issue saw a restart every 2.5 s: none here, and no second nginx.
    pmon.holds(lambda: (d := pmon.desc("ng"))["pid"] == pid and d["restarts"] == 0 and d["status"] == "running",
               3.0, message="no restart loop")
    assert f"pid {launched} handed over to pid {pid}" in handover[0]["message"], handover
    assert not events(pmon, "ng", "exit") and not events(pmon, "ng", "restart")
    detail = pmon.desc("ng")["followed"]
    assert detail["pid"] == pid and detail["from_pid"] == launched, detail
    if with_pidfile:
        assert "pid file" in handover[0]["message"] and detail.get("pattern") == "forking", handover
    else:
        assert "daemonized itself" in handover[0]["message"], handover
        why = pmon.run("why", "ng").stdout
        assert "daemon off" in why and "--pidfile" in why, why

    # stop, start again (a new master is followed), then del: nothing of nginx is left running.
    pmon.run("stop", "ng")
    for p in [pid, *workers]:
        assert not is_alive(p), f"nginx process {p} survived the stop"
    assert refused(port)
    pmon.run("start", "ng")
    second = pmon.wait_for(lambda: (m := master()) not in (None, pid) and m, 10, message="a new master")
    pmon.wait_service("ng", lambda s: s["pid"] == second and s["status"] == "running", 10)
    workers = children_of(second)
    assert get(port) == "nginx\n"
    pmon.run("restart", "ng")
    third = pmon.wait_for(lambda: (m := master()) not in (None, second) and m, 10, message="the restarted master")
    pmon.wait_service("ng", lambda s: s["pid"] == third and s["status"] == "running", 10)
    assert not any(is_alive(p) for p in [second, *workers]), "the restart left the old nginx running"
    assert pmon.desc("ng")["restarts"] == 1
    workers = children_of(third)
    pmon.run("del", "ng")
    for p in [third, *workers]:
        assert not is_alive(p), f"nginx process {p} survived del"
    assert refused(port)


def test_a_crash_of_the_followed_nginx_master_restarts_it_and_leaves_no_worker(
        pmon: Pmon, nginx_conf: tuple[Path, int]) -> None:
    prefix, port = nginx_conf
    nginx = need("nginx", "nginx-light")
    pmon.run("run", "--name", "ng", nginx, "--", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g",
             "daemon on;")
    first = pmon.wait_service("ng", lambda s: s["pid"] and (pmon.work / "nginx" / "nginx.pid").exists()
                              and s["pid"] == int((prefix / "nginx.pid").read_text()), 10)["pid"]
    workers = children_of(first)
    os.kill(first, 9)
    again = pmon.wait_service("ng", lambda s: s["restarts"] == 1 and s["status"] == "running" and s["pid"] != first
                              and s["followed"] is not None, 10, what="a new master, followed")
    for p in workers:
        pmon.wait_dead(p, 5, what="a worker of the killed master")
    assert get(port) == "nginx\n"
    pmon.run("del", "ng")
    assert not is_alive(again["pid"]) and refused(port)


SLOW_SETSID = """\
import os, sys, time
if os.fork():
    os._exit(0)  # the launched process exits at once: the daemonize pattern
time.sleep(float(sys.argv[1]))  # pmond has taken the handover by now, with the child still in the old group
os.setsid()
worker = os.fork()
if worker == 0:
    time.sleep(600)
    os._exit(0)
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker}")
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(600)
"""


def test_a_daemon_that_calls_setsid_after_the_handover_is_stopped_with_its_new_group(pmon: Pmon) -> None:
    """nginx forks, its parent exits, and only then does the child call setsid: a pmond that reads the
    child's group in between pinned the old, soon empty group, and its stop reached nobody (CI, stop 16:
    "process group ... did not die after SIGKILL")."""
    script = pmon.script("slow_setsid.py", SLOW_SETSID)
    pids_file = pmon.work / "slow.pids"
    launched = pmon.json("run", "--json", "--name", "slow", "--kill-timeout", "1", sys.executable, str(script),
                         "0.5", str(pids_file))["pid"]  # it exits at once
    text = pmon.wait_for(lambda: pids_file.exists() and pids_file.read_text(), 10, message="the daemon's pids")
    daemon, worker = (int(p) for p in text.split())
    pmon.wait_service("slow", lambda s: s["pid"] == daemon and s["status"] == "running", 10,
                      what=f"the daemon followed ({daemon}, {worker}: {events(pmon, 'slow')})")
    assert launched != daemon and pgrp(daemon) == daemon and pgrp(worker) == daemon
    pmon.run("stop", "slow", timeout=30)
    assert pmon.desc("slow")["status"] == "stopped"
    for p in (daemon, worker):
        pmon.wait_dead(p, 5, what=f"process {p} of the daemon's new group")
    kills = events(pmon, "slow", "kill")
    assert not kills, f"SIGTERM reached the group, no SIGKILL was needed: {kills}"

    # a crash of such a daemon: its worker, left in the daemon's new group, is killed with it
    pids_file.unlink()
    pmon.run("start", "slow")
    text = pmon.wait_for(lambda: pids_file.exists() and pids_file.read_text(), 10, message="the new daemon's pids")
    daemon, worker = (int(p) for p in text.split())
    pmon.wait_service("slow", lambda s: s["pid"] == daemon, 10, what="the new daemon followed")
    os.kill(daemon, signal.SIGKILL)
    pmon.wait_dead(worker, 5, what="the worker of the killed daemon")
    pmon.wait_service("slow", lambda s: s["restarts"] == 1, 10, what="a restart after the crash")


# MAINPID= through the service's notify socket (daemon/notify.py): systemd's rule


def test_mainpid_of_a_process_outside_the_service_is_refused_and_of_its_child_accepted(pmon: Pmon) -> None:
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        script = pmon.script("notifier.py", f"""
            import os, socket, subprocess, time
            def say(text):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.sendto(text.encode(), os.environ["NOTIFY_SOCKET"])
            say("READY=1")
            time.sleep(0.3)
            say("MAINPID={stranger.pid}")
            child = subprocess.Popen(["sleep", "600"])
            time.sleep(0.5)
            say(f"MAINPID={{child.pid}}")
            time.sleep(600)
            """)
        svc = pmon.json("run", "--json", "--name", "nt", "--ready", "notify", str(script))
        refusal = pmon.wait_for(lambda: [e for e in events(pmon, "nt", "reload") if e["data"].get("refused")], 10,
                                message="the refusal of a stranger's MAINPID")
        assert f"MAINPID=: pid {stranger.pid} refused" in refusal[0]["message"], refusal
        assert "not a process of the service" in refusal[0]["message"], refusal
        assert is_alive(stranger.pid), "the stranger must not be touched"
        new = pmon.wait_service("nt", lambda s: s["pid"] not in (svc["pid"], stranger.pid), 10,
                                what="the handover to its own child")
        assert ppid(new["pid"]) == svc["pid"] and new["restarts"] == 0
        assert any(f"pid {svc['pid']} handed over to pid {new['pid']} (MAINPID=)" in e["message"]
                   for e in events(pmon, "nt", "reload"))
        pmon.run("stop", "nt")
        assert not is_alive(new["pid"]) and not is_alive(svc["pid"]) and is_alive(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("trap", ["symlink", "stranger"])
def test_a_pid_file_that_is_a_link_or_names_a_stranger_is_refused(pmon: Pmon, trap: str) -> None:
    """Type=forking whose pid file is a symlink (to a file naming the service's own worker), or names a
    process outside the service (same uid, not its descendant, no marker): refused with an event, the
    stranger untouched, and the launched shell's worker is followed as its topmost descendant."""
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        worker_file, pidfile = pmon.work / "worker.pid", pmon.work / "svc.pid"
        if trap == "symlink":
            pidfile.symlink_to(worker_file)
            write = ""
        else:
            write = f"echo {stranger.pid} > {pidfile}\n"
        script = pmon.work / "forker.sh"
        script.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {worker_file}\n{write}exit 0\n")
        script.chmod(0o755)
        pmon.run("run", "--name", "fk", "--pidfile", str(pidfile), str(script))
        worker = pmon.wait_for(lambda: int(worker_file.read_text()), 5)
        up = pmon.wait_service("fk", lambda s: s["pid"] == worker, 10, what="the shell's worker followed")
        assert up["restarts"] == 0 and up["followed"]["from_pid"] != worker
        why = "is a symbolic link: refused" if trap == "symlink" else \
            f"pid file {pidfile}: pid {stranger.pid} refused: process {stranger.pid} is not a process of the service"
        refusals = [e["message"] for e in events(pmon, "fk", "reload") if e["data"].get("refused")]
        assert any(why in r for r in refusals), refusals
        assert is_alive(stranger.pid)
        pmon.run("del", "fk")
        assert not is_alive(worker) and is_alive(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
