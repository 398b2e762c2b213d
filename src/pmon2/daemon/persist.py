"""Writing state to the store without ever blocking pmond's loop, and without lying to a user.

Two kinds of writes:
- **A user's command** (`commit`): the store is the truth or the command fails. A locked database is
  retried asynchronously (SQLite's own busy wait is cut to a few milliseconds, so the loop never blocks
  on it); a write that still fails raises `NotSaved` ("state not saved: disk full") before the command
  takes effect, so nothing is done that the next pmond would undo.
- **pmond's own bookkeeping** (`save`, `event`): status changes of automatic restarts and ledger lines.
  These must never stop supervision: when the store fails (full disk, a lock held by another process),
  they are kept in memory, the newest value of each field per service and up to EVENTS_KEPT events,
  and written when the store works again (retried with a backoff of 1 s doubling to 30 s). Meanwhile
  the launch records in the run dir keep the next pmond correct about every process.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from pmon2.daemon.store import Store
from pmon2.errors import PmonError

log = logging.getLogger("pmond")
T = TypeVar("T")

COMMIT_DEADLINE = 2.0  # seconds a user's write is retried while the database is locked
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
EVENTS_KEPT = 1000


class NotSaved(PmonError):
    code = "not_saved"
    http_status = 503


def reason(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "full" in text:
        return "disk full"
    if "locked" in text or "busy" in text:
        return "the database is locked by another process"
    return text


def _busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


class Persist:
    def __init__(self, store: Store, on_commit: Callable[[int], None] = lambda count: None) -> None:
        self.store = store
        self.on_commit = on_commit  # told the store's command count after user commands are written
        self._noted: int | None = None  # the newest count not told yet (told at the end of the loop's turn)
        self.down: str | None = None  # why the last write failed; None while the store works
        self.fields: dict[int, dict[str, Any]] = {}  # service id -> newest unsaved values
        self.events: collections.deque[tuple[tuple[Any, ...], dict[str, Any]]] = collections.deque(
            maxlen=EVENTS_KEPT)
        self.retry: asyncio.TimerHandle | None = None
        self.delay = RETRY_FIRST

    # pmond's own bookkeeping: never raises

    def save(self, service_id: int, values: dict[str, Any]) -> None:
        if self.down is None:
            try:
                self.store.update_service(service_id, **values)
                return
            except sqlite3.Error as exc:
                self._failed(exc)
        self.fields.setdefault(service_id, {}).update(values)

    def event(self, *args: Any, **kwargs: Any) -> int | None:
        """store.add_event; None when the event is kept for later (its row id is not known yet)."""
        if self.down is None:
            try:
                return self.store.add_event(*args, **kwargs)
            except sqlite3.Error as exc:
                self._failed(exc)
        self.events.append((args, kwargs))
        return None

    def forget(self, service_id: int) -> None:
        self.fields.pop(service_id, None)

    # a user's command: the store is the truth, or the command fails

    async def commit(self, write: Callable[[], T], failure: str = "state not saved", *, read: bool = False) -> T:
        """Run `write` (a store call) in a transaction that counts it (Store.committed; `read`: a plain
        read); retry while the database is locked, up to COMMIT_DEADLINE. Raises NotSaved."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMIT_DEADLINE
        wait = 0.005
        while True:
            try:
                if read:
                    result = write()
                else:
                    result, count = self.store.committed(write)
                    self._note(count)
                break
            except sqlite3.Error as exc:
                if not _busy(exc) or loop.time() + wait > deadline:
                    raise NotSaved(f"{failure}: {reason(exc)}") from None
            await asyncio.sleep(wait)
            wait = min(wait * 2, 0.2)
        if self.down is not None:
            self._schedule(0.0)  # the store works again: catch up now
        return result

    def _note(self, count: int) -> None:
        """Tell on_commit the newest count once per loop iteration, not once per command: its file in
        the run dir cost ext4 a flush per rename (an apply of 100 services wrote it 100 times)."""
        pending = self._noted
        self._noted = count
        if pending is None:
            def note() -> None:
                newest, self._noted = self._noted, None
                if newest is not None:
                    self.on_commit(newest)
            asyncio.get_running_loop().call_soon(note)

    # catching up

    def _failed(self, exc: sqlite3.Error) -> None:
        if self.down is None:
            log.error("cannot write state (%s): kept in memory and retried; supervision goes on", reason(exc))
        self.down = reason(exc)
        self._schedule(self.delay)

    def _schedule(self, delay: float) -> None:
        if self.retry is None:
            self.retry = asyncio.get_running_loop().call_later(delay, self._catch_up)

    def _catch_up(self) -> None:
        self.retry = None
        try:
            while self.fields:
                service_id, values = next(iter(self.fields.items()))
                self.store.update_service(service_id, **values)
                del self.fields[service_id]
            while self.events:
                args, kwargs = self.events[0]
                self.store.add_event(*args, **kwargs)
                self.events.popleft()
        except sqlite3.Error as exc:
            self.down = reason(exc)
            self.delay = min(self.delay * 2, RETRY_MAX)
            self._schedule(self.delay)
            return
        if self.down is not None:
            log.info("state written again after a failure (%s)", self.down)
        self.down = None
        self.delay = RETRY_FIRST

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
