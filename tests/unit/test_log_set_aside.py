"""launcher.open_log in pmond's own log dir: whose existing file is reused, and another user's set aside
(REVIEW12 finding 3). Real files, no forks; the chowns need root."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmon2.daemon import launcher, rotate

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: files of another user")
ROOT = (os.geteuid(), os.getegid())


@pytest.fixture
def logdir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "logs"
    d.mkdir(mode=0o700)
    fd = launcher.trusted_dir_fd(str(d))
    assert fd >= 0
    try:
        yield d, fd
    finally:
        os.close(fd)


def planted(path: Path, uid: int, data: bytes, mode: int = 0o640) -> None:
    path.write_bytes(data)
    os.chown(path, uid, uid)
    path.chmod(mode)


def append(path: Path, dirfd: int, owner: tuple[int, int], data: bytes) -> os.stat_result:
    fd = launcher.open_log(str(path), dirfd, owner)
    try:
        os.write(fd, data)
        return os.fstat(fd)
    finally:
        os.close(fd)


@needs_root
def test_another_users_file_is_set_aside_and_a_new_one_made(logdir):
    d, dirfd = logdir
    # nobody's failed create left it, world-writable, and nobody may still hold it open: never reused.
    planted(d / "api-out.log", NOBODY, b"nobody's\n", mode=0o666)
    held = os.open(d / "api-out.log", os.O_RDONLY)
    try:
        st = append(d / "api-out.log", dirfd, ROOT, b"ROOT_SECRET\n")
        assert (st.st_uid, st.st_gid) == ROOT and stat.S_IMODE(st.st_mode) & 0o007 == 0
        assert os.read(held, 100) == b"nobody's\n", "the fd nobody holds must not see root's output"
    finally:
        os.close(held)
    assert (d / "api-out.log").read_bytes() == b"ROOT_SECRET\n"
    aside = d / f"api-out.log.uid-{NOBODY}"
    assert aside.read_bytes() == b"nobody's\n" and aside.stat().st_uid == NOBODY
    assert rotate.ROTATED.match(aside.name) is None, "rotation and the log budget must leave it alone"
    # A second time: the first name is taken, nothing is replaced.
    planted(d / "api-out.log", NOBODY, b"again\n")
    append(d / "api-out.log", dirfd, ROOT, b"x\n")
    assert aside.read_bytes() == b"nobody's\n"
    assert (d / f"api-out.log.uid-{NOBODY}-2").read_bytes() == b"again\n"


@needs_root
def test_a_service_of_another_user_never_gets_a_third_users_file(logdir):
    d, dirfd = logdir
    planted(d / "web-out.log", 4242, b"uid 4242's\n")
    st = append(d / "web-out.log", dirfd, (NOBODY, NOBODY), b"nobody's\n")
    assert st.st_uid == NOBODY and (d / "web-out.log").read_bytes() == b"nobody's\n"
    assert (d / "web-out.log.uid-4242").read_bytes() == b"uid 4242's\n"


@needs_root
def test_the_services_own_file_is_appended_to_and_pmonds_set_aside(logdir):
    d, dirfd = logdir
    planted(d / "own-out.log", NOBODY, b"before\n")
    st = append(d / "own-out.log", dirfd, (NOBODY, NOBODY), b"after\n")
    assert (d / "own-out.log").read_bytes() == b"before\nafter\n" and st.st_uid == NOBODY
    # pmond's user's file (a deleted root service's, or an older version's) never goes to another user:
    # root's output stays root's, set aside.
    planted(d / "old-out.log", 0, b"root's output\n")
    st = append(d / "old-out.log", dirfd, (NOBODY, NOBODY), b"now\n")
    assert (d / "old-out.log").read_bytes() == b"now\n" and (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert (d / "old-out.log.uid-0").read_bytes() == b"root's output\n" and os.stat(d / "old-out.log.uid-0").st_uid == 0
    # A group of pmond's user's file that the service no longer has (group = "..." removed): taken back.
    planted(d / "grp-out.log", 0, b"")
    os.chown(d / "grp-out.log", 0, 4242)
    st = append(d / "grp-out.log", dirfd, ROOT, b"x\n")
    assert (st.st_uid, st.st_gid) == ROOT
    assert sorted(p.name for p in d.iterdir()) == ["grp-out.log", "old-out.log", "old-out.log.uid-0", "own-out.log"]


@needs_root
def test_a_symlink_of_another_user_is_still_refused_not_set_aside(logdir):
    d, dirfd = logdir
    (d / "target").write_bytes(b"t")
    (d / "ln-out.log").symlink_to(d / "target")
    os.chown(d / "ln-out.log", NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(launcher.Refused, match="symbolic link"):
        launcher.open_log(str(d / "ln-out.log"), dirfd, ROOT)
    assert (d / "target").read_bytes() == b"t" and (d / "ln-out.log").is_symlink()


def test_set_aside_gives_up_when_every_name_is_taken(logdir, monkeypatch):
    d, dirfd = logdir
    monkeypatch.setattr(launcher, "MAX_ASIDE", 2)
    for name in ("f", "f.uid-7", "f.uid-7-2"):
        (d / name).write_bytes(name.encode())
    with pytest.raises(launcher.Refused, match="names to set it aside are taken"):
        launcher.set_aside("f", dirfd, 7)
    assert (d / "f").read_bytes() == b"f" and (d / "f.uid-7").read_bytes() == b"f.uid-7"
