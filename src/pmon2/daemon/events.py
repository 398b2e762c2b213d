"""The one event stream: every state change as a typed `Event`, published on an in-process `Bus`.

`Supervisor._event` writes each event to the ledger (persist.event, SQLite) and then publishes it here.
Whatever wants to know about changes as they happen (`events -f`, later alerts, metrics, SSE, the
dashboard) subscribes to the bus; nothing polls the service table.

The bus must never let a reader hurt pmond: `publish` is synchronous, O(subscribers), never blocks and
never raises because of a subscriber. Each subscriber has a bounded queue; when a slow or stuck reader
lets it fill, the oldest events are dropped and counted, and the reader gets a synthetic `lost` event
("N events were dropped for this slow reader") in their place, so it knows it missed some. The ledger
still has them (`GET /v1/events`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from pmon2.errors import PmonError
from pmon2.render import words

log = logging.getLogger("pmond")

QUEUE_SIZE = 1000  # events held per subscriber before the oldest are dropped (a few hundred KiB at most)
LOST = "lost"  # kind of the synthetic notice of dropped events
# Kind of the exit status that arrives after its `exit` event (once init reaps; the ledger's row is completed
# in place): on the bus only, data {"pid", "code", "signal", "core", "source", "runtime_s", "event_id"}.
EXIT_STATUS = "exit_status"


@dataclass(frozen=True, slots=True)
class Event:
    """One state change, shaped as a ledger row (store.events).

    id: the ledger row id; None while pmond keeps the event in memory because the database cannot be
    written (persist.py), and for a synthetic `lost` notice. at: Unix time, seconds (float).
    service_id / service: the service's id (None for events of no stored service, e.g. `delete`) and its
    name at the time. kind: `start`, `exit`, `restart`, ... (docs/api.md). message: one line for a
    human. data: kind-specific details (None: none), not to be mutated. caller_uid: the uid of the API
    caller who caused it (None: pmond's own act). owner_uid: the uid the service runs as (who may see it).
    """

    id: int | None
    at: float
    service_id: int | None
    service: str
    kind: str
    message: str
    data: dict[str, Any] | None = None
    caller_uid: int | None = None
    owner_uid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of a ledger row in the API (GET /v1/events): {"id", "service_id", "service", "at",
        "kind", "message", "data" ({} when there is none), "caller_uid", "owner_uid"}."""
        return {"id": self.id, "service_id": self.service_id, "service": self.service, "at": self.at,
                "kind": self.kind, "message": self.message, "data": dict(self.data) if self.data else {},
                "caller_uid": self.caller_uid, "owner_uid": self.owner_uid}


def lost_event(count: int) -> Event:
    """The notice a subscriber gets in place of `count` events dropped from its full queue."""
    was = "was" if count == 1 else "were"
    return Event(None, time.time(), None, "pmond", LOST,
                 f"{words.plural(count, 'event')} {was} dropped for this slow reader (the ledger still has them)",
                 {"dropped": count})


class Subscription:
    """One reader's view of the bus: the events that pass its filter, in publish order, through a queue of
    at most `size` events (the oldest dropped beyond it, then reported by one `lost` event).

    Read with `async for event in sub`, `await sub.get()` or `sub.drain()`; the iteration ends once the
    subscription is closed and its queue read. `close()` (or leaving a `with` block) unsubscribes; it is
    idempotent, and must be called when the reader goes away."""

    def __init__(self, bus: Bus, accept: Callable[[Event], bool], size: int) -> None:
        if size < 1:
            raise ValueError("a subscription's queue holds at least one event")
        self._bus: Bus | None = bus
        self._accept = accept
        self.size = size
        self._queue: collections.deque[Event] = collections.deque()
        self._lost = 0  # dropped since the last `lost` notice was handed out
        self.dropped = 0  # dropped in all, for this subscription
        self._waiter: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        return self._bus is None

    def __len__(self) -> int:
        """Events waiting to be read (a pending `lost` notice not counted)."""
        return len(self._queue)

    def offer(self, event: Event) -> None:
        """Called by Bus.publish: queue `event` if it passes the filter. Never blocks; may raise only from
        the filter, which the bus catches."""
        if self._bus is None or not self._accept(event):
            return
        if len(self._queue) >= self.size:
            self._queue.popleft()
            self._lost += 1
            self.dropped += 1
            self._bus.dropped += 1
        self._queue.append(event)
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self) -> Event | None:
        # The dropped events were older than all still queued: the notice comes first.
        if self._lost:
            count, self._lost = self._lost, 0
            return lost_event(count)
        return self._queue.popleft() if self._queue else None

    def drain(self, limit: int | None = None) -> list[Event]:
        """Every event ready now (at most `limit`), oldest first, without waiting."""
        out: list[Event] = []
        while limit is None or len(out) < limit:
            event = self._take()
            if event is None:
                break
            out.append(event)
        return out

    async def get(self) -> Event:
        """The next event, waiting for one. Raises Closed once closed and empty."""
        while True:
            event = self._take()
            if event is not None:
                return event
            if self._bus is None:
                raise Closed("the subscription is closed")
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except Closed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Unsubscribe: nothing more is queued, and a reader waiting in get() is woken (it reads what is
        left, then the iteration ends)."""
        bus, self._bus = self._bus, None
        if bus is not None:
            bus._subs.pop(id(self), None)
        self._wake()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Closed(Exception):
    """Subscription.get on a closed subscription with nothing left to read."""


class Bus:
    """The in-process event bus. publish(event) hands an event to every subscriber whose filter takes it,
    in subscription order; subscribe(...) -> Subscription."""

    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self._subs: dict[int, Subscription] = {}  # id(sub) -> sub; dicts keep insertion order
        self.published = 0  # events published since pmond started
        self.dropped = 0  # events dropped from subscribers' full queues, in all

    def publish(self, event: Event) -> None:
        """Give `event` to every subscriber that wants it. Synchronous and O(subscribers); never blocks, and
        never raises because of a subscriber (a filter that fails is logged and skips the event)."""
        self.published += 1
        for sub in list(self._subs.values()):
            try:
                sub.offer(event)
            except Exception:  # a subscriber's bug must not stop pmond's own work
                log.exception("an event subscriber failed on a %s event; skipped for it", event.kind)

    def subscribe(self, where: Callable[[Event], bool] | None = None, *, owner_uid: int | None = None,
                  service_ids: Collection[int] | None = None, kinds: Collection[str] | None = None,
                  size: int | None = None) -> Subscription:
        """A new subscription to the events published from now on that pass every filter given:
        `owner_uid` (only events of services that run as this uid: a non-root caller's view), `service_ids`
        (only events of these services), `kinds` (only these kinds), and `where` (any predicate). `size`:
        the subscriber's queue, in events (default queue_size)."""
        ids = None if service_ids is None else frozenset(service_ids)
        wanted = None if kinds is None else frozenset(kinds)

        def accept(event: Event) -> bool:
            return ((owner_uid is None or event.owner_uid == owner_uid)
                    and (ids is None or event.service_id in ids)
                    and (wanted is None or event.kind in wanted)
                    and (where is None or bool(where(event))))

        sub = Subscription(self, accept, self.queue_size if size is None else size)
        self._subs[id(sub)] = sub
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def stats(self) -> dict[str, int]:
        """{"subscribers": open subscriptions, "published": events since start, "dropped": events dropped
        for slow readers since start} (GET /v1/daemon, `event_bus`)."""
        return {"subscribers": len(self._subs), "published": self.published, "dropped": self.dropped}


# following: GET /v1/events?follow=true


def ndjson(value: Any) -> bytes:
    """One JSON value on one line (NDJSON), UTF-8."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate from somewhere: \\u escapes keep the JSON valid
        return json.dumps(value, separators=(",", ":")).encode() + b"\n"


async def follow(bus: Bus, read: Callable[[], Awaitable[list[dict[str, Any]]]], *, owner_uid: int | None,
                 service_ids: Collection[int] | None) -> AsyncGenerator[bytes, None]:
    """The body of GET /v1/events?follow=true (and /v1/services/{ref}/events), NDJSON: first the rows that
    `read()` returns (the ledger's last `limit`, oldest first, already filtered for the caller), then
    every new event that passes `owner_uid` / `service_ids`, live, each as Event.as_dict(), with a `lost`
    event where a slow reader missed some. It subscribes before reading the ledger, so nothing falls
    between the two, and skips live events already sent as rows (id <= the last row's id), so nothing
    comes twice. A ledger that cannot be read ends the stream with {"error": {"code", "message"}}.
    Runs until the client goes away or pmond stops (the server closes it, and the subscription with it)."""
    since = time.time()
    sub = bus.subscribe(owner_uid=owner_uid, service_ids=service_ids)
    try:
        try:
            rows = await read()
        except PmonError as exc:
            yield ndjson({"error": {"code": exc.code, "message": exc.message}})
            return
        last = max((r["id"] for r in rows), default=0)
        # An event kept in memory while the database was down has no id on the bus; if the ledger caught
        # up before it was read, its row was just sent: know it by when, whose and what. Only rows written
        # since the subscription began can be both (usually none: the set stays small).
        sent = {(r["at"], r["service_id"], r["kind"]) for r in rows if r["at"] >= since}
        if rows:
            yield b"".join(ndjson(r) for r in rows)
        async for first in sub:
            out = []
            for event in (first, *sub.drain(sub.size)):
                if event.id is not None:
                    if event.id <= last:
                        continue
                    last = event.id
                elif event.kind != LOST and (event.at, event.service_id, event.kind) in sent:
                    continue
                out.append(ndjson(event.as_dict()))
            if out:
                yield b"".join(out)
    finally:
        sub.close()
