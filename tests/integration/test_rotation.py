"""Built-in log rotation (issue 5): copytruncate under a fast writer, gzip, a full disk."""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

FAST_WRITER = """
    import itertools, sys
    for i in itertools.count():
        print("x" * 100, i, flush=True)
"""


def _config(pmon: Any, text: str) -> None:
    (pmon.home / "config.toml").write_text(text)


def _rotated(log: Path) -> list[Path]:
    return sorted(p for p in log.parent.glob(log.name + ".*") if not p.name.endswith(".part"))


def test_a_fast_writer_is_rotated_and_old_files_are_bounded(pmon: Any) -> None:
    _config(pmon, "log_check_interval = 0.2\n")
    writer = pmon.script("writer", FAST_WRITER)
    svc = pmon.start_service(str(writer), "--name", "fast", "--log-max-size", "64K", "--log-keep", "3")
    log = Path(svc["out_log"])
    pmon.wait_for(lambda: len(_rotated(log)) == 3, timeout=10, message="three rotated files")
    pmon.holds(lambda: len(_rotated(log)) <= 3, 1.0, message="never more than --log-keep files")
    assert {p.name for p in _rotated(log)} == {f"{log.name}.{n}" for n in (1, 2, 3)}
    # every rotated file is a clean copy: whole lines, numbers increasing from .3 to .1
    first = [int(line.split()[1]) for line in (log.parent / f"{log.name}.3").read_text().splitlines()[1:-1]]
    assert first == sorted(first) and first
    events = pmon.json("events", "fast", "--json")
    assert any(e["kind"] == "rotate" for e in events)
    after = pmon.desc("fast")
    assert after["pid"] == svc["pid"] and after["restarts"] == 0, "rotation must not touch the service"
    assert oct((log.parent / f"{log.name}.1").stat().st_mode & 0o777) == "0o640"


def test_rotated_files_can_be_gzipped(pmon: Any) -> None:
    _config(pmon, "log_check_interval = 0.2\nlog_compress = true\n")
    writer = pmon.script("writer", FAST_WRITER)
    svc = pmon.start_service(str(writer), "--name", "zipped", "--log-max-size", "32K")
    log = Path(svc["out_log"])
    gz = log.parent / f"{log.name}.1.gz"
    pmon.wait_for(gz.exists, timeout=10, message="a gzipped rotation")
    pmon.wait_for(lambda: gz.stat().st_size > 0, message="the gzip to be written")
    pmon.wait_for(lambda: len(gzip.decompress(gz.read_bytes())) >= 32 * 1024, message="a complete gzip")
    assert b"xxxxxxxx" in gzip.decompress(gz.read_bytes())


def test_bad_rotation_settings_are_refused(pmon: Any) -> None:
    proc = pmon.run("run", "sleep", "515151", "--log-max-size", "lots", check=False)
    assert proc.returncode == 1 and "--log-max-size" in proc.stderr and "Traceback" not in proc.stderr
    assert pmon.services() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_stops_neither_the_service_nor_pmond(pmon: Any) -> None:
    disk = pmon.home / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _config(pmon, "log_check_interval = 0.2\n")
        # The shell's echo fails with ENOSPC and the loop goes on, as a robust service would.
        svc = pmon.start_service("sh", "-c", "while true; do echo 0123456789012345678901234567890123456789; done",
                                 "--name", "filler", "--log_dir", str(disk), "--log-max-size", "100K")
        log = Path(svc["out_log"])
        pmon.wait_for(lambda: any("disk full" in e["message"] for e in pmon.json("events", "filler", "--json")),
                      timeout=15, message="a rotation on a full disk")
        pmon.holds(lambda: pmon.is_alive(svc["pid"]), 1.0, message="the service survives the full disk")
        after = pmon.desc("filler")
        assert after["pid"] == svc["pid"] and after["status"] == "running"
        assert log.exists()
        pmon.run("stop", "filler")
    finally:
        with contextlib.suppress(Exception):
            pmon.run("stop", "filler", check=False)
        subprocess.run(["umount", "-l", str(disk)])
