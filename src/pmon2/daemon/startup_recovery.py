"""Start-up reconciliation: after pmond (re)starts, the database, the launch records and the processes
that carry this pmond's marker are brought into agreement (`recover`). A marker counts only when its tag
verifies (recovery.marker_of): a process of any user can claim any marker, and one it made up must never
make pmond refuse to start, nor be stopped or rebuilt as a service.

Kept apart from supervisor.py, which it uses through the service table's own steps (the store, launch
records, the watch, `_event`), so that the table stays small; Supervisor.recover delegates here. Not in
recovery.py: that module is pure (it reads /proc and returns facts, knows nothing of the store or the
table, and supervisor.py and follow.py import it), where this one acts: it adopts, kills, writes the
store and the ledger and starts tasks, and importing supervisor.py from recovery.py would be a cycle.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pmon2 import procfs
from pmon2 import spec as model
from pmon2.daemon import auth, recovery, rolling, watch
from pmon2.daemon.launches import LaunchRecord
from pmon2.daemon.policy import Status
from pmon2.daemon.supervisor import Service, Supervisor
from pmon2.errors import StoreError
from pmon2.render import words


async def recover(sup: Supervisor, rebuild: bool = False) -> list[dict[str, Any]]:
    """Load every service; take back those still running, start those that died meanwhile.

    Reconciles three sources: the database, the launch records (written before any process may
    run) and the processes that carry this pmond's marker, verified. A process whose identity matches is
    adopted; the leftovers of a deleted service are stopped; a running service that the database
    does not know means the database was emptied or rolled back: pmond refuses to start (StoreError)
    unless `rebuild` (`pmon2 daemon recover`), which rebuilds those services from their processes.
    Returns what `rebuild` restored, and what it could not: a list of {"id", "name", "pid", "restored":
    true, "not_restored": [what the process could not tell]} or {"id", ("name", "pid",) "restored": false,
    "why"}; empty without `rebuild`. Called once, before pmond serves. Raises StoreError (one line, naming
    the lost services and commands) when the database lost writes and `rebuild` is false; PmonError when
    the marker key cannot be read or made (recovery.load_key)."""
    # First: until the key is set no marker verifies, and a service launched would carry an unsigned one.
    sup.instance_id.key = recovery.load_key(sup.config.paths.data_dir)
    boot = procfs.boot_id()
    records = sup.launches.load()
    rows = sup.store.load_services()
    marked = recovery.marked_processes(sup.instance_id)
    known = {row["id"] for row in rows}
    highest = sup.store.highest_service_id()
    lost = {sid: pids for sid, pids in marked.items() if sid not in known and sid > highest}
    # Launched, so once in the database, but unknown to it and with no process left: rolled back too.
    vanished = {sid: r for sid, r in records.items() if sid not in known and sid > highest and sid not in lost}
    mark = sup.launches.read_commits()
    forgotten = mark[1] - sup.store.commits() if mark is not None and mark[0] == boot else 0
    restored: list[dict[str, Any]] = []
    if (lost or vanished or forgotten > 0) and not rebuild:
        found = []
        if lost:
            found.append("services that are still running: " + ", ".join(
                f"{sid} (pid {', '.join(map(str, sorted(pids)))})" for sid, pids in sorted(lost.items())))
        if vanished:
            found.append("services it had launched: " + ", ".join(
                f"{sid} ({r.name})" for sid, r in sorted(vanished.items())))
        if forgotten > 0:
            found.append(f"its last {forgotten} command{'s' if forgotten != 1 else ''} (stop, delete, ...)")
        raise StoreError(f"the database {sup.store.path} lost {'; and '.join(found)}. It was emptied or "
                         "rolled back; run `pmon2 daemon recover` to rebuild it from the running processes")
    if lost:
        restored = _rebuild(sup, lost, records, boot)
        rows = sup.store.load_services()
        known = {row["id"] for row in rows}
    if rebuild:
        restored += [{"id": sid, "name": r.name, "pid": None, "restored": False,
                      "why": "lost from the database and not running: nothing to rebuild it from"}
                     for sid, r in sorted(vanished.items())]
        if forgotten > 0:
            restored.append({"id": None, "name": None, "pid": None, "restored": False,
                             "why": f"the database lost its last {forgotten} command(s): check that stopped "
                                    "and deleted services are as you left them"})
        sup._note_commits(sup.store.commits())
    for sid, pids in marked.items():
        if sid not in known and sid <= highest:
            sup._stop_orphans(sid, pids, records.get(sid))
    for sid in set(records) - known:
        sup.launches.remove(sid)
    rolls = rolling.Recovery(sup)  # a roll cut short: its new and old processes (surge, retire records)
    for row in rows:
        svc = Service(id=row["id"], name=row["name"], spec=sup._share_env(row["spec"]),
                      uid=auth.uid_of_user(row["spec"]["user"]), desired=row["desired"],
                      status=Status(row["status"]), pid=row["pid"], start_ticks=row["start_ticks"],
                      boot_id=row["boot_id"], started_at=row["started_at"], restarts=row["restarts"],
                      fast_exits=row["fast_exits"], retry_at=row["retry_at"], last_exit=row["last_exit"],
                      last_error=row["last_error"])
        sup.services[svc.id] = svc
        record = rolls.record(svc, records.get(svc.id))
        surge = record is not None and record is rolls.surges.get(svc.id)  # a roll's new process, never checked
        _recover_one(sup, svc, boot, record, marked.get(svc.id, []), surge=surge)
        rolls.finish(svc)
    sup.notify.recover()  # the notify sockets of adopted services, at the paths they hold
    sup.sockets.recover(sup.services.values())  # listening sockets, from the running services
    return restored


def _rebuild(sup: Supervisor, lost: dict[int, list[int]], records: dict[int, LaunchRecord],
             boot: str) -> list[dict[str, Any]]:
    """Insert each lost service again, with its old id (its processes' marker names it), from what
    its main process shows; the rest takes the defaults, and the report says which.

    `lost` is {service id: [marked pids]}, `records` the launch records by service id (their names are
    kept), `boot` this boot's id. Returns one entry per lost service, in `recover`'s shape. Each row goes
    straight into the store (store.insert_recovered), as pmond serves nothing yet."""
    restored = []
    for sid, pids in sorted(lost.items()):
        main = recovery.main_process(pids)
        facts = recovery.rebuild(main) if main is not None else None
        if facts is None:
            restored.append({"id": sid, "restored": False, "why": "its processes could not be read"})
            continue
        record = records.get(sid)
        name = record.name if record is not None else f"recovered-{sid}"
        if sup.store.name_taken(name):
            name = f"{name}-{sid}"
        out_log = facts.out_log or os.path.join(sup.config.paths.log_dir, f"{name}-out.log")
        spec = {"argv": facts.argv, "exe": facts.exe, "cwd": facts.cwd, "env": facts.env, "user": facts.user,
                "out_log": out_log, "err_log": facts.err_log or out_log, "autorestart": True,
                "min_uptime": sup.config.min_uptime, "kill_timeout": sup.config.kill_timeout,
                "stop_signal": model.SERVICE["stop_signal"].default}
        sup.store.insert_recovered(sid, name, spec, pid=facts.pid, start_ticks=facts.start_ticks,
                                   boot_id=boot, started_at=procfs.start_wall_time(facts.start_ticks))
        sup._event(None, "recover", f"rebuilt from process {facts.pid}; not restored: "
                   f"{', '.join(facts.missing)}", name=name, owner_uid=auth.uid_of_user(facts.user),
                   service_id=sid)
        restored.append({"id": sid, "name": name, "pid": facts.pid, "restored": True,
                         "not_restored": facts.missing})
    return restored


def ready_left(spec: dict[str, Any], stored: Status, started_at: float | None, now: float,
               surge: bool = False) -> float | None:
    """Seconds left for the readiness check of a process adopted at pmond's start, or None when it is
    `running` at once: it has no check (`ready`, a probe or "notify"), or it passed it (`stored`, its
    status in the database, is not STARTING) and is no roll's new process (`surge`) that never had one
    checked as the service's. What is left of start_timeout since `started_at` (wall time of its start,
    None: unknown, the whole of it), never below 0; with 0 a probe is still tried once (_await_ready)."""
    if not spec.get("ready") or (stored is not Status.STARTING and not surge):
        return None
    timeout = float(spec.get("start_timeout", 90.0))
    if started_at is None:
        return timeout
    return max(0.0, min(timeout, timeout - (now - started_at)))


def _adopted(sup: Supervisor, svc: Service, left: float | None) -> None:
    """The status of a process just adopted: `running`, or `starting` with its readiness check (`ready`)
    run again for the `left` seconds of start_timeout (ready_left), so that nothing that waits for it
    (depends_on "ready", `apply`) goes on before it passed. Not for a service about to be stopped."""
    if left is None or svc.desired == "stopped":
        svc.status = Status.RUNNING
        return
    svc.status = Status.STARTING
    sup._spawn_task(sup._await_ready(svc, svc.generation, timeout=left))


def _not_ready_yet(svc: Service, left: float | None) -> str:
    """The adopt event's words for a process whose readiness check runs again (ready_left)."""
    if svc.status is not Status.STARTING or left is None:
        return ""
    return f"; not ready yet: its readiness check runs again ({left:.3g} s of start_timeout left)"


