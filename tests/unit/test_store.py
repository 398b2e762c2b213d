import sqlite3

import pytest

from pmon2.daemon.store import SCHEMA_VERSION, Store
from pmon2.errors import StoreError


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "pmon2.db")
    yield s
    s.close()


def test_migrations_and_pragmas(store, tmp_path):
    assert SCHEMA_VERSION >= 1
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    with sqlite3.connect(tmp_path / "pmon2.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"services", "events"} <= tables


def test_reopen_keeps_data_and_does_not_remigrate(tmp_path):
    s = Store(tmp_path / "p.db")
    sid = s.insert_service("api", {"argv": ["x"]}, "stopped")
    s.close()
    s = Store(tmp_path / "p.db")
    try:
        assert [r["id"] for r in s.load_services()] == [sid]
    finally:
        s.close()


def test_insert_update_load_roundtrip(store):
    spec = {"argv": ["./api", "--port", "80"], "env": {"K": "数据"}, "autorestart": True, "min_uptime": 1.5}
    sid = store.insert_service("api", spec, "stopped")
    other = store.insert_service("web", {"argv": ["w"]}, "running")
    assert other > sid
    last_exit = {"code": 3, "signal": None, "at": "2024-01-01T00:00:00.000Z", "runtime_s": 0.25}
    store.update_service(sid, status="running", pid=4242, start_ticks=99, boot_id="b", started_at=12.5,
                         restarts=2, fast_exits=1, retry_at=None, last_exit=last_exit, last_error="boom")
    rows = store.load_services()
    assert [r["name"] for r in rows] == ["api", "web"]
    row = rows[0]
    assert row["spec"] == spec
    assert row["last_exit"] == last_exit
    assert (row["status"], row["pid"], row["start_ticks"], row["boot_id"]) == ("running", 4242, 99, "b")
    assert (row["started_at"], row["restarts"], row["fast_exits"], row["retry_at"]) == (12.5, 2, 1, None)
    assert row["last_error"] == "boom"
    assert row["desired"] == "running"
    assert rows[1]["last_exit"] is None

    store.update_service(sid, last_exit=None, spec={"argv": ["new"]})
    row = store.load_services()[0]
    assert row["last_exit"] is None
    assert row["spec"] == {"argv": ["new"]}


def test_update_rejects_unknown_field(store):
    sid = store.insert_service("api", {}, "stopped")
    with pytest.raises(ValueError):
        store.update_service(sid, name="evil")
    store.update_service(sid)  # nothing to do


def test_desired_is_checked(store):
    sid = store.insert_service("api", {}, "stopped")
    with pytest.raises(sqlite3.IntegrityError):
        store.update_service(sid, desired="maybe")


def test_duplicate_name(store):
    store.insert_service("api", {}, "stopped")
    with pytest.raises(StoreError, match="taken"):
        store.insert_service("api", {}, "stopped")
    assert len(store.load_services()) == 1


def test_delete(store):
    a = store.insert_service("a", {}, "stopped")
    store.insert_service("b", {}, "stopped")
    store.delete_service(a)
    assert [r["name"] for r in store.load_services()] == ["b"]


def test_events(store):
    a = store.insert_service("a", {}, "stopped")
    b = store.insert_service("b", {}, "stopped")
    ids = [store.add_event(a if i % 2 == 0 else b, "a" if i % 2 == 0 else "b", "exit", f"m{i}", at=float(i))
           for i in range(10)]
    assert ids == sorted(ids)
    ev = store.events()
    assert [e["message"] for e in ev] == [f"m{i}" for i in range(10)]  # oldest first
    assert [e["message"] for e in store.events(limit=3)] == ["m7", "m8", "m9"]  # the latest ones
    assert [e["message"] for e in store.events(a, limit=2)] == ["m6", "m8"]
    assert all(e["service_id"] == b for e in store.events(b))
    assert ev[0]["data"] == {}
    assert ev[0]["at"] == 0.0


def test_event_without_service(store):
    store.add_event(None, "gone", "daemon", "started", {"pid": 1})
    (ev,) = store.events()
    assert ev["service_id"] is None
    assert ev["data"] == {"pid": 1}


def test_complete_event_merges(store):
    eid = store.add_event(None, "api", "exit", "status pending", {"pid": 7, "code": None})
    store.complete_event(eid, "exit code 3", {"code": 3, "source": "pidfd"})
    (ev,) = store.events()
    assert ev["message"] == "exit code 3"
    assert ev["data"] == {"pid": 7, "code": 3, "source": "pidfd"}
    eid2 = store.add_event(None, "api", "exit", "pending")
    store.complete_event(eid2, "done", {"signal": "SIGKILL"})
    assert store.events()[-1]["data"] == {"signal": "SIGKILL"}


def test_garbage_file_is_left_untouched(tmp_path):
    path = tmp_path / "pmon2.db"
    content = b"not a database, just some bytes\n" * 200
    path.write_bytes(content)
    with pytest.raises(StoreError) as exc:
        Store(path)
    assert "\n" not in exc.value.message
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pmon2.db"]


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "pmon2.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.execute("CREATE TABLE future (x)")
    db.commit()
    db.close()
    content = path.read_bytes()
    with pytest.raises(StoreError, match="newer"):
        Store(path)
    assert path.read_bytes() == content
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_prune_keeps_the_newest_events_of_each_service(tmp_path):
    from pmon2.daemon.store import Store

    store = Store(tmp_path / "p.db")
    for i in range(30):
        store.add_event(1, "a", "exit", f"a{i}")
    for i in range(5):
        store.add_event(2, "b", "exit", f"b{i}")
    assert store.prune_events(10) == 20
    a = store.events(1, 100)
    assert [e["message"] for e in a] == [f"a{i}" for i in range(20, 30)]
    assert len(store.events(2, 100)) == 5
    store.close()
