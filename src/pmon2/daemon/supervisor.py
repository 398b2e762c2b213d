"""The service table: every service's spec and runtime state, and the operations on them.

Each status change goes through policy.step; each one that matters is written to the store and the
event ledger before the next await, so a SIGKILL of pmond at any moment leaves a consistent record.
User operations on one service are serialised by its lock; automatic restarts take the same lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pmon2 import procfs
from pmon2 import spec as model
from pmon2.config import Config
from pmon2.daemon import auth, events, follow, instances, notify, recovery, rolling, sockets, spawn, sweep, watch
from pmon2.daemon.launches import LaunchRecord, LaunchRecords
from pmon2.daemon.persist import NotSaved, Persist
from pmon2.daemon.policy import RestartPolicy, Status, Trigger, step
from pmon2.daemon.rotate import RotationPolicy, Rotator
from pmon2.daemon.store import Store
from pmon2.errors import BadRequest, Conflict, NotFound, PmonError, SpawnError
from pmon2.render import words
from pmon2.signals import parse_signal

log = logging.getLogger("pmond")

# Launches in flight at once in a bulk create: enough to keep the launcher busy, few enough that the
# requests (with their environments) fit its socket's buffer, where a full one makes pmond fork itself.
LAUNCHES_AT_ONCE = 16


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Service:
    id: int
    name: str
    spec: dict[str, Any]
    uid: int  # the uid it runs as (derived from spec["user"]): who owns it, for authorisation
    desired: str = "running"
    status: Status = Status.STOPPED
    pid: int | None = None
    start_ticks: int | None = None
    boot_id: str | None = None
    started_at: float | None = None
    restarts: int = 0
    fast_exits: int = 0
    retry_at: float | None = None
    last_exit: dict[str, Any] | None = None
    last_error: str | None = None
    # Not stored:
    pidfd: int | None = None
    generation: int = 0  # bumps at every start, so late callbacks of an old process are ignored
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    retry_handle: asyncio.TimerHandle | None = None
    escalate: asyncio.Event | None = None  # set by `stop -f` to cut a graceful stop in progress short
    cpu_sample: Any = None  # usage.CpuSample: CPU times of every process of the service, per pid
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set and replaced at each status change
    status_known: asyncio.Event = field(default_factory=asyncio.Event)  # the last exit's status arrived
    status_text: str | None = None  # the service's last STATUS= (sd_notify, notify.py)

    @property
    def policy(self) -> RestartPolicy:
        s = self.spec
        return RestartPolicy(restart=restart_mode(s), min_uptime=s["min_uptime"],
                             backoff_base=s.get("backoff_base", 0.1), backoff_cap=s.get("backoff_cap", 15.0),
                             max_restarts=s.get("max_restarts", 0), ready=bool(s.get("ready")))

    @property
    def group(self) -> str:
        """NAME for the instances NAME:i of one service; a plain service's own name."""
        return instances.group_of(self.spec, self.name)

    @property
    def alive(self) -> bool:
        return self.pidfd is not None


