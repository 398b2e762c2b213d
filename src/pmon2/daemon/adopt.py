"""Taking over a service from another manager (POST /v1/adopt, `pmon2 import pmon2-go`, root only): the
process adopted in place when it still is the one the other manager ran, else started or left stopped.

Kept apart from supervisor.py, which it uses through the service table's own steps (build_spec, the
store, launch records, the watch), so that the table stays small.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from pmon2 import procfs
from pmon2 import spec as model
from pmon2.daemon import auth, watch
from pmon2.daemon.launches import LaunchRecord
from pmon2.daemon.persist import NotSaved
from pmon2.daemon.policy import Status
from pmon2.daemon.supervisor import Service, Supervisor, iso
from pmon2.errors import Conflict, SpawnError

log = logging.getLogger("pmond")


async def adopt_existing(sup: Supervisor, req: dict[str, Any]) -> tuple[Service, dict[str, Any]]:
    """POST /v1/adopt (`pmon2 import`, root only): one service taken over from another manager, fields
    checked by spec.ADOPT_FIELDS. When `pid` still is the process `argv` names (importers.identify,
    checked after a pidfd pins it), it is adopted in place: same pid, no signal, no restart; its start
    identity and a launch record are written, and pmond watches it from now on. It carries no
    PMON2_SERVICE marker, so only the database and the launch record know it. Otherwise the service is
    started (`start`), unless a live process runs argv[0] (Conflict: probably the same service under
    other arguments; nothing starts), or it is left stopped. A stranger holding `pid` is never
    signalled. Returns the service and {"outcome": adopted|started|stopped, "pid", "notes"}."""
    # One at a time: two requests for one pid, or one row, must not both pass the checks below.
    async with sup._adopting:
        from pmon2 import importers

        req = dict(req)
        pid, start, origin = req.pop("pid", None), req.pop("start", False), req.pop("imported_from", None)
        if origin is not None:
            key = (origin["tool"], origin["source"], origin["row"])
            twin = next((s for s in sup.services.values() if (o := s.spec.get("imported_from"))
                         and (o["tool"], o["source"], o["row"]) == key), None)
            if twin is not None:
                raise Conflict(f"row {origin['row']} of {origin['source']} is already imported: service {twin.id} "
                               f"({twin.name})", code="already_imported")
        notes: list[str] = []
        pidfd = None
        found: Any = None
        facts: Any = None
        if pid is not None:
            owner = next((s for s in sup.services.values() if s.alive and s.pid == pid), None)
            if owner is not None:
                raise Conflict(f"process {pid} is already service {owner.id} ({owner.name})")
            try:
                pidfd = os.pidfd_open(pid)  # first: from here on the pid cannot be reused under us
            except OSError:
                notes.append(f"no process {pid} runs")
        try:
            if pidfd is not None:
                assert pid is not None
                found = importers.identify(pid, req["argv"])
                facts = importers.facts(pid) if found.same else None
                why = None if found.same else found.why
                if why is None and watch.has_exited(pidfd):
                    why = f"process {pid} has just exited"
                elif why is None and facts.uid is None:
                    why = f"process {pid} cannot be read"
                elif why is None and os.geteuid() not in (0, facts.uid):
                    why = f"process {pid} runs as uid {facts.uid}: only a root pmond can take it over"
                if why is not None:
                    notes.append(f"process {pid} not adopted: {why}; it was not signalled")
                    os.close(pidfd)
                    pidfd = None
            boot, now = procfs.boot_id(), time.time()
            if pidfd is not None:
                assert pid is not None
                if facts.cwd is not None:
                    req["cwd"] = facts.cwd
                if facts.env is not None:
                    req["env"] = model.service_env(facts.env)
                else:
                    notes.append(f"the environment of process {pid} cannot be read: the one sent is kept")
                req["user"] = None if facts.uid == os.geteuid() else auth.user_name(facts.uid)
            elif start:
                busy = importers.runs_file(req["argv"][0], exclude={s.pid for s in sup.services.values()
                                                                    if s.alive and s.pid is not None})
                if busy:
                    raise Conflict(f"{'; '.join(notes) + '; ' if notes else ''}not started: process "
                                   f"{', '.join(map(str, busy))} runs {req['argv'][0]} with other arguments, "
                                   "probably this very service: stop it by hand or import it again once it runs "
                                   "as recorded; nothing was started and nothing signalled")
            name, spec = sup.build_spec(req)
            spec["imported_from"] = {**(origin or {}), "at": iso(now),
                                     "adopted_pid": pid if pidfd is not None else None}
            if pidfd is not None:
                assert pid is not None and found is not None and found.stat is not None
                ticks, started = found.stat.starttime, procfs.start_wall_time(found.stat.starttime)

                def insert() -> int:
                    sid = sup.store.insert_service(name, spec, Status.RUNNING.value)
                    sup.store.update_service(sid, pid=pid, start_ticks=ticks, boot_id=boot, started_at=started)
                    return sid

                sid = await sup.persist.commit(insert)
                svc = Service(id=sid, name=name, spec=sup._share_env(spec), uid=auth.uid_of_user(spec["user"]),
                              status=Status.RUNNING, pid=pid, start_ticks=ticks, boot_id=boot, started_at=started)
                sup.services[sid] = svc
                try:  # after the row: a record of a service the database lacks would read as a rollback
                    sup.launches.write(LaunchRecord(sid, pid, ticks, boot, name))
                except OSError as exc:
                    log.warning("%s: no launch record for adopted process %d: %s", name, pid, exc.strerror)
                sup._watch(svc, pid, pidfd)
                pidfd = None
                sup._event(svc, "adopt", f"adopted running process {pid} ({found.why}), imported from Pmon2 "
                            "(Go); it carries no PMON2_SERVICE marker", pid=pid, imported_from=origin)
                sup.rotator.wake(sup.log_files(svc))
                return svc, {"outcome": "adopted", "pid": pid, "notes": notes}
            if start:
                sid = await sup.persist.commit(lambda: sup.store.insert_service(name, spec, Status.STOPPED.value))
                svc = Service(id=sid, name=name, spec=sup._share_env(spec), uid=auth.uid_of_user(spec["user"]))
                sup.services[sid] = svc
                async with svc.lock:
                    try:
                        await sup._start(svc, user_initiated=True)
                    except SpawnError:
                        sup._forget(svc)
                        with contextlib.suppress(NotSaved):
                            await sup.persist.commit(lambda: sup.store.delete_service(sid))
                        raise
                sup._event(svc, "import", "imported from Pmon2 (Go) and started: "
                            f"{'; '.join(notes) or 'no process'}", imported_from=origin)
                return svc, {"outcome": "started", "pid": svc.pid, "notes": notes}

            def insert_stopped() -> int:
                sid = sup.store.insert_service(name, spec, Status.STOPPED.value)
                sup.store.update_service(sid, desired="stopped")
                return sid

            sid = await sup.persist.commit(insert_stopped)
            svc = Service(id=sid, name=name, spec=sup._share_env(spec), uid=auth.uid_of_user(spec["user"]),
                          desired="stopped")
            sup.services[sid] = svc
            sup._event(svc, "import", "imported from Pmon2 (Go), left stopped", imported_from=origin)
            return svc, {"outcome": "stopped", "pid": None, "notes": notes}
        finally:
            if pidfd is not None:
                os.close(pidfd)
