"""launcher.open_log and trusted_dir_fd on real files (no forks), and how pmond words their failures."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

import pytest

from pmon2.daemon import launcher, spawn
from pmon2.errors import SpawnError


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir(mode=0o700)
    return d


def refused(path: Path, dirfd: int = -1) -> str:
    with pytest.raises(launcher.Refused) as info:
        launcher.open_log(str(path), dirfd)
    return str(info.value)


def test_a_new_log_is_created_blocking_append_only_and_close_on_exec(logdir):
    fd = launcher.open_log(str(logdir / "a-out.log"))
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_APPEND and not flags & os.O_NONBLOCK
        assert not os.get_inheritable(fd)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == launcher.LOG_MODE & ~_umask()
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("trusted", [False, True])
def test_symlinks_fifos_sockets_and_dirs_are_refused(logdir, trusted):
    target = logdir / "target"
    target.write_bytes(b"x")
    (logdir / "link.log").symlink_to(target)
    (logdir / "dangling.log").symlink_to(logdir / "nowhere")
    os.mkfifo(logdir / "fifo.log")
    (logdir / "dir.log").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(logdir / "sock.log"))
    dirfd = launcher.trusted_dir_fd(str(logdir)) if trusted else -1
    assert (dirfd >= 0) == trusted
    try:
        assert refused(logdir / "link.log", dirfd) == "is a symbolic link"
        assert refused(logdir / "dangling.log", dirfd) == "is a symbolic link"
        assert refused(logdir / "fifo.log", dirfd) == "is a FIFO"
        assert refused(logdir / "dir.log", dirfd) == "is a directory"
        assert refused(logdir / "sock.log", dirfd) == "is a socket"
    finally:
        sock.close()
        if dirfd >= 0:
            os.close(dirfd)
    assert target.read_bytes() == b"x"
    assert not (logdir / "nowhere").exists()


def test_a_fifo_with_a_reader_is_refused_too(logdir):
    os.mkfifo(logdir / "fifo.log")
    reader = os.open(logdir / "fifo.log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert refused(logdir / "fifo.log") == "is a FIFO"
    finally:
        os.close(reader)


def test_in_the_trusted_dir_a_hard_link_is_refused_and_an_existing_file_appended(logdir):
    dirfd = launcher.trusted_dir_fd(str(logdir))
    try:
        (logdir / "old.log").write_bytes(b"old\n")
        fd = launcher.open_log(str(logdir / "old.log"), dirfd)
        os.write(fd, b"new\n")
        os.close(fd)
        assert (logdir / "old.log").read_bytes() == b"old\nnew\n"
        os.link(logdir / "old.log", logdir / "second-name")
        assert refused(logdir / "old.log", dirfd) == "has 2 hard links"
    finally:
        os.close(dirfd)


def test_only_a_dir_of_our_own_that_nobody_else_can_write_is_trusted(tmp_path, logdir):
    fd = launcher.trusted_dir_fd(str(logdir))
    assert fd >= 0
    os.close(fd)
    logdir.chmod(0o770)
    assert launcher.trusted_dir_fd(str(logdir)) == -1
    logdir.chmod(0o755)
    (tmp_path / "via-link").symlink_to(logdir)
    assert launcher.trusted_dir_fd(str(tmp_path / "via-link")) == -1  # O_NOFOLLOW
    assert launcher.trusted_dir_fd(str(tmp_path / "missing")) == -1


SPEC = spawn.LaunchSpec(exe="/bin/app", argv=["./app"], cwd="/", env={}, out_log="/l/app-out.log",
                        err_log="/l/app-err.log", user="nobody")


def test_failures_are_worded_in_one_line():
    assert (spawn._describe_failure(SPEC, b"log /l/app-out.log\x000\x00is a symbolic link")
            == "refused log file /l/app-out.log: it is a symbolic link")
    assert (spawn._describe_failure(SPEC, f"log /l/app-err.log\0{errno.EACCES}".encode())
            == "cannot start ./app: log /l/app-err.log (as user nobody): Permission denied")
    assert (spawn._describe_failure(SPEC, f"exec /bin/app\0{errno.ENOENT}".encode())
            == "cannot start ./app: no such file: /bin/app")
    for code in (errno.EMFILE, errno.ENFILE):
        err = spawn._os_failure(SPEC, OSError(code, os.strerror(code)))
        assert isinstance(err, SpawnError) and "out of file descriptors" in err.message
        assert errno.errorcode[code] in err.message


def test_the_request_carries_the_marker_over_an_inherited_one():
    spec = spawn.LaunchSpec(exe="/bin/app", argv=["./app"], cwd="/", env={"PMON2_SERVICE": "forged", "A": "1"},
                            out_log="/l/o", err_log="/l/e", trusted_log_dir="/l/", marker="abc:7")
    req = spawn._request(spec)
    assert req[2] == {"PMON2_SERVICE": "abc:7", "A": "1"} and req[7] == "/l"
    assert spec.env["PMON2_SERVICE"] == "forged", "the spec's env is shared and must not change"