class Supervisor:
    def __init__(self, config: Config, store: Store, watcher: watch.Watcher,
                 launcher: spawn.Launcher | None = None) -> None:
        self.launcher = launcher  # None: pmond forks each intermediate itself
        self.bus = events.Bus()  # every event, live, after the ledger write (_event; events.py)
        # Its str is the instance id; its key, which signs the markers of the services it launches
        # (recovery.py), is read from the data dir by `recover`, before anything is launched or checked.
        self.instance_id = recovery.Instance(instance_id(config.paths.data_dir), b"")
        self.launches = LaunchRecords(os.path.join(config.paths.run_dir, "launches"))
        self.notify = notify.Notify(self, os.path.join(config.paths.run_dir, "notify"))  # sd_notify sockets
        self.sockets = sockets.Sockets(self._event, lambda: self.services.values())  # `listen` (sockets.py)
        self.follow = follow.Follower(self)  # successors: reload windows, pid files, daemonizing (follow.py)
        self.persist = Persist(store, on_commit=lambda count: self._note_commits(count))
        self._adopting = asyncio.Lock()  # one adoption at a time (adopt_existing)
        self._envs: dict[str, dict[str, str]] = {}  # one copy of each distinct environment
        self.config = config
        self.store = store
        self.watcher = watcher
        self.services: dict[int, Service] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.rotator = Rotator(
            config.log_check_interval, self.rotation_files,
            lambda f, kind, what, data: self._event(None if f.ref is None else self.services.get(f.ref), kind, what,
                                                    name=f.name, **data),
            max_use=config.log_max_use, keep_free=config.log_keep_free)

    # lookup

    def find(self, ref: str, caller: auth.Caller | None = None) -> Service:
        """The service `ref` names (an id of ASCII digits, or a name); with `caller`, only among the
        services that caller owns, so a non-root caller cannot even learn that another's exists."""
        ref = str(ref).strip()
        visible = [s for s in self.services.values() if caller is None or caller.owns(s.uid)]
        service_id = model.parse_id(ref)
        if service_id is not None:
            svc = self.services.get(service_id)
            if svc is not None and svc in visible:
                return svc
            raise NotFound(f"no service with id {ref}")
        import unicodedata

        ref = unicodedata.normalize("NFC", ref)
        for svc in visible:
            if svc.name == ref:
                return svc
        names = [s.name for s in visible]
        import difflib

        close = difflib.get_close_matches(ref, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NotFound(f"no service {ref!r}{hint}")

    def select(self, refs: list[str], caller: auth.Caller | None = None) -> list[Service]:
        """The services that `refs` name, in id order, each once: ids, names, `all`, and shell-style globs
        ('web-*', fnmatch rules). All or nothing: a ref that matches nothing raises NotFound naming it.
        With `caller`, only the services it owns are seen."""
        import fnmatch

        visible = [s for s in self.services.values() if caller is None or caller.owns(s.uid)]
        chosen: dict[int, Service] = {}
        for ref in refs:
            if ref == "all":
                found = visible
                if not found:
                    raise NotFound("no services yet: start one with  pmon2 run ./bin/app --name app")
            elif ref.startswith("tag:"):
                found = [s for s in visible if ref[4:] in s.spec.get("tags", ())]
                if not found:
                    raise NotFound(f"no service has the tag {ref[4:]!r}")
            elif any(c in ref for c in "*?["):
                found = [s for s in visible if fnmatch.fnmatchcase(s.name, ref)]
                if not found:
                    raise NotFound(f"no service matches {ref!r}")
            elif any(s.spec.get("instance_of") == ref for s in visible):
                found = [s for s in visible if s.spec.get("instance_of") == ref]  # every instance of NAME
            else:
                found = [self.find(ref, caller)]
            chosen.update((s.id, s) for s in found)
        return [chosen[k] for k in sorted(chosen)]

    def _check_free(self, name: str, but: Service | None = None, taken: dict[str, Any] | None = None) -> None:
        """Names are unique regardless of case (Api and api would be one log file on a case-folding disk,
        and one service to a user). `taken`: case-folded name -> its Service, or the name itself for one
        made earlier in the same bulk create (create_many), looked up there instead of a scan of every service."""
        folded = name.casefold()
        if taken is not None:
            clash = taken.get(folded)
            clash = None if clash is but else clash
        else:
            clash = next((s for s in self.services.values() if s.name.casefold() == folded and s is not but), None)
        if isinstance(clash, str):
            raise Conflict(f"name {name!r} is given twice (as {clash!r}): names are unique regardless of case")
        if clash is not None:
            raise Conflict(f"name {name!r} is taken by service {clash.id} ({clash.name}); choose another with --name")

    async def rename(self, ref: str, new: str) -> Service:
        """A new name (the way to fix a stored name that today's rules refuse, such as `all`). Its log
        files keep their paths."""
        svc = self.find(ref)
        async with svc.lock:
            self._check_free(new, but=svc)
            old = svc.name
            await self.persist.commit(lambda: self.store.rename_service(svc.id, new))
            svc.name = new
            if svc.alive and svc.pid is not None and svc.start_ticks is not None:
                with contextlib.suppress(OSError):  # the record's name is what `daemon recover` would use
                    self.launches.write(LaunchRecord(svc.id, svc.pid, svc.start_ticks, procfs.boot_id(), new))
            self._event(svc, "rename", f"renamed from {old}", old=old)
        return svc

    # services as code: the fields as given, groups of instances, changes, scale, conditions

    def request_fields(self, svc: Service) -> dict[str, Any]:
        """The service's fields in the API's form, as they were given (the group's, for an instance, with
        `instances`): what `update` and `apply` diff against and `dump` writes."""
        spec = svc.spec
        fields = dict(spec.get("fields") or legacy_fields(spec, svc.name))
        fields.update(argv=list(spec["argv"]), env=dict(spec["env"]))
        if spec.get("instance_of"):
            fields["name"] = spec["instance_of"]
            fields["instances"] = len(self.groups().get(spec["instance_of"], [])) or 1
        return fields

    def groups(self) -> dict[str, list[Service]]:
        """Services by group: NAME -> its instances NAME:0.. in order, or the plain service NAME."""
        out: dict[str, list[Service]] = {}
        for svc in sorted(self.services.values(), key=lambda s: (s.spec.get("instance", 0), s.id)):
            out.setdefault(svc.group, []).append(svc)
        return out

    async def update(self, ref: str, changes: dict[str, Any]) -> tuple[list[Service], bool]:
        """Change fields of a service, or of every instance of a group, through the spec model: (the
        services, whether a restart is needed for the change to take effect). Nothing is restarted here."""
        targets = self.select([ref])
        if "name" in changes or "instances" in changes:
            raise BadRequest("name and instances are changed with `rename` and `scale`, not `update`")
        restart = False
        for svc in targets:
            async with svc.lock:
                old = self.request_fields(svc)
                merged = {k: v for k, v in (old | changes).items() if k not in ("instances",) and v is not None}
                merged["name"] = svc.name
                if svc.spec.get("instance_of"):
                    merged.update(instance_of=svc.spec["instance_of"], instance=svc.spec["instance"])
                _, spec = self.build_spec(merged, but=svc)
                if svc.spec.get("instance_of"):
                    spec["instance_of"], spec["instance"] = svc.spec["instance_of"], svc.spec["instance"]
                    spec["fields"] = {k: v for k, v in spec["fields"].items() if k not in ("instance_of", "instance")}
                    spec["fields"]["name"] = svc.spec["instance_of"]
                changed = [k for k in changes if old.get(k) != changes[k]]
                restart = restart or any(k in RESTART_FIELDS for k in changed)
                mark = pending_mark(svc, spec, [k for k in changed if k in RESTART_FIELDS])
                if mark is not None:
                    spec["pending_restart"] = mark
                await self.persist.commit(lambda s=svc, sp=spec: self.store.update_service(s.id, spec=sp))
                svc.spec = self._share_env(spec)
                svc.uid = auth.uid_of_user(spec["user"])
                if changed:
                    self._event(svc, "update", f"changed {', '.join(sorted(changed))}"
                                + ("; takes effect at the next start" if restart else ""), fields=sorted(changed))
        return targets, restart

    async def scale(self, group: str, count: int) -> tuple[list[Service], list[str]]:
        """Run `count` instances of a group: new ones NAME:n.. are created, the highest go first when it
        shrinks. A plain service NAME becomes NAME:0. The new ones follow the group: started when one of its
        instances is meant to run, else created stopped (a stopped group stays stopped, whatever its
        autostart). Returns (the group now, removed names)."""
        current = self.select([group])
        if len(current) == 1 and not current[0].spec.get("instance_of"):
            plain = current[0]
            if count == 1:
                return current, []
            await self.rename(str(plain.id), instances.name(group, 0))
            plain.spec = dict(plain.spec, instance_of=group, instance=0)
            await self.persist.commit(lambda: self.store.update_service(plain.id, spec=plain.spec))
        members = self.groups().get(group, [])
        template = self.request_fields(members[0])
        running = any(s.desired == "running" for s in members)
        removed = []
        for svc in sorted(members, key=lambda s: s.spec["instance"], reverse=True)[:max(len(members) - count, 0)]:
            removed.append(svc.name)
            await self.delete(str(svc.id))
        have = {s.spec["instance"] for s in self.groups().get(group, [])}
        adding = [i for i in range(count) if i not in have]
        for svc in self.groups().get(group, []):
            self._event(svc, "scale", f"{group} scaled to {count}")
        made = await self.create_many([dict(template, name=instances.name(group, i), instance_of=group, instance=i)
                                       for i in adding], start=running)
        failure = next((m for m in made if isinstance(m, BaseException)), None)
        if failure is not None:
            raise failure
        return self.groups().get(group, []), removed

    async def wait_for(self, svc: Service, condition: str, timeout: float) -> None:
        """Until `condition` holds: "started" (a process runs), "ready" (its readiness check passed, or it
        has none), "completed" (it exited with a code in success_exit_codes). Raises PmonError when it
        cannot hold any more (the service failed) or at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = svc.status
            if condition == "started" and status in (Status.STARTING, Status.RUNNING):
                return
            if condition == "ready" and status is Status.RUNNING:
                return
            if condition == "completed" and status is Status.EXITED:
                code = (svc.last_exit or {}).get("code")
                if code in svc.spec.get("success_exit_codes", [0]):
                    return
                if (svc.last_exit or {}).get("source") != "pending":
                    raise PmonError(f"{svc.name} exited with {words.exit_status(svc.last_exit or {})}, "
                                    "not a success code")
            if status in (Status.ERRORED, Status.STOPPED) or (status is Status.EXITED and condition != "completed"):
                raise PmonError(f"{svc.name} is {status.value}, so it will not be {condition}")
            left = deadline - loop.time()
            if left <= 0:
                raise PmonError(f"{svc.name} was not {condition} within {timeout:g} s")
            # Also woken by the exit status arriving (`completed` needs the code).
            await watch.unless(svc.status_known, svc.changed.wait(), None, min(left, 1.0))

    def by_name(self, name: str) -> Service | None:
        return next((s for s in self.services.values() if s.name == name), None)

    # persistence

    # pmond's own writes never stop supervision: when the store fails they wait in memory (persist.py).
    # A user's command writes through `self.persist.commit`: the store is the truth or the command fails.

    def _save(self, svc: Service, *fields: str) -> None:
        self.persist.save(svc.id, {f: getattr(svc, f) for f in fields})

    async def _commit_desired(self, svc: Service, desired: str) -> None:
        """Store what the user asked for before acting on it; on failure undo and raise NotSaved."""
        before, svc.desired = svc.desired, desired
        try:
            await self.persist.commit(lambda: self.store.update_service(svc.id, desired=desired))
        except NotSaved:
            svc.desired = before
            raise

    def _note_commits(self, count: int) -> None:
        try:
            self.launches.write_commits(count, procfs.boot_id())
        except OSError as exc:
            log.warning("cannot note the command count in the run dir: %s", exc.strerror)

    def _event(self, svc: Service | None, kind: str, message: str, name: str | None = None,
               owner_uid: int | None = None, service_id: int | None = None, **data: Any) -> int | None:
        """Log and record an event, then publish it on the bus (with its ledger row id, None while the
        store is down); the caller of the API request being served (if any) is recorded."""
        log.info("%s: %s", svc.name if svc else name, message)
        caller = auth.CALLER.get()
        at, sid, who = time.time(), svc.id if svc else service_id, svc.name if svc else (name or "?")
        caller_uid, owner = caller.uid if caller else None, svc.uid if svc else owner_uid
        row = self.persist.event(sid, who, kind, message, data or None, at, caller_uid=caller_uid, owner_uid=owner)
        self.bus.publish(events.Event(row, at, sid, who, kind, message, data or None, caller_uid, owner))
        return row

    def _transition(self, svc: Service, trigger: Trigger, *, runtime: float | None = None,
                    user_initiated: bool = False, failed: bool | None = None) -> float | None:
        d = step(svc.status, trigger, svc.policy, runtime=runtime, fast_exits=svc.fast_exits,
                 user_initiated=user_initiated, failed=failed)
        if d.status is not svc.status:
            log.debug("%s: %s -> %s (%s)", svc.name, svc.status, d.status, d.reason)
        svc.status = d.status
        svc.fast_exits = d.fast_exits
        self.notify.transition(svc, trigger)  # STATUS= of a new run, the watchdog while running
        svc.changed.set()  # wake whoever waits on a condition of this service (wait_for), then re-arm
        svc.changed = asyncio.Event()
        return d.retry_in

    # start-up

    async def recover(self, rebuild: bool = False) -> list[dict[str, Any]]:
        """Reconcile the database, the launch records and the marked processes: see startup_recovery.py."""
        from pmon2.daemon import startup_recovery

        return await startup_recovery.recover(self, rebuild)

    def _stop_orphans(self, sid: int, pids: list[int], record: Any) -> None:
        """Processes marked with the id of a service that was deleted: stop them (never forget one)."""
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                # Checked again through the pidfd: the pid cannot be reused under us from here on.
                if recovery.marker_of(pid, self.instance_id) == sid:
                    watch.send_signal(pidfd, signal.SIGKILL)
                    self._event(None, "kill", f"killed process {pid}, left over from deleted service {sid}",
                                name=record.name if record is not None else f"#{sid}", pid=pid)
            finally:
                os.close(pidfd)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, PmonError):
                log.error("background task failed", exc_info=exc)

    # creating a service

    def build_spec(self, req: dict[str, Any], but: Service | None = None,
                   taken: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Fields already checked by spec.check_body (SERVICE_FIELDS) -> (name, stored spec), with the
        defaults applied and what needs the machine resolved: the executable, the log paths, the user.
        `taken`: see _check_free."""
        argv = req.get("argv")
        if argv is None:
            raise BadRequest("argv: a command is needed: pmon2 run ./bin/app [args...]")
        cwd = req.get("cwd") or model.SERVICE["cwd"].default
        if not os.path.isdir(cwd):
            raise BadRequest(f"cwd: no such directory: {cwd}")
        env = req.get("env") or {}
        exe = resolve_executable(argv[0], cwd, env.get("PATH", os.defpath))
        if "name" in req:
            name = req["name"]
        else:
            try:
                name = model.check_name(os.path.basename(argv[0]))
            except ValueError as exc:
                raise BadRequest(f"name: {exc}; set one with --name") from None
        self._check_free(name, but=but, taken=taken)
        sockets.check_caller(req, but, self.services.values())  # ports below 1024: root's
        user = req.get("user")
        if user is not None:
            check_user(user)
        if req.get("group") is not None:
            check_group(req["group"], user)
        log_dir = os.path.join(cwd, req.get("log_dir") or self.config.paths.log_dir)
        if req.get("log"):
            out_log = err_log = os.path.normpath(os.path.join(cwd, req["log"]))
        else:
            out_log = os.path.normpath(os.path.join(log_dir, f"{name}-out.log"))
            err_log = os.path.normpath(os.path.join(log_dir, f"{name}-err.log"))
        self._check_log_paths(name, out_log, err_log)
        rotation = {k: req[k] for k in ("log_max_size", "log_keep", "log_compress") if req.get(k) is not None}
        restart = req.get("restart") or ("no" if req.get("autorestart") is False else "always")
        spec = {
            "argv": list(argv), "exe": exe, "cwd": cwd, "env": env, "user": user,
            "out_log": out_log, "err_log": err_log,
            "restart": restart, "autorestart": restart != "no",
            "min_uptime": req.get("min_uptime", self.config.min_uptime),
            "kill_timeout": req.get("kill_timeout", self.config.kill_timeout),
            "stop_signal": req.get("stop_signal", model.SERVICE["stop_signal"].default),
            **rotation,
        }
        # The newer fields are stored only when they differ from their defaults (older specs lack them).
        for key in OPTIONAL_FIELDS:
            if key in req and req[key] != model.SERVICE[key].default:
                spec[key] = req[key]
        # What the user gave, as given (env and argv are the spec's own): diffs and `dump` read it back.
        spec["fields"] = {k: v for k, v in req.items() if k not in ("env", "argv", "instances")}
        return name, spec

    def _check_log_paths(self, name: str, out_log: str, err_log: str) -> None:
        """pmond's own log dir is root's: there the intermediate creates and re-owns logs as root. A caller
        other than root may use it only for its service's own NAME-out.log / NAME-err.log, never to take
        over another service's file (docs/security.md)."""
        caller = auth.CALLER.get()
        if caller is None or caller.privileged:
            return
        own_dir = os.path.normpath(self.config.paths.log_dir)
        own = {os.path.join(own_dir, f"{name}-out.log"), os.path.join(own_dir, f"{name}-err.log")}
        for path in {out_log, err_log}:
            if os.path.dirname(path) == own_dir and path not in own:
                raise auth.Forbidden(f"log: in pmond's log dir {own_dir}, a service may only use its own "
                                     f"{name}-out.log and {name}-err.log")

    async def create(self, req: dict[str, Any]) -> Service:
        """Create a service (and start it, unless autostart is false); with `instances` = N, the N services
        NAME:0 ... NAME:N-1, started at once. Returns the (first) service."""
        made = (await self.create_many([req]))[0]
        if isinstance(made, BaseException):
            raise made
        return made[0]

    async def create_many(self, reqs: list[dict[str, Any]],
                          start: bool | None = None) -> list[list[Service] | PmonError]:
        """Create services in bulk (an apply's creates): per request, its services (NAME:0 ... with
        `instances`), or the error that failed it, in order. Every request is built and checked first (names
        against one case-folded index, not a scan of every service per name); the rows of all of them are
        one transaction (one command: one commit count, one watermark write); then every start begins at
        once, at most LAUNCHES_AT_ONCE launches in flight. A service whose start fails leaves no trace (the
        user fixes the command and applies again); the others go on. `start`: start them or not (scale: as
        their group), instead of each request's autostart. Raises NotSaved when the rows cannot be written
        (nothing was created)."""
        taken: dict[str, Any] = {s.name.casefold(): s for s in self.services.values()}
        results: list[list[Service] | PmonError] = [[] for _ in reqs]
        units: list[tuple[int, str, dict[str, Any], bool]] = []  # (request, name, spec, autostart)
        for i, req in enumerate(reqs):
            try:
                built = []
                for one in self._members(req, taken):
                    name, spec = self.build_spec(one, taken=taken)
                    if "instance_of" in one:
                        spec["instance_of"], spec["instance"] = one["instance_of"], one["instance"]
                        given = {k: v for k, v in spec["fields"].items() if k not in ("instance_of", "instance")}
                        spec["fields"] = dict(given, name=one["instance_of"])
                    built.append((i, name, spec, bool(req.get("autostart", True)) if start is None else start))
                    taken[name.casefold()] = name
            except PmonError as exc:
                results[i] = exc
                continue
            units += built
        if not units:
            return results

        def insert() -> list[int]:
            ids = [self.store.insert_service(name, spec, Status.STOPPED.value) for _, name, spec, _ in units]
            for sid, (_, _, _, autostart) in zip(ids, units, strict=True):
                if not autostart:
                    self.store.update_service(sid, desired="stopped")
            return ids

        ids = await self.persist.commit(insert)
        slots = asyncio.Semaphore(LAUNCHES_AT_ONCE)

        async def start(i: int, svc: Service) -> None:
            async with slots, svc.lock:
                try:
                    await self._start(svc, user_initiated=True)
                except SpawnError as exc:
                    # Leave no trace of a service that never ran: the user fixes the command and runs again.
                    self._forget(svc)
                    try:
                        await self.persist.commit(lambda: self.store.delete_service(svc.id))
                    except NotSaved as gone:
                        log.error("%s: cannot remove the service that failed to start: %s", svc.name, gone.message)
                    if not isinstance(results[i], PmonError):
                        results[i] = exc

        starts = []
        for sid, (i, name, spec, autostart) in zip(ids, units, strict=True):
            svc = Service(id=sid, name=name, spec=self._share_env(spec), uid=auth.uid_of_user(spec["user"]))
            self.services[sid] = svc
            results[i].append(svc)  # type: ignore[union-attr]
            if autostart:
                starts.append(start(i, svc))
            else:
                svc.desired = "stopped"
                self._event(svc, "create", "created, not started ("
                            + ("autostart = false" if start is None else "its group is stopped") + ")")
        await asyncio.gather(*starts)
        return results

    def _members(self, req: dict[str, Any], taken: dict[str, Any]) -> list[dict[str, Any]]:
        """A create request as the request of each service it makes: itself, or NAME:0 ... NAME:N-1 for
        `instances` = N (the group's name NAME must be free as well)."""
        count = req.get("instances", 1)
        if "instances" not in req or req.get("instance_of"):
            return [req]  # one service, or one instance (scale); `instances = 1` given is a group of one
        try:
            group = req.get("name") or model.check_name(os.path.basename(req["argv"][0]))
        except ValueError as exc:
            raise BadRequest(f"name: {exc}; set one with --name") from None
        self._check_free(group, taken=taken)
        return [dict(req, name=instances.name(group, i), instance_of=group, instance=i, instances=count)
                for i in range(count)]

    async def adopt_existing(self, req: dict[str, Any]) -> tuple[Service, dict[str, Any]]:
        """POST /v1/adopt: see daemon/adopt.py."""
        from pmon2.daemon import adopt

        return await adopt.adopt_existing(self, req)

    # the process lifecycle

    def _share_env(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Services started from one shell carry the same environment: keep one copy of it (about 8 KB a
        service otherwise). Specs are never changed in place, so sharing is safe."""
        key = json.dumps(spec["env"], sort_keys=True)
        spec["env"] = self._envs.setdefault(key, spec["env"])
        return spec

    def _forget(self, svc: Service) -> None:
        """Drop a service from memory and the run dir (the caller deletes its row)."""
        del self.services[svc.id]
        self.follow.forget(svc.id)
        self.persist.forget(svc.id)
        self.launches.remove(svc.id)
        if not any(other.spec["env"] is svc.spec["env"] for other in self.services.values()):
            self._envs.pop(json.dumps(svc.spec["env"], sort_keys=True), None)

    def _launch_spec(self, svc: Service) -> spawn.LaunchSpec:
        s = svc.spec
        argv, env = instances.launch_values(s)
        env = self.notify.env(svc, env)  # NOTIFY_SOCKET, WATCHDOG_USEC: pmond's, never stored ones
        fds, env = self.sockets.launch(svc, env)  # `listen`: fds 3.., LISTEN_FDS, LISTEN_FDNAMES
        return spawn.LaunchSpec(exe=s["exe"], argv=argv, cwd=s["cwd"], env=env,
                                out_log=s["out_log"], err_log=s["err_log"], user=s["user"],
                                trusted_log_dir=self.config.paths.log_dir,
                                marker=recovery.marker_value(getattr(self, "instance_id", ""), svc.id, svc.uid),
                                group=s.get("group"),
                                fds=fds)

    async def _start(self, svc: Service, *, user_initiated: bool, restart: bool = False,
                     pending: spawn.Pending | None = None) -> None:
        self._cancel_retry(svc)
        try:
            if pending is None:
                pending = spawn.begin_with_reserve(self._launch_spec(svc), self.launcher)
            launched = await pending.finish(lambda pid, ticks: self.launches.write(
                LaunchRecord(svc.id, pid, ticks, procfs.boot_id(), svc.name)))
        except SpawnError as exc:
            svc.last_error = exc.message
            retry_in = self._transition(svc, Trigger.SPAWN_FAILED, user_initiated=user_initiated)
            svc.retry_at = time.time() + retry_in if retry_in is not None else None
            self._save(svc, "status", "fast_exits", "last_error", "retry_at")
            self._event(svc, "start_failed", exc.message, retry_in=retry_in)
            if retry_in is not None:
                self._schedule_retry(svc, retry_in)
            raise
        if restart:
            svc.restarts += 1
        svc.generation += 1
        svc.pid, svc.start_ticks, svc.started_at = launched.pid, launched.start_ticks, launched.started_at
        svc.boot_id = procfs.boot_id()
        svc.retry_at = None
        svc.last_error = None
        svc.cpu_sample = None
        self._transition(svc, Trigger.SPAWNED)
        self._watch(svc, launched.pid, launched.pidfd)
        self.follow.launched(svc)  # its start window: the children it forks are seen (follow.py)
        self._save(svc, "status", "pid", "start_ticks", "boot_id", "started_at", "restarts", "fast_exits",
                   "retry_at", "last_error")
        self._event(svc, "restart" if restart else "start", f"started process {launched.pid}",
                    pid=launched.pid, restarts=svc.restarts)
        self.rotator.wake(self.log_files(svc))
        if svc.status is Status.STARTING:
            self._spawn_task(self._await_ready(svc, svc.generation))

    def _watch(self, svc: Service, pid: int, pidfd: int) -> None:
        svc.pidfd = pidfd
        svc.exited = asyncio.Event()
        exit_event: list[tuple[int | None, float | None]] = []

        def on_exit() -> None:
            exit_event.append(self._on_exit(svc, pid, pidfd))

        def on_status(status: watch.ExitStatus) -> None:
            self._on_status(svc, pid, status, *(exit_event[0] if exit_event else (None, None)))

        self.watcher.watch(pid, pidfd, on_exit, on_status)

    def _on_exit(self, svc: Service, pid: int, pidfd: int) -> tuple[int | None, float | None]:
        if pid != svc.pid or self.follow.on_main_exit(svc, pid, pidfd):
            return None, None  # handed over before (MAINPID=, a roll) or now (follow.py): no exit of the service
        now = time.time()
        runtime = now - svc.started_at if svc.started_at else None
        svc.pidfd = None  # the watcher keeps it until the status is known, then closes it
        svc.exited.set()
        exit_ticks = follow.boot_ticks()  # before the restart begins: what starts later is not left over
        if svc.status is not Status.STOPPING:
            # Leftovers of a crashed service's group would hold its ports and files. (A stop gives them
            # their grace time instead: _terminate.)
            self._kill_leftovers(svc, *self.follow.group(svc, pid, pidfd))
        svc.last_exit = {"code": None, "signal": None, "at": iso(now),
                         "runtime_s": round(runtime, 3) if runtime is not None else None,
                         "source": "pending", "pid": pid}
        svc.pid = None
        svc.started_at = None
        if svc.status is Status.STOPPING:
            ev = self._exit_event(svc, pid, runtime)
            self._transition(svc, Trigger.STOPPED)
            self._save(svc, "status", "pid", "started_at", "last_exit")
            return ev, runtime
        svc.status_known = asyncio.Event()
        retry_in = self._transition(svc, Trigger.EXIT, runtime=runtime)
        svc.retry_at = now + retry_in if retry_in is not None else None
        if svc.status is Status.BACKOFF and retry_in is None:
            # restart = "on-failure": the decision waits for the exit status (exit_status_wait at most).
            self._spawn_task(self._decide_on_status(svc, svc.generation, runtime))
        if retry_in == 0:
            # The new process first, the ledger after: the launch runs while the rows are written.
            pending = None
            try:
                pending = spawn.begin_with_reserve(self._launch_spec(svc), self.launcher)
            except SpawnError:
                pass  # _start tries again, and records the failure
            self._spawn_task(self._auto_start(svc, svc.generation, restart=True, pending=pending))
        ev = self._exit_event(svc, pid, runtime)
        self._save(svc, "status", "pid", "started_at", "last_exit", "fast_exits", "retry_at")
        self._after_decision(svc, retry_in)
        # Its processes outside the group (setsid) too, once the restart is under way (sweep.py).
        self._spawn_task(sweep.after_crash(self, svc, exit_ticks))
        return ev, runtime

    def _after_decision(self, svc: Service, retry_in: float | None) -> None:
        if retry_in is not None and retry_in > 0:
            self._event(svc, "backoff", words.backoff_message(svc.fast_exits, svc.policy.min_uptime, retry_in),
                        delay_s=retry_in, fast_exits=svc.fast_exits)
            self._schedule_retry(svc, retry_in)
        elif svc.status is Status.ERRORED:
            self._event(svc, "give_up", f"gave up after {svc.fast_exits - 1} fast restarts in a row "
                        f"(max_restarts = {svc.spec.get('max_restarts')}); `pmon2 start` tries again",
                        fast_exits=svc.fast_exits)

    async def _decide_on_status(self, svc: Service, gen: int, runtime: float | None) -> None:
        """restart = "on-failure": wait for the exit status, then restart or not. A status still unknown
        after exit_status_wait counts as a failure (the service is started again)."""
        try:
            await asyncio.wait_for(svc.status_known.wait(), svc.spec.get("exit_status_wait", 3.0))
        except TimeoutError:
            pass
        if svc.id not in self.services or svc.generation != gen or svc.status is not Status.BACKOFF \
                or svc.retry_at is not None:
            return
        last = svc.last_exit or {}
        failed = last.get("code") not in svc.spec.get("success_exit_codes", [0])
        retry_in = self._transition(svc, Trigger.STATUS, runtime=runtime, failed=failed)
        svc.retry_at = time.time() + retry_in if retry_in is not None else None
        self._save(svc, "status", "fast_exits", "retry_at")
        if retry_in == 0:
            self._spawn_task(self._auto_start(svc, gen, restart=True))
        self._after_decision(svc, retry_in)

    async def _await_ready(self, svc: Service, gen: int, timeout: float | None = None) -> None:
        """Run the readiness check (`ready`) of a process that just started: `running` once it passes; a
        failed start past start_timeout (the process is killed, and the restart policy decides).
        `timeout`: seconds left instead of start_timeout (a process adopted after a restart of pmond,
        startup_recovery.py); a probe is still tried once at 0."""
        from pmon2.daemon import probes

        spec = svc.spec
        limit = spec.get("start_timeout", 90.0) if timeout is None else timeout
        try:
            probe = None if spec["ready"] == "notify" else probes.parse(spec["ready"])
        except ValueError as exc:
            result = probes.Result(False, str(exc))
        else:
            if probe is None:  # sd_notify (systemd's Type=notify): READY=1 on its notify socket, notify.py
                result = await self.notify.wait_ready(svc, limit, svc.exited)
            else:
                result = await probes.wait_ready(probe, deadline_s=limit, stop=svc.exited,
                                                 env=instances.launch_values(spec)[1], cwd=spec["cwd"],
                                                 user=probe_identity(spec))
        if svc.id not in self.services or svc.generation != gen or svc.status is not Status.STARTING:
            return
        if result.ok:
            self._transition(svc, Trigger.READY)
            self._save(svc, "status")
            self._event(svc, "ready", f"ready: {result.detail}")
            return
        self._event(svc, "start_failed", f"not ready: {result.detail}")
        self.follow.signal(svc, signal.SIGKILL)  # the current main's group; its exit goes through the policy

    async def _wait_ready_pid(self, svc: Service, pid: int, timeout: float) -> Any:
        """Until process `pid` of `svc` (e.g. a surge process, not yet the main) has sent READY=1 on the
        service's notify socket -> probes.Result(ok, detail); see notify.Notify.wait_ready_pid."""
        return await self.notify.wait_ready_pid(svc, pid, timeout)

    def _exit_event(self, svc: Service, pid: int, runtime: float | None) -> int | None:
        return self._event(svc, "exit", words.exit_message(pid, {"source": "pending", "runtime_s": runtime}),
                           pid=pid, runtime_s=svc.last_exit["runtime_s"] if svc.last_exit else None)

    def _on_status(self, svc: Service, pid: int, status: watch.ExitStatus, event_id: int | None,
                   runtime: float | None) -> None:
        info = {"code": status.code, "signal": status.signal_name(), "core": status.core,
                "source": status.source}
        message = words.exit_message(pid, info | {"runtime_s": runtime})
        if event_id is not None:
            try:
                self.store.complete_event(event_id, message, info)
            except sqlite3.Error as exc:
                log.error("%s: cannot record an exit status: %s", svc.name, exc)
        # The ledger's `exit` row is completed in place; the bus's readers saw it go by, so they get the
        # status as an event of its own (not a ledger row: id None), which names the row it completes.
        self.bus.publish(events.Event(None, time.time(), svc.id, svc.name, events.EXIT_STATUS, message,
                                      info | {"pid": pid, "event_id": event_id, "runtime_s": runtime}, None,
                                      svc.uid))
        # The status of an older run arrives late, after a restart: it must not overwrite a newer exit.
        if svc.last_exit is not None and svc.last_exit.get("pid") == pid and svc.id in self.services:
            svc.last_exit.update(info)
            self._save(svc, "last_exit")
            svc.status_known.set()

    def _kill_leftovers(self, svc: Service, pgid: int, pidfd: int) -> None:
        """SIGKILL what is left of the group the exited main process led, through its pidfd (which the
        watcher still holds): never by a number that may have been reused."""
        if (not watch.signal_tree(pidfd, pgid, signal.SIGKILL) and not watch.GroupSignal.probe()
                and procfs.group_members(pgid)):
            self._event(svc, "leftovers", f"process group {pgid} may have leftovers; not signalled: "
                        "its leader is already reaped and this kernel (before 6.9) cannot signal a "
                        "group through a pidfd", pgid=pgid)

    def _hand_over(self, svc: Service, pid: int, pidfd: int, why: str) -> None:
        """Make `pid` (pinned by `pidfd`, which this takes, and already checked) the service's main process:
        its identity, a launch record (first: a pmond killed from here on adopts `pid`), the watch. The old
        main's exit, before or after, is no exit of the service (_on_exit); restarts unchanged; nothing is
        started or killed. Event `reload`: "pid A handed over to pid B (why)"."""
        old, st, boot = svc.pid, procfs.read_stat(pid), procfs.boot_id()
        ticks = st.starttime if st is not None else 0
        try:
            self.launches.write(LaunchRecord(svc.id, pid, ticks, boot, svc.name))
        except OSError as exc:
            log.warning("%s: no launch record for process %d: %s", svc.name, pid, exc.strerror)
        extra = self.follow.handed_over(svc, old, svc.pidfd, pid, why)
        svc.pid, svc.start_ticks, svc.boot_id = pid, ticks, boot
        svc.started_at, svc.cpu_sample = procfs.start_wall_time(ticks), None
        self._watch(svc, pid, pidfd)
        self._save(svc, "status", "pid", "start_ticks", "boot_id", "started_at")
        self._event(svc, "reload", f"pid {old} handed over to pid {pid}" + (f" ({why})" if why else ""),
                    pid=pid, from_pid=old, why=why, **extra)

    def _claim_main_pid(self, svc: Service, pid: int, source: str) -> str | None:
        """systemd's rule for MAINPID= and pid files (`source` says which): `pid` becomes the main process if
        it belongs to the service and runs as its uid (follow.Follower.membership), by _hand_over. None on
        success (or when it already is the main), else the reason it was refused, also recorded."""
        if svc.alive and pid == svc.pid:
            return None
        pidfd, why = self.follow.claim(svc, pid)
        if pidfd is None:
            self._event(svc, "reload", f"{source}: pid {pid} refused: {why}", pid=pid, refused=True, source=source)
            return why
        self._hand_over(svc, pid, pidfd, source)
        return None

    def _schedule_retry(self, svc: Service, delay: float) -> None:
        self._cancel_retry(svc)
        gen = svc.generation
        svc.retry_handle = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn_task(self._auto_start(svc, gen, restart=True)))

    def _cancel_retry(self, svc: Service) -> None:
        if svc.retry_handle is not None:
            svc.retry_handle.cancel()
            svc.retry_handle = None

    async def _auto_start(self, svc: Service, gen: int, restart: bool, pending: spawn.Pending | None = None) -> None:
        try:
            async with svc.lock:
                # A user may have stopped, restarted or deleted it while we waited.
                if (svc.id not in self.services or svc.generation != gen or svc.status is not Status.BACKOFF
                        or svc.desired != "running"):
                    return
                launching, pending = pending, None
                try:
                    await self._start(svc, user_initiated=False, restart=restart, pending=launching)
                except SpawnError:
                    pass  # recorded, and a retry is scheduled
        finally:
            if pending is not None:
                pending.abort()  # not wanted any more: the intermediate kills what it started

    async def _terminate(self, svc: Service, force: bool) -> None:
        """Stop the service as systemd's KillMode=control-group does: the stop signal goes to its whole
        process group, the whole group gets `kill_timeout` (even after the main process has exited),
        then SIGKILL goes to what is left. Its processes outside that group (a reload window's successor,
        a child that called setsid) are stopped as well (sweep.py): the window's held ones get the signal
        with the group, the marked ones once the group is gone. Returns as soon as nothing of the service
        runs. A `stop -f` meanwhile (svc.escalate) sends SIGKILL at once."""
        self._cancel_retry(svc)
        sig = signal.SIGKILL if force else parse_signal(svc.spec["stop_signal"])
        escalate = svc.escalate = asyncio.Event()
        held: dict[int, int] = {}
        try:
            if not svc.alive:
                if svc.status is not Status.STOPPED:
                    self._event(svc, "stop", f"stopped (was {svc.status}, no process running)")
                    self._transition(svc, Trigger.STOP)
                    svc.retry_at = None
                    self._save(svc, "status", "retry_at")
                # What a crash left behind (its sweep may not have run yet) goes too.
                await sweep.stop_leftovers(self, svc, held, sig, escalate=escalate)
                return
            assert svc.pid is not None and svc.pidfd is not None
            pid, group = self.follow.group(svc, svc.pid, svc.pidfd)  # a followed main may lead no group (follow.py)
            group = os.dup(group)  # pins the group's identity past the main process's exit and reaping
            try:
                held = self.follow.held_pidfds(svc)  # taken now: the main's exit closes the window's
                self._transition(svc, Trigger.STOP)
                self._save(svc, "status")
                self._event(svc, "stop", f"sending {sig.name} to process group {pid}", pid=pid, signal=sig.name)
                for fd in held.values():
                    watch.send_signal(fd, sig)
                if not await watch.stop_group(group, pid, svc.exited, sig, svc.spec["kill_timeout"],
                                              escalate=escalate,
                                              note_kill=lambda text: self._event(svc, "kill", text, pid=pid)):
                    raise PmonError(f"process group {pid} of {svc.name} did not die after SIGKILL "
                                    "(stuck in the kernel?)")
            finally:
                os.close(group)
            await sweep.stop_leftovers(self, svc, held, signal.SIGKILL if escalate.is_set() else sig,
                                       escalate=escalate)
        finally:
            for fd in held.values():  # left only when the sequence was cut short
                os.close(fd)
            if svc.escalate is escalate:
                svc.escalate = None

    # user operations

    async def start(self, ref: str) -> Service:
        svc = self.find(ref)
        async with svc.lock:
            await self._commit_desired(svc, "running")
            if not svc.alive:
                svc.fast_exits = 0
                if svc.status is Status.BACKOFF:
                    svc.status = Status.STOPPED
                await self._start(svc, user_initiated=True)
        return svc

    async def stop(self, ref: str, force: bool = False) -> Service:
        svc = self.find(ref)
        if force and svc.escalate is not None:
            svc.escalate.set()  # a graceful stop holds the lock: cut it short rather than wait behind it
        rolling.halt(svc, "stopped")  # a roll waiting for its new process holds the lock: it gives up now
        async with svc.lock:
            await self._commit_desired(svc, "stopped")
            await self._terminate(svc, force)
            self.sockets.collect()  # a stopped service's sockets close: connections are refused, not left waiting
        return svc

    async def restart(self, ref: str) -> Service:
        """Stop then start; an instance of a group, or a --listen service without reload_signal, rolls
        instead (rolling.py: a new process first, in batches of rolling_batch)."""
        svc = self.find(ref)
        how = rolling.strategy_of(self, svc, "restart")
        if how is not None:
            return (await rolling.replace(self, svc, "restart", how)).svc
        return await self.restart_in_place(svc)

    async def restart_in_place(self, svc: Service) -> Service:
        async with svc.lock:
            was_alive = svc.alive
            await self._commit_desired(svc, "running")
            await self._terminate(svc, force=False)
            svc.fast_exits = 0
            await self._start(svc, user_initiated=True, restart=was_alive)
        return svc

    async def reload(self, ref: str, sig_name: str | None, wait: float | bool | None = None) -> tuple[Service, str]:
        """Send the reload signal and open the reload window (follow.py): until reload_timeout, an exit of the
        main process that leaves a successor is a handover, not a crash. With `wait` (True: reload_timeout,
        or seconds), return once the handover is done; PmonError with the reason when there was none."""
        svc = self.find(ref)
        sig = parse_signal(sig_name or svc.spec.get("reload_signal") or "USR2")
        if svc.status is Status.STOPPING:
            raise Conflict(f"{svc.name} is stopping; reload refused")
        async with svc.lock:
            if not svc.alive or svc.status not in (Status.RUNNING, Status.STARTING):
                raise Conflict(f"{svc.name} is not running ({svc.status}); start it first")
            assert svc.pidfd is not None
            window = self.follow.open_window(svc)  # first: a child forked at the signal is seen
            if not watch.send_signal(svc.pidfd, sig):
                self.follow.close_window(svc, f"{svc.name} exited before the signal")
                raise Conflict(f"{svc.name} has just exited")
            self._event(svc, "reload", f"sent {sig.name} to process {svc.pid}", pid=svc.pid, signal=sig.name)
        if wait is not None and wait is not False:
            got = await self.follow.wait(window, svc.spec.get("reload_timeout", 30.0) if wait is True else wait)
            if not got.ok:
                raise PmonError(got.message, code="no_handover")
        return svc, sig.name

    async def delete(self, ref: str, force: bool = False) -> Service:
        svc = self.find(ref)
        if force and svc.escalate is not None:
            svc.escalate.set()
        rolling.halt(svc, "deleted")
        async with svc.lock:
            # Stopped for good first: if the row cannot be deleted afterwards, the next pmond still
            # leaves it stopped, and the user is told.
            await self._commit_desired(svc, "stopped")
            await self._terminate(svc, force=force)
            # Processes of the service that left its group (setsid) still carry its marker: no leftovers.
            self._stop_orphans(svc.id, recovery.marked_processes(self.instance_id).get(svc.id, []), svc)
            try:
                await self.persist.commit(lambda: self.store.delete_service(svc.id))
            except NotSaved as exc:
                raise NotSaved(f"{svc.name} is stopped but not deleted: {exc.message}") from None
            self._forget(svc)
            self.notify.close(svc.id)
            self.sockets.collect()  # its listening sockets, unless its group still has members
            self._event(None, "delete", "deleted", name=svc.name, owner_uid=svc.uid)
        return svc

    def rotation_policy(self, svc: Service) -> RotationPolicy:
        s, c = svc.spec, self.config
        return RotationPolicy(max_size=s.get("log_max_size") or c.log_max_size,
                              keep=c.log_keep if s.get("log_keep") is None else s["log_keep"],
                              compress=c.log_compress if s.get("log_compress") is None else s["log_compress"])

    def log_files(self, svc: Service) -> list[Any]:
        """The logs of one service (rotate.LogFile): what a start hands the rotator to probe."""
        from pmon2.daemon.rotate import LogFile, log_owner

        owners, chown = log_owner(svc.spec["user"])
        policy, writer = self.rotation_policy(svc), svc.pid if svc.alive else None
        return [LogFile(p, policy, svc.name, svc.id, owners, chown, writer)
                for p in dict.fromkeys((svc.spec["out_log"], svc.spec["err_log"]))]

    def rotation_files(self) -> list[Any]:
        """Every log pmond knows (rotate.LogFile), its service running or not, and pmond's own."""
        from pmon2.daemon.rotate import LogFile

        c = self.config
        files = []
        for svc in self.services.values():
            files += self.log_files(svc)
        files.append(LogFile(os.path.join(c.paths.log_dir, "pmond.log"),
                             RotationPolicy(c.log_max_size, c.log_keep, c.log_compress), "pmond",
                             owners=frozenset({os.geteuid()}), quiet=True))
        return files

    def flush(self, services: list[Service]) -> list[str]:
        """Empty log files in place: services keep writing through O_APPEND at the new end. Nothing is
        followed: a log that is a symlink, a hard link or a FIFO is refused (rotate.empty_log), the
        others are emptied all the same, and the first refusal is the error."""
        from pmon2.daemon.rotate import empty_log, log_owner

        emptied: list[str] = []
        errors: list[str] = []
        for svc in services:
            owners, _ = log_owner(svc.spec["user"])
            done = []
            for path in dict.fromkeys((svc.spec["out_log"], svc.spec["err_log"])):
                try:
                    if empty_log(path, owners):
                        done.append(path)
                except PmonError as exc:
                    errors.append(exc.message)
                    self._event(svc, "flush", exc.message, refused=True)
                except OSError as exc:
                    errors.append(f"cannot empty {path}: {exc.strerror}")
            if done:
                self._event(svc, "flush", "logs emptied", files=done)
            emptied += done
        if errors:
            more = f" ({words.other_files_emptied(len(emptied))})" if emptied else ""
            raise PmonError(errors[0] + more)
        return emptied

    # views

    def view(self, svc: Service, detail: bool = False, show_env: bool = False, scan: Any = None) -> dict[str, Any]:
        """A service as the API shows it. Its environment is masked (spec.mask_env) unless `show_env`,
        which the API grants only to root and the service's own user. `scan` (a usage.Scan) is the one
        look at /proc that all the views of a request share (`ls`: one for all services)."""
        now = time.time()
        usage = self._usage(svc, scan)
        s = svc.spec
        out: dict[str, Any] = {
            "id": svc.id, "name": svc.name, "pid": svc.pid if svc.alive else None,
            "user": s["user"] or current_user(), "argv": s["argv"], "cwd": s["cwd"],
            "status": svc.status.value, "desired": svc.desired, "restarts": svc.restarts,
            "uptime_s": round(now - svc.started_at, 3) if svc.alive and svc.started_at else None,
            **usage,
            "started_at": iso(svc.started_at) if svc.alive else None,
            "retry_at": iso(svc.retry_at) if svc.status is Status.BACKOFF else None,
            "retry_in_s": max(0.0, round(svc.retry_at - now, 3))
            if svc.status is Status.BACKOFF and svc.retry_at else None,
            "last_exit": public_exit(svc.last_exit), "last_error": svc.last_error,
            "autorestart": s["autorestart"], "restart": restart_mode(s), "out_log": s["out_log"],
            "err_log": s["err_log"], "instance_of": s.get("instance_of"), "instance": s.get("instance"),
            "tags": s.get("tags", []), "source": s.get("source"), "status_text": svc.status_text,
        }
        if detail:
            try:
                recent = [{"at": iso(e["at"]), "message": e["message"]} | e["data"]
                          for e in self.store.events(svc.id, 5, kind="exit")]
            except sqlite3.Error:
                recent = []  # the ledger cannot be read now (locked): the rest of the view still can
            rotation = self.rotation_policy(svc)
            out |= {"log_max_size": rotation.max_size, "log_keep": rotation.keep, "log_compress": rotation.compress,
                    "exe": s["exe"], "env": s["env"] if show_env else model.mask_env(s["env"]),
                    "env_masked": not show_env, "min_uptime": s["min_uptime"],
                    "kill_timeout": s["kill_timeout"], "stop_signal": s["stop_signal"],
                    "fast_exits": svc.fast_exits, "recent_exits": recent, "imported_from": s.get("imported_from"),
                    "followed": self.follow.describe(svc)}
            out |= {k: s.get(k, model.SERVICE[k].default) for k in OPTIONAL_FIELDS if k not in ("tags", "source")}
            out |= self.notify.view(svc)
        return out

    def _usage(self, svc: Service, scan: Any = None) -> dict[str, Any]:
        """CPU and memory of the whole service (all the processes of its session) and of its main process
        alone (daemon/usage.py); every field None while it does not run."""
        from pmon2.daemon import usage

        if not svc.alive or svc.pid is None:
            return dict.fromkeys(usage.FIELDS)
        got = (scan or usage.SAMPLER.scan()).usage(svc.pid, svc.cpu_sample)
        if got is None:
            return dict.fromkeys(usage.FIELDS)
        figures, svc.cpu_sample = got
        return figures.as_dict()

    def daemon_status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for svc in self.services.values():
            counts[svc.status.value] = counts.get(svc.status.value, 0) + 1
        return {"services": len(self.services), "by_status": counts, "instance_id": self.instance_id}


def public_exit(last_exit: dict[str, Any] | None) -> dict[str, Any] | None:
    if last_exit is None:
        return None
    return {k: last_exit.get(k) for k in ("code", "signal", "at", "core", "runtime_s", "source", "while_down")
            if k in last_exit or k in ("code", "signal", "at")}


def resolve_executable(cmd: str, cwd: str, path_var: str) -> str:
    if "/" in cmd:
        candidate = os.path.normpath(os.path.join(cwd, cmd))
        if not os.path.exists(candidate):
            raise SpawnError(f"no such file: {cmd}")
        if os.path.isdir(candidate):
            raise SpawnError(f"{cmd} is a directory, not a program")
        if not os.access(candidate, os.X_OK):
            raise SpawnError(f"{cmd} is not executable (chmod +x {cmd}?)")
        return candidate
    for entry in path_var.split(os.pathsep):
        base = os.path.join(cwd, entry) if entry else cwd
        candidate = os.path.join(base, cmd)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.normpath(candidate)
    raise SpawnError(f"command not found: {cmd} (not in PATH; give a path such as ./{cmd})")


# Fields stored in a spec only when they differ from their defaults (specs written before them lack them).
OPTIONAL_FIELDS = ("group", "success_exit_codes", "exit_status_wait", "max_restarts", "backoff_base", "backoff_cap",
                   "reload_signal", "port", "tags", "ready", "start_timeout", "depends_on", "source",
                   "rolling_batch", "watchdog_sec", "listen", "reuseport", "pidfile", "reload_timeout")
# A change of these takes effect at the next start: `update` says a restart is needed.
RESTART_FIELDS = frozenset({"argv", "cwd", "env", "user", "group", "log", "log_dir", "port", "ready",
                            "watchdog_sec", "listen", "reuseport", "pidfile"})


# What a process is launched with, of a stored spec: a change of any of these waits for a restart.
LAUNCH_KEYS = ("exe", "argv", "cwd", "env", "user", "group", "out_log", "err_log", "port", "ready", "watchdog_sec",
               "listen", "reuseport", "pidfile", "instance")


def launch_digest(spec: dict[str, Any]) -> str:
    """A digest of what a stored spec launches a process with (LAUNCH_KEYS): equal digests, equal processes."""
    text = json.dumps([spec.get(k) for k in LAUNCH_KEYS], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pending_mark(svc: Service, new_spec: dict[str, Any], fields: list[str]) -> dict[str, Any] | None:
    """The `pending_restart` mark of `new_spec`, which replaces svc.spec while svc's process keeps running:
    {"pid", "start_ticks": the process that still runs the older spec, "digest": that spec's launch_digest,
    "fields": the fields (RESTART_FIELDS) changed since it started}; None when nothing runs or what runs
    is what `new_spec` would launch. A failed rolling restart leaves it, so the next apply finishes the
    change (restart_pending); any later start of the service makes it stale."""
    if not svc.alive or svc.pid is None:
        return None
    mark = svc.spec.get("pending_restart")
    if not mark or (mark.get("pid"), mark.get("start_ticks")) != (svc.pid, svc.start_ticks):
        if not fields:
            return None
        mark = {"pid": svc.pid, "start_ticks": svc.start_ticks, "digest": launch_digest(svc.spec), "fields": []}
    if launch_digest(new_spec) == mark["digest"]:
        return None  # changed back: the process runs what the spec says
    return dict(mark, fields=sorted(set(mark["fields"]) | set(fields)))


def restart_pending(svc: Service) -> list[str]:
    """The fields (RESTART_FIELDS) whose change waits for a restart of svc's running process (it was
    started before they changed, and a restart did not follow or failed); [] when it runs its spec."""
    mark = svc.spec.get("pending_restart")
    if not mark or not svc.alive or (mark.get("pid"), mark.get("start_ticks")) != (svc.pid, svc.start_ticks):
        return []
    return list(mark.get("fields") or [])


def legacy_fields(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """Request fields for a spec stored before specs kept them (what `run` gave, as near as it can be
    told): the log paths are given back as `log` when stdout and stderr share a file."""
    out: dict[str, Any] = {"name": name, "cwd": spec["cwd"], "user": spec.get("user"),
                           "restart": restart_mode(spec), "min_uptime": spec["min_uptime"],
                           "kill_timeout": spec["kill_timeout"], "stop_signal": spec["stop_signal"]}
    if spec["out_log"] == spec["err_log"]:
        out["log"] = spec["out_log"]
    else:
        out["log_dir"] = os.path.dirname(spec["out_log"])
    out.update({k: spec[k] for k in ("log_max_size", "log_keep", "log_compress", *OPTIONAL_FIELDS) if k in spec})
    return {k: v for k, v in out.items() if v is not None}


def probe_identity(spec: dict[str, Any]) -> tuple[int, int, list[int]] | None:
    """(uid, gid, groups) an exec: readiness probe runs as: the service's, never root's for another
    user's service. None: pmond's own."""
    user, group = spec.get("user"), spec.get("group")
    if user is None and group is None:
        return None
    import grp
    import pwd

    pw = pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.geteuid())
    gid = grp.getgrnam(group).gr_gid if group is not None else pw.pw_gid
    if (pw.pw_uid, gid) == (os.geteuid(), os.getegid()):
        return None
    return pw.pw_uid, gid, os.getgrouplist(pw.pw_name, gid)


def restart_mode(spec: dict[str, Any]) -> str:
    """A stored spec's restart mode; specs from before `restart` have only `autorestart`."""
    return spec.get("restart") or ("always" if spec.get("autorestart", True) else "no")


def check_group(group: str, user: str | None) -> None:
    import grp

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SpawnError(f"no such group: {group}") from None
    if os.geteuid() != 0 and gid not in os.getgroups() and gid != os.getegid():
        raise SpawnError(f"--group {group} needs pmond to run as root")
    caller = auth.CALLER.get()
    if caller is not None and not caller.privileged:
        import pwd

        name = user or auth.user_name(caller.uid)
        try:
            primary = pwd.getpwnam(name).pw_gid
        except KeyError:
            primary = -1
        if gid != primary and gid not in os.getgrouplist(name, primary if primary >= 0 else gid):
            raise auth.Forbidden(f"group: {name} is not a member of {group}")


def check_user(user: str) -> None:
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SpawnError(f"no such user: {user}") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise SpawnError(f"--user {user} needs pmond to run as root")


def instance_id(data_dir: str) -> str:
    """Tells this pmond apart from the pmonds of other users and other PMON2_HOMEs on the machine: a
    64-bit FNV-1a hash of pmond's uid and its data dir, in hex. Each service carries
    PMON2_SERVICE=<instance id>:<service id>:<tag>, so its processes can be told apart even when the
    database is lost. Anyone can compute it: the tag, made with pmond's secret key, is what authenticates
    a marker (recovery.py). (Not hashlib: its OpenSSL costs pmond 3.4 MB of resident memory.)"""
    value = 0xCBF29CE484222325
    for byte in f"{os.geteuid()}:{os.path.realpath(data_dir)}".encode():
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


@functools.cache
def current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
