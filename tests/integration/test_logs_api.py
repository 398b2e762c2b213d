"""Logs through the API (issue 11, requirement 4): `log` and `logf` ask pmond, which reads the files.

The last N lines span rotated files (gzipped included); streams and services are chosen as for other
commands; a user reads the logs of its own services without any access to the log dir, and nothing
else; a symlink planted in place of a log is never followed; `logf` follows across copytruncate and
rename over one connection, which no idle timeout cuts.
"""

from __future__ import annotations

import gzip
import json
import os
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import pmon2

NOBODY = 65534
SRC = str(Path(pmon2.__file__).resolve().parent.parent)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pmond as root, a client as nobody")


# helpers


def body_lines(text: str) -> list[str]:
    """The tagged lines of `log`'s output (not the grey heads naming files)."""
    return [ln for ln in text.splitlines() if "|" in ln and not ln.startswith("──")]


class Output:
    """A running `logf`'s stdout and stderr, read raw (select sees no Python buffer)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.names = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
        self.seen = {"out": b"", "err": b""}
        self.open = set(self.names)

    @property
    def out(self) -> str:
        return self.seen["out"].decode()

    @property
    def err(self) -> str:
        return self.seen["err"].decode()

    def pump(self, timeout: float) -> bool:
        """Read what comes within `timeout`; False once both streams have ended."""
        for fd in select.select(list(self.open), [], [], timeout)[0] if self.open else []:
            chunk = os.read(fd, 65536)
            if chunk:
                self.seen[self.names[fd]] += chunk
            else:
                self.open.discard(fd)
        return bool(self.open)

    def wait_for(self, needle: str, where: str = "out", timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.seen[where].decode():
            left = deadline - time.monotonic()
            if left <= 0 or (not self.pump(left) and needle not in self.seen[where].decode()):
                pytest.fail(f"logf never printed {needle!r} on std{where}; stdout:\n{self.out[-2000:]}\n"
                            f"stderr:\n{self.err[-2000:]}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def logf(pmon: Any, *args: str, cmd: list[str] | None = None, **kwargs: Any) -> Output:
    kwargs.setdefault("env", pmon.env)
    kwargs.setdefault("cwd", pmon.work)
    proc = subprocess.Popen(cmd or pmon.cmd("logf", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, **kwargs)
    return Output(proc)


def fds_to(pid: int, path: str | None = None) -> list[str]:
    """What the open fds of a process point at; with `path`, only those that are that file."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if path is None or target == path:
            found.append(target)
    return found


def sockets_of(pid: int) -> int:
    return sum(1 for target in fds_to(pid) if target.startswith("socket:"))


