"""Rolling restarts: what `reload` and `restart` do to a group of instances, or to a `--listen` service
without a reload_signal (issue 13, part 5).

Which services roll (`strategy`): with `instances` > 1, `reload` and `restart` roll; so do they for a
service that `listen`s and declares no `reload_signal`. Any other service keeps its meaning: `restart`
stops then starts it, `reload` sends its signal and follows a handover (Supervisor.reload); so does a
`reload --sig SIG`, whatever the service.

A roll replaces the members of a group a batch at a time (`rolling_batch`, default 1), in instance
order, one strategy per service:

- surge (start first; Kubernetes' maxSurge): a second process of the same service is started beside the
  running one (the same launch spec and PMON2_SERVICE marker, so it shares the socket pmond holds),
  pmond waits until it is ready, makes it the service's main process (Supervisor._hand_over) and stops
  the old process's group gracefully (stop_signal, kill_timeout, then SIGKILL). That exit is not a
  crash: the hand over unhooked it. Needs a socket that both processes can serve: `listen` (pmond's), or
  SO_REUSEPORT, or no port at all (workers).
- recreate (stop then start; maxUnavailable): for instances on ports of their own (`port`), whose new
  process could not bind the port its predecessor holds. The batch is restarted and waited ready before
  the next one; it serves nothing meanwhile, so the group runs short of that many instances.

A new process is ready when its readiness says so: sd_notify READY=1 from that very pid (ready =
"notify"), its `ready` check, or, when it declares none, once it has run min_uptime (Kubernetes'
minReadySeconds; pmond's held socket queues connections meanwhile). One that exits, or is not ready
within start_timeout, stops the roll: it is stopped, its predecessor keeps serving, the members not yet
replaced keep theirs, the reason goes back to the CLI and into the ledger (event kind "roll").

`restarts`: each replaced process counts one restart, as a user's restart does (and as pm2 counts a
reload); a roll resets the crash-loop count.

Crash safety: the run dir holds `<id>.surge` (written before the new process may run) and
`<id>.retire` (the old process, written before the hand over); launches.py. After a SIGKILL of pmond,
Recovery adopts the surge as the main process when the old one is gone, and stops whatever of the two
is not the main process, so nothing is lost, doubled or left untracked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pmon2 import procfs
from pmon2.daemon import instances, spawn, watch
from pmon2.daemon.launches import RETIRE, SURGE, LaunchRecord
from pmon2.daemon.policy import Status, Trigger
from pmon2.errors import Conflict, PmonError, SpawnError
from pmon2.signals import parse_signal

if TYPE_CHECKING:
    from pmon2.daemon import probes
    from pmon2.daemon.supervisor import Service, Supervisor

log = logging.getLogger("pmond")
T = TypeVar("T")

SURGE_KIND = "surge"  # start the new process first, then stop the old one
RECREATE = "recreate"  # stop, then start (instances on ports of their own)


class RollStopped(PmonError):
    """A member could not be replaced: the roll stops there."""

    code = "roll_stopped"
    http_status = 409

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # short: what the members not replaced are told


@dataclass
class Outcome:
    """One member of a roll, replaced: `old_pid` the process that was stopped (None: none ran)."""

    svc: Service
    old_pid: int | None
    strategy: str

    def answer(self) -> dict[str, Any]:
        """What a reload's answer adds to the service's view."""
        return {"signal": None, "rolled": self.strategy, "replaced_pid": self.old_pid}


# which services roll, and how (pure)


def declares_reload_signal(spec: dict[str, Any]) -> bool:
    """Did the user give a reload_signal (stored only when not the default, so also look at the fields as given)?"""
    return "reload_signal" in spec or "reload_signal" in (spec.get("fields") or {})


def strategy(spec: dict[str, Any], group_size: int, action: str, sig: str | None = None) -> str | None:
    """How `action` ("restart" or "reload") replaces a service of a group of `group_size` instances:
    SURGE_KIND, RECREATE, or None when it does not roll (restart in place, or reload by signal). An
    explicit `sig` (reload --sig) is always a signal."""
    if action not in ("restart", "reload") or (action == "reload" and sig is not None):
        return None
    listen = bool(spec.get("listen"))
    if not (group_size > 1 or (listen and not declares_reload_signal(spec))):
        return None
    if not listen and not spec.get("reuseport") and spec.get("port") is not None:
        return RECREATE
    return SURGE_KIND


def batch_size(spec: dict[str, Any]) -> int:
    return max(1, int(spec.get("rolling_batch") or 1))


def group_size(sup: Supervisor, svc: Service) -> int:
    group = svc.spec.get("instance_of")
    if not group:
        return 1
    return sum(1 for s in sup.services.values() if s.spec.get("instance_of") == group)


def strategy_of(sup: Supervisor, svc: Service, action: str, sig: str | None = None) -> str | None:
    return strategy(svc.spec, group_size(sup, svc), action, sig)


# batches: members of a group go through one gate, `rolling_batch` at a time, and a failure closes it


class Gate:
    """The roll of one group now: at most `size` members are replaced at once, in the order they arrive
    (asyncio's semaphore is FIFO), and once one fails the members still waiting are not replaced. The
    gate lives as long as some member uses it; the next roll gets a fresh one."""

    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)
        self.stopped: str | None = None
        self.users = 0


class Gates:
    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}

    async def through(self, group: str, size: int, name: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` for member `name` of `group` when a slot is free. RollStopped from `work` stops the
        roll: members that get their slot afterwards raise RollStopped("not replaced: ...")."""
        gate = self.gates.get(group)
        if gate is None:
            gate = self.gates[group] = Gate(size)
        gate.users += 1
        try:
            async with gate.slots:
                if gate.stopped is not None:
                    raise RollStopped(f"not replaced, it keeps its process: the roll stopped at {gate.stopped}")
                try:
                    return await work()
                except RollStopped as exc:
                    gate.stopped = gate.stopped or f"{name} ({exc.reason})"
                    raise
        finally:
            gate.users -= 1
            if gate.users == 0 and self.gates.get(group) is gate:
                del self.gates[group]


_GATES: weakref.WeakKeyDictionary[Any, Gates] = weakref.WeakKeyDictionary()


# A plain `stop` or `del` of a member whose new process is being waited for (holding its lock) ends that
# wait at once (`halt`): the new process is stopped (the stop signal), and the stop goes on with the old.


@dataclass
class _Roll:
    svc: Service
    cancel: asyncio.Event  # also svc.escalate: `stop -f` / `del -f` set it
    halted: str | None = None  # "stopped" / "deleted": a plain stop or del set `cancel`


_ROLLS: dict[int, _Roll] = {}  # id(Service) -> the roll waiting for its new process now


def halt(svc: Service, what: str) -> None:
    """A user's `stop` or `del` (`what`: "stopped", "deleted") of `svc`: a roll waiting for its new
    process to get ready gives up at once, its new process stopped gracefully. No-op without one."""
    roll = _ROLLS.get(id(svc))
    if roll is not None and roll.svc is svc and not roll.cancel.is_set():
        roll.halted = what
        roll.cancel.set()


# the entry points: Supervisor.restart and the API's reload


async def replace(sup: Supervisor, svc: Service, action: str, how: str) -> Outcome:
    """Replace one member of a roll (`how`: SURGE_KIND or RECREATE) once its batch's turn comes.
    Raises RollStopped (the roll stops) or another PmonError (this member only)."""
    gates = _GATES.get(sup)
    if gates is None:
        gates = _GATES[sup] = Gates()
    desired = svc.desired

    async def work() -> Outcome:
        # A user's later command wins over the roll that waited for its turn: del, or stop.
        if sup.services.get(svc.id) is not svc:
            raise Conflict(f"{svc.name} was deleted during the roll")
        if desired == "running" and svc.desired == "stopped":
            raise Conflict(f"{svc.name} was stopped during the roll; not started again")
        return await (_surge(sup, svc, action) if how == SURGE_KIND else _recreate(sup, svc, action))

    return await gates.through(svc.group, batch_size(svc.spec), svc.name, work)


async def reload(sup: Supervisor, ref: str, sig: str | None, **options: Any) -> tuple[Service, dict[str, Any]]:
    """`reload` of one service, routed: a roll, or Supervisor.reload (the signal and its handover).
    Returns the service and what its answer adds to its view ({"signal"} or Outcome.answer())."""
    svc = sup.find(ref)
    how = strategy_of(sup, svc, "reload", sig)
    if how is not None:
        return svc, (await replace(sup, svc, "reload", how)).answer()
    svc, name = await sup.reload(ref, sig, **options)
    return svc, {"signal": name}


# recreate: stop, then start


async def _recreate(sup: Supervisor, svc: Service, action: str) -> Outcome:
    if action == "reload" and not svc.alive:
        raise Conflict(f"{svc.name} is not running ({svc.status}); start it first")
    old = svc.pid if svc.alive else None
    timeout = svc.spec.get("start_timeout", 90.0)
    try:
        await sup.restart_in_place(svc)
        await sup.wait_for(svc, "ready", timeout)
        if not svc.spec.get("ready"):  # no readiness declared: it must at least stay up min_uptime
            pid = svc.pid
            settled = await ran_min_uptime(svc.spec, svc.exited, timeout)
            if not settled.ok or svc.pid != pid:
                raise RollStopped(f"new process {pid} exited within min_uptime "
                                  f"({svc.spec.get('min_uptime') or 0:g} s)")
    except RollStopped:
        raise
    except PmonError as exc:
        raise RollStopped(exc.message) from None
    return Outcome(svc, old, RECREATE)


# surge: start beside, wait ready, hand over, stop the old one


async def _surge(sup: Supervisor, svc: Service, action: str) -> Outcome:
    old: tuple[int, int, tuple[int, int]] | None = None
    async with svc.lock:
        if sup.services.get(svc.id) is not svc:
            raise Conflict(f"{svc.name} was deleted during the roll")
        if svc.alive and svc.status in (Status.RUNNING, Status.STARTING):
            assert svc.pidfd is not None and svc.pid is not None
            if action == "restart":
                await sup._commit_desired(svc, "running")  # as a restart in place does
            old_pid, old_fd = svc.pid, os.dup(svc.pidfd)  # pins the old process until it is retired
            # Its group as a stop finds it, taken before the hand over forgets it: a main process that was
            # handed over to (a re-exec, MAINPID=) may lead no group of its own (follow.py).
            pgid, group_fd = sup.follow.group(svc, old_pid, svc.pidfd)
            try:
                group = pgid, os.dup(group_fd)
            except BaseException:
                os.close(old_fd)
                raise
            try:
                await _start_beside(sup, svc)
            except BaseException:
                os.close(old_fd)
                os.close(group[1])
                raise
            old = old_pid, old_fd, group
    if old is None:  # nothing runs: nothing to keep serving
        if action == "reload":
            raise Conflict(f"{svc.name} is not running ({svc.status}); start it first")
        return await _recreate(sup, svc, action)
    old_pid, old_fd, group = old
    await retire(sup, svc, old_pid, old_fd, "replaced by a rolling restart", group=group)
    sup.launches.remove(svc.id, RETIRE)  # kept when this is cut short: recovery stops what it names
    return Outcome(svc, old_pid, SURGE_KIND)


async def _start_beside(sup: Supervisor, svc: Service) -> None:
    """With svc.lock held: start the new process, wait until it is ready and make it the main process;
    on failure stop it and raise RollStopped (the old one is untouched)."""
    from pmon2.daemon import probes  # not at import: pmond loads it only once some service needs it

    old_pid, old_ticks, old_boot = svc.pid, svc.start_ticks, svc.boot_id
    assert old_pid is not None and old_ticks is not None
    boot = procfs.boot_id()
    timeout = svc.spec.get("start_timeout", 90.0)
    try:
        pending = spawn.begin_with_reserve(sup._launch_spec(svc), sup.launcher)
        launched = await pending.finish(lambda pid, ticks: sup.launches.write(
            LaunchRecord(svc.id, pid, ticks, boot, svc.name), SURGE))
    except SpawnError as exc:
        sup.launches.remove(svc.id, SURGE)
        sup._event(svc, "roll", f"roll stopped: {exc.message}; process {old_pid} keeps running", pid=old_pid)
        raise RollStopped(exc.message) from None
    pid, pidfd = launched.pid, launched.pidfd
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    watch_fd = os.dup(pidfd)

    def on_exit() -> None:
        loop.remove_reader(watch_fd)
        exited.set()

    loop.add_reader(watch_fd, on_exit)
    cancel = svc.escalate = asyncio.Event()  # `stop -f` / `del -f` meanwhile: give up at once
    roll = _ROLLS[id(svc)] = _Roll(svc, cancel)  # a plain `stop` / `del` meanwhile: give up too (halt)
    try:
        sup._event(svc, "roll", f"started process {pid} beside process {old_pid}; waiting until it is ready",
                   pid=pid, old_pid=old_pid)
        result = await watch.unless(cancel, wait_new_ready(sup, svc, pid, exited, timeout),
                                    probes.Result(False, "cancelled by stop -f"))
        if _ROLLS.get(id(svc)) is roll:
            del _ROLLS[id(svc)]
        if not result.ok and roll.halted is not None:
            result = probes.Result(False, f"{svc.name} was {roll.halted} during the roll")
        if result.ok and exited.is_set():
            result = probes.Result(False, "the process exited")
        if not result.ok:
            force = cancel.is_set() and roll.halted is None
            if roll.halted is not None:
                reason = f"{svc.name} was {roll.halted}; new process {pid} was not ready yet"
            elif exited.is_set():
                reason = f"new process {pid} {_exit_words(pid, pidfd)} before it was ready"
            elif result.detail.startswith("not ready"):
                reason = f"new process {pid} {result.detail}"
            else:
                reason = f"new process {pid} not ready: {result.detail}"
            keeps = "is stopped with it" if roll.halted is not None else "keeps serving"
            sup._event(svc, "roll", f"roll stopped: {reason}; process {old_pid} {keeps}",
                       pid=pid, old_pid=old_pid, reason=result.detail)
            retiring, pidfd = pidfd, -1
            if not force:  # a `stop -f` during the graceful stop of the new process still cuts it short
                cancel = svc.escalate = asyncio.Event()
            await retire(sup, svc, pid, retiring, "not ready", force=force, escalate=cancel)
            sup.launches.remove(svc.id, SURGE)
            raise RollStopped(f"{reason}; it was stopped, and process {old_pid} {keeps}", reason)
        try:
            sup.launches.write(LaunchRecord(svc.id, old_pid, old_ticks, old_boot or boot, svc.name), RETIRE)
        except OSError as exc:
            retiring, pidfd = pidfd, -1
            await retire(sup, svc, pid, retiring, "the roll could not be recorded", force=True)
            sup.launches.remove(svc.id, SURGE)
            raise RollStopped(f"cannot record the roll in the run dir: {exc.strerror}") from None
        crashed = svc.pid != old_pid  # the old one exited meanwhile (and the restart policy took note)
        handing, pidfd = pidfd, -1
        hand_over(sup, svc, pid, handing, f"rolling restart: process {pid} is ready, {result.detail}")
        sup.launches.remove(svc.id, SURGE)
        svc.restarts += 1
        svc.fast_exits = 0
        sup._save(svc, "restarts", "fast_exits")
        sup._event(svc, "roll", f"process {pid} replaces process {old_pid}, which "
                   + ("had exited" if crashed else "is stopping"), pid=pid, old_pid=old_pid, restarts=svc.restarts)
    finally:
        if _ROLLS.get(id(svc)) is roll:
            del _ROLLS[id(svc)]
        if svc.escalate is cancel:
            svc.escalate = None
        loop.remove_reader(watch_fd)
        os.close(watch_fd)
        if pidfd >= 0:
            os.close(pidfd)


async def wait_new_ready(sup: Supervisor, svc: Service, pid: int, exited: asyncio.Event,
                         timeout: float) -> probes.Result:
    """Until the new process `pid` of `svc` is ready (see the module's docstring), it exits (`exited`),
    or `timeout` seconds pass. (A named point of the crash harness: "mid-roll".)"""
    from pmon2.daemon import probes

    spec = svc.spec
    ready = spec.get("ready")
    if ready == "notify":
        wait = getattr(sup, "_wait_ready_pid", None)
        if wait is None:
            return probes.Result(False, "this pmond cannot wait for READY=1 of a given process")
        return await watch.unless(exited, wait(svc, pid, timeout), probes.Result(False, "the process exited"))
    if ready:
        # With a shared socket a tcp or http check may be answered by an older instance: ready = "notify"
        # is the check that speaks for this very process (README, Rolling restarts).
        from pmon2.daemon.supervisor import probe_identity

        try:
            probe = probes.parse(ready)
        except ValueError as exc:
            return probes.Result(False, str(exc))
        return await probes.wait_ready(probe, deadline_s=timeout, stop=exited, env=instances.launch_values(spec)[1],
                                       cwd=spec["cwd"], user=probe_identity(spec))
    return await ran_min_uptime(spec, exited, timeout)


async def ran_min_uptime(spec: dict[str, Any], exited: asyncio.Event, timeout: float) -> probes.Result:
    """A process that declares no readiness counts as ready once it has run min_uptime (Kubernetes'
    minReadySeconds; `timeout` at most) without exiting (`exited`): the one place of that rule."""
    from pmon2.daemon import probes

    settle = min(float(spec.get("min_uptime") or 0.0), timeout)
    if await watch.unless(exited, asyncio.sleep(settle, True), False):
        return probes.Result(True, f"it ran {settle:g} s (min_uptime)")
    return probes.Result(False, "the process exited")


def _exit_words(pid: int, pidfd: int) -> str:
    """"exited (exit code 1)"; only "exited" when its status cannot be had (watch.exit_status_now)."""
    status = watch.exit_status_now(pid, pidfd)
    return f"exited ({status.describe()})" if status is not None else "exited"


def hand_over(sup: Supervisor, svc: Service, pid: int, pidfd: int, why: str) -> None:
    """Make the ready new process the service's main one (Supervisor._hand_over: the old main's exit is
    ignored from now on, restarts unchanged), then make sure the service shows it as running: the old
    process may have died while the new one was getting ready (a crash, now backing off)."""
    sup._hand_over(svc, pid, pidfd, why)
    sup._cancel_retry(svc)
    svc.retry_at = None
    if svc.status is not Status.RUNNING:
        if svc.status is not Status.STARTING:
            sup._transition(svc, Trigger.SPAWNED)
        if svc.status is Status.STARTING:
            sup._transition(svc, Trigger.READY)
        sup._save(svc, "status", "retry_at")


async def retire(sup: Supervisor, svc: Service, pid: int, pidfd: int, why: str, force: bool = False,
                 group: tuple[int, int] | None = None, escalate: asyncio.Event | None = None) -> None:
    """Stop process `pid` and its process group, which is not (or no longer) the service's main process, as a
    stop does: stop_signal, kill_timeout, then SIGKILL. Returns once `pid` has exited and nothing of the
    group runs. Takes `pidfd`. `group`: (pgid, a pidfd to signal it through), also taken, when `pid` leads
    no group of its own (Follower.group, before the hand over); default: the group `pid` leads. `escalate`
    set meanwhile: SIGKILL at once. (A named point of the crash harness: "mid-roll-retiring".)"""
    pgid, group_fd = group if group is not None else (pid, pidfd)
    if not watch.has_exited(pidfd):  # its last words on the notify socket (STOPPING=1) are no refusal
        sup.follow.retiring(svc, pid)
    try:
        await _retire(sup, svc, pid, pidfd, pgid, group_fd, why, force, escalate)
    finally:
        if group_fd != pidfd:
            os.close(group_fd)


async def _retire(sup: Supervisor, svc: Service, pid: int, pidfd: int, pgid: int, group_fd: int, why: str,
                  force: bool, escalate: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        exited.set()

    if watch.has_exited(pidfd):
        exited.set()
        if not watch.group_alive(group_fd, pgid):
            os.close(pidfd)
            return  # nothing left to stop
    else:
        loop.add_reader(pidfd, on_exit)
    try:
        sig = signal.SIGKILL if force else parse_signal(svc.spec["stop_signal"])
        sup._event(svc, "roll", f"sending {sig.name} to process group {pgid} ({why})", pid=pid, signal=sig.name)
        if await watch.stop_group(group_fd, pgid, exited, sig, svc.spec["kill_timeout"], escalate=escalate,
                                  note_kill=lambda text: sup._event(svc, "kill", text, pid=pid)):
            sup._event(svc, "roll", f"process {pid} {_exit_words(pid, pidfd)}: stopped, {why}", pid=pid)
        else:
            log.error("%s: process group %d did not die after SIGKILL (stuck in the kernel?)", svc.name, pgid)
    finally:
        if not exited.is_set():
            loop.remove_reader(pidfd)
        os.close(pidfd)


# recovery after a SIGKILL of pmond in the middle of a roll


def leftovers(main_pid: int | None, records: list[LaunchRecord], alive: Callable[[LaunchRecord], bool]) -> list[
        LaunchRecord]:
    """The processes a roll's records name that still run and are not the service's main process: to stop."""
    return [r for r in records if r.pid != main_pid and alive(r)]


def pick_record(main: LaunchRecord | None, db: LaunchRecord | None, surge: LaunchRecord | None,
                alive: Callable[[LaunchRecord], bool]) -> LaunchRecord | None:
    """The record recovery adopts the service from: its launch record, unless neither it nor the database
    names a live process and the roll's new one lives (the old one is gone: the new one takes over)."""
    if surge is not None and not any(r is not None and alive(r) for r in (main, db)) and alive(surge):
        return surge
    return main


class Recovery:
    """Supervisor.recover's part for rolls: `record` before a service's recovery, `finish` after it."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.surges = sup.launches.load(SURGE)
        self.retiring = sup.launches.load(RETIRE)

    @staticmethod
    def alive(r: LaunchRecord) -> bool:
        if r.boot_id != procfs.boot_id():
            return False
        st = procfs.read_stat(r.pid)
        return st is not None and st.alive and st.starttime == r.start_ticks

    def record(self, svc: Service, main: LaunchRecord | None) -> LaunchRecord | None:
        surge = self.surges.get(svc.id)
        if surge is None:
            return main
        db = None
        if svc.pid is not None and svc.start_ticks is not None:
            db = LaunchRecord(svc.id, svc.pid, svc.start_ticks, svc.boot_id or "", svc.name)
        return pick_record(main, db, surge, self.alive)

    def finish(self, svc: Service) -> None:
        """After the service's recovery: the roll's records agree with what was adopted; whatever else
        of the roll still runs is stopped (stop_signal, kill_timeout, SIGKILL) in the background."""
        records = [(kind, r) for kind, r in ((SURGE, self.surges.get(svc.id)), (RETIRE, self.retiring.get(svc.id)))
                   if r is not None]
        if not records:
            return
        main = svc.pid if svc.alive else None
        surge = self.surges.get(svc.id)
        if surge is not None and main == surge.pid and svc.start_ticks is not None:
            with contextlib.suppress(OSError):  # the launch record names the adopted one before the surge's goes
                self.sup.launches.write(LaunchRecord(svc.id, surge.pid, svc.start_ticks, surge.boot_id, svc.name))
            self.sup._event(svc, "roll", f"pmond restarted in the middle of a roll: process {surge.pid}, "
                            "started by the roll, is the service now (the old one is gone)", pid=surge.pid)
        stop = leftovers(main, [r for _, r in records], self.alive)
        for kind, r in records:
            pidfd = watch.adopt(r.pid, r.start_ticks, r.boot_id) if any(r is s for s in stop) else None
            if pidfd is None:
                self.sup.launches.remove(svc.id, kind)
            else:
                self.sup._spawn_task(self._stop(svc, r, pidfd, kind))

    async def _stop(self, svc: Service, r: LaunchRecord, pidfd: int, kind: str) -> None:
        why = ("pmond restarted in the middle of a roll; the new process was not the service's yet"
               if kind == SURGE else "pmond restarted while a roll was stopping it")
        await retire(self.sup, svc, r.pid, pidfd, why)
        self.sup.launches.remove(svc.id, kind)
