"""Leftovers: the processes of a service outside its main process's group (issue 13, REVIEW13 finding 3).

A stop signals the main's process group (watch.stop_group), and a crash SIGKILLs what is left of it
(Supervisor._kill_leftovers). A process of the service that called setsid (a re-exec'd successor during a
reload window, a worker that detached) is in neither. Without a cgroup per service, pmond knows such a
process by the pidfds a reload window holds (Follower.held_pidfds) and by the PMON2_SERVICE marker it
inherited (recovery.py): `stop_leftovers` ends a stop, restart or delete with them (the stop signal,
kill_timeout, SIGKILL), and `after_crash` SIGKILLs them in the background once a crashed service has been
launched again (a crash's restart path does no /proc-wide scan before the launch).

Only a process pinned by a pidfd first, then read through /proc, is signalled: it carries this pmond's
marker of this very service (recovery.marker_of, read again after the pin), runs as the service's uid,
is not pmond's own (its launcher), nor another service's main process. A crash's sweep also spares what
started since the exit (the new process and its children), a process the service is retiring (a roll
stops it gracefully; Follower.retired), and everything when the service's main process now is one that
ran before the exit (a roll's new process took over).

One look at /proc serves every sweep that asks for it at about the same time (`Scanner`): `stop all` of
1,000 services reads /proc once or a few times, not 1,000 times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from pmon2 import procfs
from pmon2.daemon import recovery, watch
from pmon2.render import words

if TYPE_CHECKING:
    from pmon2.daemon.supervisor import Service, Supervisor

log = logging.getLogger("pmond")

POLL_S = 0.02  # how often a sweep looks whether the processes it signalled have exited


class Scanner:
    """recovery.marked_processes, shared: a caller gets a scan begun after it asked, and the callers that
    ask before that scan runs (in the same turn of the loop) share it."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._next: asyncio.Future[dict[int, list[int]]] | None = None

    async def marked(self) -> dict[int, list[int]]:
        """{service id: [pids]} of the live processes carrying this pmond's marker, as of now or later."""
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
            loop.call_soon(self._scan)
        return await asyncio.shield(self._next)

    def _scan(self) -> None:
        fut, self._next = self._next, None
        if fut is None or fut.done():
            return
        try:
            fut.set_result(recovery.marked_processes(self.instance_id))
        except OSError as exc:
            log.warning("cannot look for the services' leftover processes: %s", exc.strerror)
            fut.set_result({})


_SCANNERS: weakref.WeakKeyDictionary[Supervisor, Scanner] = weakref.WeakKeyDictionary()


def scanner(sup: Supervisor) -> Scanner:
    got = _SCANNERS.get(sup)
    if got is None or got.instance_id != sup.instance_id:
        got = _SCANNERS[sup] = Scanner(sup.instance_id)
    return got


def pin_marked(sup: Supervisor, svc: Service, pids: list[int], *, before_ticks: int | None = None,
               spare: Callable[[procfs.Stat], bool] | None = None) -> dict[int, int]:
    """{pid: pidfd} of those of `pids` that are, pinned, the service's (see the module's docstring), and
    started before `before_ticks` (clock ticks after boot) when it is given; `spare(stat)` True leaves one
    alone. The caller closes the pidfds."""
    from pmon2.daemon.follow import pmonds_own, uid_of

    others = {s.pid for s in sup.services.values() if s is not svc and s.alive and s.pid}
    pinned: dict[int, int] = {}
    for pid in pids:
        if pid == os.getpid() or pid in others or pid in pinned:
            continue
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        keep = False
        try:
            # Read through the pin: from here on the number cannot be another process's.
            st = procfs.read_stat(pid)
            keep = (st is not None and st.alive and not watch.has_exited(fd) and not pmonds_own(st)
                    and (before_ticks is None or st.starttime < before_ticks)
                    and uid_of(pid) == svc.uid and recovery.marker_of(pid, sup.instance_id) == svc.id
                    and not (spare is not None and spare(st)))
        finally:
            if keep:
                pinned[pid] = fd
            else:
                os.close(fd)
    return pinned