def request(pmon: Any, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """A raw GET: (status, headers, body as sent, chunked or not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(pmon.socket))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def write_gz(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(data)


# the last lines


def test_log_n_spans_rotated_files_gzipped_included(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "747401", "--name", "rot")
    live = Path(svc["out_log"])
    live.write_bytes(b"".join(f"line {i}\n".encode() for i in range(7, 10)))
    Path(f"{live}.1").write_bytes(b"".join(f"line {i}\n".encode() for i in range(4, 7)))
    write_gz(Path(f"{live}.2.gz"), b"".join(f"line {i}\n".encode() for i in range(1, 4)))
    for n in (2, 3, 5, 9, 50):
        got = body_lines(pmon.run("log", "rot", "-n", str(n), "--out").stdout)
        assert got == [f"out | line {i}" for i in range(1, 10)][-n:], n
    answer = json.loads(request(pmon, "/v1/services/rot/logs?lines=5&stream=out")[2])
    assert answer == {"services": [{"id": svc["id"], "name": "rot", "logs": [
        {"stream": "out", "file": str(live), "combined": False, "lines": [f"line {i}" for i in range(5, 10)],
         "truncated": False, "error": None}]}]}


def test_streams_json_and_several_services(pmon: Any) -> None:
    for name in ("web-a", "web-b", "other"):
        pmon.start_service("sh", "-c", f"echo {name}-o; echo {name}-e >&2; exec sleep 747402", "--name", name)
    shared = pmon.start_service("sh", "-c", "echo both-o; echo both-e >&2; exec sleep 747403", "--name", "shared",
                                "--log", str(pmon.work / "shared.log"))
    pmon.wait_for(lambda: "other-e" in pmon.run("log", "other").stdout, message="the services' output")
    pmon.wait_for(lambda: "both-e" in Path(shared["out_log"]).read_text(), message="the shared log")

    assert body_lines(pmon.run("log", "web-a", "--out").stdout) == ["out | web-a-o"]
    assert body_lines(pmon.run("log", "web-a", "--err").stdout) == ["err | web-a-e"]
    globbed = body_lines(pmon.run("log", "web-*").stdout)
    assert globbed == ["web-a out | web-a-o", "web-a err | web-a-e", "web-b out | web-b-o", "web-b err | web-b-e"]
    everything = pmon.run("log").stdout
    assert all(f"{n}-o" in everything for n in ("web-a", "web-b", "other", "both"))
    # One file for both streams: tagged `log` in text, stream "out" in JSON, nothing for --err.
    assert body_lines(pmon.run("log", "shared").stdout) == ["log | both-o", "log | both-e"]
    assert body_lines(pmon.run("log", "shared", "--err").stdout) == []
    rows = [json.loads(ln) for ln in pmon.run("log", "shared", "web-b", "--json").stdout.splitlines()]
    assert rows == [{"service": "web-b", "stream": "out", "text": "web-b-o"},
                    {"service": "web-b", "stream": "err", "text": "web-b-e"},
                    {"service": "shared", "stream": "out", "text": "both-o"},
                    {"service": "shared", "stream": "out", "text": "both-e"}]
    # All or nothing: one unknown ref fails the whole command.
    bad = pmon.run("log", "web-a", "nope", check=False)
    assert bad.returncode == 1 and "nope" in bad.stderr and bad.stdout == ""
    assert pmon.run("log", "web-a", "--out", "--err", check=False).returncode == 2


def test_the_api_checks_its_queries(pmon: Any) -> None:
    pmon.start_service("sleep", "747404", "--name", "q")
    for query, word in (("lines=-1", "lines"), ("lines=x", "lines"), ("lines=100001", "lines"),
                        ("stream=both", "stream"), ("follow=yes", "follow"), ("tail=3", "tail")):
        status, _, body = request(pmon, f"/v1/logs?{query}")
        assert status == 400 and word in json.loads(body)["error"]["message"], (query, body)
    status, _, body = request(pmon, "/v1/logs?select=q,zz")
    assert status == 404 and "zz" in json.loads(body)["error"]["message"]
    status, _, body = request(pmon, "/v1/services/zz/logs")
    assert status == 404


# access


def nobody_python() -> str:
    """An interpreter (>= 3.11) that nobody may run: this venv's lives under /root."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run([candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                               user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True)
        if probe.returncode == 0:
            return candidate
    pytest.skip("no python3 >= 3.11 that nobody may run")


def as_nobody(pmon: Any, python: str, *args: str) -> tuple[list[str], dict[str, Any]]:
    env = {"PMON2_HOME": str(pmon.home), "PYTHONPATH": SRC, "NO_COLOR": "1", "PATH": "/usr/bin:/bin",
           "HOME": "/tmp"}
    return [python, "-m", "pmon2", *args], {"env": env, "cwd": "/", "user": NOBODY, "group": NOBODY,
                                           "extra_groups": []}


@needs_root
def test_a_user_reads_its_services_logs_without_access_to_the_log_dir(pmon: Any) -> None:
    (pmon.home / "config.toml").write_text('allow_users = ["nobody"]\n')
    python = nobody_python()
    pmon.start_service("sh", "-c", "echo root-secret-line; exec sleep 747405", "--name", "rootsvc")
    svc = pmon.start_service("sh", "-c", "echo nobody-out; echo nobody-err >&2; exec sleep 747406",
                             "--name", "nob", "--user", "nobody", cwd="/tmp")
    pmon.wait_for(lambda: "nobody-err" in Path(svc["err_log"]).read_text(), message="nob's output")
    for d in (pmon.home, pmon.home / "run"):
        os.chmod(d, 0o711)  # nobody may reach the socket, and nothing else
    st = os.stat(pmon.log_dir)
    assert st.st_uid == 0 and st.st_mode & 0o077 == 0, "the log dir must be closed to nobody"

    cmd, kw = as_nobody(pmon, python, "log", "-n", "5")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw)
    assert proc.returncode == 0, proc.stderr
    assert body_lines(proc.stdout) == ["out | nobody-out", "err | nobody-err"]  # only its own service
    assert "root-secret-line" not in proc.stdout
    cmd, kw = as_nobody(pmon, python, "log", "rootsvc")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw)
    assert proc.returncode == 1 and "no service 'rootsvc'" in proc.stderr and "root-secret" not in proc.stdout

    cmd, kw = as_nobody(pmon, python, "logf", "nob", "-n", "1")
    follow = logf(pmon, cmd=cmd, **kw)
    try:
        follow.wait_for("out | nobody-out")
        follow.wait_for("err | nobody-err")
    finally:
        follow.stop()

    # A file of root's in place of nob's log (as a --log path could name one): nobody is refused it.
    planted = Path(svc["out_log"] + ".new")
    planted.write_text("ROOT-ONLY\n")
    os.rename(planted, svc["out_log"])
    cmd, kw = as_nobody(pmon, python, "log", "nob", "--out")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw)
    assert proc.returncode == 1 and "belongs to root" in proc.stderr, proc.stderr
    assert "ROOT-ONLY" not in proc.stdout
    assert "ROOT-ONLY" in pmon.run("log", "nob", "--out").stdout  # root reads any regular file


