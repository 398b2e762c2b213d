"""Readiness probes (daemon/probes.py) against real local servers and processes, on loopback only."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pmon2.daemon import probes, watch
from pmon2.daemon.probes import ExecProbe, HttpProbe, Probe, Result, TcpProbe, parse, wait_ready

SRC = str(Path(probes.__file__).resolve().parents[2])
NOBODY = 65534


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def stat_of(pid: int) -> list[str] | None:
    """Fields after the command name of /proc/<pid>/stat: state at 0, ppid at 1, pgrp at 2."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def children() -> set[int]:
    """Our child processes, zombies included (a zombie child is one we failed to reap)."""
    me = str(os.getpid())
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and (stat_of(int(p)) or ["", ""])[1] == me}


def running_with(*argv: str) -> list[int]:
    """Live (not zombie) processes whose command line is exactly argv."""
    want = "\0".join(argv).encode() + b"\0"
    found = []
    for p in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline == want and (stat_of(int(p)) or ["Z"])[0] not in ("Z", "X"):
            found.append(int(p))
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def unreaped() -> Iterator[None]:
    """Fails a test that leaves a child of ours behind, running or a zombie."""
    before = children()
    yield
    assert children() - before == set()
    assert probes._children == set()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so no one else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# parse


@pytest.mark.parametrize(("spec", "kind", "hosts", "port"), [
    ("tcp://127.0.0.1:8080", TcpProbe, [("127.0.0.1", socket.AF_INET)], 8080),
    ("tcp://[::1]:1", TcpProbe, [("::1", socket.AF_INET6)], 1),
    ("tcp://localhost:65535", TcpProbe, [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)], 65535),
    ("http://10.1.2.3:80", HttpProbe, [("10.1.2.3", socket.AF_INET)], 80),
    ("https://LocalHost:443/x", HttpProbe, [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)], 443),
])
def test_parse_network_probes(spec: str, kind: type, hosts: list[tuple[str, int]], port: int) -> None:
    probe = parse(spec)
    assert type(probe) is kind
    assert probe.spec == spec
    assert (probe.hosts, probe.port) == (hosts, port)  # type: ignore[attr-defined]


def test_parse_http_paths_and_kinds() -> None:
    probe = parse("http://127.0.0.1:80")
    assert isinstance(probe, HttpProbe)
    assert (probe.kind, probe.path, probe.host_header, probe.tls) == ("http", "/", "127.0.0.1:80", False)
    probe = parse("https://[::1]:8443/health?full=1#frag")
    assert isinstance(probe, HttpProbe)
    assert (probe.kind, probe.path, probe.host_header, probe.tls) == ("https", "/health?full=1", "[::1]:8443", True)
    assert parse("tcp://127.0.0.1:1").kind == "tcp"
    assert parse("tcp://127.0.0.1:1/").kind == "tcp"  # a lone slash is harmless


def test_parse_exec_splits_with_shell_rules() -> None:
    probe = parse("""exec:sh -c 'curl -fs "http://x/"' --x="a b" """)
    assert isinstance(probe, ExecProbe)
    assert probe.kind == "exec"
    assert probe.argv == ["sh", "-c", 'curl -fs "http://x/"', "--x=a b"]
    assert repr(probe).startswith("<ExecProbe 'exec:sh")