async def stop_leftovers(sup: Supervisor, svc: Service, held: dict[int, int], sig: int, *,
                         escalate: asyncio.Event | None = None) -> None:
    """The end of a stop (Supervisor._terminate): once the main's group is gone, stop the processes of
    the service still running outside it: those of `held` ({pid: pidfd}, already sent `sig`: a reload
    window's, taken) and those carrying the service's marker (sent `sig` now); kill_timeout for all of them
    to exit, then SIGKILL (at once when `sig` is SIGKILL or `escalate` is set). Returns once they have
    exited (KILL_WAIT at most after the SIGKILL)."""
    try:
        pids = (await scanner(sup).marked()).get(svc.id, [])
        found = pin_marked(sup, svc, [p for p in pids if p not in held])
        for fd in found.values():
            watch.send_signal(fd, sig)
        held.update(found)
        live = {pid: fd for pid, fd in held.items() if not watch.has_exited(fd)}
        if not live:
            return
        listed = ", ".join(str(p) for p in sorted(live))
        sup._event(svc, "stop", f"{words.plural(len(live), 'process', 'processes')} outside its process group: "
                   f"{listed}; "
                   + (f"sent {signal.Signals(sig).name}" if found else "waiting for them"),
                   pids=sorted(live), signal=signal.Signals(sig).name)
        if sig != signal.SIGKILL:
            if await _gone(live, float(svc.spec["kill_timeout"]), escalate):
                return
            live = {pid: fd for pid, fd in live.items() if not watch.has_exited(fd)}
            left = ", ".join(str(p) for p in sorted(live))
            sup._event(svc, "kill", f"still running {svc.spec['kill_timeout']:g} s after {signal.Signals(sig).name}: "
                       f"sending SIGKILL to {left}, outside its process group", pids=sorted(live))
        for fd in live.values():
            watch.send_signal(fd, signal.SIGKILL)
        if not await _gone(live, watch.KILL_WAIT, None):
            log.error("%s: processes %s did not die after SIGKILL (stuck in the kernel?)", svc.name,
                      sorted(p for p, fd in live.items() if not watch.has_exited(fd)))
    finally:
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        held.clear()


async def _gone(pinned: dict[int, int], timeout: float, escalate: asyncio.Event | None) -> bool:
    """Until every process of `pinned` has exited (True), `timeout` seconds pass or `escalate` is set."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(watch.has_exited(fd) for fd in pinned.values()):
        left = deadline - loop.time()
        if left <= 0 or (escalate is not None and escalate.is_set()):
            return False
        await watch.unless(escalate, asyncio.sleep(min(POLL_S, left)), None)
    return True


async def after_crash(sup: Supervisor, svc: Service, exit_ticks: int) -> None:
    """A background task of a crash (Supervisor._on_exit, after the restart was begun): SIGKILL the
    processes of the service that started before its exit at `exit_ticks` and outlived it outside its
    group. Runs under the service's lock, after the restart queued before it."""
    async with svc.lock:
        if sup.services.get(svc.id) is not svc:
            return
        if svc.alive and (svc.start_ticks is None or svc.start_ticks < exit_ticks):
            return  # a process that ran before the exit is the service now (a roll's): none of it is left over
        pids = (await scanner(sup).marked()).get(svc.id, [])
        pinned = pin_marked(sup, svc, pids, before_ticks=exit_ticks, spare=lambda st: sup.follow.retired(svc, st))
        try:
            for pid, fd in pinned.items():
                if watch.send_signal(fd, signal.SIGKILL):
                    sup._event(svc, "kill", f"killed process {pid}, left over outside its process group after "
                               "the crash", pid=pid)
        finally:
            for fd in pinned.values():
                os.close(fd)
