import itertools

import pytest

from pmon2.daemon.policy import (
    TRANSITIONS,
    InvalidTransition,
    RestartPolicy,
    Status,
    Trigger,
    backoff_delay,
    step,
)

POLICY = RestartPolicy()


def test_backoff_doubles_from_100ms():
    assert [backoff_delay(n, POLICY) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])


def test_backoff_zero_without_fast_exits():
    assert backoff_delay(0, POLICY) == 0.0
    assert backoff_delay(-3, POLICY) == 0.0


def test_backoff_capped_at_15s():
    assert backoff_delay(8, POLICY) == pytest.approx(12.8)
    assert backoff_delay(9, POLICY) == 15.0
    assert backoff_delay(60, POLICY) == 15.0


def test_backoff_capped_for_very_long_crash_loops():
    # At the 15 s cap, ~1025 fast exits take ~4 h of crash loop; the delay must stay at the cap.
    assert backoff_delay(1025, POLICY) == 15.0
    assert backoff_delay(10_000, POLICY) == 15.0


def test_step_survives_very_long_crash_loop():
    d = step(Status.RUNNING, Trigger.EXIT, POLICY, runtime=0.01, fast_exits=5000)
    assert d.status is Status.BACKOFF
    assert d.retry_in == 15.0
    assert d.fast_exits == 5001


def test_fast_exits_grow_delay():
    fast_exits = 0
    delays = []
    for _ in range(4):
        d = step(Status.RUNNING, Trigger.EXIT, POLICY, runtime=0.2, fast_exits=fast_exits)
        assert d.status is Status.BACKOFF
        fast_exits = d.fast_exits
        delays.append(d.retry_in)
    assert fast_exits == 4
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_unknown_runtime_counts_as_fast_exit():
    d = step(Status.RUNNING, Trigger.EXIT, POLICY, runtime=None, fast_exits=2)
    assert d.fast_exits == 3
    assert d.retry_in == pytest.approx(0.4)


def test_long_run_resets_and_restarts_at_once():
    d = step(Status.RUNNING, Trigger.EXIT, POLICY, runtime=3600.0, fast_exits=7)
    assert d.status is Status.BACKOFF
    assert d.fast_exits == 0
    assert d.retry_in == 0


def test_min_uptime_boundary_is_not_fast():
    d = step(Status.RUNNING, Trigger.EXIT, RestartPolicy(min_uptime=2.0), runtime=2.0, fast_exits=3)
    assert (d.fast_exits, d.retry_in) == (0, 0)
    d = step(Status.RUNNING, Trigger.EXIT, RestartPolicy(min_uptime=2.0), runtime=1.99, fast_exits=3)
    assert d.fast_exits == 4


def test_no_autorestart_exits():
    d = step(Status.RUNNING, Trigger.EXIT, RestartPolicy(restart="no"), runtime=0.1, fast_exits=2)
    assert d.status is Status.EXITED
    assert d.retry_in is None


def test_on_failure_waits_for_the_status_then_decides():
    policy = RestartPolicy(restart="on-failure")
    waiting = step(Status.RUNNING, Trigger.EXIT, policy, runtime=5.0)
    assert (waiting.status, waiting.retry_in) == (Status.BACKOFF, None)
    assert step(Status.BACKOFF, Trigger.STATUS, policy, runtime=5.0, failed=False).status is Status.EXITED
    again = step(Status.BACKOFF, Trigger.STATUS, policy, runtime=5.0, failed=True)
    assert (again.status, again.retry_in) == (Status.BACKOFF, 0.0)


def test_max_restarts_gives_up():
    policy = RestartPolicy(max_restarts=3)
    assert step(Status.RUNNING, Trigger.EXIT, policy, runtime=0.1, fast_exits=2).status is Status.BACKOFF
    gave_up = step(Status.RUNNING, Trigger.EXIT, policy, runtime=0.1, fast_exits=3)
    assert gave_up.status is Status.ERRORED and gave_up.retry_in is None


def test_readiness_gates_running():
    policy = RestartPolicy(ready=True)
    assert step(Status.STOPPED, Trigger.SPAWNED, policy).status is Status.STARTING
    assert step(Status.STARTING, Trigger.READY, policy).status is Status.RUNNING
    assert step(Status.STARTING, Trigger.EXIT, policy, runtime=0.1).status is Status.BACKOFF


