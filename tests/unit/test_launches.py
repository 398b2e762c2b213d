"""Launch records: written in place (one pwrite of a fixed size), read back whole, never half of one."""

from __future__ import annotations

import os
from pathlib import Path

from pmon2.daemon.launches import RECORD_SIZE, LaunchRecord, LaunchRecords


def test_a_record_is_created_then_overwritten_in_place_with_no_tail(tmp_path: Path) -> None:
    records = LaunchRecords(str(tmp_path / "launches"))
    boot = "0123456789abcdef0123456789abcdef0123"
    records.write(LaunchRecord(7, 123456, 99, boot, "a-rather-long-service-name"))
    path = tmp_path / "launches" / "7"
    inode = path.stat().st_ino
    assert path.stat().st_size == RECORD_SIZE
    records.write(LaunchRecord(7, 42, 100, boot, "web"))  # shorter: nothing of the old one may be left
    assert path.stat().st_ino == inode, "overwritten in place, not replaced by a new file"
    assert records.load() == {7: LaunchRecord(7, 42, 100, boot, "web")}
    assert path.read_bytes().startswith(f"42 100 {boot} web\n".encode())
    # A longer line than a record holds falls back to a file renamed over it, and reads back the same.
    long = LaunchRecord(7, 1, 2, boot, "x" * RECORD_SIZE)
    records.write(long)
    assert records.load() == {7: long}
    records.write(LaunchRecord(7, 3, 4, boot, "web"))
    assert records.load() == {7: LaunchRecord(7, 3, 4, boot, "web")}
    assert path.stat().st_size == RECORD_SIZE
    records.close()


def test_an_empty_record_is_dropped_and_the_commit_count_reads_back(tmp_path: Path) -> None:
    records = LaunchRecords(str(tmp_path / "launches"))
    # pmond died between the create and the write: that launch was never acknowledged, so nothing ran.
    (tmp_path / "launches" / "9").write_bytes(b"")
    assert records.load() == {}
    assert not (tmp_path / "launches" / "9").exists()
    assert records.read_commits() is None
    records.write_commits(12, "boot")
    records.write_commits(7, "boot")
    assert records.read_commits() == ("boot", 7)
    assert not [n for n in os.listdir(tmp_path / "launches") if n.endswith(".tmp")]
    records.close()
