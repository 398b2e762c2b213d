"""POST /v1/apply and GET /v1/dump: an app file's services applied idempotently, and today's services as one.

Apply works in three stages (docs/api.md, "Apply"):

1. **Check**, all or nothing: every field of every service (spec.check_services), duplicate names,
   dependencies (unknown names, cycles), the caller's right to each service (a caller other than root
   runs services as itself only, as POST /v1/services), and sources (a service that came from another
   file is never taken over). Every problem is named, and nothing runs unless there is none.
2. **Plan** (`plan`, a pure function of the file's services and the groups that exist): create, change
   (which fields; whether that needs a restart, or a start), unchanged, and with `prune`, remove. What
   runs counts, not only what is stored: a process started before a change that needed a restart (one
   whose restart failed, as a rolling restart that stopped) is a change still to make, of those fields.
   Apply never takes a service from another user: root's file that would run another user's service as
   someone else is a conflict.
3. **Execute** (`_Run`): removals first, a service after the services that depend on it; then one task
   per service, which waits for its dependencies' conditions (started, ready, completed) before it
   starts anything, so independent services start at once and concurrently. A failure is reported on its
   row, the services that depend on it are not started, the others go on, and nothing is rolled back.

Services are compared by group: a service with `instances` is the group NAME of NAME:0 ... NAME:N-1, and
Supervisor.request_fields gives a group's fields as they were given.
"""

from __future__ import annotations

import asyncio
import difflib
import heapq
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pmon2 import spec as model
from pmon2.daemon import auth
from pmon2.daemon.auth import Caller, Forbidden
from pmon2.daemon.supervisor import RESTART_FIELDS, restart_pending
from pmon2.errors import BadRequest, PmonError

log = logging.getLogger("pmond")

# The fields a plan compares, in the spec's order: all but the name (the key), the deprecated autorestart
# (folded into restart) and the source (compared apart: it decides whose service it is).
COMPARED = tuple(f.name for f in model.SERVICE_FIELDS if f.name not in ("name", "autorestart", "source"))
# Creates and restarts in flight at once (each holds a few descriptors while its process is launched).
START_CONCURRENCY = 64
CONDITION_WORDS = {"started": "started", "ready": "ready", "completed": "completed successfully"}
_RANK = {name: i for i, name in enumerate(COMPARED)}


