"""Authenticated PMON2_SERVICE markers (daemon/recovery.py): the tag binds pmond's key, the instance id, the
service id and the uid the process runs as; forged, copied or damaged markers are no markers; the key file is
made once, private, and refused when it is not. Over a fake /proc (environ and status per process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pmon2.daemon import recovery
from pmon2.errors import PmonError

ME = os.geteuid()
KEY = bytes(range(recovery.KEY_BYTES))
INST = recovery.Instance("0123456789abcdef", KEY)


def fake(root: Path, pid: int, env: dict[str, str], uids: tuple[int, int, int] = (ME, ME, ME),
         start: int = 1000, pgrp: int | None = None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = ["S", 1, pgrp or pid, pid, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 1, 0, start, 0, 0]
    (d / "stat").write_text(f"{pid} (p) " + " ".join(map(str, fields)) + "\n")
    (d / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in env.items()))
    real, effective, saved = uids
    (d / "status").write_text(f"Name:\tp\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\nPPid:\t1\n"
                              f"Uid:\t{real}\t{effective}\t{saved}\t{effective}\nGid:\t0\t0\t0\t0\n")


def test_a_marker_is_the_instance_the_service_and_a_tag_that_only_the_key_makes() -> None:
    value = recovery.marker_value(INST, 7, ME)
    instance, sid, tag = value.split(":")
    assert (instance, sid) == ("0123456789abcdef", "7") and len(tag) == 2 * recovery.TAG_BYTES
    assert recovery.marker_value(INST, 8, ME) != value and recovery.marker_value(INST, 7, ME + 1) != value
    other = recovery.Instance("0123456789abcdef", bytes(recovery.KEY_BYTES))
    assert recovery.marker_value(other, 7, ME) != value, "another key, another tag"
    assert recovery.marker_value("0123456789abcdef", 7, ME) == "0123456789abcdef:7", "no key: no tag"
    assert str(INST) == "0123456789abcdef" and f"{INST}" == "0123456789abcdef" and KEY.hex() not in repr(INST)


def test_only_a_marker_tagged_with_the_key_for_its_id_and_its_processs_uid_counts(tmp_path: Path) -> None:
    good = recovery.marker_value(INST, 7, ME)
    fake(tmp_path, 10, {"A": "1", "PMON2_SERVICE": good})
    fake(tmp_path, 11, {"PMON2_SERVICE": "0123456789abcdef:7"})  # the old format: anyone could write it
    fake(tmp_path, 12, {"PMON2_SERVICE": "0123456789abcdef:4242:" + "0" * 24})  # a made-up tag
    fake(tmp_path, 13, {"PMON2_SERVICE": good.replace(":7:", ":8:")})  # a tag moved to another id
    fake(tmp_path, 14, {"PMON2_SERVICE": good}, uids=(ME + 1,) * 3)  # copied onto another user's process
    fake(tmp_path, 15, {"PMON2_SERVICE": good}, uids=(ME, 0, 0) if ME else (1000, 0, 0))  # a set-user-ID program
    fake(tmp_path, 16, {"PMON2_SERVICE": recovery.marker_value(INST, 9, ME + 1)}, uids=(ME + 1,) * 3)
    fake(tmp_path, 17, {"PMON2_SERVICE": good + "0"})  # a longer tag
    fake(tmp_path, 18, {"PMON2_SERVICE": "0123456789abcdef:" + "9" * 5000 + ":" + "0" * 24})
    fake(tmp_path, 19, {"PMON2_SERVICE": recovery.marker_value(recovery.Instance("fedcba9876543210", KEY), 7, ME)})
    proc = str(tmp_path)
    assert recovery.marker_of(10, INST, proc) == 7
    assert [recovery.marker_of(pid, INST, proc) for pid in range(11, 16)] == [None] * 5
    assert recovery.marker_of(16, INST, proc) == 9, "tagged for the uid it runs as: a service of another user"
    assert recovery.marker_of(17, INST, proc) is None and recovery.marker_of(18, INST, proc) is None
    assert recovery.marker_of(19, INST, proc) is None, "another pmond's marker"
    assert recovery.marker_of(10, "0123456789abcdef", proc) is None, "no key: nothing verifies"
    assert recovery.marker_of(99, INST, proc) is None, "gone"
    assert recovery.marked_processes(INST, proc) == {7: [10], 9: [16]}


def test_process_uid_needs_real_effective_and_saved_uid_to_agree(tmp_path: Path) -> None:
    fake(tmp_path, 10, {}, uids=(5, 5, 5))
    fake(tmp_path, 11, {}, uids=(5, 0, 0))
    fake(tmp_path, 12, {}, uids=(5, 5, 0))
    assert [recovery.process_uid(p, str(tmp_path)) for p in (10, 11, 12, 13)] == [5, None, None, None]


def test_the_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    key = recovery.load_key(str(tmp_path))
    path = tmp_path / recovery.KEY_FILE
    assert len(key) == recovery.KEY_BYTES and path.read_bytes() == key
    assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == ME
    assert recovery.load_key(str(tmp_path)) == key, "read back, never made again"
    assert sorted(p.name for p in tmp_path.iterdir()) == [recovery.KEY_FILE], "no temporary file left"
    other = tmp_path / "other"
    other.mkdir()
    assert recovery.load_key(str(other)) != key, "each data dir its own key"


@pytest.mark.parametrize("trap", ["group-readable", "short", "long", "symlink", "directory"])
def test_a_key_file_anyone_else_may_read_or_a_damaged_one_is_refused_in_one_line(tmp_path: Path, trap: str) -> None:
    path = tmp_path / recovery.KEY_FILE
    if trap == "group-readable":
        path.write_bytes(KEY)
        path.chmod(0o640)
    elif trap in ("short", "long"):
        path.write_bytes(KEY[:5] if trap == "short" else KEY + b"x")
        path.chmod(0o600)
    elif trap == "symlink":
        (tmp_path / "elsewhere").write_bytes(KEY)
        (tmp_path / "elsewhere").chmod(0o600)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir()
    with pytest.raises(PmonError) as err:
        recovery.load_key(str(tmp_path))
    assert "marker key" in err.value.message and "\n" not in err.value.message


def test_a_rebuilt_service_takes_the_uid_its_process_runs_as_from_status(tmp_path: Path) -> None:
    """Not the owner of /proc/PID, which is root for a process that made itself non-dumpable."""
    fake(tmp_path, 10, {"PMON2_SERVICE": recovery.marker_value(INST, 3, 65534), "X": "1"}, uids=(65534,) * 3)
    (tmp_path / "10" / "cmdline").write_bytes(b"sleep\x00600\x00")
    (tmp_path / "10" / "exe").symlink_to("/bin/sleep")
    (tmp_path / "10" / "cwd").symlink_to("/")
    (tmp_path / "10" / "fd").mkdir()
    got = recovery.rebuild(10, str(tmp_path))
    assert got is not None and got.argv == ["sleep", "600"] and got.env == {"X": "1"}
    assert got.user == "nobody" or got.user == "65534"
    fake(tmp_path, 11, {}, uids=(65534, 0, 0))
    for name, target in (("exe", "/bin/sleep"), ("cwd", "/")):
        (tmp_path / "11" / name).symlink_to(target)
    (tmp_path / "11" / "cmdline").write_bytes(b"passwd\x00")
    assert recovery.rebuild(11, str(tmp_path)) is None, "a set-user-ID program is never rebuilt (as root)"
