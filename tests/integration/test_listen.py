"""`--listen`: pmond holds the listening sockets and passes them with systemd's protocol (sd_listen_fds(3)).

The service here is a tiny HTTP server on the fds pmond passes (socket.socket(fileno=3)). It refuses to
serve unless LISTEN_PID is its own pid and LISTEN_FDS counts its fds, and each answer tells its pid, the
name of the socket it came in on and the fds it holds. Clients count refused connections: with the
socket held by pmond there must be none, through restarts, crashes and a SIGKILL of pmond.
"""

from __future__ import annotations

import json
import marshal
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pmon2.daemon import launcher
from procs import free_port

from .peer import request_as

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid, a port below 1024)")

SERVER = """
    import json, os, selectors, signal, socket, sys
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit(f"LISTEN_PID={os.environ.get('LISTEN_PID')} is not my pid {os.getpid()}")
    count = int(os.environ["LISTEN_FDS"])
    names = os.environ["LISTEN_FDNAMES"].split(":")
    assert len(names) == count, names
    held = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    sel = selectors.DefaultSelector()
    for i in range(count):
        sock = socket.socket(fileno=3 + i)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, names[i])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    while not stopping:
        for key, _ in sel.select(0.1):
            try:
                conn, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            conn.setblocking(True)
            conn.settimeout(5)
            conn.recv(65536)
            body = json.dumps({"pid": os.getpid(), "name": key.data, "fds": held}).encode()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
            conn.close()
"""


def ask(address: Any, family: int = socket.AF_INET, timeout: float = 5.0) -> dict[str, Any]:
    """One request; the server's JSON answer. Raises OSError (ConnectionRefusedError...)."""
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(address)
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), data
    return json.loads(body)


