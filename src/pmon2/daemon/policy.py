"""The restart policy: states, the transitions between them, and backoff. Pure: no I/O, no clock.

Every change of a service's status goes through `step`, which checks it against TRANSITIONS, so a
transition the design never meant raises instead of silently happening.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    STARTING = "starting"  # started, its readiness check (`ready`) has not passed yet
    RUNNING = "running"
    BACKOFF = "backoff"  # waiting for the next start attempt (delay 0 means: right now)
    STOPPING = "stopping"  # stop signal sent, waiting for the process to end
    STOPPED = "stopped"  # stopped by a user
    EXITED = "exited"  # ended, and its policy says not to start it again
    ERRORED = "errored"  # a start a user asked for failed (the error went back to them)


class Trigger(StrEnum):
    SPAWNED = "spawned"  # a start succeeded (or a running process was adopted)
    SPAWN_FAILED = "spawn_failed"
    EXIT = "exit"  # the process ended without a user asking
    STATUS = "status"  # the exit status arrived, for restart = "on-failure" (waiting in backoff for it)
    READY = "ready"  # the readiness check passed
    STOP = "stop"  # a user asked to stop it
    STOPPED = "stopped"  # the process ended after a stop


TRANSITIONS: dict[tuple[Status, Trigger], frozenset[Status]] = {
    (Status.STOPPED, Trigger.SPAWNED): frozenset({Status.RUNNING, Status.STARTING}),
    (Status.EXITED, Trigger.SPAWNED): frozenset({Status.RUNNING, Status.STARTING}),
    (Status.ERRORED, Trigger.SPAWNED): frozenset({Status.RUNNING, Status.STARTING}),
    (Status.BACKOFF, Trigger.SPAWNED): frozenset({Status.RUNNING, Status.STARTING}),
    (Status.RUNNING, Trigger.SPAWNED): frozenset({Status.RUNNING}),  # adoption of a known process
    (Status.STOPPED, Trigger.SPAWN_FAILED): frozenset({Status.ERRORED}),
    (Status.EXITED, Trigger.SPAWN_FAILED): frozenset({Status.ERRORED}),
    (Status.ERRORED, Trigger.SPAWN_FAILED): frozenset({Status.ERRORED}),
    (Status.BACKOFF, Trigger.SPAWN_FAILED): frozenset({Status.BACKOFF, Status.ERRORED}),
    (Status.RUNNING, Trigger.EXIT): frozenset({Status.BACKOFF, Status.EXITED, Status.ERRORED}),
    (Status.STARTING, Trigger.EXIT): frozenset({Status.BACKOFF, Status.EXITED, Status.ERRORED}),
    (Status.STARTING, Trigger.READY): frozenset({Status.RUNNING}),
    (Status.BACKOFF, Trigger.STATUS): frozenset({Status.BACKOFF, Status.EXITED, Status.ERRORED}),
    (Status.RUNNING, Trigger.STOP): frozenset({Status.STOPPING}),
    (Status.STARTING, Trigger.STOP): frozenset({Status.STOPPING}),
    (Status.BACKOFF, Trigger.STOP): frozenset({Status.STOPPED}),
    (Status.EXITED, Trigger.STOP): frozenset({Status.STOPPED}),
    (Status.ERRORED, Trigger.STOP): frozenset({Status.STOPPED}),
    (Status.STOPPED, Trigger.STOP): frozenset({Status.STOPPED}),
    (Status.STOPPING, Trigger.STOP): frozenset({Status.STOPPING}),
    (Status.STOPPING, Trigger.STOPPED): frozenset({Status.STOPPED}),
    # A process that ends on its own while a stop is on its way is still a stop.
    (Status.STOPPING, Trigger.EXIT): frozenset({Status.STOPPED}),
}


class InvalidTransition(Exception):
    pass


@dataclass(frozen=True)
class RestartPolicy:
    restart: str = "always"  # systemd's Restart=: "always", "on-failure" or "no"
    min_uptime: float = 1.0  # a run shorter than this counts as a fast exit
    backoff_base: float = 0.1
    backoff_cap: float = 15.0
    max_restarts: int = 0  # fast exits in a row before giving up (errored); 0: never
    ready: bool = False  # a readiness check gates `running` (the start is `starting` until it passes)

    @property
    def autorestart(self) -> bool:
        return self.restart != "no"


@dataclass(frozen=True)
class Decision:
    status: Status
    retry_in: float | None  # seconds until the next start attempt, None when none is planned
    fast_exits: int  # consecutive fast exits, the backoff exponent
    reason: str


def backoff_delay(fast_exits: int, policy: RestartPolicy) -> float:
    """0 for a service that ran long enough; then 100 ms doubling per fast exit, capped."""
    if fast_exits <= 0:
        return 0.0
    # Bound the exponent: a loop of hours would otherwise overflow the float.
    return min(policy.backoff_base * 2.0 ** min(fast_exits - 1, 64), policy.backoff_cap)


def step(status: Status, trigger: Trigger, policy: RestartPolicy, *, runtime: float | None = None,
         fast_exits: int = 0, user_initiated: bool = False, failed: bool | None = None) -> Decision:
    """`failed`, for an EXIT or STATUS: whether the exit counts as a failure (restart = "on-failure");
    None while the status is not known yet (the decision then waits in backoff for Trigger.STATUS)."""
    allowed = TRANSITIONS.get((status, trigger))
    if allowed is None:
        raise InvalidTransition(f"{trigger} is not possible in state {status}")
    decision = _decide(status, trigger, policy, runtime, fast_exits, user_initiated, failed)
    if decision.status not in allowed:
        raise InvalidTransition(f"{status} -{trigger}-> {decision.status} is not in the table")
    return decision


def _decide(status: Status, trigger: Trigger, policy: RestartPolicy, runtime: float | None,
            fast_exits: int, user_initiated: bool, failed: bool | None) -> Decision:
    if trigger is Trigger.SPAWNED:
        if policy.ready and status is not Status.RUNNING:
            return Decision(Status.STARTING, None, fast_exits, "started, waiting until ready")
        return Decision(Status.RUNNING, None, fast_exits, "started")
    if trigger is Trigger.READY:
        return Decision(Status.RUNNING, None, fast_exits, "ready")
    if trigger is Trigger.SPAWN_FAILED:
        if user_initiated:
            return Decision(Status.ERRORED, None, fast_exits, "start failed")
        # An automatic attempt that failed is a fast exit: retry later, never give up silently.
        n = fast_exits + 1
        return Decision(Status.BACKOFF, backoff_delay(n, policy), n, "start failed, retrying")
    if (trigger is Trigger.EXIT and status in (Status.RUNNING, Status.STARTING)) or trigger is Trigger.STATUS:
        if policy.restart == "no":
            return Decision(Status.EXITED, None, fast_exits, "exited, restart = no")
        if policy.restart == "on-failure":
            if failed is None:
                return Decision(Status.BACKOFF, None, fast_exits, "exited, waiting for its status")
            if not failed:
                return Decision(Status.EXITED, None, 0, "exited with success, restart = on-failure")
        fast = runtime is None or runtime < policy.min_uptime
        n = fast_exits + 1 if fast else 0
        if policy.max_restarts and n > policy.max_restarts:
            return Decision(Status.ERRORED, None, n, f"gave up after {policy.max_restarts} fast restarts")
        delay = backoff_delay(n, policy)
        return Decision(Status.BACKOFF, delay, n, "crash loop, backing off" if delay else "restarting")
    if trigger in (Trigger.STOP, Trigger.STOPPED, Trigger.EXIT):
        if status in (Status.RUNNING, Status.STARTING):
            return Decision(Status.STOPPING, None, 0, "stopping")
        if status is Status.STOPPING and trigger is Trigger.STOP:
            return Decision(Status.STOPPING, None, 0, "stopping")
        return Decision(Status.STOPPED, None, 0, "stopped")
    raise InvalidTransition(f"{trigger} in {status}")
