"""startup_recovery.ready_left: which adopted processes are `starting` again after a restart of pmond, and
for how long their readiness check runs (REVIEW12 finding 5). Pure: no pmond, no forks."""

from __future__ import annotations

import pytest

from pmon2.daemon.policy import Status
from pmon2.daemon.startup_recovery import ready_left

PROBE = {"ready": "tcp://127.0.0.1:1", "start_timeout": 30.0}


def test_a_process_whose_check_had_not_passed_gets_what_is_left_of_start_timeout():
    assert ready_left(PROBE, Status.STARTING, started_at=1000.0, now=1012.0) == pytest.approx(18.0)
    assert ready_left({"ready": "notify", "start_timeout": 5}, Status.STARTING, 1000.0, 1001.0) == pytest.approx(4.0)


def test_past_start_timeout_it_is_zero_never_negative_and_never_more_than_start_timeout():
    assert ready_left(PROBE, Status.STARTING, started_at=1000.0, now=1100.0) == 0.0
    assert ready_left(PROBE, Status.STARTING, started_at=1000.0, now=990.0) == 30.0  # the clock went back
    assert ready_left(PROBE, Status.STARTING, started_at=None, now=1000.0) == 30.0


def test_without_start_timeout_the_default_applies():
    assert ready_left({"ready": "exec:true"}, Status.STARTING, started_at=1000.0, now=1000.0) == 90.0


@pytest.mark.parametrize("stored", [Status.RUNNING, Status.STOPPING, Status.BACKOFF])
def test_a_process_that_passed_its_check_is_running_at_once(stored):
    assert ready_left(PROBE, stored, started_at=1000.0, now=1001.0) is None


@pytest.mark.parametrize("ready", [None, ""])
def test_a_service_without_a_check_is_running_at_once(ready):
    assert ready_left({"ready": ready, "start_timeout": 30}, Status.STARTING, 1000.0, 1001.0) is None
    assert ready_left({}, Status.STARTING, 1000.0, 1001.0, surge=True) is None


def test_a_rolls_new_process_is_checked_though_the_service_was_running():
    assert ready_left(PROBE, Status.RUNNING, started_at=1000.0, now=1010.0, surge=True) == pytest.approx(20.0)