class Hammer:
    """Requests in a loop from a thread until stopped: how many were served, refused, or failed otherwise."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.served = self.refused = 0
        self.failed: list[str] = []
        self.pids: set[int] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                self.pids.add(ask(("127.0.0.1", self.port))["pid"])
                self.served += 1
            except ConnectionRefusedError:
                self.refused += 1
            except (OSError, AssertionError, ValueError) as exc:
                self.failed.append(repr(exc))

    def stop(self) -> Hammer:
        self.done.set()
        self.thread.join(10)
        return self


def serve(pmon: Any, name: str, *flags: str, instances: int = 1) -> dict[str, Any]:
    script = pmon.script("srv.py", SERVER)
    more = ("--instances", str(instances)) if instances > 1 else ()
    svc = pmon.json("run", "--json", *flags, *more, "--name", name, str(script))
    return svc


def socket_inode(pid: int, fd: int = 3) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def events(pmon: Any, name: str, kind: str) -> list[str]:
    return [e["message"] for e in pmon.json("events", name, "-n", "200", "--json") if e["kind"] == kind]


@pytest.mark.parametrize("via", ["launcher", "pmond"])
def test_the_service_gets_its_sockets_as_fd_3_on_with_systemds_variables(pmon, via):
    if via == "pmond":
        pmon.env["PMON2_LAUNCHER"] = "0"  # pmond forks each intermediate itself
    port = free_port()
    svc = serve(pmon, "web", "--listen", f"tcp://127.0.0.1:{port}", "--listen", "unix:run/web.sock,name=admin")
    assert svc["status"] == "running" and svc["listen"] == [f"tcp://127.0.0.1:{port}", "unix:run/web.sock,name=admin"]
    answer = pmon.wait_for(lambda: ask(("127.0.0.1", port)), message="an answer on the TCP socket")
    assert answer["pid"] == svc["pid"] and answer["name"] == "web"  # default name: the service's
    # fds 0-2, the two sockets, and the one listdir had open: no pipe of pmond's leaked into the service
    assert answer["fds"] == [0, 1, 2, 3, 4, 5]
    unix = pmon.work / "run" / "web.sock"  # relative to the service's cwd
    assert stat.S_ISSOCK(unix.lstat().st_mode) and stat.S_IMODE(unix.lstat().st_mode) == 0o666
    assert ask(str(unix), socket.AF_UNIX)["name"] == "admin"
    environ = dict(e.split(b"=", 1) for e in Path(f"/proc/{svc['pid']}/environ").read_bytes().split(b"\0") if e)
    assert environ[b"LISTEN_FDS"] == b"2" and environ[b"LISTEN_FDNAMES"] == b"web:admin"
    assert environ[b"LISTEN_PID"] == str(svc["pid"]).encode()
    # A crash restart passes the same sockets to the next process.
    inode = socket_inode(svc["pid"])
    os.kill(svc["pid"], signal.SIGKILL)
    after = pmon.wait_service("web", lambda s: s["pid"] not in (None, svc["pid"]) and s["status"] == "running")
    assert socket_inode(after["pid"]) == inode
    assert ask(("127.0.0.1", port))["pid"] == after["pid"]
    assert events(pmon, "web", "listen") == [f"listening on tcp://127.0.0.1:{port}, unix:run/web.sock"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop then start", "rolling"])
def test_restarts_and_crashes_under_load_refuse_no_connection(pmon, how):
    port = free_port()
    # With a reload_signal, `restart` stops then starts (the backlog pmond holds bridges the gap);
    # without one, a --listen service rolls (a new process first, rolling.py).
    flags = ("--reload-signal", "HUP") if how == "stop then start" else ()
    svc = serve(pmon, "web", "--listen", f"tcp://127.0.0.1:{port}", *flags)
    pmon.wait_for(lambda: ask(("127.0.0.1", port)), message="the first answer")
    hammer = Hammer(port)
    try:
        for _ in range(2):
            pmon.run("restart", "web")
        current = pmon.desc("web")["pid"]
        os.kill(current, signal.SIGKILL)
        pmon.wait_service("web", lambda s: s["pid"] not in (None, current) and s["status"] == "running")
        pmon.wait_for(lambda: len(hammer.pids) >= 4 and hammer.served > 100, timeout=10,
                      message=lambda: f"answers of the later processes: {hammer.pids}")
    finally:
        hammer.stop()
    assert hammer.refused == 0, f"{hammer.refused} connections refused ({hammer.served} served)"
    # An accepted connection of the SIGKILLed process may be reset; nothing else may fail.
    assert len(hammer.failed) <= 2, hammer.failed[:5]
    assert svc["pid"] in hammer.pids and len(hammer.pids) >= 4


def test_a_stopped_service_refuses_and_a_deleted_one_lets_the_port_go(pmon):
    port = free_port()
    serve(pmon, "web", "--listen", f"tcp://127.0.0.1:{port}")
    pmon.wait_for(lambda: ask(("127.0.0.1", port)), message="an answer")
    pmon.run("stop", "web")
    with pytest.raises(ConnectionRefusedError):
        ask(("127.0.0.1", port))
    pmon.run("start", "web")
    assert pmon.wait_for(lambda: ask(("127.0.0.1", port)), message="an answer after start")
    pmon.run("del", "web")
    with pytest.raises(ConnectionRefusedError):
        ask(("127.0.0.1", port))
    with socket.socket() as again:  # nothing of pmond's holds it
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_the_sockets_survive_a_sigkill_of_pmond(pmon):
    port = free_port()
    svc = serve(pmon, "web", "--listen", f"tcp://127.0.0.1:{port}", "--listen", "unix:web.sock,name=admin",
                "--reload-signal", "HUP")
    pmon.wait_for(lambda: ask(("127.0.0.1", port)), message="an answer")
    inode = socket_inode(svc["pid"])
    daemon = pmon.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    pmon.wait_dead(daemon, what="the killed pmond")
    assert ask(("127.0.0.1", port))["pid"] == svc["pid"], "the service still holds its socket"
    pmon.run("ls")  # a new pmond, which adopts the service and takes its sockets back
    assert any(m == f"took back 2 listening sockets from process {svc['pid']}" for m in events(pmon, "web", "listen"))
    hammer = Hammer(port)
    try:
        pmon.run("restart", "web")
        new = pmon.desc("web")["pid"]
        pmon.wait_for(lambda: new in hammer.pids, message="an answer of the restarted process")
    finally:
        hammer.stop()
    assert hammer.refused == 0 and not hammer.failed, (hammer.refused, hammer.failed[:3])
    assert socket_inode(new) == inode, "the very socket the first pmond bound"
    assert ask(str(pmon.work / "web.sock"), socket.AF_UNIX) == {"pid": new, "name": "admin", "fds": [0, 1, 2, 3, 4, 5]}


def test_sockets_that_cannot_be_taken_back_are_bound_again(pmon):
    """The running process no longer holds its socket (it closed it): the next pmond cannot take it back,
    binds it again and says so."""
    port, moved = free_port(), free_port()
    svc = pmon.json("run", "--json", "--listen", f"tcp://127.0.0.1:{port}", "--name", "closer", "--",
                    "sh", "-c", "exec 3>&- && exec sleep 600")
    # Another keeps its socket, but at fd 7: found among its fds by address.
    mover = pmon.json("run", "--json", "--listen", f"tcp://127.0.0.1:{moved}", "--name", "mover", "--",
                      "sh", "-c", "exec 7>&3 3>&- && exec sleep 600")
    pmon.wait_for(lambda: not os.path.exists(f"/proc/{svc['pid']}/fd/3") and pmon.is_alive(svc["pid"]),
                  message="the service closed fd 3")
    pmon.wait_for(lambda: not os.path.exists(f"/proc/{mover['pid']}/fd/3") and pmon.is_alive(mover["pid"]),
                  message="the other moved fd 3 to 7")
    daemon = pmon.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    pmon.wait_dead(daemon, what="the killed pmond")
    with pytest.raises(ConnectionRefusedError):
        ask(("127.0.0.1", port))
    pmon.run("ls")
    messages = events(pmon, "closer", "listen")
    assert any("cannot take back" in m and "holds no listening socket" in m and "bound them again" in m
               for m in messages), messages
    with socket.create_connection(("127.0.0.1", port), timeout=2):  # pmond's socket: queued, not refused
        pass
    assert pmon.desc("closer")["pid"] == svc["pid"], "adopted, not restarted"
    assert events(pmon, "mover", "listen")[-1] == f"took back 1 listening socket from process {mover['pid']}"


def test_instances_share_one_socket_unless_reuseport(pmon):
    shared, own = free_port(), free_port()
    serve(pmon, "web", "--listen", f"tcp://127.0.0.1:{shared}", instances=3)
    serve(pmon, "rp", "--listen", f"tcp://127.0.0.1:{own}", "--reuseport", instances=3)
    web = [pmon.desc(f"web:{i}")["pid"] for i in range(3)]
    rp = [pmon.desc(f"rp:{i}")["pid"] for i in range(3)]
    assert len({socket_inode(p) for p in web}) == 1
    assert len({socket_inode(p) for p in rp}) == 3
    # SO_REUSEPORT spreads new connections over the three sockets: each instance serves some.
    seen: set[int] = set()
    pmon.wait_for(lambda: seen.add(ask(("127.0.0.1", own))["pid"]) or seen == set(rp), timeout=10,
                  message=lambda: f"every reuseport instance answers: {seen} of {rp}")
    answer = ask(("127.0.0.1", shared))
    assert answer["pid"] in web and answer["name"] == "web"  # the group's name, never web:1


@needs_root
def test_unix_sockets_are_made_as_the_services_user_and_never_through_a_link(pmon):
    os.chmod(pmon.home, 0o711)
    own = pmon.home / "nobody"
    own.mkdir()
    os.chown(own, NOBODY, NOBODY)
    path = own / "app.sock"
    svc = pmon.json("run", "--json", "--user", "nobody", "--listen", f"unix:{path},mode=0660", "--name", "app",
                    "/bin/sleep", "600")
    st = path.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o660) and stat.S_ISSOCK(st.st_mode)
    assert socket_inode(svc["pid"]).startswith("socket:")
    pmon.run("del", "app")
    # The stale file is replaced at the next bind; a link a service put there never is.
    assert path.exists()
    pmon.json("run", "--json", "--user", "nobody", "--listen", f"unix:{path}", "--name", "app2", "/bin/sleep", "600")
    pmon.run("del", "app2")
    path.unlink()
    path.symlink_to("/etc/passwd")
    proc = pmon.run("run", "--user", "nobody", "--listen", f"unix:{path}", "--name", "app3", "/bin/sleep", "600",
                    check=False)
    assert proc.returncode != 0 and "is a symbolic link; not replaced" in proc.stderr and "Traceback" not in proc.stderr
    assert path.is_symlink() and os.stat("/etc/passwd").st_uid == 0
    # pmond makes no file where the service's user could not.
    proc = pmon.run("run", "--user", "nobody", "--listen", "unix:/etc/pmon2-test.sock", "--name", "app4",
                    "/bin/sleep", "600", check=False)
    assert proc.returncode != 0 and "Permission denied (as uid 65534)" in proc.stderr
    assert not os.path.exists("/etc/pmon2-test.sock")


@needs_root
def test_a_caller_who_is_not_root_may_not_listen_below_1024(pmon):
    (pmon.home / "config.toml").write_text('allow_users = ["nobody"]\n')
    pmon.run("daemon", "start")
    for d in (pmon.home, pmon.home / "run"):
        os.chmod(d, 0o711)
    sock = str(pmon.socket)
    body = {"argv": ["/bin/sleep", "600"], "cwd": "/tmp", "name": "low", "listen": ["tcp://127.0.0.1:80"]}
    code, err = request_as(NOBODY, sock, "POST", "/v1/services", body)
    assert code == 403 and "below 1024 are for root only" in err["error"]["message"], err
    port = free_port()
    code, mine = request_as(NOBODY, sock, "POST", "/v1/services", dict(body, listen=[f"tcp://127.0.0.1:{port}"]))
    assert code == 201, mine
    # The socket is the caller's, as its service's: /proc/net/tcp shows its owner's uid.
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    assert any(r[1] == f"0100007F:{port:04X}" and r[3] == "0A" and r[7] == str(NOBODY) for r in rows)
    code, err = request_as(NOBODY, sock, "POST", "/v1/services/low/update",
                           {"fields": {"listen": ["tcp://127.0.0.1:443"]}})
    assert code == 403, err
    # Root may.
    assert pmon.run("run", "--listen", "tcp://127.0.0.1:81", "--name", "root81", "sleep", "600").returncode == 0


def test_bad_listen_flags_are_one_line_errors(pmon):
    for flag, problem in (("tcp://localhost:8080", "resolves no names"), ("tcp://127.0.0.1:8080,name=a:b", "no ':'"),
                          ("ftp://1.2.3.4:21", "use tcp://")):
        proc = pmon.run("run", "--listen", flag, "sleep", "600", check=False)
        assert proc.returncode != 0 and problem in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = pmon.run("run", "--listen", f"tcp://127.0.0.1:{port}", "--name", "busy", "sleep", "600", check=False)
    assert proc.returncode != 0 and "address already in use" in proc.stderr
    assert pmon.services() == []


def test_the_launcher_takes_only_requests_with_the_fds_they_announce(tmp_path):
    """_take_one: a request that announces N sockets must come with exactly 2 + N fds; then the service
    gets them at 3.. and LISTEN_PID is its own pid."""
    script = tmp_path / "env.sh"
    script.write_text('#!/bin/sh\necho "$LISTEN_PID $$ $(readlink /proc/$$/fd/3)"\nexec sleep 600\n')
    script.chmod(0o755)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        inode = f"socket:[{os.fstat(listener.fileno()).st_ino}]"

        def request(n_announced: int, fds: list[int]) -> tuple[int, bytes, bytes]:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            status_r, status_w = os.pipe()
            ack_r, ack_w = os.pipe()
            note_r, note_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 127
                try:
                    for fd in (status_r, ack_w, note_r):
                        os.close(fd)
                    ours.close()
                    code = launcher._take_one(theirs, note_w, launcher.changed_signals())
                finally:
                    os._exit(code)
            for fd in (note_w,):
                os.close(fd)
            theirs.close()
            req = ("/bin/sh", ["sh", str(script)], {"PATH": "/bin:/usr/bin"}, str(tmp_path), str(tmp_path / "out"),
                   str(tmp_path / "out"), None, None, n_announced)
            ours.sendmsg([marshal.dumps(req)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 b"".join(fd.to_bytes(4, "little") for fd in [status_w, ack_r, *fds]))])
            os.close(status_w)
            os.close(ack_r)
            note = os.read(note_r, 1)
            report = os.read(status_r, 64)
            if report[:1] == b"P":
                os.write(ack_w, b"g")
            code = os.WEXITSTATUS(os.waitpid(pid, 0)[1])
            for fd in (status_r, ack_w, note_r):
                os.close(fd)
            ours.close()
            return code, note, report

        for announced, given in ((1, []), (0, [listener.fileno()]), (2, [listener.fileno()])):
            code, note, report = request(announced, given)
            assert (code, note, report) == (1, b"t", b""), (announced, len(given))
        code, note, report = request(1, [listener.fileno()])
        assert code == 0 and note == b"t" and report[:1] == b"P"
        service = launcher.unpack_report(report)[0]
        out = tmp_path / "out"
        try:
            deadline = time.monotonic() + 5
            while not out.read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.02)
            listen_pid, own_pid, fd3 = out.read_text().split()
            assert listen_pid == own_pid == str(service) and fd3 == inode
        finally:
            os.kill(service, signal.SIGKILL)
