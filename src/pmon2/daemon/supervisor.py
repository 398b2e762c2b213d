"""The service table: every service's spec and runtime state, and the operations on them.

Each status change goes through policy.step; each one that matters is written to the store and the
event ledger before the next await, so a SIGKILL of pmond at any moment leaves a consistent record.
User operations on one service are serialised by its lock; automatic restarts take the same lock.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pmon2 import procfs
from pmon2.config import Config
from pmon2.daemon import spawn, watch
from pmon2.daemon.policy import RestartPolicy, Status, Trigger, step
from pmon2.daemon.rotate import RotationPolicy, Rotator, parse_size
from pmon2.daemon.store import Store
from pmon2.errors import BadRequest, Conflict, NotFound, PmonError, SpawnError
from pmon2.signals import parse_signal

log = logging.getLogger("pmond")

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
# After SIGKILL a process dies unless stuck in the kernel (D state); don't hang a client forever.
KILL_WAIT = 10.0


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Service:
    id: int
    name: str
    spec: dict[str, Any]
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
    cpu_sample: tuple[float, float] | None = None  # (cpu seconds, monotonic time)

    @property
    def policy(self) -> RestartPolicy:
        return RestartPolicy(autorestart=self.spec["autorestart"], min_uptime=self.spec["min_uptime"])

    @property
    def alive(self) -> bool:
        return self.pidfd is not None


class Supervisor:
    def __init__(self, config: Config, store: Store, watcher: watch.Watcher,
                 launcher: spawn.Launcher | None = None) -> None:
        self.launcher = launcher  # None: pmond forks each intermediate itself
        self._envs: dict[str, dict[str, str]] = {}  # one copy of each distinct environment
        self.config = config
        self.store = store
        self.watcher = watcher
        self.services: dict[int, Service] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.rotator = Rotator(config.log_check_interval, self.rotation_files,
                               lambda name, what: self._event(self.by_name(name), "rotate", what, name=name))

    # lookup

    def find(self, ref: str) -> Service:
        ref = str(ref).strip()
        if ref.isdigit():
            svc = self.services.get(int(ref))
            if svc is not None:
                return svc
            raise NotFound(f"no service with id {ref}")
        for svc in self.services.values():
            if svc.name == ref:
                return svc
        names = [s.name for s in self.services.values()]
        import difflib

        close = difflib.get_close_matches(ref, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NotFound(f"no service {ref!r}{hint}")

    def by_name(self, name: str) -> Service | None:
        return next((s for s in self.services.values() if s.name == name), None)

    # persistence

    # A write that fails (a full disk, say) is logged and the service goes on being supervised: losing
    # a ledger line is better than leaving a crashed service down.

    def _save(self, svc: Service, *fields: str) -> None:
        try:
            self.store.update_service(svc.id, **{f: getattr(svc, f) for f in fields})
        except sqlite3.Error as exc:
            log.error("%s: cannot save its state: %s", svc.name, exc)

    def _event(self, svc: Service | None, kind: str, message: str, name: str | None = None,
               **data: Any) -> int | None:
        log.info("%s: %s", svc.name if svc else name, message)
        try:
            return self.store.add_event(svc.id if svc else None, svc.name if svc else (name or "?"), kind,
                                        message, data or None)
        except sqlite3.Error as exc:
            log.error("cannot record an event: %s", exc)
            return None

    def _transition(self, svc: Service, trigger: Trigger, *, runtime: float | None = None,
                    user_initiated: bool = False) -> float | None:
        d = step(svc.status, trigger, svc.policy, runtime=runtime, fast_exits=svc.fast_exits,
                 user_initiated=user_initiated)
        if d.status is not svc.status:
            log.debug("%s: %s -> %s (%s)", svc.name, svc.status, d.status, d.reason)
        svc.status = d.status
        svc.fast_exits = d.fast_exits
        return d.retry_in

    # start-up

    async def recover(self) -> None:
        """Load every service; take back those still running, start those that died meanwhile."""
        boot = procfs.boot_id()
        for row in self.store.load_services():
            svc = Service(id=row["id"], name=row["name"], spec=self._share_env(row["spec"]), desired=row["desired"],
                          status=Status(row["status"]), pid=row["pid"], start_ticks=row["start_ticks"],
                          boot_id=row["boot_id"], started_at=row["started_at"], restarts=row["restarts"],
                          fast_exits=row["fast_exits"], retry_at=row["retry_at"], last_exit=row["last_exit"],
                          last_error=row["last_error"])
            self.services[svc.id] = svc
            self._recover_one(svc, boot)

    def _recover_one(self, svc: Service, boot: str) -> None:
        pidfd = watch.adopt(svc.pid, svc.start_ticks, svc.boot_id) if svc.pid else None
        if pidfd is not None:
            assert svc.pid is not None
            svc.status = Status.RUNNING
            self._watch(svc, svc.pid, pidfd)
            self._save(svc, "status")
            self._event(svc, "adopt", f"adopted running process {svc.pid}", pid=svc.pid)
            if svc.desired == "stopped":
                self._spawn_task(self.stop(str(svc.id)))
            return
        rebooted = svc.boot_id is not None and svc.boot_id != boot
        was_up = svc.status in (Status.RUNNING, Status.STOPPING)
        if was_up:
            why = "the machine rebooted" if rebooted else "it ended while pmond was down"
            svc.last_exit = {"code": None, "signal": None, "at": None, "runtime_s": None,
                             "source": "unknown", "while_down": True}
            self._event(svc, "exit", f"process {svc.pid} is gone: {why}; exit status unknown",
                        pid=svc.pid, while_down=True, rebooted=rebooted)
        svc.pid = None
        svc.started_at = None
        if svc.desired == "running" and (was_up or svc.status is Status.BACKOFF or rebooted):
            svc.status = Status.BACKOFF
            svc.retry_at = time.time()
            self._save(svc, "status", "pid", "started_at", "retry_at", "last_exit")
            self._spawn_task(self._auto_start(svc, svc.generation, restart=was_up))
        else:
            if svc.status in (Status.RUNNING, Status.STOPPING, Status.BACKOFF):
                svc.status = Status.STOPPED
            self._save(svc, "status", "pid", "started_at", "last_exit")

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

    def build_spec(self, req: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise BadRequest("a command is needed: pmon2 run ./bin/app [args...]")
        cwd = req.get("cwd") or os.getcwd()
        if not os.path.isabs(cwd) or not os.path.isdir(cwd):
            raise BadRequest(f"no such directory: {cwd}")
        env = req.get("env")
        if env is None:
            env = {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise BadRequest("env must map names to strings")
        exe = resolve_executable(argv[0], cwd, env.get("PATH", os.defpath))
        name = req.get("name") or os.path.basename(argv[0])
        if not NAME_RE.fullmatch(name) or name.isdigit():
            raise BadRequest(f"invalid name {name!r}: use letters, digits, '.', '_' and '-' "
                             "(not only digits); set one with --name")
        clash = self.by_name(name)
        if clash is not None:
            raise Conflict(f"name {name!r} is taken by service {clash.id}; choose another with --name")
        user = req.get("user") or None
        if user is not None:
            check_user(user)
        log_dir = os.path.join(cwd, req["log_dir"] if req.get("log_dir") else self.config.paths.log_dir)
        if req.get("log"):
            out_log = err_log = os.path.normpath(os.path.join(cwd, req["log"]))
        else:
            out_log = os.path.normpath(os.path.join(log_dir, f"{name}-out.log"))
            err_log = os.path.normpath(os.path.join(log_dir, f"{name}-err.log"))
        stop_signal = parse_signal(req.get("stop_signal") or "TERM").name
        rotation = {}
        if req.get("log_max_size") is not None:
            try:
                rotation["log_max_size"] = parse_size(req["log_max_size"])
            except ValueError as exc:
                raise BadRequest(f"--log-max-size: {exc}") from None
        if req.get("log_keep") is not None:
            keep = req["log_keep"]
            if isinstance(keep, str) and keep.isdigit():
                keep = int(keep)
            if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= 1000:
                raise BadRequest("--log-keep must be a whole number from 0 to 1000")
            rotation["log_keep"] = keep
        if req.get("log_compress") is not None:
            rotation["log_compress"] = bool(req["log_compress"])
        spec = {
            "argv": list(argv), "exe": exe, "cwd": cwd, "env": env, "user": user,
            "out_log": out_log, "err_log": err_log,
            "autorestart": bool(req.get("autorestart", True)),
            "min_uptime": seconds(req, "min_uptime", self.config.min_uptime),
            "kill_timeout": seconds(req, "kill_timeout", self.config.kill_timeout),
            "stop_signal": stop_signal,
            **rotation,
        }
        return name, spec

    async def create(self, req: dict[str, Any]) -> Service:
        name, spec = self.build_spec(req)
        for path in {spec["out_log"], spec["err_log"]}:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as exc:
                raise BadRequest(f"cannot create log dir {os.path.dirname(path)}: {exc.strerror}") from None
        service_id = self.store.insert_service(name, spec, Status.STOPPED.value)
        svc = Service(id=service_id, name=name, spec=self._share_env(spec))
        self.services[svc.id] = svc
        async with svc.lock:
            try:
                await self._start(svc, user_initiated=True)
            except SpawnError:
                # Leave no trace of a service that never ran: the user fixes the command and runs again.
                self._forget(svc)
                raise
        return svc

    # the process lifecycle

    def _share_env(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Services started from one shell carry the same environment: keep one copy of it (about 8 KB a
        service otherwise). Specs are never changed in place, so sharing is safe."""
        key = json.dumps(spec["env"], sort_keys=True)
        spec["env"] = self._envs.setdefault(key, spec["env"])
        return spec

    def _forget(self, svc: Service) -> None:
        del self.services[svc.id]
        self.store.delete_service(svc.id)
        if not any(other.spec["env"] is svc.spec["env"] for other in self.services.values()):
            self._envs.pop(json.dumps(svc.spec["env"], sort_keys=True), None)

    def _launch_spec(self, svc: Service) -> spawn.LaunchSpec:
        s = svc.spec
        return spawn.LaunchSpec(exe=s["exe"], argv=s["argv"], cwd=s["cwd"], env=s["env"],
                                out_log=s["out_log"], err_log=s["err_log"], user=s["user"])

    async def _start(self, svc: Service, *, user_initiated: bool, restart: bool = False,
                     pending: spawn.Pending | None = None) -> None:
        self._cancel_retry(svc)
        try:
            if pending is None:
                pending = spawn.begin(self._launch_spec(svc), self.launcher)
            launched = await pending.finish()
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
        self._save(svc, "status", "pid", "start_ticks", "boot_id", "started_at", "restarts", "fast_exits",
                   "retry_at", "last_error")
        self._event(svc, "restart" if restart else "start", f"started process {launched.pid}",
                    pid=launched.pid, restarts=svc.restarts)
        self.rotator.wake()

    def _watch(self, svc: Service, pid: int, pidfd: int) -> None:
        svc.pidfd = pidfd
        svc.exited = asyncio.Event()
        exit_event: list[tuple[int | None, float | None]] = []

        def on_exit() -> None:
            exit_event.append(self._on_exit(svc, pid))

        def on_status(status: watch.ExitStatus) -> None:
            self._on_status(svc, pid, status, *(exit_event[0] if exit_event else (None, None)))

        self.watcher.watch(pid, pidfd, on_exit, on_status)

    def _on_exit(self, svc: Service, pid: int) -> tuple[int | None, float | None]:
        now = time.time()
        runtime = now - svc.started_at if svc.started_at else None
        svc.pidfd = None  # the watcher keeps it until the status is known, then closes it
        svc.exited.set()
        # Leftovers of the group (children of a crashed service) would hold its ports and files.
        self._kill_leftovers(pid)
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
        retry_in = self._transition(svc, Trigger.EXIT, runtime=runtime)
        svc.retry_at = now + retry_in if retry_in is not None else None
        if retry_in == 0:
            # The new process first, the ledger after: the launch runs while the rows are written.
            pending = None
            try:
                pending = spawn.begin(self._launch_spec(svc), self.launcher)
            except SpawnError:
                pass  # _start tries again, and records the failure
            self._spawn_task(self._auto_start(svc, svc.generation, restart=True, pending=pending))
        ev = self._exit_event(svc, pid, runtime)
        self._save(svc, "status", "pid", "started_at", "last_exit", "fast_exits", "retry_at")
        if retry_in is not None and retry_in > 0:
            self._event(svc, "backoff", f"died {svc.fast_exits} times in a row within "
                        f"{svc.policy.min_uptime:g} s: next start in {retry_in:g} s", delay_s=retry_in,
                        fast_exits=svc.fast_exits)
            self._schedule_retry(svc, retry_in)
        return ev, runtime

    def _exit_event(self, svc: Service, pid: int, runtime: float | None) -> int | None:
        return self._event(svc, "exit", f"process {pid} exited after {fmt_runtime(runtime)}, status pending",
                           pid=pid, runtime_s=svc.last_exit["runtime_s"] if svc.last_exit else None)

    def _on_status(self, svc: Service, pid: int, status: watch.ExitStatus, event_id: int | None,
                   runtime: float | None) -> None:
        info = {"code": status.code, "signal": status.signal_name(), "core": status.core,
                "source": status.source}
        if event_id is not None:
            try:
                self.store.complete_event(
                    event_id, f"process {pid} exited after {fmt_runtime(runtime)}: {status.describe()}", info)
            except sqlite3.Error as exc:
                log.error("%s: cannot record an exit status: %s", svc.name, exc)
        # The status of an older run arrives late, after a restart: it must not overwrite a newer exit.
        if svc.last_exit is not None and svc.last_exit.get("pid") == pid and svc.id in self.services:
            svc.last_exit.update(info)
            self._save(svc, "last_exit")

    def _kill_leftovers(self, pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

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
        """Stop the process and wait until it is really gone (its pidfd said so)."""
        self._cancel_retry(svc)
        if not svc.alive:
            if svc.status is not Status.STOPPED:
                self._event(svc, "stop", f"stopped (was {svc.status}, no process running)")
                self._transition(svc, Trigger.STOP)
                svc.retry_at = None
                self._save(svc, "status", "retry_at")
            return
        assert svc.pid is not None and svc.pidfd is not None
        pid, pidfd, exited = svc.pid, svc.pidfd, svc.exited
        self._transition(svc, Trigger.STOP)
        self._save(svc, "status")
        sig = signal.SIGKILL if force else parse_signal(svc.spec["stop_signal"])
        self._event(svc, "stop", f"sending {sig.name} to process group {pid}", pid=pid, signal=sig.name)
        watch.signal_group(pidfd, pid, sig)
        if not force:
            try:
                await asyncio.wait_for(exited.wait(), svc.spec["kill_timeout"])
                return
            except TimeoutError:
                self._event(svc, "kill", f"still running after {svc.spec['kill_timeout']:g} s: sending SIGKILL",
                            pid=pid)
                if svc.pidfd is not None:
                    watch.signal_group(svc.pidfd, pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(exited.wait(), KILL_WAIT)
        except TimeoutError:
            raise PmonError(f"process {pid} of {svc.name} did not die after SIGKILL "
                            "(stuck in the kernel?)") from None

    # user operations

    async def start(self, ref: str) -> Service:
        svc = self.find(ref)
        async with svc.lock:
            svc.desired = "running"
            self._save(svc, "desired")
            if not svc.alive:
                svc.fast_exits = 0
                if svc.status is Status.BACKOFF:
                    svc.status = Status.STOPPED
                await self._start(svc, user_initiated=True)
        return svc

    async def stop(self, ref: str, force: bool = False) -> Service:
        svc = self.find(ref)
        async with svc.lock:
            svc.desired = "stopped"
            self._save(svc, "desired")
            await self._terminate(svc, force)
        return svc

    async def restart(self, ref: str) -> Service:
        svc = self.find(ref)
        async with svc.lock:
            was_alive = svc.alive
            svc.desired = "running"
            self._save(svc, "desired")
            await self._terminate(svc, force=False)
            svc.fast_exits = 0
            await self._start(svc, user_initiated=True, restart=was_alive)
        return svc

    async def reload(self, ref: str, sig_name: str | None) -> tuple[Service, str]:
        sig = parse_signal(sig_name or "USR2")
        svc = self.find(ref)
        async with svc.lock:
            if not svc.alive or svc.status is not Status.RUNNING:
                raise Conflict(f"{svc.name} is not running ({svc.status}); start it first")
            assert svc.pidfd is not None
            if not watch.send_signal(svc.pidfd, sig):
                raise Conflict(f"{svc.name} has just exited")
            self._event(svc, "reload", f"sent {sig.name} to process {svc.pid}", pid=svc.pid, signal=sig.name)
        return svc, sig.name

    async def delete(self, ref: str) -> Service:
        svc = self.find(ref)
        async with svc.lock:
            await self._terminate(svc, force=False)
            self._forget(svc)
            self._event(None, "delete", "deleted", name=svc.name)
        return svc

    def rotation_policy(self, svc: Service) -> RotationPolicy:
        s, c = svc.spec, self.config
        return RotationPolicy(max_size=s.get("log_max_size") or c.log_max_size,
                              keep=c.log_keep if s.get("log_keep") is None else s["log_keep"],
                              compress=c.log_compress if s.get("log_compress") is None else s["log_compress"])

    def rotation_files(self) -> list[tuple[str, RotationPolicy, str]]:
        files = []
        for svc in self.services.values():
            if svc.alive:
                policy = self.rotation_policy(svc)
                files += [(p, policy, svc.name) for p in dict.fromkeys((svc.spec["out_log"], svc.spec["err_log"]))]
        return files

    def flush(self, services: list[Service]) -> list[str]:
        """Empty log files in place: services keep writing through O_APPEND at the new end."""
        emptied = []
        for svc in services:
            for path in dict.fromkeys((svc.spec["out_log"], svc.spec["err_log"])):
                try:
                    os.truncate(path, 0)
                    emptied.append(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise PmonError(f"cannot empty {path}: {exc.strerror}") from None
            self._event(svc, "flush", "logs emptied")
        return emptied

    # views

    def view(self, svc: Service, detail: bool = False) -> dict[str, Any]:
        now = time.time()
        cpu, mem = self._usage(svc)
        s = svc.spec
        out: dict[str, Any] = {
            "id": svc.id, "name": svc.name, "pid": svc.pid if svc.alive else None,
            "user": s["user"] or current_user(), "argv": s["argv"], "cwd": s["cwd"],
            "status": svc.status.value, "desired": svc.desired, "restarts": svc.restarts,
            "uptime_s": round(now - svc.started_at, 3) if svc.alive and svc.started_at else None,
            "cpu_percent": cpu, "mem_bytes": mem,
            "started_at": iso(svc.started_at) if svc.alive else None,
            "retry_at": iso(svc.retry_at) if svc.status is Status.BACKOFF else None,
            "retry_in_s": max(0.0, round(svc.retry_at - now, 3))
            if svc.status is Status.BACKOFF and svc.retry_at else None,
            "last_exit": public_exit(svc.last_exit), "last_error": svc.last_error,
            "autorestart": s["autorestart"], "out_log": s["out_log"], "err_log": s["err_log"],
        }
        if detail:
            recent = [{"at": iso(e["at"]), "message": e["message"]} | e["data"]
                      for e in self.store.events(svc.id, 5, kind="exit")]
            rotation = self.rotation_policy(svc)
            out |= {"log_max_size": rotation.max_size, "log_keep": rotation.keep, "log_compress": rotation.compress,
                    "exe": s["exe"], "env": s["env"], "min_uptime": s["min_uptime"],
                    "kill_timeout": s["kill_timeout"], "stop_signal": s["stop_signal"],
                    "fast_exits": svc.fast_exits, "recent_exits": recent}
        return out

    def _usage(self, svc: Service) -> tuple[float | None, int | None]:
        if not svc.alive or svc.pid is None:
            return None, None
        st = procfs.read_stat(svc.pid)
        if st is None or not st.alive:
            return None, None
        now = time.monotonic()
        cpu_s = st.cpu_seconds
        prev = svc.cpu_sample
        svc.cpu_sample = (cpu_s, now)
        if prev is not None and now - prev[1] >= 0.2:
            pct = 100.0 * (cpu_s - prev[0]) / (now - prev[1])
        else:
            # No recent sample: the average over the process's life so far.
            age = time.time() - svc.started_at if svc.started_at else 0.0
            pct = 100.0 * cpu_s / age if age > 0 else 0.0
        return round(max(pct, 0.0), 1), st.rss_bytes

    def daemon_status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for svc in self.services.values():
            counts[svc.status.value] = counts.get(svc.status.value, 0) + 1
        return {"services": len(self.services), "by_status": counts}


def public_exit(last_exit: dict[str, Any] | None) -> dict[str, Any] | None:
    if last_exit is None:
        return None
    return {k: last_exit.get(k) for k in ("code", "signal", "at", "core", "runtime_s", "source")
            if k in last_exit or k in ("code", "signal", "at")}


def fmt_runtime(runtime: float | None) -> str:
    if runtime is None:
        return "an unknown time"
    return f"{runtime * 1000:.0f} ms" if runtime < 1 else f"{runtime:.1f} s"


def seconds(req: dict[str, Any], key: str, default: float) -> float:
    value = req.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key.replace('_', '-')} must be a number of seconds, not {value!r}") from None
    if not 0 <= number <= 86400:
        raise BadRequest(f"{key.replace('_', '-')} must be between 0 and 86400 seconds")
    return number


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


def check_user(user: str) -> None:
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SpawnError(f"no such user: {user}") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise SpawnError(f"--user {user} needs pmond to run as root")


@functools.cache
def current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