@pytest.mark.parametrize("trigger", [Trigger.EXIT, Trigger.STOPPED])
def test_stopping_then_end_is_stopped(trigger):
    d = step(Status.STOPPING, trigger, POLICY, runtime=0.01, fast_exits=3)
    assert d.status is Status.STOPPED
    assert d.retry_in is None


def test_stop_while_running_is_stopping():
    assert step(Status.RUNNING, Trigger.STOP, POLICY).status is Status.STOPPING
    assert step(Status.STOPPING, Trigger.STOP, POLICY).status is Status.STOPPING


@pytest.mark.parametrize("status", [Status.BACKOFF, Status.EXITED, Status.ERRORED, Status.STOPPED])
def test_stop_without_process_is_stopped(status):
    d = step(status, Trigger.STOP, POLICY, fast_exits=4)
    assert d.status is Status.STOPPED
    assert d.retry_in is None


@pytest.mark.parametrize("status", [Status.STOPPED, Status.EXITED, Status.ERRORED, Status.BACKOFF])
def test_user_spawn_failure_is_errored(status):
    d = step(status, Trigger.SPAWN_FAILED, POLICY, fast_exits=2, user_initiated=True)
    assert d.status is Status.ERRORED
    assert d.retry_in is None


def test_automatic_spawn_failure_backs_off_with_growing_delay():
    fast_exits = 0
    delays = []
    for _ in range(3):
        d = step(Status.BACKOFF, Trigger.SPAWN_FAILED, POLICY, fast_exits=fast_exits)
        assert d.status is Status.BACKOFF
        fast_exits = d.fast_exits
        delays.append(d.retry_in)
    assert delays == pytest.approx([0.1, 0.2, 0.4])
    assert fast_exits == 3


def test_spawned_is_running_and_keeps_fast_exits():
    for status in (Status.STOPPED, Status.EXITED, Status.ERRORED, Status.BACKOFF, Status.RUNNING):
        d = step(status, Trigger.SPAWNED, POLICY, fast_exits=3)
        assert d.status is Status.RUNNING
        assert d.fast_exits == 3
        assert d.retry_in is None


MISSING = [(s, t) for s, t in itertools.product(Status, Trigger) if (s, t) not in TRANSITIONS]


def test_table_has_gaps():
    assert (Status.STOPPED, Trigger.EXIT) in MISSING
    assert (Status.STOPPING, Trigger.SPAWNED) in MISSING


@pytest.mark.parametrize(("status", "trigger"), MISSING)
def test_pairs_outside_the_table_raise(status, trigger):
    for user in (False, True):
        with pytest.raises(InvalidTransition):
            step(status, trigger, POLICY, runtime=5.0, fast_exits=1, user_initiated=user)


@pytest.mark.parametrize(("status", "trigger"), sorted(TRANSITIONS))
def test_every_decision_is_allowed_by_the_table(status, trigger):
    # An automatic start only ever happens from BACKOFF (the supervisor's _auto_start checks it).
    users = (False, True) if (trigger is not Trigger.SPAWN_FAILED or status is Status.BACKOFF) else (True,)
    for restart, user, runtime, fast_exits, failed, max_restarts, ready in itertools.product(
            ("always", "on-failure", "no"), users, (None, 0.0, 0.5, 1.0, 30.0), (0, 1, 3, 20), (None, True, False),
            (0, 2), (False, True)):
        policy = RestartPolicy(restart=restart, max_restarts=max_restarts, ready=ready)
        d = step(status, trigger, policy, runtime=runtime, fast_exits=fast_exits, user_initiated=user,
                 failed=failed)
        assert d.status in TRANSITIONS[(status, trigger)]
        assert d.fast_exits >= 0
        assert d.retry_in is None or 0 <= d.retry_in <= 15.0
        waiting = restart == "on-failure" and failed is None and trigger in (Trigger.EXIT, Trigger.STATUS)
        assert (d.retry_in is not None) == (d.status is Status.BACKOFF and not waiting)


def test_automatic_spawn_failure_outside_backoff_is_rejected():
    with pytest.raises(InvalidTransition):
        step(Status.STOPPED, Trigger.SPAWN_FAILED, POLICY, user_initiated=False)
