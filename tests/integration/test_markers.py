"""Authenticated PMON2_SERVICE markers (daemon/recovery.py), with a real pmond: every service carries
<instance id>:<service id>:<tag>, the tag made with a key kept in the data dir; a made-up marker, or a
service's real one copied onto a process of another uid, neither stops pmond from starting nor gets a
process signalled."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from procs import is_alive

Pmon = Any  # tests/conftest.py's helper (the `pmon` fixture)

pytestmark = pytest.mark.timeout(60)


def marker_of(pid: int) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e for e in env if e.startswith(b"PMON2_SERVICE=")).decode().split("=", 1)[1]


def restart_pmond(pmon: Pmon) -> subprocess.CompletedProcess[str]:
    """SIGKILL pmond and start the next one (through `ls`); its answer."""
    pmond = pmon.daemon_pid()
    assert pmond is not None
    os.kill(pmond, signal.SIGKILL)
    pmon.wait_dead(pmond, what="pmond")
    return pmon.run("ls", check=False)


def test_the_marker_carries_a_tag_made_with_a_private_key_that_outlives_pmond(pmon: Pmon) -> None:
    svc = pmon.start_service("--name", "s", "sleep", "600")
    key = pmon.home / "data" / "marker.key"
    st = key.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid() and st.st_size == 32
    first = key.read_bytes()
    instance, sid, tag = marker_of(svc["pid"]).split(":")
    assert pmon.service_marker().decode() == f"PMON2_SERVICE={instance}:" and sid == str(svc["id"])
    assert len(tag) == 24 and all(c in "0123456789abcdef" for c in tag)
    again = restart_pmond(pmon)
    assert again.returncode == 0, again.stderr
    assert key.read_bytes() == first, "the key is made once: a new one would disown running services"
    assert pmon.desc("s")["pid"] == svc["pid"], "adopted again"


def test_a_made_up_tag_for_an_id_never_given_out_does_not_stop_pmond_from_starting(pmon: Pmon) -> None:
    """The same user as pmond, who knows the format and the instance id, but not the key."""
    svc = pmon.start_service("--name", "s", "sleep", "600")
    instance = marker_of(svc["pid"]).split(":")[0]
    made_up = subprocess.Popen(["sleep", "600"], start_new_session=True, cwd="/",
                               env={"PMON2_SERVICE": f"{instance}:4242:{secrets.token_hex(12)}"})
    try:
        again = restart_pmond(pmon)
        assert again.returncode == 0, f"pmond refused to start: {again.stderr.strip()}"
        assert made_up.poll() is None and is_alive(made_up.pid)
        assert [s["name"] for s in pmon.services()] == ["s"], "nothing rebuilt from the made-up marker"
    finally:
        made_up.kill()
        made_up.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a stranger that runs as nobody")
def test_a_services_marker_copied_onto_another_users_process_is_not_the_services(pmon: Pmon) -> None:
    """Root's service's real marker, tag and all, on a process of nobody (or any other uid): the tag was
    made for root, so the process is no process of the service: not a lost service after a restart of
    pmond (once the database forgot it), not a leftover that `del` kills."""
    svc = pmon.start_service("--name", "s", "sleep", "600")
    real = marker_of(svc["pid"])
    copied = subprocess.Popen(["sleep", "600"], user=65534, group=65534, extra_groups=[], start_new_session=True,
                              env={"PMON2_SERVICE": real}, cwd="/")
    try:
        again = restart_pmond(pmon)
        assert again.returncode == 0, again.stderr
        pmon.run("del", "s")
        pmon.wait_dead(svc["pid"], what="the service's own process")
        assert copied.poll() is None and is_alive(copied.pid), "pmond signalled another user's process"
    finally:
        copied.kill()
        copied.wait()
