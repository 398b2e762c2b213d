"""pmond's HTTP transport under malformed, hostile and slow clients: every request gets an answer (never
500, never a traceback in pmond.log), and pmond's memory and its answer to root stay bounded.

Raw bytes go over the Unix socket here; the CLI is only used to set things up and to check that pmond
still serves. Timeouts are shortened through PMON2_HTTP_* (server.Limits.from_env).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LOOSE = "4xx"  # the API's own validation decides the exact status: any 4xx will do
SHORT_TIMEOUTS = {"PMON2_HTTP_IDLE_TIMEOUT": "1", "PMON2_HTTP_BODY_TIMEOUT": "1"}
MIB = 1 << 20


# raw HTTP over the socket


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A connection to pmond; waits while its listen backlog is full (connect() fails with EAGAIN then)."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        while True:
            try:
                sock.connect(str(path))
                return sock
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
    except BaseException:
        sock.close()
        raise


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int | None, Any, bool]:
    """Read one response: (status, JSON body or None, whether pmond closed the connection after it).
    Status None: the connection ended without a response."""
    deadline = time.monotonic() + timeout
    buf = b""
    closed = False
    need: int | None = None
    while need is None or len(buf) < need:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""  # Linux reports ECONNRESET after the data when pmond closed with input unread
        except TimeoutError:
            break
        if not chunk:
            closed = True
            break
        buf += chunk
        head, sep, _ = buf.partition(b"\r\n\r\n")
        if sep and need is None:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), 0)
            need = len(head) + 4 + length
    if not buf.startswith(b"HTTP/1.1 "):
        return None, None, closed
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"\r\nconnection: close" in head.lower() and not closed:
        closed = wait_closed(sock, deadline - time.monotonic())
    try:
        data = json.loads(body) if body.strip() else None
    except ValueError:
        data = body
    return status, data, closed


def wait_closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(max(timeout, 0.001))
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def exchange(path: Path, data: bytes, timeout: float = 10.0) -> tuple[int | None, Any, bool]:
    """Send raw bytes on a fresh connection and read the one response."""
    with connect(path, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # pmond answered and closed before taking it all: its answer is still there to read
        return read_response(sock, timeout)


def request(method: str, target: str, body: bytes | str = b"", headers: str = "") -> bytes:
    """A well-formed request that asks pmond to close after answering."""
    raw = body.encode() if isinstance(body, str) else body
    return (f"{method} {target} HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n{headers}"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


def post(target: str, body: Any) -> bytes:
    return request("POST", target, body if isinstance(body, str | bytes) else json.dumps(body))


def head(extra: str, method: str = "POST", target: str = "/v1/services") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: pmon2\r\n{extra}\r\n".encode()


def chunked(*chunks: bytes) -> bytes:
    return head("Transfer-Encoding: chunked\r\n") + b"".join(chunks)


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def socket_fds(pid: int) -> int:
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def tracebacks(pmon: Any) -> str:
    text = (pmon.log_dir / "pmond.log").read_text(errors="replace")
    return text[text.find("Traceback"):][:2000] if "Traceback" in text else ""


# the tables

ARGV = ["sleep", "31977"]
DEEP_OBJECT = '{"a":' * 33 + "1" + "}" * 33  # 33 levels: far below Python's recursion limit
DEEP_IN_OBJECT = '{"argv": ' + "[" * 900 + "]" * 900 + "}"

MALFORMED: list[tuple[str, bytes, int | str]] = [
    # request line
    ("garbage request line", b"GARBAGE\r\n\r\n", 400),
    ("method alone", b"GET\r\n\r\n", 400),
    ("no HTTP version", b"GET /v1/version\r\nHost: pmon2\r\n\r\n", 400),
    ("bad HTTP version", b"GET /v1/version HTTP/x.y\r\nHost: pmon2\r\n\r\n", 400),
    ("HTTP/2.0 over HTTP/1 framing", b"GET /v1/version HTTP/2.0\r\nHost: pmon2\r\n\r\n", 505),
    ("blank lines only", b"\r\n\r\n", 400),
    ("space in the target", b"GET /v1/serv ices HTTP/1.1\r\nHost: pmon2\r\n\r\n", 400),
    ("non-ASCII target", "GET /v1/services/\u00b2 HTTP/1.1\r\nHost: pmon2\r\n\r\n".encode(), 400),
    ("non-ASCII target, Arabic digit", "GET /v1/events?limit=\u0663 HTTP/1.1\r\nHost: pmon2\r\n\r\n".encode(), 400),
    ("control byte in the target", b"GET /v1/\x01 HTTP/1.1\r\nHost: pmon2\r\n\r\n", 400),
    # headers
    ("HTTP/1.1 without Host", b"GET /v1/version HTTP/1.1\r\n\r\n", 400),
    ("two Host headers", b"GET /v1/version HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("header line without a colon", head("Content-Length 2\r\n"), 400),
    ("space before the colon", head("Content-Length : 2\r\n"), 400),
    ("bad header name", head("X(y): z\r\n"), 400),
    ("NUL in a header value", head("X-A: a\x00b\r\n"), 400),
    ("bare CR in a header value", head("X-A: a\rb\r\n"), 400),
    ("head incomplete beyond the limit", head("X-A: " + "a" * 200_000 + "\r\n"), 431),
    ("head endless", b"GET /v1/version HTTP/1.1\r\nHost: pmon2\r\nX-A: " + b"a" * 100_000, 431),
    ("thousands of headers", head("X-A: b\r\n" * 30_000), 431),
    # Content-Length
    ("negative Content-Length", head("Content-Length: -1\r\n"), 400),
    ("non-numeric Content-Length", head("Content-Length: abc\r\n"), 400),
    ("Content-Length with a space inside", head("Content-Length: 1 2\r\n"), 400),
    ("conflicting Content-Lengths", head("Content-Length: 1\r\nContent-Length: 2\r\n"), 400),
    ("5,000-digit Content-Length", head("Content-Length: " + "9" * 5000 + "\r\n"), 400),
    ("Content-Length just over 4 MiB", head("Content-Length: 4194305\r\n"), 413),
    ("Content-Length of a terabyte", head("Content-Length: 1099511627776\r\n"), 413),
    ("Content-Length and chunked",
     head("Content-Length: 2\r\nTransfer-Encoding: chunked\r\n") + b"2\r\n{}\r\n0\r\n\r\n", 400),
    # chunked bodies
    ("unknown transfer coding", head("Transfer-Encoding: gzip\r\n"), 501),
    ("bad chunk size", chunked(b"zz\r\n{}\r\n0\r\n\r\n"), 400),
    ("negative chunk size", chunked(b"-2\r\n{}\r\n0\r\n\r\n"), 400),
    ("huge chunk size", chunked(b"f" * 30 + b"\r\n"), 400),
    ("chunk without its CRLF", chunked(b"2\r\n{}XX0\r\n\r\n"), 400),
    ("chunks over 4 MiB", chunked(*[b"100000\r\n" + b" " * MIB + b"\r\n"] * 5, b"0\r\n\r\n"), 413),
    ("chunked array body", head("Transfer-Encoding: chunked\r\nConnection: close\r\n") + b"2\r\n[]\r\n0\r\n\r\n", 400),
    # routing (the API's answer, through the transport)
    ("unknown method", request("BREW", "/v1/services"), 405),
    ("lower-case method", request("get", "/v1/services"), 405),
    ("GET on a POST endpoint", request("GET", "/v1/daemon/shutdown"), 405),
    ("unknown path", request("GET", "/v2/nothing"), 404),
    # bodies that are not a JSON object
    ("array body", post("/v1/services", "[]"), 400),
    ("string body", post("/v1/services", '"run"'), 400),
    ("number body", post("/v1/services", "42"), 400),
    ("null body", post("/v1/services", "null"), 400),
    ("true body", post("/v1/services", "true"), 400),
    ("array body on stop", post("/v1/services/keep/stop", "[true]"), 400),
    ("unclosed object", post("/v1/services", "{"), 400),
    ("missing value", post("/v1/services", '{"argv":}'), 400),
    ("trailing garbage", post("/v1/services", "{} x"), 400),
    ("single quotes", post("/v1/services", "{'argv': ['sleep']}"), 400),
    ("invalid UTF-8", post("/v1/services", b'{"argv": ["\xff\xfe"]}'), 400),
    ("UTF-8 BOM", post("/v1/services", b"\xef\xbb\xbf{}"), 400),
    ("100,000 nested arrays", post("/v1/services", "[" * 100_000), 400),
    ("100,000 nested objects", post("/v1/services", '{"a":' * 100_000), 400),
    ("33 nested objects", post("/v1/services", DEEP_OBJECT), 400),
    ("900 nested arrays in a field", post("/v1/services", DEEP_IN_OBJECT), 400),
    ("5,000-digit integer", post("/v1/services", '{"log_keep": ' + "7" * 5000 + "}"), 400),
    ("integer over 64 bits", post("/v1/services", {"argv": ARGV, "log_keep": 1 << 64}), 400),
    ("NaN", post("/v1/services", '{"argv": ["sleep", "1"], "min_uptime": NaN}'), 400),
    ("-Infinity", post("/v1/services", '{"argv": ["sleep", "1"], "min_uptime": -Infinity}'), 400),
    ("log_max_size 1e400", post("/v1/services", '{"argv": ["sleep", "1"], "log_max_size": 1e400}'), 400),
    ("lone surrogate escape", post("/v1/services", '{"argv": ["sleep", "1"], "name": "\\ud800"}'), 400),
    ("lone surrogate in UTF-8", post("/v1/services", b'{"argv": ["sleep", "1"], "name": "\xed\xa0\x80"}'), 400),
]

SLOW: list[tuple[str, bytes, int]] = [
    ("nothing sent", b"", 408),
    ("half a request line", b"GET /v1/ver", 408),
    ("head without its blank line", b"GET /v1/version HTTP/1.1\r\nHost: pmon2\r\n", 408),
    ("body shorter than Content-Length", head("Content-Length: 10\r\n") + b'{"a"', 408),
    ("chunked body that stops", chunked(b"2\r\n{}\r\n"), 408),
]

# Field types and references: pmond's API validation (api.py, spec.py) gives these their exact status.
BAD_FIELDS: list[tuple[str, bytes]] = [
    ("name as a list", post("/v1/services", {"argv": ARGV, "name": ["a"]})),
    ("name as an int", post("/v1/services", {"argv": ARGV, "name": 5})),
    ("name empty", post("/v1/services", {"argv": ARGV, "name": ""})),
    ("argv as a string", post("/v1/services", {"argv": "sleep 1"})),
    ("argv empty", post("/v1/services", {"argv": []})),
    ("argv of ints", post("/v1/services", {"argv": [1, 2]})),
    ("no argv", post("/v1/services", {})),
    ("cwd as an int", post("/v1/services", {"argv": ARGV, "cwd": 5})),
    ("user as a list", post("/v1/services", {"argv": ARGV, "user": ["root"]})),
    ("env as a list", post("/v1/services", {"argv": ARGV, "env": ["A=1"]})),
    ("env value an int", post("/v1/services", {"argv": ARGV, "env": {"A": 1}})),
    ("kill_timeout as text", post("/v1/services", {"argv": ARGV, "kill_timeout": "soon"})),
    ("log_keep negative", post("/v1/services", {"argv": ARGV, "log_keep": -1})),
    ("stop_signal out of range", post("/v1/services", {"argv": ARGV, "stop_signal": 99999})),
    ("autorestart as text", post("/v1/services", {"argv": ARGV, "autorestart": "yes"})),
    ('"force": "false" on stop', post("/v1/services/keep/stop", {"force": "false"})),
    ("force as a list on stop", post("/v1/services/keep/stop", {"force": [True]})),
    ("signal as a list on reload", post("/v1/services/keep/reload", {"signal": ["HUP"]})),
    ("ref with a superscript digit", request("GET", "/v1/services/%C2%B2")),
    ("ref with an Arabic-Indic digit", request("GET", "/v1/services/%D9%A3")),
    ("stop a ref with a superscript digit", post("/v1/services/%C2%B2/stop", {})),
    ("ref that is not UTF-8", request("GET", "/v1/services/%FF%FE")),
    ("limit with a superscript digit", request("GET", "/v1/events?limit=%C2%B2")),
    ("limit with an Arabic-Indic digit", request("GET", "/v1/events?limit=%D9%A3")),
    ("limit negative", request("GET", "/v1/services/keep/events?limit=-1")),
    ("limit in exponent form", request("GET", "/v1/events?limit=1e3")),
    ("limit huge", request("GET", "/v1/events?limit=" + "9" * 5000)),
    ("show_env neither true nor false", request("GET", "/v1/services/keep?show_env=maybe")),
]


@pytest.fixture
def served(pmon) -> dict[str, Any]:
    """A pmond with short timeouts and one running service, `keep`."""
    pmon.env.update(SHORT_TIMEOUTS)
    keep = pmon.start_service(*ARGV, "--name", "keep")
    return keep | {"daemon": pmon.daemon_pid()}


def assert_unharmed(pmon: Any, served: dict[str, Any]) -> None:
    """The same pmond still serves, `ls` works, and `keep` still runs with the same pid; no traceback."""
    daemon = served["daemon"]
    assert pmon.daemon_pid() == daemon and pmon.is_alive(daemon), "pmond died or was replaced"
    [after] = [s for s in pmon.services() if s["name"] == "keep"]
    assert (after["status"], after["pid"]) == ("running", served["pid"]), after
    assert pmon.is_alive(served["pid"])
    assert not tracebacks(pmon), tracebacks(pmon)


def test_malformed_requests_are_answered(pmon, served):
    assert len(MALFORMED) + len(SLOW) >= 40
    wrong = []
    for name, data, expected in MALFORMED:
        status, body, closed = exchange(pmon.socket, data)
        if status != expected:
            wrong.append(f"{name}: {status} {body}, expected {expected}")
        elif not closed:
            wrong.append(f"{name}: {status}, but the connection stayed open")
        elif not (isinstance(body, dict) and isinstance(body.get("error", {}).get("message"), str)):
            wrong.append(f"{name}: {status} without a JSON error: {body!r}")
    assert not wrong, "\n".join(wrong)
    assert_unharmed(pmon, served)


def test_slow_clients_get_408(pmon, served):
    """With PMON2_HTTP_IDLE_TIMEOUT=1 and PMON2_HTTP_BODY_TIMEOUT=1."""
    socks = []
    try:
        started = time.monotonic()
        for _name, data, _expected in SLOW:
            sock = connect(pmon.socket)
            socks.append(sock)
            sock.sendall(data)
        pmon.wait_for(lambda: _poll(socks), timeout=10, message="the first 408")
        assert time.monotonic() - started >= 0.9, "answered before the 1 s timeout"
        for (name, _data, expected), sock in zip(SLOW, socks, strict=True):
            status, body, closed = read_response(sock, timeout=10.0)
            assert (status, closed) == (expected, True), (name, status, body)

        # Keep-alive: the idle timeout runs again from the end of each response.
        with connect(pmon.socket) as sock:
            sock.sendall(b"GET /v1/version HTTP/1.1\r\nHost: pmon2\r\n\r\n")
            status, body, closed = read_response(sock)
            assert (status, closed) == (200, False), body
            answered = time.monotonic()
            status, body, closed = read_response(sock, timeout=10.0)
            assert (status, closed) == (408, True), body
            assert time.monotonic() - answered >= 0.9
    finally:
        for sock in socks:
            sock.close()
    assert_unharmed(pmon, served)


def test_bad_fields_and_refs_get_4xx(pmon, served):
    # TODO(lead): tighten to the exact statuses once the API's validation is final.
    wrong = []
    for name, data in BAD_FIELDS:
        status, body, _closed = exchange(pmon.socket, data)
        if status is None or not 400 <= status < 500:
            wrong.append(f"{name}: {status} {body}")
    assert not wrong, "\n".join(wrong)
    assert_unharmed(pmon, served)


def test_arbitrary_json_never_gets_500(pmon):
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    keep = pmon.start_service(*ARGV, "--name", "keep")
    keys = ["argv", "name", "cwd", "env", "user", "log", "log_dir", "autorestart", "min_uptime", "kill_timeout",
            "stop_signal", "log_max_size", "log_keep", "log_compress", "force", "signal"]
    leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
              | st.text(max_size=20) | st.sampled_from(["sleep", "/", "-1", "9", "SIGTERM", "HUP", "nobody"]))
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    bodies = values | st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), values, max_size=6)
    targets = st.sampled_from(["/v1/services", "/v1/services/keep/stop", "/v1/services/keep/reload",
                               "/v1/services/nosuch/stop", "/v1/services/keep/flush", "/v1/flush"])

    @hypothesis.settings(max_examples=150, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(target=targets, body=bodies)
    def check(target: str, body: Any) -> None:
        status, answer, _closed = exchange(pmon.socket, post(target, body))
        assert status is not None, f"no answer to {target} {body!r}"
        assert status < 500, f"{status} {answer} for {target} {body!r}"

    daemon = pmon.daemon_pid()
    check()
    assert pmon.daemon_pid() == daemon and pmon.is_alive(daemon)
    assert any(s["name"] == "keep" for s in pmon.services()), keep
    assert not tracebacks(pmon), tracebacks(pmon)


def test_head_expect_and_pipelining(pmon):
    pmon.run("daemon", "start")
    status, body, closed = exchange(pmon.socket, request("HEAD", "/v1/version"))
    assert (status, body, closed) == (405, None, True)  # RFC 9110 §9.3.2: no body in the answer to HEAD

    with connect(pmon.socket) as sock:
        sock.sendall(head("Expect: 100-continue\r\nContent-Length: 2\r\n", target="/v1/services/nosuch/stop"))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"{}")
        status, body, closed = read_response(sock)
        assert (status, body["error"]["code"], closed) == (404, "not_found", False)

    with connect(pmon.socket) as sock:
        sock.sendall(b"GET /v1/version HTTP/1.1\r\nHost: a\r\n\r\n" * 3 + request("GET", "/v1/nothing"))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        assert re.findall(rb"HTTP/1\.1 (\d+) ", received) == [b"200", b"200", b"200", b"404"]
    assert not tracebacks(pmon), tracebacks(pmon)


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 550 sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_and_stalled_clients_cannot_exhaust_pmond(pmon, many_fds):
    """500 idle connections plus 50 half-sent 4 MiB bodies: pmond stays under 40 MiB, keeps at most 256
    connections (shedding the idle ones with 503), lets 4 bodies in (16 MiB budget) and refuses the
    rest with 503, and root's `ls` still answers within a second."""
    pmon.run("daemon", "start")
    daemon = pmon.daemon_pid()
    base_fds = socket_fds(daemon)
    idle: list[socket.socket] = []
    senders: list[socket.socket] = []
    try:
        for _ in range(500):
            idle.append(connect(pmon.socket))
        body_head = head("Content-Length: 4194304\r\n")
        half = b" " * (2 * MIB)
        for _ in range(50):
            sock = connect(pmon.socket)
            senders.append(sock)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(body_head + half)

        def unanswered() -> list[socket.socket]:
            ready = {fd for fd, _ in _poll(idle + senders)}
            return [s for s in idle + senders if s.fileno() not in ready]

        pmon.wait_for(lambda: len(unanswered()) <= 256, timeout=10,
                      message=lambda: f"at most 256 connections held, {len(unanswered())} now")
        pmon.wait_for(lambda: socket_fds(daemon) - base_fds <= 256, timeout=10,
                      message=lambda: f"pmond to hold at most 256 sockets, {socket_fds(daemon) - base_fds} now")
        rss = vm_kib(daemon, "VmRSS")
        started = time.monotonic()
        services = pmon.json("ls", "--json")
        latency = time.monotonic() - started
        rss = max(rss, vm_kib(daemon, "VmRSS"))
        print(f"pmond VmRSS {rss / 1024:.1f} MiB (peak {vm_kib(daemon, 'VmHWM') / 1024:.1f} MiB), "
              f"ls {latency * 1000:.0f} ms")
        assert services == []
        assert rss < 40 * 1024, f"pmond's RSS is {rss} KiB"
        assert latency < 1.0, f"ls took {latency:.2f} s"

        held = unanswered()
        assert len([s for s in senders if s in held]) == 4, "the 16 MiB budget admits four 4 MiB bodies"
        statuses = [read_response(s, timeout=2)[0] for s in idle + senders if s not in held]
        assert len(statuses) >= 550 - 256
        assert set(statuses) <= {503, 408}, set(statuses)  # 408: the idle timeout (10 s) on a slow machine
        assert pmon.daemon_pid() == daemon
    finally:
        for sock in idle + senders:
            sock.close()
    # Once the clients are gone, everything they held is given back.
    pmon.wait_for(lambda: socket_fds(daemon) - base_fds <= 0, timeout=10, message="pmond to close every socket")
    assert pmon.json("ls", "--json") == []
    assert not tracebacks(pmon), tracebacks(pmon)


def _poll(socks: list[socket.socket]) -> list[tuple[int, int]]:
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return poller.poll(0)
