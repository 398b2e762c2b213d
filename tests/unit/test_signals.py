import signal

import pytest

from pmon2.errors import BadRequest
from pmon2.signals import parse_signal


@pytest.mark.parametrize(("text", "sig"), [
    ("HUP", signal.SIGHUP), ("SIGHUP", signal.SIGHUP), ("hup", signal.SIGHUP), ("1", signal.SIGHUP),
    (1, signal.SIGHUP), ("USR2", signal.SIGUSR2), ("sigterm", signal.SIGTERM), (" INT ", signal.SIGINT),
    ("9", signal.SIGKILL),
])
def test_parse_ok(text, sig):
    assert parse_signal(text) is sig


@pytest.mark.parametrize("text", ["FOO", "999", "0", "", "SIG", "-1", "1.5"])
def test_parse_bad(text):
    with pytest.raises(BadRequest) as exc:
        parse_signal(text)
    assert exc.value.code == "bad_request"
