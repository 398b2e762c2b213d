"""SQLite persistence: the services, their runtime state and the event ledger.

WAL with synchronous=NORMAL: a committed transaction survives a SIGKILL of pmond at any moment
(only a power cut can lose the last ones), and each write costs microseconds, not an fsync.
A database that cannot be read is reported, never replaced.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pmon2.errors import StoreError

T = TypeVar("T")

# Each entry brings the schema from version i to i + 1. Never edit a released entry: append.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE services (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        name        TEXT NOT NULL UNIQUE,
        spec        TEXT NOT NULL,
        desired     TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
        status      TEXT NOT NULL,
        pid         INTEGER,
        start_ticks INTEGER,
        boot_id     TEXT,
        started_at  REAL,
        restarts    INTEGER NOT NULL DEFAULT 0,
        fast_exits  INTEGER NOT NULL DEFAULT 0,
        retry_at    REAL,
        last_exit   TEXT,
        last_error  TEXT,
        created_at  REAL NOT NULL
    );
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        service_id  INTEGER,
        service     TEXT NOT NULL,
        at          REAL NOT NULL,
        kind        TEXT NOT NULL,
        message     TEXT NOT NULL,
        data        TEXT
    );
    CREATE INDEX events_by_service ON events (service_id, id);
    """,
    # Who caused each event (the API caller's uid; null for pmond's own acts) and whose service it is
    # (the uid it runs as), so a non-root caller is shown only the events of its own services.
    """
    ALTER TABLE events ADD COLUMN caller_uid INTEGER;
    ALTER TABLE events ADD COLUMN owner_uid INTEGER;
    CREATE INDEX events_by_owner ON events (owner_uid, id);
    """,
    # `commits` counts the user commands written (Store.committed); pmond keeps the same count in its run
    # dir, so a database that lost committed commands (a deleted -wal) is recognised at start-up.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('commits', 0);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
# The ledger keeps this many of the newest events per service; older ones are pruned now and then.
EVENTS_KEPT = 2000
BUSY_TIMEOUT_MS = 5
PRUNE_EVERY = 500

RUNTIME_FIELDS = ("desired", "status", "pid", "start_ticks", "boot_id", "started_at", "restarts",
                  "fast_exits", "retry_at", "last_exit", "last_error")