def test_a_planted_symlink_is_never_followed(pmon: Any) -> None:
    secret = pmon.work / "secret.txt"
    secret.write_text("TARGET-CONTENT\n")
    logs = pmon.work / "plant"
    svc = pmon.start_service("sleep", "747407", "--name", "planted", "--log-dir", str(logs))
    live = Path(svc["out_log"])
    live.write_text("real line\n")
    Path(f"{live}.1").symlink_to(secret)  # a rotated file that is a symlink: the search stops there
    proc = pmon.run("log", "planted", "--out", check=False)
    assert proc.returncode == 1 and "symbolic link" in proc.stderr
    assert body_lines(proc.stdout) == ["out | real line"] and "TARGET" not in proc.stdout

    follow = logf(pmon, "planted", "--out", "-n", "0")
    try:
        pmon.wait_for(lambda: fds_to(pmon.daemon_pid(), str(live)), message="pmond to follow the log")
        live.unlink()
        live.symlink_to(secret)  # the live log replaced by a symlink while followed
        follow.wait_for("symbolic link", where="err")
        live.unlink()
        live.write_text("after the symlink\n")
        follow.wait_for("out | after the symlink")
        assert "TARGET" not in follow.out
    finally:
        follow.stop()
    live.unlink()
    live.symlink_to(secret)
    proc = pmon.run("log", "planted", check=False)
    assert proc.returncode == 1 and "TARGET" not in proc.stdout and "symbolic link" in proc.stderr
    answer = json.loads(request(pmon, "/v1/logs?select=planted&stream=out")[2])
    assert answer["services"][0]["logs"][0]["lines"] == [] and "TARGET" not in json.dumps(answer)


# following


