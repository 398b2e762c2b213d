"""server.py without a socket: what a body may be, the limits from the environment, and who gets shed
when the connection cap is reached."""

from __future__ import annotations

import asyncio
import json

import pytest

from pmon2.daemon import server
from pmon2.daemon.auth import Caller, PeerPolicy
from pmon2.daemon.server import MAX_DEPTH, HttpServer, Limits, parse_body, split_target, unquote
from pmon2.errors import BadRequest


@pytest.mark.parametrize("raw", [b"", b"  \r\n", b"\n"])
def test_an_empty_body_is_none(raw):
    assert parse_body(raw) is None


@pytest.mark.parametrize("raw", [b"{}", b'{"argv": ["sleep", "1"], "env": {"A": "b"}, "force": false}',
                                 b'{"n": -9223372036854775808, "m": 9223372036854775807, "f": 1.5e300}',
                                 '{"name": "caf\u00e9 \U0001f600"}'.encode(), b'{"pair": "\\ud83d\\ude00"}'])
def test_json_objects_pass_unchanged(raw):
    assert parse_body(raw) == json.loads(raw)


def nested(levels: int) -> bytes:
    return ('{"a":' * levels + "1" + "}" * levels).encode()


@pytest.mark.parametrize(("raw", "words"), [
    (b"[]", "must be a JSON object"),
    (b'"x"', "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"false", "must be a JSON object"),
    (b"{", "not JSON"),
    (b"{} []", "not JSON"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b"[" * 100_000, "nested more than 32 levels"),
    (b'{"a":' * 100_000, "nested more than 32 levels"),
    (nested(MAX_DEPTH + 1), "nested more than 32 levels"),
    (b'{"a": ' + b"[" * 500 + b"]" * 500 + b"}", "nested more than 32 levels"),
    (b'{"a": ' + b"1" * 5000 + b"}", "integer"),
    (b'{"a": 9223372036854775808}', "64 bits"),
    (b'{"a": -9223372036854775809}', "64 bits"),
    (b'{"a": 1e400}', "out of range"),
    (b'{"a": -1e400}', "out of range"),
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": Infinity}', "Infinity is not a JSON number"),
    (b'{"a": "\\ud800"}', "lone surrogate"),
    (b'{"\\udfff": 1}', "lone surrogate"),
    (b'{"a": ["\xed\xa0\x80"]}', "lone surrogate"),
])
def test_anything_else_is_a_bad_request_naming_the_problem(raw, words):
    with pytest.raises(BadRequest) as info:
        parse_body(raw)
    assert words in info.value.message, info.value.message
    assert info.value.code == "bad_request" and info.value.http_status == 400


def test_nesting_up_to_the_limit_is_fine():
    assert parse_body(nested(MAX_DEPTH))


def test_unquote_and_split_target():
    assert unquote("%C2%B2%zz%4") == "\u00b2%zz%4"
    assert unquote("%+1") == "%+1"  # not hex: left alone (int() would take "+1")
    assert split_target("/v1/events?limit=%D9%A3&a=b+c#x") == ("/v1/events", {"limit": ["\u0663"], "a": ["b c"]})


def test_limits_from_env():
    limits = Limits.from_env({"PMON2_HTTP_IDLE_TIMEOUT": "0.5", "PMON2_HTTP_CONNECTIONS": "32",
                              "PMON2_HTTP_ROOT_RESERVE": "0", "PMON2_HTTP_BODY_TIMEOUT": "soon",
                              "PMON2_HTTP_BODY_BUDGET": "-1", "PMON2_HTTP_SEND_TIMEOUT": "0"})
    assert limits == Limits(connections=32, root_reserve=0, idle_timeout=0.5)
    assert Limits.from_env({}) == Limits()


class FakeWriter:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True


ROOT = Caller(pid=1, uid=0, gid=0)
USER = Caller(pid=2, uid=54321, gid=54321)


def test_the_cap_sheds_the_longest_idle_and_keeps_slots_for_root():
    async def scenario() -> None:
        srv = HttpServer("/nonexistent", None, PeerPolicy(), Limits(connections=4, root_reserve=2))  # type: ignore[arg-type]

        def arrive(caller: Caller, at: float, waiting: bool = True) -> server._Client:
            client = server._Client(caller, True, FakeWriter(), at)  # type: ignore[arg-type]
            if not waiting:
                client.waiting_since = None
            admitted = srv._admit(client)
            if admitted:
                srv.clients.add(client)
            return client if admitted else None

        busy_user = arrive(USER, 1.0, waiting=False)  # mid-request: never shed
        idle_user = arrive(USER, 2.0)
        assert busy_user and idle_user
        # Two of four slots are root's: a third user connection sheds the idle one.
        third = arrive(USER, 3.0)
        assert third and idle_user.closed and idle_user.writer.closed
        assert idle_user.writer.data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert not busy_user.closed
        # Root takes the reserved slots without shedding anyone.
        root1, root2 = arrive(ROOT, 4.0), arrive(ROOT, 5.0)
        assert root1 and root2 and not third.closed
        # Full: a user may not shed root's idle connections, and its own kind is all busy or gone.
        third.waiting_since = None
        assert arrive(USER, 6.0) is None and not root1.closed
        # Root may shed the longest idle connection, whoever it belongs to.
        assert arrive(ROOT, 7.0) and root1.closed and not root2.closed
        assert len(srv.clients) == 4

    asyncio.run(scenario())