JSON_FIELDS = ("spec", "last_exit")


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from None
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 2000")
            # The first real read: garbage in the file fails here, before anything is written.
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"the database {self.path} has schema version {version}, newer than this "
                                 f"pmon2 knows ({SCHEMA_VERSION}): upgrade pmon2")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA cache_size = -512")  # KiB: the data is small, RSS matters more
            self._migrate(version)
            # Damage behind a sound first page shows only when the pages are read: look now, so that it is
            # refused here as corrupt, not met later as a traceback (a few ms on pmond's small database).
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed")
            # From here on pmond's loop runs: never let SQLite's busy wait block it for long. A locked
            # database is retried asynchronously instead (persist.py).
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.OperationalError as exc:
            self.db.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(f"the database {path} is locked by another process; pmond cannot start "
                                 "until it lets go", code="locked") from None
            raise StoreError(f"cannot use the database {path}: {exc}", code="unusable") from None
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise StoreError(f"cannot use the database {path}: {exc}; it was left untouched. "
                             "`pmon2 daemon recover` keeps it aside and rebuilds one from the running "
                             "services", code="corrupt") from None
        except BaseException:
            self.db.close()
            raise

    def _migrate(self, version: int) -> None:
        for target in range(version, SCHEMA_VERSION):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(MIGRATIONS[target]):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {target + 1}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.db.close()

    # services

    def load_services(self) -> list[dict[str, Any]]:
        return [_decode(row) for row in self.db.execute("SELECT * FROM services ORDER BY id")]

    def insert_service(self, name: str, spec: dict[str, Any], status: str) -> int:
        try:
            cur = self.db.execute(
                "INSERT INTO services (name, spec, desired, status, created_at) VALUES (?, ?, 'running', ?, ?)",
                (name, json.dumps(spec), status, time.time()))
        except sqlite3.IntegrityError:
            raise StoreError(f"name {name!r} is taken") from None
        assert cur.lastrowid is not None
        return cur.lastrowid

    def committed(self, write: Callable[[], T]) -> tuple[T, int]:
        """Run `write` and count it in `commits`, in one transaction: (its result, the new count)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = write()
            self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'commits'")
            count = int(self.db.execute("SELECT value FROM meta WHERE key = 'commits'").fetchone()[0])
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return result, count

    def commits(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'commits'").fetchone()
        return int(row[0]) if row else 0

    def highest_service_id(self) -> int:
        """The highest service id ever handed out (AUTOINCREMENT's sqlite_sequence): a marked process
        with a higher id belongs to a service this database never saw, so it lost writes."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'services'").fetchone()
        return int(row[0]) if row else 0

    def rename_service(self, service_id: int, name: str) -> None:
        try:
            self.db.execute("UPDATE services SET name = ? WHERE id = ?", (name, service_id))
        except sqlite3.IntegrityError:
            raise StoreError(f"name {name!r} is taken") from None

    def name_taken(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM services WHERE name = ?", (name,)).fetchone() is not None

    def insert_recovered(self, service_id: int, name: str, spec: dict[str, Any], *, pid: int, start_ticks: int,
                         boot_id: str, started_at: float) -> None:
        """A service rebuilt from its running process (`pmon2 daemon recover`), under its old id."""
        self.db.execute(
            "INSERT INTO services (id, name, spec, desired, status, pid, start_ticks, boot_id, started_at, "
            "created_at) VALUES (?, ?, ?, 'running', 'running', ?, ?, ?, ?, ?)",
            (service_id, name, json.dumps(spec), pid, start_ticks, boot_id, started_at, time.time()))

    def update_service(self, service_id: int, **fields: Any) -> None:
        if not fields:
            return
        bad = set(fields) - set(RUNTIME_FIELDS) - {"spec"}
        if bad:
            raise ValueError(f"not a stored field: {sorted(bad)}")
        values = [json.dumps(v) if k in JSON_FIELDS and v is not None else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE services SET {assignments} WHERE id = ?", (*values, service_id))

    def delete_service(self, service_id: int) -> None:
        self.db.execute("DELETE FROM services WHERE id = ?", (service_id,))

    # events

    def add_event(self, service_id: int | None, service: str, kind: str, message: str,
                  data: dict[str, Any] | None = None, at: float | None = None, *,
                  caller_uid: int | None = None, owner_uid: int | None = None) -> int:
        cur = self.db.execute(
            "INSERT INTO events (service_id, service, at, kind, message, data, caller_uid, owner_uid) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (service_id, service, time.time() if at is None else at, kind, message,
             json.dumps(data) if data else None, caller_uid, owner_uid))
        assert cur.lastrowid is not None
        if cur.lastrowid % PRUNE_EVERY == 0:
            self.prune_events(EVENTS_KEPT)
        return cur.lastrowid

    def prune_events(self, keep: int) -> int:
        cur = self.db.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER "
            "(PARTITION BY service ORDER BY id DESC) AS newer FROM events) WHERE newer > ?)", (keep,))
        return cur.rowcount

    def complete_event(self, event_id: int, message: str, data: dict[str, Any]) -> None:
        """Fill in what was learnt after the fact (an exit status arrives once init reaps)."""
        row = self.db.execute("SELECT data FROM events WHERE id = ?", (event_id,)).fetchone()
        merged = (json.loads(row[0]) if row and row[0] else {}) | data
        self.db.execute("UPDATE events SET message = ?, data = ? WHERE id = ?",
                        (message, json.dumps(merged), event_id))

    def events(self, service_id: int | None = None, limit: int = 50, kind: str | None = None,
               owner_uid: int | None = None) -> list[dict[str, Any]]:
        """The newest `limit` events, oldest first; of one service, one kind, or the services of one uid."""
        where: list[str] = []
        params: list[Any] = []
        if service_id is not None:
            where.append("service_id = ?")
            params.append(service_id)
        if owner_uid is not None:
            where.append("owner_uid = ?")
            params.append(owner_uid)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(f"SELECT * FROM events {clause} ORDER BY id DESC LIMIT ?", (*params, limit))
        out = []
        for row in rows:
            item = dict(row)
            item["data"] = json.loads(item["data"]) if item["data"] else {}
            out.append(item)
        out.reverse()
        return out


def set_aside(path: str) -> str:
    """Rename a damaged database (and its -wal and -shm) to PATH.damaged-TIMESTAMP; returns the new name."""
    import os

    aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):
        try:
            os.rename(path + suffix, aside + suffix)
        except FileNotFoundError:
            pass
    return aside


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    item = dict(row)
    for key in JSON_FIELDS:
        if item.get(key) is not None:
            item[key] = json.loads(item[key])
    return item


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]