def test_logf_follows_rotation_over_one_connection(pmon: Any) -> None:
    ticker = pmon.script("ticker", """
        import itertools, time
        for i in itertools.count():
            print(f"tick {i}", flush=True)
            time.sleep(0.05)
    """)
    svc = pmon.start_service(str(ticker), "--name", "ticker")
    out_log = Path(svc["out_log"])
    daemon = pmon.daemon_pid()
    follow = logf(pmon, "ticker", "--out")
    try:
        follow.wait_for("tick 3")
        assert sockets_of(follow.proc.pid) == 1
        assert not fds_to(follow.proc.pid, str(out_log)), "the CLI must not read the log itself"
        # copytruncate, as pmond's own rotation does it
        shutil.copy(out_log, f"{out_log}.1")
        os.truncate(out_log, 0)
        pmon.wait_for(lambda: out_log.stat().st_size > 0, message="the service to write again")
        after = int(out_log.read_text().split()[1])
        follow.wait_for(f"tick {after + 2}")
        # rename + create: the service keeps writing to the old file, a new one appears at the path
        os.rename(out_log, f"{out_log}.2")
        out_log.write_text("written to the new file\n")
        follow.wait_for("written to the new file")
        last = int(Path(f"{out_log}.2").read_text().split()[-1])
        follow.wait_for(f"tick {last}")  # and the rest of the renamed file, still written to
        assert sockets_of(follow.proc.pid) == 1 and follow.proc.poll() is None
        lines = [ln for ln in follow.out.splitlines() if ln.startswith("out | tick")]
        numbers = [int(ln.split()[-1]) for ln in lines]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), "lines repeated or out of order"
    finally:
        follow.stop()
    # The client gone, pmond lets go of what it followed.
    pmon.wait_for(lambda: not fds_to(daemon, f"{out_log}.2") and not fds_to(daemon, str(out_log)),
                  message="pmond to close the followed files")


def test_an_idle_timeout_does_not_cut_a_follow_and_pmond_stopping_ends_it(pmon: Any) -> None:
    env = dict(pmon.env, PMON2_HTTP_IDLE_TIMEOUT="0.3")
    svc = pmon.start_service("sleep", "747408", "--name", "quiet", env=env)
    follow = logf(pmon, "quiet", "--out")
    try:
        pmon.wait_for(lambda: fds_to(pmon.daemon_pid(), svc["out_log"]), message="pmond to follow the log")
        pmon.holds(lambda: follow.proc.poll() is None, 1.0, message="logf still connected past the idle timeout")
        with open(svc["out_log"], "a") as fh:
            fh.write("late line\n")
        follow.wait_for("out | late line")
        pmon.run("daemon", "stop")
        deadline = time.monotonic() + 10
        while follow.pump(max(deadline - time.monotonic(), 0)) and time.monotonic() < deadline:
            pass
        assert follow.proc.wait(timeout=5) == 1 and "pmon2: pmond ended the stream" in follow.err, follow.err
    finally:
        follow.stop()


def test_logf_json_and_the_raw_stream(pmon: Any) -> None:
    svc = pmon.start_service("sh", "-c", "echo first; exec sleep 747409", "--name", "js")
    pmon.wait_for(lambda: "first" in Path(svc["out_log"]).read_text(), message="the first line")
    follow = logf(pmon, "js", "--json", "-n", "5")
    try:
        follow.wait_for('"text": "first"')
        with open(svc["out_log"], "a") as fh:
            fh.write("second\n")
        follow.wait_for('"text": "second"')
        rows = [json.loads(ln) for ln in follow.out.splitlines()]
        assert rows == [{"service": "js", "stream": "out", "text": "first"},
                        {"service": "js", "stream": "out", "text": "second"}]
    finally:
        follow.stop()
    # On the wire: chunked NDJSON, the first value being the answer without follow.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(pmon.socket))
        s.sendall(b"GET /v1/services/js/logs?follow=true&lines=1 HTTP/1.1\r\nHost: pmon2\r\n\r\n")
        data = b""
        while b"\n\r\n" not in data.partition(b"\r\n\r\n")[2]:  # a chunk of whole lines has come
            data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"application/x-ndjson" in head.lower()
    size, _, rest = body.partition(b"\r\n")
    first = json.loads(rest[:int(size, 16)])
    assert first == {"services": [{"id": svc["id"], "name": "js", "logs": [
        {"stream": "out", "file": svc["out_log"], "combined": False, "lines": ["second"], "truncated": False,
         "error": None}, {"stream": "err", "file": svc["err_log"], "combined": False, "lines": [],
                          "truncated": False, "error": None}]}]}
