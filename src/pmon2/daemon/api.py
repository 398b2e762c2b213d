"""The API's routes: each maps one HTTP request onto the supervisor. docs/api.md documents them all.

Every body and query is checked through the spec model (pmon2.spec) before a handler runs, and every
handler checks the caller (pmon2.daemon.auth): non-root callers see and act on their own services only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from pmon2 import spec as model
from pmon2.daemon import auth, events, rolling
from pmon2.daemon.apply import Apply, find_cycles
from pmon2.daemon.auth import Caller, Forbidden
from pmon2.daemon.logread import LogApi
from pmon2.daemon.server import Streamed, unquote
from pmon2.daemon.supervisor import Supervisor
from pmon2.errors import BadRequest, NotFound, PmonError

Handler = Callable[..., Awaitable[tuple[int, Any]]]
# (method, path pattern, body fields, query fields, handler)
Route = tuple[str, re.Pattern[str], tuple[model.Field, ...], tuple[model.Field, ...], Handler]


async def in_dependency_order(sup: Supervisor, services: list[Any], action: str,
                              act: Callable[[Any], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run `act` on every service at once, except where depends_on orders them: a start or restart of X
    waits until each dependency selected with it meets X's condition (started, ready, completed); a stop
    or delete of a dependency waits until its selected dependents are stopped (the reverse order, as
    process-compose and systemd do). Results in id order."""
    groups = {svc.group for svc in services}
    deps = {svc.id: {d: c for d, c in svc.spec.get("depends_on", {}).items() if d in groups} for svc in services}
    if action not in ("start", "restart", "stop", "delete") or not any(deps.values()):
        return list(await asyncio.gather(*(act(svc) for svc in services)))
    graph: dict[str, list[str]] = {g: [] for g in groups}
    for svc in services:
        graph[svc.group] = sorted(set(graph[svc.group]) | set(deps[svc.id]))
    cycles = find_cycles(graph)
    if cycles:
        raise BadRequest("depends_on has a cycle: " + "; ".join(" -> ".join(c) for c in cycles))
    done: dict[str, asyncio.Event] = {g: asyncio.Event() for g in groups}
    remaining = {g: sum(1 for s in services if s.group == g) for g in groups}
    forward = action in ("start", "restart")

    async def one(svc: Any) -> dict[str, Any]:
        try:
            if forward:
                for dep, condition in deps[svc.id].items():
                    for other in [s for s in services if s.group == dep]:
                        await done[dep].wait()
                        await sup.wait_for(other, condition, other.spec.get("start_timeout", 90.0))
            else:  # wait for the selected services that depend on this one
                for other in services:
                    if svc.group in deps[other.id]:
                        await done[other.group].wait()
            return await act(svc)
        except PmonError as exc:
            return {"id": svc.id, "name": svc.name, "ok": False,
                    "error": {"code": exc.code, "message": f"dependency not met: {exc.message}"}}
        finally:
            remaining[svc.group] -= 1
            if remaining[svc.group] == 0:
                done[svc.group].set()

    return list(await asyncio.gather(*(one(svc) for svc in services)))