@pytest.mark.parametrize(("spec", "reason"), [
    ("ftp://127.0.0.1:21", "use tcp://HOST:PORT"),
    ("127.0.0.1:80", "use tcp://HOST:PORT"),
    ("TCP://127.0.0.1:80", "use tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "give HOST:PORT"),
    ("tcp://:80", "give HOST:PORT"),
    ("tcp://127.0.0.1:0", "give HOST:PORT"),
    ("tcp://127.0.0.1:65536", "give HOST:PORT"),
    ("tcp://127.0.0.1:\uff18\uff10", "give HOST:PORT"),  # fullwidth digits
    ("tcp://127.0.0.1:http", "give HOST:PORT"),
    ("tcp://example.com:80", "HOST must be an IP address or localhost (pmond resolves no names)"),
    ("http://db.internal:80/", "HOST must be an IP address or localhost"),
    ("tcp://127.1:80", "HOST must be an IP address"),
    ("tcp://[fe80::1%eth0]:80", "HOST must be an IP address"),
    ("tcp://[127.0.0.1]:80", "HOST must be an IP address"),
    ("tcp://::1:80", "write an IPv6 address in brackets, such as tcp://[::1]:80"),
    ("http://user@127.0.0.1:80/", "HOST must be an IP address"),
    ("tcp://127.0.0.1:80/x", "a tcp probe has no path"),
    ("http://127.0.0.1:80/a b", "printable ASCII"),
    ("http://127.0.0.1:80/é", "printable ASCII"),
    ("exec:", "give a command after exec:"),
    ("exec:   ", "give a command after exec:"),
    ("exec:echo 'open", "no closing quotation"),
])
def test_parse_refuses_with_one_line(spec: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(spec)
    message = str(info.value)
    assert reason in message
    assert message.startswith(repr(spec))
    assert "\n" not in message


def test_parse_refuses_a_non_string() -> None:
    with pytest.raises(ValueError, match="a probe is a string, not int"):
        parse(8080)  # type: ignore[arg-type]


def test_check_refuses_a_timeout_of_zero() -> None:
    with pytest.raises(ValueError, match="timeout must be more than 0"):
        run(parse("tcp://127.0.0.1:1").check(timeout=0))


# tcp


def test_tcp_connects_and_closes_at_once() -> None:
    async def main() -> tuple[Result, bytes, int]:
        got: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.append(await reader.read())  # b"" once the probe closes: it sent nothing
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            result = await parse(f"tcp://127.0.0.1:{port}").check(timeout=2)
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
        return result, got[0], port

    result, sent, port = run(main())
    assert result == Result(True, f"connected to 127.0.0.1:{port}")
    assert sent == b""


def test_tcp_refused(refused_port: int) -> None:
    assert run(parse(f"tcp://127.0.0.1:{refused_port}").check(timeout=2)) == Result(False, "connection refused")


def test_tcp_localhost_tries_ipv6_after_ipv4() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6) as listener:
        try:
            listener.bind(("::1", 0))
        except OSError:
            pytest.skip("no ::1 here")
        port = listener.getsockname()[1]
        with socket.socket() as v4:
            try:
                v4.bind(("127.0.0.1", port))  # keeps IPv4 refusing on this port
            except OSError:
                pytest.skip("the port is taken on 127.0.0.1")
            listener.listen()
            assert run(parse(f"tcp://localhost:{port}").check(timeout=2)) == Result(True, f"connected to [::1]:{port}")


def test_tcp_times_out_on_a_full_accept_queue() -> None:
    """A listener that never accepts, its queue full: Linux drops further SYNs, so a connect hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            time.sleep(0.1)
            started = time.monotonic()
            result = run(parse(f"tcp://127.0.0.1:{port}").check(timeout=0.3))
            elapsed = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert result == Result(False, "timed out after 0.3 s")
    assert 0.25 < elapsed < 2


# http


async def http_server(answer: bytes | None, heads: list[bytes] | None = None,
                      close_at_once: bool = False) -> asyncio.Server:
    """A loopback server answering every request with `answer` (None: reads it and never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if close_at_once:
                return
            head = await reader.readuntil(b"\r\n\r\n") if heads is not None else await reader.read(1024)
            if heads is not None:
                heads.append(head)
            if answer is None:
                await reader.read()  # until the probe gives up and closes
                return
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def http_check(answer: bytes | None, path: str = "/", timeout: float = 2.0,
               close_at_once: bool = False) -> tuple[Result, list[bytes], int]:
    async def main() -> tuple[Result, list[bytes], int]:
        heads: list[bytes] = []
        server = await http_server(answer, heads, close_at_once)
        port = server.sockets[0].getsockname()[1]
        async with server:
            result = await parse(f"http://127.0.0.1:{port}{path}").check(timeout=timeout)
        return result, heads, port

    return run(main())


def test_http_200_is_ready_and_the_request_is_minimal() -> None:
    result, heads, port = http_check(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", path="/health?deep=1")
    assert result == Result(True, "HTTP 200")
    lines = heads[0].decode().split("\r\n")
    assert lines[0] == "GET /health?deep=1 HTTP/1.1"
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["connection"] == "close"


@pytest.mark.parametrize(("answer", "result"), [
    (b"HTTP/1.1 204 No Content\r\n\r\n", Result(True, "HTTP 204")),
    (b"HTTP/1.0 200 OK\r\n\r\n", Result(True, "HTTP 200")),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", Result(False, "HTTP 503")),
    (b"HTTP/1.1 301 Moved Permanently\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n", Result(False, "HTTP 301")),
    (b"HTTP/1.1 404 Not Found\r\n\r\n", Result(False, "HTTP 404")),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", Result(True, "HTTP 200")),
    (b"", Result(False, "connection closed without an answer")),
    (b"SSH-2.0-OpenSSH_9.2\r\n", Result(False, "not an HTTP answer: b'SSH-2.0-OpenSSH_9.2\\r\\n'")),
])
def test_http_answers(answer: bytes, result: Result) -> None:
    assert http_check(answer)[0] == result


def test_http_closed_before_reading_the_request() -> None:
    result = http_check(b"", close_at_once=True)[0]
    assert not result.ok
    assert result.detail in ("connection closed without an answer", "connection reset")


def test_http_no_answer_times_out() -> None:
    started = time.monotonic()
    result, heads, _ = http_check(None, timeout=0.3)
    assert result == Result(False, "timed out after 0.3 s")
    assert heads  # it connected and asked
    assert time.monotonic() - started < 2


def test_http_refused(refused_port: int) -> None:
    result = run(parse(f"http://127.0.0.1:{refused_port}/").check(timeout=2))
    assert result == Result(False, "connection refused")


# https (a self-signed certificate made by the openssl command)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


class HttpsServer:
    """A threaded HTTPS server on loopback (threads are fine in tests; the server is not pmond)."""

    def __init__(self, cert: str, key: str, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        head = b""
                        while b"\r\n\r\n" not in head:
                            chunk = tls.recv(4096)
                            if not chunk:
                                break
                            head += chunk
                        tls.sendall(self.answer)
                except OSError:
                    pass  # a client that refused the certificate

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def https_server(certificate: tuple[str, str]) -> Iterator[HttpsServer]:
    server = HttpsServer(*certificate)
    yield server
    server.close()


def test_https_verifies_the_certificate(https_server: HttpsServer, certificate: tuple[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "_tls_context", None)
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent")  # a system store without our certificate
    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent")
    result = run(parse(f"https://127.0.0.1:{https_server.port}/").check(timeout=5))
    assert result == Result(False, "TLS: certificate verify failed: self-signed certificate")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_200_with_a_trusted_certificate(https_server: HttpsServer, certificate: tuple[str, str],
                                              monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setattr(probes, "_tls_context", None)
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    result = run(parse(f"https://{host}:{https_server.port}/ready").check(timeout=5))
    assert result == Result(True, "HTTP 200")


def test_https_to_a_plain_server_fails() -> None:
    async def main() -> Result:
        server = await http_server(b"HTTP/1.1 400 Bad Request\r\n\r\n", heads=None)  # answers any bytes
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await parse(f"https://127.0.0.1:{port}/").check(timeout=2)

    result = run(main())
    assert not result.ok
    assert result.detail.startswith("TLS: ")


def test_no_ssl_and_no_thread_until_an_https_probe(https_server: HttpsServer, certificate: tuple[str, str]) -> None:
    """As in pmond: `ssl` is blocked before asyncio loads, tcp/http/exec probes leave it unloaded and start
    no thread; an https probe loads it and works."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules.setdefault("ssl", None)  # what pmond's entry point does
        import asyncio, json, threading
        from pmon2.daemon import probes, watch

        async def handle(reader, writer):
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
            await writer.drain()
            writer.close()

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            out = {{"results": []}}
            for spec in (f"tcp://127.0.0.1:{{port}}", f"http://127.0.0.1:{{port}}/", "exec:true"):
                out["results"].append((await probes.parse(spec).check(timeout=5)).ok)
            out["ssl_before"] = "_ssl" in sys.modules or sys.modules.get("ssl") is not None
            out["threads_before"] = threading.active_count()
            result = await probes.parse("https://127.0.0.1:{https_server.port}/").check(timeout=5)
            out["https"] = [result.ok, result.detail]
            out["ssl_after"] = "_ssl" in sys.modules
            server.close()
            print(json.dumps(out))

        asyncio.run(main())
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "SSL_CERT_FILE": certificate[0]}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"results": [True, True, True], "ssl_before": False, "threads_before": 1,
                   "https": [True, "HTTP 200"], "ssl_after": True}


# exec


@pytest.mark.usefixtures("unreaped")
def test_exec_exit_0_and_1() -> None:
    assert run(parse("exec:true").check(timeout=5)) == Result(True, "exit code 0")
    assert run(parse("exec:sh -c 'exit 1'").check(timeout=5)) == Result(False, "exit code 1")
    assert run(parse("exec:sh -c 'kill -TERM $$'").check(timeout=5)) == Result(False, "killed by SIGTERM")


@pytest.mark.usefixtures("unreaped")
def test_exec_timeout_kills_its_whole_group_and_reaps() -> None:
    started = time.monotonic()
    result = run(parse("exec:sh -c 'sleep 41.25 & sleep 41.5'").check(timeout=0.2))
    elapsed = time.monotonic() - started
    assert result == Result(False, "timed out after 0.2 s")
    assert elapsed < 2
    assert wait_until(lambda: not running_with("sleep", "41.25") and not running_with("sleep", "41.5"))


@pytest.mark.usefixtures("unreaped")
def test_exec_leaves_nothing_running_behind() -> None:
    assert run(parse("exec:sh -c 'sleep 42.25 & exit 0'").check(timeout=5)) == Result(True, "exit code 0")
    assert wait_until(lambda: not running_with("sleep", "42.25"))


@pytest.mark.usefixtures("unreaped")
def test_exec_runs_in_its_own_session_with_no_stdio(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (f"a=$(readlink /proc/$$/fd/0) b=$(readlink /proc/$$/fd/1) c=$(readlink /proc/$$/fd/2); "
              f"ps -o sid= -o pgid= -o pid= -p $$ > {out}; echo $a $b $c >> {out}")
    assert run(parse(f"exec:sh -c '{script}'").check(timeout=5)).ok
    sid, pgid, pid, *fds = out.read_text().split()
    assert sid == pgid == pid
    assert fds == ["/dev/null"] * 3


@pytest.mark.usefixtures("unreaped")
def test_exec_gets_the_service_env_and_cwd(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "READY_TOKEN": "x y"}
    probe = parse("""exec:sh -c 'test "$READY_TOKEN" = "x y" && test "$(pwd -P)" = "$1"' - """ + str(tmp_path))
    assert run(probe.check(timeout=5, env=env, cwd=str(tmp_path))).ok
    assert not run(probe.check(timeout=5, env=env, cwd="/")).ok
    assert not run(probe.check(timeout=5, cwd=str(tmp_path))).ok  # pmond's env has no READY_TOKEN


@pytest.mark.usefixtures("unreaped")
def test_exec_looks_the_command_up_in_the_service_path(tmp_path: Path) -> None:
    tool = tmp_path / "ready-tool"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    assert run(parse("exec:ready-tool").check(timeout=5, env={"PATH": str(tmp_path)})).ok


@pytest.mark.usefixtures("unreaped")
def test_exec_that_cannot_start() -> None:
    assert run(parse("exec:/nonexistent/ready").check(timeout=5)) == Result(
        False, "cannot run /nonexistent/ready: no such file or directory")
    result = run(parse("exec:true").check(timeout=5, cwd="/nonexistent"))
    assert result == Result(False, "cannot run true: /nonexistent: no such file or directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.usefixtures("unreaped")
def test_exec_runs_as_the_service_user_and_enters_cwd_as_it(tmp_path: Path) -> None:
    user = (NOBODY, NOBODY, [NOBODY])
    probe = parse("exec:sh -c 'test $(id -u) = 65534 && test $(id -g) = 65534 && test \"$(id -G)\" = 65534'")
    assert run(probe.check(timeout=5, user=user)) == Result(True, "exit code 0")
    private = tmp_path / "private"
    (private / "inside").mkdir(parents=True)
    private.chmod(0o700)  # root's: nobody cannot enter, so the probe must not start in there
    assert run(probe.check(timeout=5, user=user, cwd=str(private / "inside"))) == Result(
        False, f"cannot run sh: cannot enter {private / 'inside'} as uid 65534")
    assert run(probe.check(timeout=5, user=user, cwd="/")).ok


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the refusal when pmond is not root")
def test_exec_as_another_user_needs_root() -> None:
    result = run(parse("exec:true").check(timeout=5, user=(os.geteuid() + 1, 0, [])))
    assert result == Result(False, f"cannot run as uid {os.geteuid() + 1}: pmond does not run as root")


@pytest.mark.usefixtures("unreaped")
def test_exec_cancelled_is_killed_and_reaped() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(parse("exec:sleep 43.25").check(timeout=30))
        await asyncio.sleep(0.3)
        assert running_with("sleep", "43.25")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert not running_with("sleep", "43.25")


@pytest.mark.parametrize(("pidfd_info", "hook", "detail"), [
    (True, False, "exit code 3"),  # Linux 6.15+: the pidfd keeps the status
    (False, True, "exit code 3"),  # older: pmond's reaper kept it for us
    (False, False, "exit status unknown"),
])
@pytest.mark.usefixtures("unreaped")
def test_exec_reaped_by_someone_else(monkeypatch: pytest.MonkeyPatch, pidfd_info: bool, hook: bool,
                                     detail: str) -> None:
    """As a subreaper, pmond's SIGCHLD handler may reap a probe before the probe's own pidfd callback."""
    if pidfd_info and not watch.PidfdInfo.probe():
        pytest.skip("no PIDFD_INFO_EXIT on this kernel")
    stolen: dict[int, int] = {}
    steals = []
    real_waitpid = os.waitpid

    def reaper_was_quicker(pid: int, options: int) -> tuple[int, int]:
        if pid in probes._children and pid not in steals:
            steals.append(pid)
            stolen[pid] = real_waitpid(pid, 0)[1]
            raise ChildProcessError(10, "No child processes")
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", reaper_was_quicker)
    monkeypatch.setattr(watch.PidfdInfo, "supported", pidfd_info)
    if hook:
        monkeypatch.setattr(probes, "reaped_status",
                            lambda pid: watch.ExitStatus.from_wait_status(stolen.pop(pid), "waitpid"))
    assert run(parse("exec:sh -c 'exit 3'").check(timeout=5)) == Result(False, detail)
    assert len(steals) == 1


# wait_ready


class Scripted(Probe):
    """A fake probe: answers from a list (the last one repeats), records when and with what it was asked."""

    def __init__(self, *answers: Result) -> None:
        super().__init__("scripted")
        self.answers = list(answers)
        self.calls: list[tuple[float, dict[str, Any]]] = []

    async def check(self, **kwargs: Any) -> Result:  # type: ignore[override]
        self.calls.append((asyncio.get_running_loop().time(), kwargs))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_wait_ready_succeeds_once_a_server_listens() -> None:
    async def main() -> tuple[Result, float, int]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            asyncio.get_running_loop().call_later(0.5, sock.listen)
            started = time.monotonic()
            result = await wait_ready(parse(f"tcp://127.0.0.1:{port}"), deadline_s=5)
            return result, time.monotonic() - started, port

    result, elapsed, port = run(main())
    assert result == Result(True, f"connected to 127.0.0.1:{port}")
    assert 0.5 <= elapsed < 1.5


def test_wait_ready_gives_up_at_the_deadline(refused_port: int) -> None:
    started = time.monotonic()
    result = run(wait_ready(parse(f"tcp://127.0.0.1:{refused_port}"), deadline_s=0.5))
    elapsed = time.monotonic() - started
    assert result == Result(False, "not ready after 0.5 s: connection refused")
    assert 0.5 <= elapsed < 1


def test_wait_ready_returns_when_stop_is_set(refused_port: int) -> None:
    async def main() -> tuple[Result, float]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        started = time.monotonic()
        result = await wait_ready(parse(f"tcp://127.0.0.1:{refused_port}"), deadline_s=10, stop=stop)
        return result, time.monotonic() - started

    result, elapsed = run(main())
    assert result == Result(False, "the process exited")
    assert elapsed < 0.6


@pytest.mark.usefixtures("unreaped")
def test_wait_ready_stop_kills_a_running_exec_probe() -> None:
    async def main() -> tuple[Result, float]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        started = time.monotonic()
        result = await wait_ready(parse("exec:sleep 44.25"), deadline_s=10, stop=stop)
        return result, time.monotonic() - started

    result, elapsed = run(main())
    assert result == Result(False, "the process exited")
    assert elapsed < 1
    assert not running_with("sleep", "44.25")


def test_wait_ready_with_stop_already_set_makes_no_attempt() -> None:
    async def main() -> tuple[Result, Scripted]:
        stop = asyncio.Event()
        stop.set()
        probe = Scripted(Result(True, "fine"))
        return await wait_ready(probe, deadline_s=10, stop=stop), probe

    result, probe = run(main())
    assert result == Result(False, "the process exited")
    assert probe.calls == []


def test_wait_ready_makes_one_attempt_with_no_time_left() -> None:
    probe = Scripted(Result(True, "fine"))
    assert run(wait_ready(probe, deadline_s=0)) == Result(True, "fine")
    assert probe.calls[0][1]["timeout"] == probes.MIN_ATTEMPT
    probe = Scripted(Result(False, "HTTP 500"))
    assert run(wait_ready(probe, deadline_s=0)) == Result(False, "not ready after 0 s: HTTP 500")
    assert len(probe.calls) == 1


def test_wait_ready_pauses_grow_to_one_second_and_kwargs_pass_through() -> None:
    probe = Scripted(Result(False, "exit code 1"))
    user = (1000, 1000, [1000])
    result = run(wait_ready(probe, deadline_s=2.7, env={"A": "1"}, cwd="/srv", user=user, timeout=0.5))
    assert result == Result(False, "not ready after 2.7 s: exit code 1")
    times = [t for t, _ in probe.calls]
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(times)]
    assert gaps[:5] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert all({**kwargs, "timeout": 0} == {"env": {"A": "1"}, "cwd": "/srv", "user": user, "timeout": 0}
               for _, kwargs in probe.calls)
    timeouts = [kwargs["timeout"] for _, kwargs in probe.calls]
    assert timeouts[:5] == [0.5] * 5
    assert all(probes.MIN_ATTEMPT <= t <= 0.5 for t in timeouts)


def test_wait_ready_cuts_an_attempt_to_the_deadline() -> None:
    probe = Scripted(Result(False, "HTTP 503"))
    run(wait_ready(probe, deadline_s=0.3))  # default attempt timeout: 5 s
    assert 0.25 < probe.calls[0][1]["timeout"] <= 0.3


def test_wait_ready_passes_after_failures() -> None:
    probe = Scripted(Result(False, "HTTP 503"), Result(False, "HTTP 503"), Result(True, "HTTP 200"))
    assert run(wait_ready(probe, deadline_s=5)) == Result(True, "HTTP 200")
    assert len(probe.calls) == 3
