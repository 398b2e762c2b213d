"""The in-process event bus (pmon2.daemon.events): order, filters, bounded queues, unsubscribing, and a
publish that no subscriber can break. No pmond, no forks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pmon2.daemon import events
from pmon2.daemon.events import Bus, Event


def ev(n: int, *, service_id: int | None = 1, kind: str = "start", owner: int | None = 0) -> Event:
    return Event(n, 1000.0 + n, service_id, f"svc{service_id}", kind, f"event {n}", {"n": n}, None, owner)


def test_as_dict_has_the_ledger_rows_keys_in_order() -> None:
    from pmon2.daemon.store import Store

    store = Store(":memory:")
    try:
        row_id = store.add_event(3, "api", "exit", "process 9 exited", {"pid": 9}, 1234.5, caller_uid=7, owner_uid=8)
        bare_id = store.add_event(None, "gone", "delete", "deleted", None, 1235.0, owner_uid=8)
        row, bare = store.events(None, 10)
    finally:
        store.close()
    full = Event(row_id, 1234.5, 3, "api", "exit", "process 9 exited", {"pid": 9}, 7, 8).as_dict()
    assert list(full) == list(row) and full == row
    # No data: {} as the ledger answers it, not null.
    assert Event(bare_id, 1235.0, None, "gone", "delete", "deleted", None, None, 8).as_dict() == bare
    json.dumps(full)


def test_event_is_frozen() -> None:
    e = ev(1)
    with pytest.raises(AttributeError):
        e.kind = "stop"  # type: ignore[misc]


def test_delivery_in_publish_order_to_every_subscriber() -> None:
    bus = Bus()
    a, b = bus.subscribe(), bus.subscribe()
    for n in range(1, 6):
        bus.publish(ev(n))
    assert [e.id for e in a.drain()] == [1, 2, 3, 4, 5]
    assert [e.id for e in b.drain()] == [1, 2, 3, 4, 5]
    assert a.drain() == []
    assert bus.stats() == {"subscribers": 2, "published": 5, "dropped": 0}


def test_a_subscriber_sees_only_what_was_published_after_it_subscribed() -> None:
    bus = Bus()
    bus.publish(ev(1))
    sub = bus.subscribe()
    bus.publish(ev(2))
    assert [e.id for e in sub.drain()] == [2]


def test_filters() -> None:
    bus = Bus()
    mine = bus.subscribe(owner_uid=1000)
    two = bus.subscribe(service_ids=[2, 3])
    exits = bus.subscribe(kinds={"exit"})
    odd = bus.subscribe(where=lambda e: (e.id or 0) % 2 == 1)
    both = bus.subscribe(owner_uid=1000, service_ids=[2])
    bus.publish(ev(1, service_id=1, owner=0))
    bus.publish(ev(2, service_id=2, owner=1000, kind="exit"))
    bus.publish(ev(3, service_id=3, owner=0, kind="exit"))
    bus.publish(ev(4, service_id=None, owner=1000, kind="delete"))
    bus.publish(ev(5, service_id=2, owner=0))  # service 2 now runs as root: not 1000's any more
    assert [e.id for e in mine.drain()] == [2, 4]
    assert [e.id for e in two.drain()] == [2, 3, 5]
    assert [e.id for e in exits.drain()] == [2, 3]
    assert [e.id for e in odd.drain()] == [1, 3, 5]
    assert [e.id for e in both.drain()] == [2]


def test_a_full_queue_drops_the_oldest_and_says_how_many() -> None:
    bus = Bus(queue_size=3)
    slow, other = bus.subscribe(), bus.subscribe(size=100)
    for n in range(1, 11):
        bus.publish(ev(n))
    assert len(slow) == 3  # bounded, however many were published
    got = slow.drain()
    assert got[0].kind == events.LOST and got[0].id is None
    assert got[0].data == {"dropped": 7} and "7 events were dropped" in got[0].message
    assert [e.id for e in got[1:]] == [8, 9, 10]  # the newest kept, in order
    assert slow.dropped == 7 and bus.stats()["dropped"] == 7
    assert [e.id for e in other.drain()] == list(range(1, 11))  # a slow reader costs the others nothing
    # The notice is given once; later drops get a notice of their own.
    bus.publish(ev(11))
    assert [e.id for e in slow.drain()] == [11]
    for n in range(12, 17):
        bus.publish(ev(n))
    again = slow.drain()
    assert again[0].kind == events.LOST and again[0].data == {"dropped": 2}
    assert [e.id for e in again[1:]] == [14, 15, 16]
    assert slow.dropped == 9


def test_lost_notice_comes_before_the_events_still_queued() -> None:
    bus = Bus(queue_size=2)
    sub = bus.subscribe()
    for n in range(1, 4):
        bus.publish(ev(n))
    first = sub.drain(1)
    assert [e.kind for e in first] == [events.LOST]
    assert [e.id for e in sub.drain()] == [2, 3]
    assert events.lost_event(1).message.startswith("1 event was dropped")


def test_unsubscribe_stops_delivery_and_is_idempotent() -> None:
    bus = Bus()
    sub = bus.subscribe()
    bus.publish(ev(1))
    sub.close()
    sub.close()
    bus.publish(ev(2))
    assert bus.subscribers == 0 and sub.closed
    assert [e.id for e in sub.drain()] == [1]  # what was queued may still be read
    with bus.subscribe() as scoped:
        assert bus.subscribers == 1
        assert not scoped.closed
    assert bus.subscribers == 0


def test_publish_never_raises_because_of_a_subscriber(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus()

    def broken(e: Event) -> bool:
        raise RuntimeError("subscriber bug")

    bad = bus.subscribe(where=broken)
    good = bus.subscribe()
    bus.publish(ev(1))  # must not raise
    assert [e.id for e in good.drain()] == [1]
    assert bad.drain() == []
    assert "subscriber failed" in caplog.text


def test_async_iteration_waits_and_ends_on_close() -> None:
    async def main() -> list[Any]:
        bus = Bus()
        sub = bus.subscribe()
        got: list[Any] = []

        async def reader() -> None:
            async for e in sub:
                got.append(e.id)

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)
        assert got == []  # waiting, not spinning
        bus.publish(ev(1))
        bus.publish(ev(2))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        bus.publish(ev(3))
        sub.close()
        await asyncio.wait_for(task, 2.0)
        return got

    assert asyncio.run(main()) == [1, 2, 3]


def test_a_cancelled_reader_leaves_a_usable_subscription() -> None:
    async def main() -> int | None:
        bus = Bus()
        sub = bus.subscribe()
        waiting = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        bus.publish(ev(7))
        return (await asyncio.wait_for(sub.get(), 2.0)).id

    assert asyncio.run(main()) == 7


def _lines(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for chunk in chunks for line in chunk.splitlines()]


def test_follow_sends_rows_then_live_events_without_gap_or_duplicate() -> None:
    """Events published while the ledger is being read are both in the rows and on the bus: sent once."""

    async def main() -> list[dict[str, Any]]:
        bus = Bus()
        ledger = [ev(n).as_dict() for n in (1, 2)]

        async def read() -> list[dict[str, Any]]:
            # Meanwhile (the read awaits, e.g. a locked database): events 3 and 4 are written and published.
            for n in (3, 4):
                ledger.append(ev(n).as_dict())
                bus.publish(ev(n))
            await asyncio.sleep(0)
            return list(ledger)

        gen = events.follow(bus, read, owner_uid=None, service_ids=None)
        chunks = [await anext(gen)]
        assert bus.subscribers == 1
        bus.publish(ev(5))
        bus.publish(ev(6, owner=1000))
        chunks.append(await asyncio.wait_for(anext(gen), 2.0))
        await gen.aclose()
        assert bus.subscribers == 0  # closed with the stream
        return _lines(chunks)

    got = asyncio.run(main())
    assert [e["id"] for e in got] == [1, 2, 3, 4, 5, 6]


def test_follow_filters_live_events_by_owner_and_service() -> None:
    async def main() -> list[dict[str, Any]]:
        bus = Bus()

        async def read() -> list[dict[str, Any]]:
            return []

        gen = events.follow(bus, read, owner_uid=1000, service_ids=[2])
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0)
        bus.publish(ev(1, service_id=2, owner=0))  # not 1000's
        bus.publish(ev(2, service_id=3, owner=1000))  # another service
        bus.publish(ev(3, service_id=2, owner=1000))
        chunk = await asyncio.wait_for(first, 2.0)
        await gen.aclose()
        return _lines([chunk])

    assert [e["id"] for e in asyncio.run(main())] == [3]


def test_follow_reports_an_unreadable_ledger_and_unsubscribes() -> None:
    from pmon2.daemon.persist import NotSaved

    async def main() -> tuple[list[dict[str, Any]], int]:
        bus = Bus()

        async def read() -> list[dict[str, Any]]:
            raise NotSaved("the ledger cannot be read now: the database is locked by another process")

        chunks = [chunk async for chunk in events.follow(bus, read, owner_uid=None, service_ids=None)]
        return _lines(chunks), bus.subscribers

    lines, subscribers = asyncio.run(main())
    assert lines == [{"error": {"code": "not_saved", "message": "the ledger cannot be read now: the database is "
                                                                  "locked by another process"}}]
    assert subscribers == 0


def test_follow_is_declared_in_the_query_model() -> None:
    from pmon2 import spec
    from pmon2.errors import PmonError

    assert spec.check_query({}, spec.EVENTS_QUERY) == {"limit": 50, "follow": False}
    assert spec.check_query({"follow": ["true"], "limit": ["5"]}, spec.EVENTS_QUERY) == {"limit": 5, "follow": True}
    for bad in ("yes", "TRUE", "", "on"):
        with pytest.raises(PmonError, match="follow"):
            spec.check_query({"follow": [bad]}, spec.EVENTS_QUERY)


def test_followed_lines_stay_aligned_as_wider_names_come() -> None:
    """`events -f` renders batch after batch: the columns only grow, so a later short name lines up with an
    earlier long one, and a longer one widens the columns for what follows."""
    from pmon2.render.why import render_events

    def row(service: str, kind: str) -> dict[str, object]:
        return {"at": 1_800_000_000.0, "service": service, "kind": kind, "message": "m"}

    widths: dict[str, int] = {}
    first = render_events([row("a-long-name", "restart")], False, widths)
    second = render_events([row("b", "exit")], False, widths)
    assert first.index(" m") == second.index(" m"), (first, second)
    third = render_events([row("an-even-longer-name", "exit_status")], False, widths)
    assert third.index(" m") > first.index(" m") and widths == {"service": 19, "kind": 11}
    alone = render_events([row("b", "exit")], False)
    assert alone.index(" m") < second.index(" m"), "without widths, each call sizes its own columns"