def differing(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The compared fields whose values differ between two services' fields as given (a missing one at its
    default: None for the defaults pmond sets, the config's, the caller's user...; `restart` from the older
    `autorestart`), in COMPARED's order: field -> its new value. Only the fields either one gives are looked
    at: one that neither gives is at its default in both (a plan of 1,000 unchanged services built 2,000
    dicts of every field)."""
    keys = sorted((new.keys() | old.keys() | {"restart"}) & _RANK.keys(), key=_RANK.__getitem__)
    out = {}
    for key in keys:
        a, b = _value(new, key), _value(old, key)
        if a != b:
            out[key] = a
    return out


def _value(fields: dict[str, Any], name: str) -> Any:
    if name == "restart" and "restart" not in fields and "autorestart" in fields:
        return "always" if fields["autorestart"] else "no"
    return fields.get(name, model.SERVICE[name].default)


@dataclass
class Current:
    """A service group as it exists: its fields as they were given (Supervisor.request_fields), whether a
    user wants it running (desired `running` for any of its instances), its Service objects, the uid it
    runs as (None: not known, not checked), and its members meant to run whose process is older than a
    change that needs a restart (service id -> those fields; supervisor.restart_pending)."""

    fields: dict[str, Any]
    running: bool = True
    services: list[Any] = field(default_factory=list)
    uid: int | None = None
    pending: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class Step:
    """One row of the plan."""

    name: str
    action: str  # create, change, unchanged, remove
    fields: list[str] = field(default_factory=list)  # change: the fields that differ
    restart: bool = False  # change: the change restarts the service (a prediction until it ran)
    want: dict[str, Any] = field(default_factory=dict)  # the file's service (not for remove)
    changes: dict[str, Any] = field(default_factory=dict)  # change: field -> new value (None: pmond's default)
    depends_on: dict[str, str] = field(default_factory=dict)  # the file's; for remove, the stored one
    current: Current | None = None
    ok: bool = True
    error: dict[str, str] | None = None
    start: bool = False  # change: autostart turned on for a group that does not run: it is started
    pending: list[str] = field(default_factory=list)  # change: fields stored already, not yet run (restart)

    def fail(self, code: str, message: str) -> None:
        if self.ok:  # the first failure is the one to tell
            self.ok, self.error = False, {"code": code, "message": message}

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "action": self.action, "fields": self.fields,
                               "restart": self.restart, "ok": self.ok}
        if self.start:
            row["start"] = True
        if self.pending:
            row["pending"] = self.pending
        if self.error is not None:
            row["error"] = self.error
        return row


@dataclass
class Plan:
    steps: list[Step]  # in the order they begin: removals, then the rest in dependency order
    problems: list[str]  # validation problems: any one and nothing runs
    conflicts: list[str]  # problems with services that exist (another file's, a name taken)

    @property
    def valid(self) -> bool:
        return not self.problems and not self.conflicts


def plan(services: list[dict[str, Any]], current: dict[str, Current], source: str, *, prune: bool = False,
         taken: Iterable[str] = (), problems: Iterable[str] = (), caller_uid: int | None = None) -> Plan:
    """The plan of applying `services` (checked by spec.check_services, a caller's user already set) from
    the file `source` to the service groups `current` (group name -> Current) that the caller may act on.
    `taken`: names (case-folded) of services the caller may not see. `problems`: those found before.
    `caller_uid`: the caller's uid (None: no caller, as in a test).

    A service that exists and came from `run` (no source) is taken over: a change of `source`, and
    whatever else differs. One that came from another file is a conflict, and so is one that runs as a
    user other than the caller when the file would run it as someone else (root's apply never turns
    nobody's service into root's). depends_on "completed" on a service that restarts always is a
    problem: it never stays exited. With `prune`, the groups whose source is `source` and that the file
    lacks are removed."""
    problems = list(problems)
    conflicts: list[str] = []
    taken = set(taken)
    seen: dict[str, str] = {}  # folded -> name
    unique: list[dict[str, Any]] = []
    for svc in services:
        name = svc["name"]
        first = seen.get(name.casefold())
        if first is not None:
            also = "" if first == name else f" (as {first!r}: names are unique regardless of case)"
            problems.append(f"services.{name}: the name is given twice{also}")
            continue
        seen[name.casefold()] = name
        unique.append(svc)
    by_name = {s["name"]: s for s in unique}
    graph: dict[str, list[str]] = {}
    for svc in unique:
        deps = svc.get("depends_on") or {}
        for dep, condition in deps.items():
            if dep not in by_name:
                close = difflib.get_close_matches(dep, list(by_name), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"services.{svc['name']}.depends_on: {dep!r} is not a service of this file{hint}")
            elif condition == "completed" and _value(by_name[dep], "restart") == "always":
                # It exits 0 and is started again at once: "completed" would hold for an instant, or never.
                problems.append(f"services.{svc['name']}.depends_on: {dep!r} = \"completed\" waits until {dep} "
                                f"exits successfully, but {dep} restarts whenever it exits (restart = \"always\", "
                                f"the default): set restart = \"no\" or \"on-failure\" in services.{dep}")
        graph[svc["name"]] = [d for d in deps if d in by_name]
    for cycle in find_cycles(graph):
        problems.append(f"services.{cycle[0]}.depends_on: a cycle: {' -> '.join(cycle)}")

    current_folded = {name.casefold(): name for name in current}
    steps: list[Step] = []
    for name in dependency_order(graph):
        svc = by_name[name]
        want = dict(svc)
        want["source"] = svc.get("source") or source
        deps = dict(svc.get("depends_on") or {})
        cur = current.get(name)
        if cur is None:
            other = current_folded.get(name.casefold())
            if other is not None:
                conflicts.append(f"services.{name}: service {other!r} exists, and names are unique regardless "
                                 "of case: rename one of them")
            elif name.casefold() in taken:
                conflicts.append(f"services.{name}: the name is taken by another user's service")
            steps.append(Step(name, "create", want=want, depends_on=deps))
            continue
        have_source = cur.fields.get("source")
        if have_source is not None and have_source != want["source"]:
            conflicts.append(f"services.{name}: service {name!r} comes from {have_source}, not from "
                             f"{want['source']}: take it out of that file (and apply it with prune), or delete it "
                             f"(pmon2 del {name}), then apply again")
            continue
        owner = cur.uid
        if owner is not None and owner != caller_uid and auth.uid_of_user(want.get("user")) != owner:
            user, theirs = auth.user_name(owner), want.get("user") or auth.user_name(auth.uid_of_user(None))
            conflicts.append(f"services.{name}: service {name!r} runs as {user}, and this file would run it as "
                             f"{theirs}: apply never takes a service from its user; set user = \"{user}\" in "
                             f"services.{name}, or delete it first (pmon2 del {name}), then apply again")
            continue
        changes = differing(want, cur.fields)
        changed = list(changes)
        if have_source is None:  # made by `run`: from now on the file's
            changed.append("source")
            changes["source"] = want["source"]
        # Stored already, but the process that runs was started before: a restart that failed, or never came.
        stale = sorted({f for fs in cur.pending.values() for f in fs} - set(changed), key=_rank)
        if not changed and not stale:
            steps.append(Step(name, "unchanged", want=want, depends_on=deps, current=cur))
            continue
        # The supervisor's word on what needs a restart (Supervisor.update says it again when it runs).
        restart = cur.running and (any(k in RESTART_FIELDS for k in changed) or bool(cur.pending))
        start = not cur.running and "autostart" in changed and bool(_value(want, "autostart"))
        steps.append(Step(name, "change", sorted([*changed, *stale], key=_rank), restart, want=want,
                          changes=changes, depends_on=deps, current=cur, start=start, pending=stale))

    removals: list[Step] = []
    if prune:
        for name, cur in current.items():
            if name.casefold() not in seen and cur.fields.get("source") == source:
                removals.append(Step(name, "remove", depends_on=dict(cur.fields.get("depends_on") or {}),
                                     current=cur))
        # a service goes after the services that depend on it: the reverse of the start order
        order = dependency_order({s.name: [d for d in s.depends_on if d in current] for s in removals})
        rank = {name: i for i, name in enumerate(reversed(order))}
        removals.sort(key=lambda s: rank[s.name])
    return Plan(removals + steps, problems, conflicts)


def _rank(name: str) -> int:
    return _RANK.get(name, len(_RANK))  # source (not compared) last


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Each cycle of a dependency graph (name -> the names it depends on) once, as [a, b, ..., a], found
    in the graph's order."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    cycles: list[list[str]] = []
    known: set[frozenset[str]] = set()
    for root in graph:
        if colour[root] != white:
            continue
        path: list[str] = [root]
        colour[root] = grey
        stack = [iter(graph[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                stack.pop()
                continue
            if colour.get(nxt, black) == grey:
                cycle = [*path[path.index(nxt):], nxt]
                key = frozenset(cycle)
                if key not in known:
                    known.add(key)
                    cycles.append(cycle)
            elif colour.get(nxt) == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return cycles


def dependency_order(graph: dict[str, list[str]]) -> list[str]:
    """The names of `graph` (name -> names it depends on), each after its dependencies, and otherwise in the
    graph's order. The names on a cycle come last, in the graph's order."""
    index = {name: i for i, name in enumerate(graph)}
    waiting = {name: len(set(deps)) for name, deps in graph.items()}
    dependents: dict[str, list[str]] = {name: [] for name in graph}
    for name, deps in graph.items():
        for dep in set(deps):
            dependents[dep].append(name)
    ready = [(index[n], n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        out.append(name)
        for other in dependents[name]:
            waiting[other] -= 1
            if waiting[other] == 0:
                heapq.heappush(ready, (index[other], other))
    if len(out) < len(graph):
        placed = set(out)
        out += [name for name in graph if name not in placed]
    return out


def answer(steps: list[Step], dry_run: bool) -> dict[str, Any]:
    summary = dict.fromkeys(("create", "change", "unchanged", "remove"), 0)
    for step in steps:
        summary[step.action] += 1
    summary["failed"] = sum(not s.ok for s in steps)
    return {"plan": [s.row() for s in steps], "summary": summary, "dry_run": dry_run}


class Invalid(PmonError):
    """The file has problems: nothing was applied. Answered with every problem (`Apply.apply`)."""

    def __init__(self, problems: list[str], conflict: bool) -> None:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{count}, nothing was applied: {'; '.join(problems)}",
                         "conflict" if conflict else "bad_request")
        self.http_status = 409 if conflict else 400
        self.problems = problems


class _DependencyFailed(PmonError):
    code = "dependency_failed"
    http_status = 424


class Apply:
    """The routes of apply and dump; one apply runs at a time (another waits for it)."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self.lock = asyncio.Lock()

    def routes(self) -> list[tuple[str, re.Pattern[str], tuple[model.Field, ...], tuple[model.Field, ...], Any]]:
        none = model.NO_FIELDS
        return [("POST", re.compile(r"/v1/apply"), model.APPLY_FIELDS, none, self.apply),
                ("GET", re.compile(r"/v1/dump"), none, model.DUMP_QUERY, self.dump)]

    async def apply(self, caller: Caller, fields: dict[str, Any], **_: Any) -> tuple[int, Any]:
        if "source" not in fields:
            raise BadRequest("source: the app file's absolute path is needed")
        services, problems = model.check_services(fields.get("services", []))
        self._as_caller(services, caller)
        async with self.lock:
            current, taken = self.current(caller)
            p = plan(services, current, fields["source"], prune=fields.get("prune", False), taken=taken,
                     problems=problems, caller_uid=caller.uid)
            if not p.valid:
                exc = Invalid(p.problems + p.conflicts, conflict=not p.problems)
                return exc.http_status, {"error": {"code": exc.code, "message": exc.message,
                                                   "problems": exc.problems}}
            dry_run = fields.get("dry_run", False)
            if not dry_run:
                await _Run(self.sup, p.steps).execute()
        result = answer(p.steps, dry_run)
        s = result["summary"]
        log.info("apply %s%s: %d to create, %d to change, %d unchanged, %d to remove, %d failed", fields["source"],
                 " (dry run)" if dry_run else "", s["create"], s["change"], s["unchanged"], s["remove"], s["failed"])
        return 200, result

    def _as_caller(self, services: list[dict[str, Any]], caller: Caller) -> None:
        """A caller other than root runs services as itself only (the rule of POST /v1/services): each
        service's user defaults to the caller and may not be another."""
        if caller.privileged:
            return
        own = auth.user_name(caller.uid)
        refused = []
        for svc in services:
            user = svc.get("user") or own
            if auth.uid_of_user(user) != caller.uid:
                refused.append(svc["name"])
            svc["user"] = user
        if refused:
            raise Forbidden(f"user: you may only run services as yourself ({own}): services "
                            f"{', '.join(refused)}; nothing was applied")

    def current(self, caller: Caller) -> tuple[dict[str, Current], set[str]]:
        """The groups the caller may act on (name -> Current, in id order), and the folded names of the rest."""
        groups = self.sup.groups()
        current: dict[str, Current] = {}
        taken: set[str] = set()
        for name, members in sorted(groups.items(), key=lambda kv: min(s.id for s in kv[1])):
            if all(caller.owns(s.uid) for s in members):
                pending = {s.id: fields for s in members if s.desired == "running" and (fields := restart_pending(s))}
                current[name] = Current(self.sup.request_fields(members[0]),
                                        any(s.desired == "running" for s in members), list(members),
                                        uid=members[0].uid, pending=pending)
            else:
                taken.add(name.casefold())
        return current, taken

    async def dump(self, caller: Caller, options: dict[str, Any], **_: Any) -> tuple[int, Any]:
        """Today's services, one object per group, fields as given (what apply takes back). Environment
        values are in clear for a caller who may see them (root, pmond's user, the services' own user: the
        rule of desc --show-env), masked with masked=true, and otherwise refused."""
        masked = options["masked"]
        out = []
        refused = []
        for name, members in sorted(self.sup.groups().items(), key=lambda kv: min(s.id for s in kv[1])):
            if not all(caller.owns(s.uid) for s in members):
                continue
            fields = dict(self.sup.request_fields(members[0]))
            if fields.get("env"):
                if masked:
                    fields["env"] = model.mask_env(fields["env"])
                elif not all(caller.privileged or caller.uid == s.uid for s in members):
                    refused.append(name)
            out.append(fields)
        if refused:
            raise Forbidden(f"the environment of {', '.join(refused)} is shown in clear only to root and the "
                            "services' own user; dump --masked shows it masked")
        return 200, {"services": out, "masked": masked}


class _Run:
    """The execution of a valid plan."""

    def __init__(self, sup: Any, steps: list[Step]) -> None:
        self.sup = sup
        self.steps = {s.name: s for s in steps if s.action != "remove"}
        self.removals = [s for s in steps if s.action == "remove"]
        self.acted = {name: asyncio.Event() for name in self.steps}
        self.members: dict[str, list[Any]] = {}  # group name -> its services, once known
        self.started: set[str] = set()  # groups this apply started or restarted
        self.waits: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.slots = asyncio.Semaphore(START_CONCURRENCY)

    async def execute(self) -> None:
        if self.removals:
            await self.remove_all()
        busy, bulk = [], []
        for step in self.steps.values():
            if step.action == "unchanged":
                assert step.current is not None
                self.members[step.name] = step.current.services
                self.acted[step.name].set()
            elif step.action == "create" and not step.depends_on:
                bulk.append(step)  # waits for nothing: created with the others in one go
            else:
                busy.append(step)
        await asyncio.gather(self.create_all(bulk), *(self.one(step) for step in busy))
        for wait in self.waits.values():
            wait.cancel()  # only those nobody needed in the end (all others are done)

    async def create_all(self, steps: list[Step]) -> None:
        """The creates that depend on nothing, in one Supervisor.create_many: one transaction for all
        their rows, their launches at once. A failure is its step's alone."""
        if not steps:
            return
        try:
            made = await self.sup.create_many([dict(step.want) for step in steps])
        except PmonError as exc:  # the rows were not written: nothing was created
            made = [exc] * len(steps)
        for step, result in zip(steps, made, strict=True):
            if isinstance(result, PmonError):
                step.fail(result.code, result.message)
            else:
                self.members[step.name] = list(result)
                if step.want.get("autostart", True):
                    self.started.add(step.name)
            self.acted[step.name].set()
        await asyncio.gather(*(self.readiness(step) for step in steps))

    async def one(self, step: Step) -> None:
        try:
            if step.action == "create":
                await self.create(step)
            else:
                await self.change(step)
        except PmonError as exc:
            step.fail(exc.code, exc.message)
        finally:
            self.acted[step.name].set()
        await self.readiness(step)

    async def readiness(self, step: Step) -> None:
        if step.ok and step.name in self.started and step.want.get("ready"):
            # A readiness check that never passes is a failed start: apply reports it.
            try:
                await self.condition(step.name, "ready")
            except PmonError as exc:
                step.fail(exc.code, f"not ready: {exc.message}")

    async def create(self, step: Step) -> None:
        autostart = step.want.get("autostart", True)
        if autostart:
            await self.gate(step)
        async with self.slots:
            svc = await self.sup.create(dict(step.want))
        self.members[step.name] = (self.sup.groups().get(step.name) or [svc]) if step.want.get("instances", 1) > 1 \
            else [svc]
        if autostart:
            self.started.add(step.name)

    async def change(self, step: Step) -> None:
        cur = step.current
        assert cur is not None
        before = {s.id for s in cur.services}
        changes = {k: v for k, v in step.changes.items() if k != "instances"}
        needs = False
        if changes:
            _, needs = await self.sup.update(step.name, changes)
        members = cur.services
        if "instances" in step.changes:
            if step.changes["instances"] > len(before) and cur.running:
                await self.gate(step)  # new instances start at once (a stopped group's are made stopped)
            members, _ = await self.sup.scale(step.name, step.changes["instances"])
        self.members[step.name] = list(members)
        # Restarted: the members meant to run, when this change needs it or an earlier one still waits for it.
        again = [s for s in members if s.id in before and s.desired == "running" and (needs or s.id in cur.pending)]
        # Started: every member, when autostart was turned on for a group that does not run.
        begin = [s for s in members if s.desired != "running"] if step.start else []
        step.restart = bool(again)
        if not again and not begin:
            return
        await self.gate(step)
        async with self.slots:
            results = await asyncio.gather(*(self.sup.restart(str(s.id)) for s in again),
                                           *(self.sup.start(str(s.id)) for s in begin), return_exceptions=True)
        self.started.add(step.name)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def gate(self, step: Step) -> None:
        """Wait until each dependency meets its condition; DependencyFailed if one never will."""
        if not step.depends_on:
            return
        waits = [self._dependency(dep, condition) for dep, condition in step.depends_on.items()]
        await asyncio.gather(*waits)

    async def _dependency(self, dep: str, condition: str) -> None:
        try:
            await self.condition(dep, condition)
        except _DependencyFailed:
            raise
        except PmonError as exc:
            raise _DependencyFailed(f"not started: dependency {dep!r} is not {CONDITION_WORDS[condition]}: "
                                    f"{exc.message}") from None

    async def condition(self, name: str, condition: str) -> None:
        """Wait until group `name` meets `condition`; each (group, condition) is waited for once, however
        many wait for it."""
        key = (name, condition)
        wait = self.waits.get(key)
        if wait is None:
            wait = self.waits[key] = asyncio.ensure_future(self._condition(name, condition))
        await asyncio.shield(wait)

    async def _condition(self, name: str, condition: str) -> None:
        step = self.steps[name]
        await self.acted[name].wait()
        if not step.ok:
            assert step.error is not None
            raise _DependencyFailed(f"not started: dependency {name!r} failed: {step.error['message']}")
        members = self.members.get(name) or []
        if not members:
            raise _DependencyFailed(f"not started: dependency {name!r} has no service")
        if condition in ("started", "ready") and not any(s.desired == "running" for s in members):
            why = "autostart = false" if step.action == "create" else "it is stopped"
            raise _DependencyFailed(f"not started: dependency {name!r} does not run ({why})")
        timeout = step.want.get("start_timeout", model.SERVICE["start_timeout"].default)
        await asyncio.gather(*(self.sup.wait_for(s, condition, timeout) for s in members))

    async def remove_all(self) -> None:
        """Every removal at once, each service after the removed services that depend on it."""
        rank = {s.name: i for i, s in enumerate(self.removals)}
        done = {s.name: asyncio.Event() for s in self.removals}
        dependents = {s.name: [o.name for o in self.removals if s.name in o.depends_on and rank[o.name] < rank[s.name]]
                      for s in self.removals}

        async def one(step: Step) -> None:
            assert step.current is not None
            for other in dependents[step.name]:
                await done[other].wait()
            try:
                results = await asyncio.gather(*(self.sup.delete(str(s.id)) for s in step.current.services),
                                               return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
            except PmonError as exc:
                step.fail(exc.code, exc.message)
            finally:
                done[step.name].set()

        await asyncio.gather(*(one(s) for s in self.removals))
