"""The roll's decisions, without processes: which services roll and how (strategy), batches through a
group's gate (at most rolling_batch at once, in order, and a failure stops the rest), and what recovery
keeps after a pmond crash in the middle of a roll (pick_record, leftovers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pmon2 import spec as model
from pmon2.daemon import rolling
from pmon2.daemon.launches import LaunchRecord
from pmon2.daemon.rolling import RECREATE, SURGE_KIND, Gates, RollStopped, strategy
from pmon2.errors import Conflict


def spec(**fields: Any) -> dict[str, Any]:
    """A stored spec: optional fields only when given, and the fields as the user gave them."""
    return dict(fields, fields=dict(fields))


@pytest.mark.parametrize(("fields", "size", "action", "sig", "expected"), [
    # a plain service: restart in place, reload by signal (FOLLOW's handover)
    ({}, 1, "restart", None, None),
    ({}, 1, "reload", None, None),
    ({"reload_signal": "SIGHUP"}, 1, "reload", None, None),
    # instances roll, whatever the reload_signal; start-first unless each has a port of its own
    ({}, 4, "reload", None, SURGE_KIND),
    ({}, 4, "restart", None, SURGE_KIND),
    ({"reload_signal": "SIGHUP"}, 4, "reload", None, SURGE_KIND),
    ({"port": 8000}, 4, "restart", None, RECREATE),
    ({"port": 8000}, 4, "reload", None, RECREATE),
    ({"listen": ["tcp://127.0.0.1:8000"]}, 4, "reload", None, SURGE_KIND),
    ({"listen": ["tcp://127.0.0.1:8000"], "port": 8000}, 4, "reload", None, SURGE_KIND),
    ({"listen": ["tcp://127.0.0.1:8000"], "reuseport": True}, 4, "restart", None, SURGE_KIND),
    # --listen without reload_signal rolls a single service; with one, reload is the signal
    ({"listen": ["tcp://127.0.0.1:8000"]}, 1, "reload", None, SURGE_KIND),
    ({"listen": ["tcp://127.0.0.1:8000"]}, 1, "restart", None, SURGE_KIND),
    ({"listen": ["tcp://127.0.0.1:8000"], "reload_signal": "SIGUSR2"}, 1, "reload", None, None),
    ({"listen": ["tcp://127.0.0.1:8000"], "reload_signal": "SIGUSR2"}, 1, "restart", None, None),
    # an explicit signal is a signal, and other actions never roll
    ({}, 4, "reload", "SIGHUP", None),
    ({"listen": ["tcp://127.0.0.1:8000"]}, 1, "reload", "SIGHUP", None),
    ({}, 4, "stop", None, None),
    ({}, 4, "start", None, None),
])
def test_strategy(fields: dict[str, Any], size: int, action: str, sig: str | None, expected: str | None) -> None:
    assert strategy(spec(**fields), size, action, sig) == expected


def test_a_reload_signal_given_as_the_default_still_counts_as_declared() -> None:
    # The stored spec omits a field equal to its default; the fields as given keep it.
    stored = {"listen": ["tcp://127.0.0.1:8000"], "fields": {"reload_signal": "SIGUSR2"}}
    assert strategy(stored, 1, "reload") is None


def test_rolling_batch_is_a_spec_field() -> None:
    field = model.SERVICE["rolling_batch"]
    assert field.default == 1 and field.flag == "--rolling-batch"
    assert field.from_text("3") == 3
    with pytest.raises(model.FieldError):
        field.validate(0)
    assert rolling.batch_size({}) == 1 and rolling.batch_size({"rolling_batch": 2}) == 2


def run_roll(members: list[str], size: int, fail: set[str] = frozenset(), conflict: set[str] = frozenset(),
             ) -> tuple[dict[str, Any], list[tuple[str, str]], int]:
    """Members of one group through its gate at once (as the API's gather sends them): (outcome per
    member, the order of starts and ends, the most replaced at once)."""
    gates = Gates()
    trace: list[tuple[str, str]] = []
    active = [0, 0]

    async def work(name: str) -> str:
        active[0] += 1
        active[1] = max(active[1], active[0])
        trace.append(("start", name))
        await asyncio.sleep(0.01)
        trace.append(("end", name))
        active[0] -= 1
        if name in fail:
            raise RollStopped(f"new process of {name} not ready")
        if name in conflict:
            raise Conflict(f"{name} is not running")
        return name

    async def main() -> dict[str, Any]:
        results = await asyncio.gather(*(gates.through("web", size, m, lambda m=m: work(m)) for m in members),
                                       return_exceptions=True)
        assert gates.gates == {}, "the gate outlives its roll"
        return dict(zip(members, results, strict=True))

    out = asyncio.run(main())
    return out, trace, active[1]


def test_one_at_a_time_in_order() -> None:
    members = [f"web:{i}" for i in range(4)]
    out, trace, most = run_roll(members, 1)
    assert out == {m: m for m in members}
    assert most == 1
    assert [n for kind, n in trace if kind == "start"] == members


def test_batches_of_two() -> None:
    members = [f"web:{i}" for i in range(5)]
    out, trace, most = run_roll(members, 2)
    assert most == 2 and all(out[m] == m for m in members)
    # the third starts only once one of the first two has ended
    assert trace.index(("start", "web:2")) > min(trace.index(("end", "web:0")), trace.index(("end", "web:1")))


def test_a_failure_stops_the_roll_and_the_rest_keep_their_processes() -> None:
    members = [f"web:{i}" for i in range(4)]
    out, trace, _ = run_roll(members, 1, fail={"web:1"})
    assert out["web:0"] == "web:0"
    assert isinstance(out["web:1"], RollStopped) and "not ready" in out["web:1"].message
    for later in ("web:2", "web:3"):
        assert isinstance(out[later], RollStopped)
        assert out[later].message == ("not replaced, it keeps its process: the roll stopped at web:1 "
                                      "(new process of web:1 not ready)")
    assert ("start", "web:2") not in trace and ("start", "web:3") not in trace


def test_a_member_that_is_not_running_does_not_stop_the_roll() -> None:
    out, _, _ = run_roll(["web:0", "web:1", "web:2"], 1, conflict={"web:1"})
    assert isinstance(out["web:1"], Conflict)
    assert out["web:0"] == "web:0" and out["web:2"] == "web:2"


def test_the_next_roll_starts_fresh_after_a_stopped_one() -> None:
    gates = Gates()

    async def main() -> list[Any]:
        async def bad() -> str:
            raise RollStopped("broken")

        async def good() -> str:
            return "ok"

        first = await asyncio.gather(gates.through("g", 1, "g:0", bad), return_exceptions=True)
        second = await gates.through("g", 1, "g:0", good)
        return [first[0], second]

    first, second = asyncio.run(main())
    assert isinstance(first, RollStopped) and second == "ok"


def rec(pid: int, ticks: int = 100) -> LaunchRecord:
    return LaunchRecord(7, pid, ticks, "boot", "web:0")


def test_recovery_keeps_the_old_process_while_it_lives() -> None:
    main, surge = rec(10), rec(20)
    assert rolling.pick_record(main, main, surge, lambda r: True) is main
    # the surge, not yet the service's, is stopped
    assert rolling.leftovers(10, [surge], lambda r: True) == [surge]


def test_recovery_adopts_the_surge_when_the_old_process_is_gone() -> None:
    main, db, surge = rec(10), rec(10), rec(20)
    alive = {20}
    assert rolling.pick_record(main, db, surge, lambda r: r.pid in alive) is surge
    assert rolling.leftovers(20, [surge], lambda r: r.pid in alive) == []


def test_recovery_after_the_hand_over_stops_the_retiring_process() -> None:
    new, old = rec(20), rec(10)
    alive = {10, 20}
    # the launch record already names the new process: it is adopted, the old one is stopped
    assert rolling.pick_record(new, old, new, lambda r: r.pid in alive) is new
    assert rolling.leftovers(20, [new, old], lambda r: r.pid in alive) == [old]


def test_recovery_with_nothing_alive_adopts_nothing() -> None:
    main, surge = rec(10), rec(20)
    assert rolling.pick_record(main, None, surge, lambda r: False) is main
    assert rolling.leftovers(None, [surge], lambda r: False) == []


def test_a_reused_pid_is_not_the_surge() -> None:
    surge = rec(20, ticks=100)
    stranger = {(20, 555)}  # pid 20 now runs something else, started later

    def alive(r: LaunchRecord) -> bool:
        return (r.pid, r.start_ticks) in stranger

    assert rolling.pick_record(rec(10), None, surge, alive) is not surge
    assert rolling.leftovers(None, [surge], alive) == []
