"""Issue 11, requirements 5 and 6: one phrase per exit source in `why`, `desc` and the ledger; failed starts
are never counted as exits; plurals are right in every message with a count."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pmon2.render import words
from pmon2.render.detail import describe_exit, render_detail
from pmon2.render.why import explain
from pmon2.render.words import exit_message, exit_phrase, exit_source, exit_status, plural

# plural


def test_plural_regular_and_irregular() -> None:
    assert plural(0, "time") == "0 times"
    assert plural(1, "time") == "1 time"
    assert plural(2, "time") == "2 times"
    assert plural(1, "child", "children") == "1 child"
    assert plural(3, "child", "children") == "3 children"


# Every template with a count, rendered with 1 and with 2. A new template in words.TEMPLATES fails
# test_every_template_is_checked until its wording is written down here.
EXPECTED = {
    "restarted": ("restarted 1 time", "restarted 2 times"),
    "variables": ("1 variable", "2 variables"),
    "last_lines": ("last 1 line", "last 2 lines"),
    "files_emptied": ("emptied 1 log file", "emptied 2 log files"),
    "other_files_emptied": ("1 other log file emptied", "2 other log files emptied"),
    "services_status": ("1 service", "2 services"),
    "backoff_message": ("exited within 1 s of starting: next start in 0.4 s",
                        "exited within 1 s of starting (2 exits or failed starts in a row): next start in 0.4 s"),
    "failures_exits": ("1 exit", "2 exits in a row"),
    "failures_failed_starts": ("1 failed start", "2 failed starts in a row"),
    "failures_mixed": ("1 exit, then 1 failed start", "2 exits, then 2 failed starts"),
    "failures_beyond_ledger": ("2 exits or failed starts in a row, the last 1 of them: 1 exit",
                               "3 exits or failed starts in a row, the last 2 of them: 2 exits"),
}


def test_every_template_is_checked() -> None:
    assert set(words.TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_with_1_and_2(name: str) -> None:
    one, two = EXPECTED[name]
    assert words.TEMPLATES[name](1) == one
    assert words.TEMPLATES[name](2) == two


# No "1 <plural>" anywhere a count of 1 is rendered (units such as "1 s" or "1 ms" are not nouns).
ONE_PLURAL = re.compile(r"\b1 (?:[a-z]+ ){0,2}(?!ms\b)[a-z]+s\b")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_plural_after_1(name: str) -> None:
    text = words.TEMPLATES[name](1)
    assert not ONE_PLURAL.search(text.replace("in a row", "")), text


# one phrase per exit source

SOURCES = {
    # source: (last_exit as `desc` gets it, the data of the matching `exit` event as `why` gets it, phrase)
    "code": ({"code": 2, "signal": None, "at": "T", "runtime_s": 0.003, "source": "pidfd"},
             {"pid": 7, "runtime_s": 0.003, "code": 2, "signal": None, "core": False, "source": "pidfd"},
             "code 2 after 3 ms"),
    "signal": ({"code": None, "signal": "SIGSEGV", "core": True, "at": "T", "runtime_s": 2.5, "source": "waitpid"},
               {"pid": 7, "runtime_s": 2.5, "code": None, "signal": "SIGSEGV", "core": True, "source": "waitpid"},
               "signal SIGSEGV (core dumped) after 2.5 s"),
    # Before init reaps: last_exit says `pending`, the exit event has no status yet (no `source`).
    "pending": ({"code": None, "signal": None, "at": "T", "runtime_s": 0.003, "source": "pending"},
                {"pid": 7, "runtime_s": 0.003},
                "status pending after 3 ms (waiting for init to reap it)"),
    "unknown": ({"code": None, "signal": None, "at": "T", "core": False, "runtime_s": 0.003, "source": "unknown"},
                {"pid": 7, "runtime_s": 0.003, "code": None, "signal": None, "core": False, "source": "unknown"},
                "status unknown after 3 ms"),
}


def service(tmp_path: Path, status: str, last_exit: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    err = tmp_path / "err.log"
    err.touch()
    base = {"id": 1, "name": "api", "status": status, "pid": None, "argv": ["./api"], "exe": "/srv/api",
            "cwd": "/srv", "restarts": 0, "out_log": str(tmp_path / "out.log"), "err_log": str(err),
            "env": {}, "autorestart": status != "exited", "min_uptime": 1, "fast_exits": 0,
            "last_exit": last_exit, "recent_exits": []}
    return base | kw


def event(kind: str, data: dict[str, Any] | None = None, at: float = 1_700_000_000.0) -> dict[str, Any]:
    return {"service": "api", "kind": kind, "at": at, "message": kind, "data": data or {}}


def test_the_sources_are_the_four_shared_ones() -> None:
    assert tuple(SOURCES) == words.EXIT_SOURCES
    for source, (last_exit, data, _) in SOURCES.items():
        assert exit_source(last_exit) == exit_source(data) == source


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_why_and_desc_tell_an_exit_the_same_way(tmp_path: Path, source: str) -> None:
    last_exit, data, phrase = SOURCES[source]
    assert exit_phrase(last_exit) == exit_phrase(data) == phrase
    assert describe_exit(last_exit) == f"{phrase}, at T"
    desc = render_detail(service(tmp_path, "exited", last_exit), False)
    why = explain(service(tmp_path, "exited", last_exit), [event("start"), event("exit", data)])
    assert re.search(rf"^  last exit +{re.escape(phrase)}, at T$", desc, re.M), desc
    assert f"api exited ({phrase}) and is not started again" in why


def test_pending_is_not_unknown_in_why(tmp_path: Path) -> None:
    """The reported bug: before init reaps, `why` said "status unknown" where `desc` said "status pending"."""
    svc = service(tmp_path, "running", pid=8, restarts=1, uptime_s=1)
    why = explain(svc, [event("start"), event("exit", {"pid": 7, "runtime_s": 0.003}), event("restart")])
    assert "recent exits: status pending after 3 ms (waiting for init to reap it)." in why
    assert "unknown" not in why


def test_an_exit_found_while_pmond_was_down_is_unknown_with_the_reason(tmp_path: Path) -> None:
    data = {"pid": 7, "while_down": True, "rebooted": False}
    last_exit = {"code": None, "signal": None, "at": None, "runtime_s": None, "source": "unknown", "while_down": True}
    assert exit_status(data) == exit_status(last_exit) == "status unknown"
    assert exit_phrase(data) == exit_phrase(last_exit) == "status unknown (it ended while pmond was down)"
    assert exit_phrase(data | {"rebooted": True}) == "status unknown (the machine rebooted)"
    why = explain(service(tmp_path, "exited", last_exit), [event("exit", data)])
    assert "api exited (status unknown (it ended while pmond was down))" in why


LEDGER = {
    "code": "process 7 exited after 3 ms: code 2",
    "signal": "process 7 exited after 2.5 s: signal SIGSEGV (core dumped)",
    "pending": "process 7 exited after 3 ms: status pending (waiting for init to reap it)",
    "unknown": "process 7 exited after 3 ms: status unknown",
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_the_ledger_tells_an_exit_in_the_same_words(source: str) -> None:
    last_exit, data, _ = SOURCES[source]
    assert exit_message(7, data) == LEDGER[source]
    assert exit_status(last_exit) in LEDGER[source]


def test_ledger_messages_without_a_run_time() -> None:
    assert exit_message(7, {"source": "pending"}) == "process 7 exited: status pending (waiting for init to reap it)"
    assert words.gone_message(7, rebooted=False) == "process 7 is gone: it ended while pmond was down; status unknown"
    assert words.gone_message(7, rebooted=True) == "process 7 is gone: the machine rebooted; status unknown"


# failed starts are not exits


def crash_loop(tmp_path: Path, kinds: list[str], **kw: Any) -> str:
    events = [event("start")]
    for kind in kinds:
        if kind == "exit":
            events.append(event("exit", {"pid": 7, "runtime_s": 0.003, "code": 2, "source": "pidfd"}))
        else:
            events.append(event("start_failed"))
    svc = service(tmp_path, "backoff", fast_exits=len(kinds), retry_in_s=3.2, last_error="cannot open the log", **kw)
    return explain(svc, events)


def test_one_exit_then_four_failed_starts(tmp_path: Path) -> None:
    why = crash_loop(tmp_path, ["exit"] + ["start_failed"] * 4)
    assert "api keeps dying: 1 exit, then 4 failed starts in a row, each exit within 1 s of starting" in why
    assert "5 exits" not in why
    assert "recent exits: code 2 after 3 ms)" in why
    assert "pmon2 starts it again in 3.2 s" in why


def test_only_failed_starts_are_no_exits(tmp_path: Path) -> None:
    why = crash_loop(tmp_path, ["start_failed"] * 3)
    assert "api keeps failing to start: 3 failed starts in a row." in why
    assert "exit" not in why.split("The last start failed")[0]


def test_a_single_fast_exit_or_failed_start(tmp_path: Path) -> None:
    assert "api exited within 1 s of starting (code 2 after 3 ms)." in crash_loop(tmp_path, ["exit"])
    assert "api failed to start." in crash_loop(tmp_path, ["start_failed"])


def test_older_failures_of_a_streak_only_count_the_ledger_holds(tmp_path: Path) -> None:
    svc = service(tmp_path, "backoff", fast_exits=300, retry_in_s=15.0)
    events = [event("exit", {"code": 2, "runtime_s": 0.01, "source": "pidfd"}), event("start_failed")]
    why = explain(svc, events)
    assert "keeps dying: 300 exits or failed starts in a row, the last 2 of them: 1 exit, then 1 failed start" in why


def test_exits_before_the_streak_are_not_counted(tmp_path: Path) -> None:
    # A long run reset the count: only the last fast_exits failures are the streak.
    events = [event("exit", {"code": 0, "runtime_s": 600, "source": "pidfd"}), event("restart"),
              event("exit", {"code": 2, "runtime_s": 0.003, "source": "pidfd"}), event("start_failed"),
              event("start_failed")]
    svc = service(tmp_path, "backoff", fast_exits=3, retry_in_s=0.4)
    assert "keeps dying: 1 exit, then 2 failed starts in a row" in explain(svc, events)


def test_backoff_without_fast_exits_is_a_restart_about_to_happen(tmp_path: Path) -> None:
    why = explain(service(tmp_path, "backoff", fast_exits=0, retry_in_s=0.0), [])
    assert why.startswith("api is about to be started again (in 0.0 s).")
    assert "0 exits" not in why


# plurals in why and desc


def test_why_restarted_once(tmp_path: Path) -> None:
    svc = service(tmp_path, "running", pid=8, restarts=1, uptime_s=5)
    assert "It has restarted 1 time; recent exits: none recorded." in explain(svc, [])
    svc["restarts"] = 2
    assert "It has restarted 2 times;" in explain(svc, [])


def test_desc_counts_one_variable(tmp_path: Path) -> None:
    one = render_detail(service(tmp_path, "stopped", env={"PORT": "80"}), False)
    assert re.search(r"\benv\s+1 variable$", one, re.M), one
    two = render_detail(service(tmp_path, "stopped", env={"PORT": "80", "HOST": "x"}), False)
    assert re.search(r"\benv\s+2 variables$", two, re.M), two