class Api:
    def __init__(self, supervisor: Supervisor, info: Callable[[], dict[str, Any]],
                 shutdown: Callable[[], None], peers: auth.PeerPolicy | None = None) -> None:
        self.sup = supervisor
        self.info = info
        self.shutdown = shutdown
        self.peers = peers
        ref = r"/v1/services/(?P<ref>[^/]+)"
        none = model.NO_FIELDS
        self.routes: list[Route] = [
            ("GET", re.compile(r"/v1/version"), none, none, self.get_version),
            ("GET", re.compile(r"/v1/daemon"), none, none, self.get_daemon),
            ("POST", re.compile(r"/v1/daemon/shutdown"), none, none, self.post_shutdown),
            ("GET", re.compile(r"/v1/services"), none, none, self.list_services),
            ("POST", re.compile(r"/v1/services"), model.SERVICE_FIELDS, none, self.create_service),
            ("GET", re.compile(ref), none, (model.SHOW_ENV,), self.get_service),
            ("DELETE", re.compile(ref), none, (model.FORCE,), self.delete_service),
            ("POST", re.compile(ref + "/start"), none, none, self.start),
            ("POST", re.compile(ref + "/stop"), model.STOP_FIELDS, none, self.stop),
            ("POST", re.compile(ref + "/restart"), none, none, self.restart),
            ("POST", re.compile(ref + "/reload"), model.RELOAD_FIELDS, none, self.reload),
            ("GET", re.compile(ref + "/events"), none, model.EVENTS_QUERY, self.service_events),
            ("GET", re.compile(r"/v1/events"), none, model.EVENTS_QUERY, self.all_events),
            ("POST", re.compile(ref + "/flush"), none, none, self.flush),
            ("POST", re.compile(r"/v1/flush"), none, none, self.flush_all),
            ("POST", re.compile(ref + "/rename"), model.RENAME_FIELDS, none, self.rename),
            ("POST", re.compile(ref + "/update"), model.UPDATE_FIELDS, none, self.update),
            ("POST", re.compile(ref + "/scale"), model.SCALE_FIELDS, none, self.scale),
            ("POST", re.compile(r"/v1/adopt"), model.ADOPT_FIELDS, none, self.adopt),
            *[("POST", re.compile(f"/v1/actions/{action}"), fields, none, self._batch(action))
              for action, fields in model.ACTION_FIELDS.items()],
            *LogApi(supervisor).routes(),  # GET .../logs: handlers in logread.py
            *Apply(supervisor).routes(),  # POST /v1/apply, GET /v1/dump: handlers in apply.py
        ]

    async def __call__(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any] | None,
                       caller: Caller) -> tuple[int, Any]:
        path_matched = False
        for verb, pattern, body_fields, query_fields, handler in self.routes:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            path_matched = True
            if verb == method:
                params = {k: unquote(v) for k, v in m.groupdict().items()}
                fields = model.check_body(body, body_fields)
                options = model.check_query(query, query_fields)
                token = auth.CALLER.set(caller)
                try:
                    return await handler(caller=caller, fields=fields, options=options, **params)
                finally:
                    auth.CALLER.reset(token)
        if path_matched:
            return 405, {"error": {"code": "method_not_allowed", "message": f"{method} is not allowed on {path}"}}
        raise NotFound(f"no such endpoint: {path}")

    async def get_version(self, **_: Any) -> tuple[int, Any]:
        info = self.info()
        return 200, {"version": info["version"], "pid": info["pid"]}

    async def get_daemon(self, **_: Any) -> tuple[int, Any]:
        access = self.peers.describe() if self.peers is not None else None
        return 200, self.info() | self.sup.daemon_status() | {"access": access, "event_bus": self.sup.bus.stats()}

    async def post_shutdown(self, caller: Caller, **_: Any) -> tuple[int, Any]:
        caller.require_root("daemon shutdown")
        self.shutdown()
        return 202, {"stopping": True, "pid": self.info()["pid"], "services_left_running": True}

    async def list_services(self, caller: Caller, **_: Any) -> tuple[int, Any]:
        from pmon2.daemon.usage import SAMPLER

        scan = SAMPLER.scan()  # one for the whole list (usage.Scan), not one per service
        return 200, [self.sup.view(s, scan=scan) for s in self.sup.services.values() if caller.owns(s.uid)]

    async def create_service(self, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        if not caller.privileged:
            # A non-root caller's services run as itself: never as pmond's uid, never as another user.
            own = auth.user_name(caller.uid)
            user = fields.get("user") or own
            if auth.uid_of_user(user) != caller.uid:
                raise Forbidden(f"user: you may only run services as yourself ({own})")
            fields["user"] = user
        svc = await self.sup.create(fields)
        view = self.sup.view(svc, detail=True)
        if svc.spec.get("instance_of"):
            view["instance_ids"] = [s.id for s in self.sup.groups().get(svc.group, [])]
        return 201, view

    async def get_service(self, ref: str, caller: Caller, options: dict[str, Any], **_: Any) -> tuple[int, Any]:
        svc = self.sup.find(ref, caller)
        # Owners only reach this far, so show_env is already limited to root and the service's user.
        return 200, self.sup.view(svc, detail=True, show_env=options["show_env"])

    async def delete_service(self, ref: str, caller: Caller, options: dict[str, Any], **_: Any) -> tuple[int, Any]:
        svc = await self.sup.delete(self._own(ref, caller), force=options["force"])
        return 200, {"id": svc.id, "name": svc.name, "deleted": True}

    async def start(self, ref: str, caller: Caller, **_: Any) -> tuple[int, Any]:
        return 200, self.sup.view(await self.sup.start(self._own(ref, caller)), detail=True)

    async def stop(self, ref: str, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        svc = await self.sup.stop(self._own(ref, caller), force=fields.get("force", False))
        return 200, self.sup.view(svc, detail=True)

    async def restart(self, ref: str, caller: Caller, **_: Any) -> tuple[int, Any]:
        return 200, self.sup.view(await self.sup.restart(self._own(ref, caller)), detail=True)

    async def reload(self, ref: str, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        svc, extra = await rolling.reload(self.sup, self._own(ref, caller), fields.get("signal"),
                                          wait=fields.get("wait"))
        return 200, self.sup.view(svc, detail=True) | extra | self._handover(svc, fields, extra)

    async def service_events(self, ref: str, caller: Caller, options: dict[str, Any], **_: Any) -> tuple[int, Any]:
        """One service's events; NAME of an instance group (web for web:0..3, as ls and reload take it): the
        newest `limit` of all its instances together, oldest first. With `follow`, a stream (events.follow):
        those, then each new event of the same services (those the ref named when the request came)."""
        try:
            ids = [self.sup.find(ref, caller).id]
        except NotFound:
            ids = [s.id for s in self.sup.groups().get(ref, []) if caller.owns(s.uid)]
            if not ids:
                raise
        limit = options["limit"]

        def read() -> list[dict[str, Any]]:
            rows = [e for sid in ids for e in self.sup.store.events(sid, limit)]
            return sorted(rows, key=lambda e: e["id"])[-limit:]

        if options["follow"]:
            return 200, Streamed(events.follow(self.sup.bus, lambda: self.sup.persist.commit(
                read, "the ledger cannot be read now", read=True), service_ids=ids,
                # and, live, while the caller still owns them: an event carries its service's uid then
                owner_uid=None if caller.privileged else caller.uid))
        return 200, await self.sup.persist.commit(read, "the ledger cannot be read now", read=True)

    async def all_events(self, caller: Caller, options: dict[str, Any], **_: Any) -> tuple[int, Any]:
        """The newest `limit` events of the services the caller may see (a non-root caller: those whose
        owner_uid is its uid), oldest first; with `follow`, then each new one as well (events.follow)."""
        owner = None if caller.privileged else caller.uid

        def read() -> Any:
            return self.sup.persist.commit(lambda: self.sup.store.events(None, options["limit"], owner_uid=owner),
                                           "the ledger cannot be read now", read=True)

        if options["follow"]:
            return 200, Streamed(events.follow(self.sup.bus, read, owner_uid=owner, service_ids=None))
        return 200, await read()

    async def flush(self, ref: str, caller: Caller, **_: Any) -> tuple[int, Any]:
        return 200, {"files": self.sup.flush([self.sup.find(ref, caller)])}

    async def flush_all(self, caller: Caller, **_: Any) -> tuple[int, Any]:
        caller.require_root("flush of every service")
        return 200, {"files": self.sup.flush(list(self.sup.services.values()))}

    async def update(self, ref: str, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        """Change fields of a service (or of every instance of NAME) through the spec model; with
        `restart`, restart what the change needs restarted. 200 {"services": [...], "restart_needed",
        "restarted"}."""
        changes = model.check_body(fields.get("fields") or {}, model.SERVICE_FIELDS)
        if not caller.privileged and "user" in changes and auth.uid_of_user(changes["user"]) != caller.uid:
            raise Forbidden(f"user: you may only run services as yourself ({auth.user_name(caller.uid)})")
        self.sup.select([ref], caller)  # the caller's own, or NotFound
        services, needed = await self.sup.update(ref, changes)
        restarted = False
        if needed and fields.get("restart"):
            await asyncio.gather(*(self.sup.restart(str(s.id)) for s in services))
            restarted = True
        return 200, {"services": [self.sup.view(s, detail=True) for s in services], "restart_needed": needed,
                     "restarted": restarted}

    async def scale(self, ref: str, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        if "instances" not in fields:
            raise BadRequest("instances: how many?")
        self.sup.select([ref], caller)
        group, removed = await self.sup.scale(ref, fields["instances"])
        return 200, {"services": [self.sup.view(s) for s in group], "removed": removed}

    async def rename(self, ref: str, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        if "name" not in fields:
            raise BadRequest("name: the new name is needed")
        return 200, self.sup.view(await self.sup.rename(self._own(ref, caller), fields["name"]), detail=True)

    async def adopt(self, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        """`pmon2 import`: a service taken over from another manager, its running process adopted in place
        (daemon/adopt.py). Adopting an arbitrary pid is root's alone (auth.py)."""
        caller.require_root("adopting a running process (pmon2 import)")
        if "argv" not in fields:
            raise BadRequest("argv: the command of the service is needed")
        svc, outcome = await self.sup.adopt_existing(fields)
        return 201, outcome | {"service": self.sup.view(svc, detail=True)}

    def _batch(self, action: str) -> Handler:
        """POST /v1/actions/{action}: one action on the services `select` names, resolved all or nothing
        first, then run on all of them at once (a restart of 100 takes as long as the slowest). 200 with
        {"results": [{"id", "name", "ok", "service" | "error"}]}, in id order."""
        async def run(caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
            if "select" not in fields:
                raise BadRequest("select: which services? ids, names, globs or 'all'")
            services = self.sup.select(fields["select"], caller)
            force = fields.get("force", False)

            async def one(ref: str) -> dict[str, Any]:
                if action == "start":
                    return self.sup.view(await self.sup.start(ref))
                if action == "stop":
                    return self.sup.view(await self.sup.stop(ref, force=force))
                if action == "restart":
                    return self.sup.view(await self.sup.restart(ref))
                if action == "reload":
                    # a roll (rolling.py) or the signal and its handover (Supervisor.reload)
                    svc, extra = await rolling.reload(self.sup, ref, fields.get("signal"), wait=fields.get("wait"))
                    return self.sup.view(svc) | extra | self._handover(svc, fields, extra)
                if action == "delete":
                    svc = await self.sup.delete(ref, force=force)
                    return {"id": svc.id, "name": svc.name, "deleted": True}
                return {"files": self.sup.flush([self.sup.find(ref)])}

            async def guarded(svc: Any) -> dict[str, Any]:
                try:
                    return {"id": svc.id, "name": svc.name, "ok": True, "service": await one(str(svc.id))}
                except PmonError as exc:
                    return {"id": svc.id, "name": svc.name, "ok": False,
                            "error": {"code": exc.code, "message": exc.message}}

            results = await in_dependency_order(self.sup, services, action, guarded)
            return 200, {"results": results}
        return run

    def _handover(self, svc: Any, fields: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """`reload --wait` of a signal (not a roll): how its window ended ({"handover": {ok, message,
        from_pid, pid}}; a window that ended without one made the reload fail instead)."""
        signalled = extra.get("signal") is not None  # a roll answers "signal": None, and has no window
        return {"handover": self.sup.follow.result(svc)} if fields.get("wait") and signalled else {}

    def _own(self, ref: str, caller: Caller) -> str:
        """The id of the service `ref` names, if the caller owns it (else NotFound, as if absent)."""
        return str(self.sup.find(ref, caller).id)