def _recover_one(sup: Supervisor, svc: Service, boot: str, record: LaunchRecord | None = None,
                 marked: list[int] | None = None, surge: bool = False) -> None:
    """One service loaded from the database: adopt its process (the launch record's first, then the
    database's, each checked by pid, start time and boot id), else a successor of it (follow.py), else
    record that it died while pmond was down and start it again if the user wants it running. `marked`
    is its pids that carry the marker; `surge`: `record` is a roll's new process (rolling.Recovery). An
    adopted process whose readiness check had not passed is `starting`, and checked again (ready_left).
    The outcome is saved and logged through `_save` and `_event`; a stop or a start it calls for runs
    as a background task (`_spawn_task`)."""
    stored = svc.status
    # The launch record is at least as new as the database: pmond writes it first.
    candidates = [(svc.pid, svc.start_ticks, svc.boot_id)]
    if record is not None and (record.pid, record.start_ticks) != (svc.pid, svc.start_ticks):
        candidates.insert(0, (record.pid, record.start_ticks, record.boot_id))
    for pid, ticks, boot_id in candidates:
        pidfd = watch.adopt(pid, ticks, boot_id) if pid else None
        if pidfd is None:
            continue
        assert pid is not None and ticks is not None
        if pid != svc.pid:
            svc.pid, svc.start_ticks, svc.boot_id = pid, ticks, boot_id
            svc.started_at = procfs.start_wall_time(ticks)
        left = ready_left(svc.spec, stored, svc.started_at, time.time(),
                          surge=surge and record is not None and pid == record.pid)
        sup._watch(svc, pid, pidfd)
        _adopted(sup, svc, left)
        sup.follow.restore_window(svc)  # a reload window the killed pmond had open for this process
        sup._save(svc, "status", "pid", "start_ticks", "boot_id", "started_at")
        sup._event(svc, "adopt", f"adopted running process {pid}" + _not_ready_yet(svc, left), pid=pid)
        if svc.desired == "stopped":
            sup._spawn_task(sup.stop(str(svc.id)))
        return
    # Gone, but a successor of it runs (pmond was killed during a handover): adopt it, start no duplicate.
    found = sup.follow.after_restart(svc, marked or [], record.start_ticks if record is not None else None)
    if found is not None:
        # What is left counts from the first process's start: its successor carries on the same start.
        _adopted(sup, svc, ready_left(svc.spec, stored, svc.started_at, time.time(), surge=surge))
        sup._hand_over(svc, *found)
        if svc.desired == "stopped":
            sup._spawn_task(sup.stop(str(svc.id)))
        return
    rebooted = svc.boot_id is not None and svc.boot_id != boot
    was_up = svc.status in (Status.RUNNING, Status.STARTING, Status.STOPPING)
    if svc.last_exit is not None and svc.last_exit.get("source") == "pending":
        svc.last_exit["source"] = "unknown"  # pmond died before the status came: nobody will tell it now
    if was_up:
        svc.last_exit = {"code": None, "signal": None, "at": None, "runtime_s": None,
                         "source": "unknown", "while_down": True}
        sup._event(svc, "exit", words.gone_message(svc.pid, rebooted),
                   pid=svc.pid, while_down=True, rebooted=rebooted)
    svc.pid = None
    svc.started_at = None
    # A user asked for it to run: whatever command pmond died inside (a restart between its stop and
    # its start leaves `stopped`), it runs again. `exited` and `errored` were pmond's own verdicts.
    if svc.desired == "running" and svc.status in (Status.STOPPED, Status.STOPPING, Status.RUNNING,
                                                  Status.STARTING, Status.BACKOFF):
        svc.status = Status.BACKOFF
        svc.retry_at = time.time()
        sup._save(svc, "status", "pid", "started_at", "retry_at", "last_exit")
        sup._spawn_task(sup._auto_start(svc, svc.generation, restart=was_up))
    else:
        if svc.status in (Status.RUNNING, Status.STARTING, Status.STOPPING, Status.BACKOFF):
            svc.status = Status.STOPPED
        sup._save(svc, "status", "pid", "started_at", "last_exit")
