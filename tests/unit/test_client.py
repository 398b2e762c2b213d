import pytest

from pmon2.client import Client, parse_response
from pmon2.errors import DaemonUnreachable
from pmon2.paths import resolve


def response(status_line, body, length=None):
    length = len(body) if length is None else length
    return (f"{status_line}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def test_ok_response():
    assert parse_response(response("HTTP/1.1 200 OK", b'{"id": 1, "name": "api"}')) == (200, {"id": 1, "name": "api"})


def test_content_length_limits_body():
    raw = response("HTTP/1.1 200 OK", b'[1, 2]', length=6) + b"garbage"
    assert parse_response(raw) == (200, [1, 2])


def test_utf8_body():
    body = '{"name": "数据服务"}'.encode()
    assert parse_response(response("HTTP/1.1 201 Created", body)) == (201, {"name": "数据服务"})


def test_error_response():
    body = b'{"error": {"code": "not_found", "message": "no service api"}}'
    status, data = parse_response(response("HTTP/1.1 404 Not Found", body))
    assert status == 404
    assert data["error"]["code"] == "not_found"


def test_empty_body():
    assert parse_response(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n") == (204, None)


@pytest.mark.parametrize("raw", [
    b"",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n",  # cut inside the head
    b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"id\": 1, \"na",  # cut inside the body
    b"garbage\r\n\r\n{}",
    b"HTTP/1.1 abc OK\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n\r\n<html>",
    b"HTTP/1.1 200 OK\r\n\r\n\xff\xfe",
])
def test_malformed_raises(raw):
    with pytest.raises(DaemonUnreachable):
        parse_response(raw)


def test_truncated_body_that_parses_raises():
    # 4 bytes announced, 2 received: "12" is valid JSON but not the answer that was sent.
    with pytest.raises(DaemonUnreachable):
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n12")


def test_bad_content_length_raises_daemon_unreachable():
    with pytest.raises(DaemonUnreachable):
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}")


def test_service_path_quotes():
    c = Client(resolve({"PMON2_HOME": "/tmp/x"}))
    assert c.service_path("api") == "/v1/services/api"
    assert c.service_path("a/b c", "stop") == "/v1/services/a%2Fb%20c/stop"
    assert c.service_path(3, "start") == "/v1/services/3/start"


def test_request_without_daemon_and_no_autostart(tmp_path):
    c = Client(resolve({"PMON2_HOME": str(tmp_path)}))
    with pytest.raises(DaemonUnreachable, match="not running"):
        c.request("GET", "/v1/version", autostart=False, timeout=1.0)
    assert not c.is_running()
