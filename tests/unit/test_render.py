import io
import re

import pytest

from pmon2.render.table import render_services, status_text
from pmon2.render.text import human_bytes, human_duration, pad, paint, truncate, use_color, width

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ELLIPSIS = "\u2026"


def test_width_ascii_and_cjk():
    assert width("") == 0
    assert width("api") == 3
    assert width("数据服务") == 8
    assert width("a数b") == 4
    assert width("e\u0301") == 1  # combining accent takes no column


@pytest.mark.parametrize("text", ["hello world", "数据服务数据服务", "a数b据c服d务", "x" * 50])
@pytest.mark.parametrize("limit", [0, 1, 2, 3, 4, 5, 7, 10])
def test_truncate_never_exceeds_limit(text, limit):
    out = truncate(text, limit)
    assert width(out) <= limit
    if width(text) <= limit:
        assert out == text
    elif limit > 0:
        assert out.endswith(ELLIPSIS)
        assert text.startswith(out[:-1])


def test_truncate_examples():
    assert truncate("abcdef", 4) == "abc" + ELLIPSIS
    assert truncate("abcdef", 6) == "abcdef"
    assert truncate("数据服务", 5) == "数据" + ELLIPSIS
    assert truncate("数据服务", 4) == "数" + ELLIPSIS
    assert truncate("abc", 0) == ""


def test_pad():
    assert pad("ab", 5) == "ab   "
    assert pad("ab", 5, ">") == "   ab"
    assert pad("数据", 6) == "数据  "
    assert width(pad("数据", 6, ">")) == 6
    assert pad("toolong", 3) == "toolong"


def test_paint():
    assert paint("x", "red", False) == "x"
    assert paint("x", None, True) == "x"
    assert paint("x", "green bold", True) == "\x1b[32;1mx\x1b[0m"


def svc(i, name, **kw):
    base = {"id": i, "name": name, "pid": 1000 + i, "status": "running", "restarts": 2, "uptime_s": 5000,
            "cpu_percent": 12.5, "mem_bytes": 30_000_000, "user": "www"}
    base.update(kw)
    return base


SERVICES = [
    svc(1, "api"),
    svc(2, "数据服务", user=None),
    svc(13, "a-really-long-service-name-" * 4, status="backoff", retry_in_s=3.2, pid=None,
        uptime_s=None, cpu_percent=None, mem_bytes=None),
    svc(4, "混合mixed名前", status="errored", pid=None),
]


def lines_of(out):
    return [ANSI.sub("", line) for line in out.split("\n")]


@pytest.mark.parametrize("color", [False, True])
@pytest.mark.parametrize("max_width", [200, 120, 80])
def test_table_lines_equal_width_and_fit(color, max_width):
    out = render_services(SERVICES, color, max_width)
    assert ("\x1b[" in out) == color
    lines = lines_of(out)
    assert len(lines) == 4 + len(SERVICES)
    widths = {width(line) for line in lines}
    assert len(widths) == 1, widths
    assert widths.pop() <= max_width


def test_table_wide_enough_keeps_names():
    lines = lines_of(render_services(SERVICES, False, 500))
    assert any("数据服务" in line for line in lines)
    assert any(SERVICES[2]["name"] in line for line in lines)
    assert not any(ELLIPSIS in line for line in lines)


def test_table_truncates_long_name_with_ellipsis():
    lines = lines_of(render_services(SERVICES, False, 80))
    assert SERVICES[2]["name"] not in "".join(lines)
    row = next(line for line in lines if "backoff 3.2s" in line)
    assert ELLIPSIS in row
    assert "a-really" in row


def test_table_fits_60_columns():
    out = render_services([svc(1, "x" * 40), svc(2, "数据服务")], False, 60)
    lines = lines_of(out)
    assert len({width(line) for line in lines}) == 1
    assert max(width(line) for line in lines) <= 60


def test_table_cells():
    lines = lines_of(render_services([svc(7, "api")], False, 200))
    row = lines[3]
    assert row.startswith("│  7 │ api")
    for cell in ("api", "1007", "running", "1h", "12.5%", "28.6MB", "www"):
        assert cell in row


def test_status_text():
    assert status_text({"status": "backoff", "retry_in_s": 1.04}) == "backoff 1.0s"
    assert status_text({"status": "backoff", "retry_in_s": None}) == "backoff"
    assert status_text({"status": "stopped"}) == "stopped"


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_no_color_wins(clean_env):
    clean_env.setenv("NO_COLOR", "1")
    clean_env.setenv("FORCE_COLOR", "1")
    assert use_color(Tty()) is False
    assert use_color(io.StringIO()) is False


def test_force_color_on_non_tty(clean_env):
    clean_env.setenv("FORCE_COLOR", "1")
    assert use_color(io.StringIO()) is True


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_force_color_off_values(clean_env, value):
    clean_env.setenv("FORCE_COLOR", value)
    assert use_color(io.StringIO()) is False


def test_non_tty_no_color(clean_env):
    assert use_color(io.StringIO()) is False


def test_tty_color_unless_dumb(clean_env):
    assert use_color(Tty()) is True
    clean_env.setenv("TERM", "dumb")
    assert use_color(Tty()) is False


@pytest.mark.parametrize(("n", "text"), [
    (None, "-"), (0, "0B"), (1023, "1023B"), (1024, "1.0KB"), (1536, "1.5KB"),
    (1024**2, "1.0MB"), (5 * 1024**3, "5.0GB"), (2 * 1024**4, "2.0TB"), (3 * 1024**5, "3072.0TB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [
    (None, "-"), (0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"), (86399, "23h"),
    (86400, "1D"), (10 * 86400, "10D"),
])
def test_human_duration(s, text):
    assert human_duration(s) == text
