"""Log files resist symbolic-link, hard-link and FIFO tricks (issue 9, requirement 1).

A service that runs as `nobody` must never get pmond (root) to write where nobody could not: logs in
pmond's own log dir are created by pmond and given to the service's user, logs anywhere else are opened
as the service's user, and neither kind is opened through a symbolic link, as a FIFO, or (in pmond's dir)
with a second hard link. See launcher.py.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import time
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs services as nobody")
SECRET = b"root only, do not append\n"


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def secret_file(directory: Path) -> Path:
    """A root-only file with known content: what an attack would append to."""
    target = directory / "secret"
    target.write_bytes(SECRET)
    target.chmod(0o600)
    return target


def start_failures(pmon, name: str) -> list[str]:
    return [r["message"] for r in pmon.db_rows(
        "SELECT message FROM events WHERE service = ? AND kind = 'start_failed' ORDER BY id", (name,))]


def answers_quickly(pmon) -> None:
    """pmond is up and not blocked on some open: `ls` answers well within a second."""
    began = time.monotonic()
    pmon.run("ls", "--json", timeout=5)
    assert time.monotonic() - began < 1.0, "pmond took a second or more to answer: blocked?"


def sh_script(directory: Path, name: str, body: str) -> Path:
    """A /bin/sh script: the test's Python may live where nobody cannot run it (under /root)."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def sleeper(pmon, pub: Path) -> Path:
    return sh_script(pub, "sleeper", "echo up\necho up-err >&2\nexec sleep 3600\n")


@needs_root
def test_a_symlink_planted_by_the_service_in_its_own_log_dir_is_not_followed_on_restart(pmon, pub, nobody):
    """The attack as found: a service running as nobody, with a log dir nobody can write, replaces its
    out log with a symbolic link to a root-only file and exits; the automatic restart must not append
    to that file."""
    logs = pub / "logs"
    logs.mkdir()
    os.chown(logs, nobody.pw_uid, nobody.pw_gid)
    logs.chmod(0o755)
    target = secret_file(pub)
    flag = logs / "first-run-done"
    sh_script(pub, "attack", f"""
if [ ! -e '{flag}' ]; then
    : > '{flag}'
    rm '{logs / "attack-out.log"}'
    ln -s '{target}' '{logs / "attack-out.log"}'
    exit 0
fi
echo appended by the restarted service
exec sleep 3600
""")
    pmon.run("run", "--json", "./attack", "--user", "nobody", "--log_dir", str(logs), "--name", "attack",
             cwd=pub)
    pmon.wait_for(lambda: start_failures(pmon, "attack"), timeout=5.0, message="a refused restart")
    assert "refused log file" in start_failures(pmon, "attack")[0]
    assert "symbolic link" in start_failures(pmon, "attack")[0]
    assert target.read_bytes() == SECRET
    assert os.stat(target).st_uid == 0 and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert (logs / "attack-out.log").is_symlink(), "the planted link should be left for a human to see"
    svc = pmon.desc("attack")
    assert svc["pid"] is None and "symbolic link" in (svc.get("last_error") or ""), svc
    # Retried with backoff, refused each time; pmond stays up and answers.
    time.sleep(0.5)
    answers_quickly(pmon)
    assert target.read_bytes() == SECRET


@needs_root
def test_a_log_dir_the_service_user_cannot_write_is_refused_not_written_as_root(pmon, pub):
    """Outside pmond's own log dir a log is opened as the service's user: a service never writes where
    its user could not (here a root-owned 0755 dir)."""
    logs = pub / "rootlogs"
    logs.mkdir(mode=0o755)
    sleeper(pmon, pub)
    proc = pmon.run("run", "./sleeper", "--user", "nobody", "--log_dir", str(logs), "--name", "denied",
                    cwd=pub, check=False)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1 and "Permission denied" in proc.stderr and "nobody" in proc.stderr
    assert not (logs / "denied-out.log").exists()


@needs_root
def test_a_hard_link_in_pmonds_log_dir_is_refused(pmon, pub, nobody):
    sleeper(pmon, pub)
    svc = pmon.start_service("./sleeper", "--user", "nobody", "--name", "linked", cwd=pub)
    out = pmon.log_dir / "linked-out.log"
    pmon.wait_for(lambda: out.read_bytes() == b"up\n", message="the service's first line")
    pmon.run("stop", "linked")
    pmon.wait_dead(svc["pid"])
    target = secret_file(pub)
    out.unlink()
    os.link(target, out)  # as if planted: only root can write this dir
    proc = pmon.run("start", "linked", check=False, timeout=5)
    assert proc.returncode == 1, proc
    assert proc.stderr == f"pmon2: linked: refused log file {out}: it has 2 hard links\n"
    assert target.read_bytes() == SECRET and os.stat(target).st_uid == 0
    answers_quickly(pmon)


