"""Rotation and flush follow nothing a service plants in its log dir (issue 9).

pmond often runs as root and rotates the logs of services that run as other users, in directories
those users may own. Whatever such a service puts in place of its log or of a rotated file (a
symlink to a root-only file, a hard link, a FIFO), pmond refuses it with one event or one error line,
changes no byte of any other file, and never blocks.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path
from typing import Any

import pytest

ROOT_SKIP = "needs root"


def _config(pmon: Any, text: str) -> None:
    (pmon.home / "config.toml").write_text(text)


def _refusals(pmon: Any, name: str) -> list[str]:
    return [e["message"] for e in pmon.json("events", name, "-n", "1000", "--json") if "refused" in e["message"]]


def _secret(path: Path, body: bytes) -> bytes:
    path.write_bytes(body)
    path.chmod(0o600)
    return body


def _plant_symlink(link: Path, target: Path, owner: pwd.struct_passwd | None) -> None:
    """What the service's user could do in its own log dir (the link ends up theirs)."""
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    if owner is not None:
        os.lchown(link, owner.pw_uid, owner.pw_gid)


def _answers_quickly(pmon: Any) -> None:
    started = time.monotonic()
    pmon.services()
    took = time.monotonic() - started
    assert took < 1.0, f"pmon2 ls took {took:.2f} s: pmond blocked?"


@pytest.fixture
def nobody_logs(pmon: Any) -> tuple[pwd.struct_passwd, Path]:
    if os.geteuid() != 0:
        pytest.skip(f"{ROOT_SKIP}: a service that runs as nobody, in a log dir that nobody owns")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip(f"{ROOT_SKIP} and a user 'nobody'")
    pmon.home.chmod(0o755)  # nobody must reach its log dir
    logs = pmon.home / "svclogs"
    logs.mkdir()
    os.chown(logs, pw.pw_uid, pw.pw_gid)
    return pw, logs


def test_rotation_refuses_symlinks_that_a_service_planted(pmon: Any, nobody_logs: Any) -> None:
    nobody, logs = nobody_logs
    _config(pmon, "log_check_interval = 0.2\n")
    a = _secret(pmon.home / "secret-a", b"root only, A\n" * 10)
    b = _secret(pmon.home / "secret-b", b"root only, B\n" * 1000)  # 13 KB: over the 1K limit
    svc = pmon.start_service("sleep", "717171", "--name", "victim", "--user", "nobody", "--log_dir", str(logs),
                             "--log-max-size", "1K")
    out = Path(svc["out_log"])
    part = logs / "victim-out.log.1.part"
    _plant_symlink(part, pmon.home / "secret-a", nobody)
    _plant_symlink(out, pmon.home / "secret-b", nobody)
    refused = f"refused to rotate {out}: it is a symbolic link"
    pmon.wait_for(lambda: refused in _refusals(pmon, "victim"), timeout=5, message="the rotation refused")
    pmon.holds(lambda: (pmon.home / "secret-a").read_bytes() == a and (pmon.home / "secret-b").read_bytes() == b,
               1.0, message="the root-only files unchanged")
    assert part.is_symlink() and out.is_symlink()
    assert len(_refusals(pmon, "victim")) == 1, "refused once, not at every check"

    # The flush is refused too, in one line naming the file and why; the other log is emptied.
    proc = pmon.run("flush", "victim", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"refused to empty {out}: it is a symbolic link" in proc.stderr
    assert (pmon.home / "secret-b").read_bytes() == b
    _answers_quickly(pmon)


def test_a_planted_part_file_is_replaced_and_the_copy_belongs_to_the_service(pmon: Any, nobody_logs: Any) -> None:
    nobody, logs = nobody_logs
    _config(pmon, "log_check_interval = 0.2\n")
    a = _secret(pmon.home / "secret-a", b"root only, A\n" * 10)
    svc = pmon.start_service("sleep", "727272", "--name", "victim", "--user", "nobody", "--log_dir", str(logs),
                             "--log-max-size", "1K")
    out = Path(svc["out_log"])
    _plant_symlink(logs / "victim-out.log.1.part", pmon.home / "secret-a", nobody)
    with out.open("ab") as fh:
        fh.write(b"a real line\n" * 150)  # over 1K, under 2K: one rotated file
    one = logs / "victim-out.log.1"
    pmon.wait_for(lambda: one.exists(), timeout=5, message="the rotation")
    assert (pmon.home / "secret-a").read_bytes() == a
    st = one.lstat()
    assert not one.is_symlink() and st.st_uid == nobody.pw_uid and st.st_gid == nobody.pw_gid
    assert one.read_bytes().endswith(b"a real line\n" * 150)
    assert not (logs / "victim-out.log.1.part").exists()


def test_a_planted_rotated_symlink_stops_the_rotation(pmon: Any, nobody_logs: Any) -> None:
    nobody, logs = nobody_logs
    _config(pmon, "log_check_interval = 0.2\n")
    a = _secret(pmon.home / "secret-a", b"root only, A\n" * 10)
    svc = pmon.start_service("sleep", "737373", "--name", "victim", "--user", "nobody", "--log_dir", str(logs),
                             "--log-max-size", "1K", "--log-keep", "2")
    out = Path(svc["out_log"])
    _plant_symlink(logs / "victim-out.log.2", pmon.home / "secret-a", nobody)
    with out.open("ab") as fh:
        fh.write(b"a real line\n" * 500)
    pmon.wait_for(lambda: any(m.startswith(f"refused to rotate {out}: {out}.2: it is a symbolic link")
                              for m in _refusals(pmon, "victim")), timeout=5, message="the rotation refused")
    assert (pmon.home / "secret-a").read_bytes() == a
    assert (logs / "victim-out.log.2").is_symlink() and out.stat().st_size >= 6000  # nothing moved


def test_a_fifo_and_a_hard_link_in_place_of_logs_are_refused_without_blocking(pmon: Any) -> None:
    _config(pmon, "log_check_interval = 0.2\n")
    svc = pmon.start_service("sleep", "747474", "--name", "tricks", "--log-max-size", "1K")
    out, err = Path(svc["out_log"]), Path(svc["err_log"])
    other = pmon.home / "other.txt"
    body = b"somebody else's file\n" * 200
    other.write_bytes(body)
    err.unlink()
    os.mkfifo(err)
    out.unlink()
    os.link(other, out)
    want = {f"refused to rotate {out}: it has 2 hard links", f"refused to rotate {err}: it is a FIFO"}
    pmon.wait_for(lambda: want <= set(_refusals(pmon, "tricks")), timeout=5, message="both refused")
    _answers_quickly(pmon)
    started = time.monotonic()
    proc = pmon.run("flush", "tricks", check=False, timeout=10)
    assert time.monotonic() - started < 5
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "refused to empty" in proc.stderr and ("2 hard links" in proc.stderr or "a FIFO" in proc.stderr)
    _answers_quickly(pmon)
    assert other.read_bytes() == body
    assert pmon.desc("tricks")["status"] == "running"
