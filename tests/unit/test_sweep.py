"""Leftovers outside a service's group (daemon/sweep.py) and a stop during a roll (rolling.halt), without
forking: one /proc scan shared by the sweeps that ask together, which processes a sweep pins, and how a
plain stop or del ends a roll's wait."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from pmon2 import procfs
from pmon2.daemon import follow, recovery, rolling, sweep


def test_sweeps_that_ask_together_share_one_scan_and_a_later_one_gets_a_fresh_scan(
        monkeypatch: pytest.MonkeyPatch) -> None:
    scans: list[int] = []

    def marked(instance_id: str) -> dict[int, list[int]]:
        scans.append(1)
        return {7: [len(scans)]}

    monkeypatch.setattr(recovery, "marked_processes", marked)

    async def main() -> tuple[list[dict[int, list[int]]], dict[int, list[int]]]:
        scanner = sweep.Scanner("i")
        together = await asyncio.gather(*(scanner.marked() for _ in range(50)))
        later = await scanner.marked()
        return list(together), later

    together, later = asyncio.run(main())
    assert together == [{7: [1]}] * 50
    assert later == {7: [2]} and len(scans) == 2


def test_a_scan_that_fails_finds_nothing_rather_than_failing_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(instance_id: str) -> dict[int, list[int]]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(recovery, "marked_processes", broken)
    assert asyncio.run(sweep.Scanner("i").marked()) == {}


@dataclass
class FakeSvc:
    id: int
    uid: int
    pid: int | None = None
    alive: bool = False


@dataclass
class FakeSup:
    instance_id: str = "i"
    services: dict[int, Any] = field(default_factory=dict)


def test_a_sweep_pins_only_the_services_processes_started_before_the_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A live process that is not pytest itself: its parent (pinned by pidfd, never signalled here).
    target = os.getppid()
    st = procfs.read_stat(target)
    assert st is not None
    marks = {target: 3}
    monkeypatch.setattr(recovery, "marker_of", lambda pid, instance_id: marks.get(pid))
    monkeypatch.setattr(follow, "uid_of", lambda pid: 1000)
    monkeypatch.setattr(follow, "pmonds_own", lambda st: False)
    svc = FakeSvc(id=3, uid=1000)
    sup: Any = FakeSup(services={3: svc})

    def pinned(**kw: Any) -> list[int]:
        got = sweep.pin_marked(sup, svc, [target, os.getpid(), 4_000_000], **kw)  # type: ignore[arg-type]
        for fd in got.values():
            os.close(fd)
        return sorted(got)

    assert pinned() == [target]  # pmond itself and a pid that runs nothing: never
    assert pinned(before_ticks=st.starttime + 1) == [target]
    assert pinned(before_ticks=st.starttime) == []  # started at the exit or later: the new run's
    assert pinned(spare=lambda s: s.pid == target) == []  # retiring: a roll stops it
    marks[target] = 4
    assert pinned() == []  # another service's marker
    marks[target] = 3
    monkeypatch.setattr(follow, "uid_of", lambda pid: 0)
    assert pinned() == []  # another uid (root) than the service's
    monkeypatch.setattr(follow, "uid_of", lambda pid: 1000)
    sup.services[9] = FakeSvc(id=9, uid=1000, pid=target, alive=True)
    assert pinned() == []  # another service's main process


def test_a_plain_stop_halts_the_roll_waiting_for_its_new_process_and_stop_f_stays_a_force() -> None:
    async def main() -> None:
        svc: Any = FakeSvc(id=1, uid=0)
        rolling.halt(svc, "stopped")  # no roll: nothing happens
        roll = rolling._ROLLS[id(svc)] = rolling._Roll(svc, asyncio.Event())
        try:
            rolling.halt(FakeSvc(id=1, uid=0), "stopped")  # another object: not this roll
            assert not roll.cancel.is_set()
            rolling.halt(svc, "stopped")
            assert roll.cancel.is_set() and roll.halted == "stopped"
            forced = rolling._ROLLS[id(svc)] = rolling._Roll(svc, asyncio.Event())
            forced.cancel.set()  # stop -f came first
            rolling.halt(svc, "deleted")
            assert forced.halted is None
        finally:
            rolling._ROLLS.pop(id(svc), None)

    asyncio.run(main())