@needs_root
@pytest.mark.parametrize("reader", [False, True], ids=["no-reader", "with-reader"])
def test_a_fifo_in_pmonds_log_dir_is_refused_without_blocking(pmon, pub, reader):
    sleeper(pmon, pub)
    svc = pmon.start_service("./sleeper", "--user", "nobody", "--name", "piped", cwd=pub)
    pmon.run("stop", "piped")
    pmon.wait_dead(svc["pid"])
    err = pmon.log_dir / "piped-err.log"
    err.unlink()
    os.mkfifo(err, 0o600)
    # Without a reader, an O_NONBLOCK open for writing fails with ENXIO; with one, it succeeds and fstat
    # must refuse it. Either way nothing waits.
    held = os.open(err, os.O_RDONLY | os.O_NONBLOCK) if reader else -1
    try:
        began = time.monotonic()
        proc = pmon.run("start", "piped", check=False, timeout=5)
        assert time.monotonic() - began < 2.0
        assert proc.returncode == 1, proc
        assert proc.stderr == f"pmon2: piped: refused log file {err}: it is a FIFO\n"
        answers_quickly(pmon)
        if held >= 0:
            try:
                data = os.read(held, 100)  # b"" once the refused writer has closed it
            except BlockingIOError:
                data = b""
            assert data == b"", "something was written into the FIFO"
    finally:
        if held >= 0:
            os.close(held)
    assert stat.S_ISFIFO(os.lstat(err).st_mode)


@needs_root
def test_a_restart_after_a_planted_fifo_is_refused_and_retried(pmon, pub):
    """The automatic restart meets the planted file: a start_failed event, backoff, pmond unblocked; once
    the file is gone the retry starts the service."""
    sleeper(pmon, pub)
    svc = pmon.start_service("./sleeper", "--user", "nobody", "--name", "retry", cwd=pub)
    err = pmon.log_dir / "retry-err.log"
    err.unlink()
    os.mkfifo(err, 0o600)
    os.kill(svc["pid"], signal.SIGKILL)
    pmon.wait_for(lambda: start_failures(pmon, "retry"), message="a refused restart")
    assert start_failures(pmon, "retry")[0] == f"refused log file {err}: it is a FIFO"
    answers_quickly(pmon)
    err.unlink()
    back = pmon.wait_service("retry", lambda s: s["status"] == "running" and s["pid"], timeout=20.0,
                             what="running again once the FIFO is gone")
    assert back["pid"] != svc["pid"]


@needs_root
def test_logs_in_pmonds_dir_belong_to_the_service_user_and_root_owned_ones_are_set_aside(pmon, pub, nobody):
    """A root-owned log of the same name (a deleted root service's, or an older version's) is never given
    to nobody: root's output stays root's, set aside as NAME.uid-0."""
    sleeper(pmon, pub)
    pmon.run("daemon", "start")  # pmond makes its log dir as it wants it (root, 0700 here)
    old = pmon.log_dir / "owned-out.log"
    old.write_bytes(b"root's output\n")
    old.chmod(0o640)
    assert os.stat(old).st_uid == 0
    svc = pmon.start_service("./sleeper", "--user", "nobody", "--name", "owned", cwd=pub)
    assert pmon.uid_of(svc["pid"]) == nobody.pw_uid
    new = pmon.log_dir / "owned-err.log"
    pmon.wait_for(lambda: new.exists() and new.read_bytes() == b"up-err\n", message="the err log written")
    pmon.wait_for(lambda: old.exists() and old.read_bytes() == b"up\n", message="a new out log, nobody's")
    aside = pmon.log_dir / "owned-out.log.uid-0"
    assert aside.read_bytes() == b"root's output\n" and os.stat(aside).st_uid == 0
    for path in (old, new):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        assert st.st_nlink == 1 and stat.S_ISREG(st.st_mode)
    # The dir itself stays pmond's: nobody can plant nothing there.
    st = os.stat(pmon.log_dir)
    assert st.st_uid == 0 and not st.st_mode & 0o022


def test_a_symlink_in_place_of_a_log_is_refused_without_a_user_switch(pmon):
    """A service that runs as pmond's own user gets the same checks: no link is followed."""
    target = pmon.work / "elsewhere"
    target.write_bytes(b"untouched\n")
    link = pmon.work / "svc.log"
    link.symlink_to(target)
    proc = pmon.run("run", "sleep", "36101", "--log", str(link), "--name", "linky", check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"pmon2: refused log file {link}: it is a symbolic link\n"
    assert target.read_bytes() == b"untouched\n"
    assert pmon.services() == []


def test_a_directory_in_place_of_a_log_is_refused(pmon):
    (pmon.work / "adir").mkdir()
    proc = pmon.run("run", "sleep", "36102", "--log", str(pmon.work / "adir"), "--name", "dirlog", check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"pmon2: refused log file {pmon.work / 'adir'}: it is a directory\n"


def test_the_service_carries_its_marker_and_not_an_inherited_one(pmon):
    env = dict(pmon.env, PMON2_SERVICE="forged:99")
    svc = pmon.start_service("sleep", "36103", "--name", "marked", env=env)
    entries = Path(f"/proc/{svc['pid']}/environ").read_bytes().split(b"\0")
    marks = [e for e in entries if e.startswith(b"PMON2_SERVICE=")]
    assert len(marks) == 1 and marks[0] != b"PMON2_SERVICE=forged:99", marks
    assert marks[0].split(b":")[1] == str(svc["id"]).encode(), marks  # <instance>:<id>:<tag>
