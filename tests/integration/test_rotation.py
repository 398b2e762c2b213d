"""Built-in log rotation (issues 5, 10): copytruncate under a fast writer, gzip, a full disk, every log
(stopped services' and pmond's), adaptive checks under a 50 MB/s writer, and the log budget."""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT_SKIP = "needs root"
FAST_WRITER = """
    import itertools, sys
    for i in itertools.count():
        print("x" * 100, i, flush=True)
"""


def _config(pmon: Any, text: str) -> None:
    (pmon.home / "config.toml").write_text(text)


def _rotated(log: Path) -> list[Path]:
    return sorted(p for p in log.parent.glob(log.name + ".*") if ".part" not in p.name)


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


@contextlib.contextmanager
def _tmpfs(pmon: Any, size: str) -> Iterator[Path]:
    """A small tmpfs under the test's home, unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.skip(f"{ROOT_SKIP}: mounting a small tmpfs")
    disk = pmon.home / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip(f"{ROOT_SKIP}: cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        with contextlib.suppress(Exception):
            for svc in pmon.services():
                pmon.run("stop", svc["name"], check=False)
        subprocess.run(["umount", "-l", str(disk)])


def test_a_full_disk_stops_neither_the_service_nor_pmond(pmon: Any) -> None:
    with _tmpfs(pmon, "256k") as disk:
        # No budget here: the rotation itself must survive the full disk.
        _config(pmon, 'log_check_interval = 0.2\nlog_max_use = "100%"\nlog_keep_free = 0\n')
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


def _events(pmon: Any, name: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in pmon.json("events", name, "-n", "1000", "--json") if e["kind"] == kind]


def test_a_stopped_services_log_is_rotated_too(pmon: Any) -> None:
    _config(pmon, "log_check_interval = 0.2\n")
    svc = pmon.start_service("sleep", "616161", "--name", "idle", "--log-max-size", "1K")
    pmon.run("stop", "idle")
    log = Path(svc["out_log"])
    with log.open("ab") as fh:  # a leftover child, or a daemonised grandchild, still writing
        fh.write(b"late line\n" * 150)  # over 1K, under 2K: one rotated file
    pmon.wait_for(lambda: (log.parent / f"{log.name}.1").exists(), timeout=5, message="the stopped log rotated")
    assert (log.parent / f"{log.name}.1").read_bytes() == b"late line\n" * 150
    assert log.stat().st_size == 0
    assert any(e["message"].startswith(f"rotated {log}") for e in _events(pmon, "idle", "rotate"))


def test_pmonds_own_log_is_rotated(pmon: Any) -> None:
    _config(pmon, 'log_check_interval = 0.2\nlog_max_size = "1K"\n')
    pmon.start_service("sleep", "626262", "--name", "talker")
    own = pmon.log_dir / "pmond.log"
    with own.open("ab") as fh:
        fh.write(b"padding\n" * 150)
    rotated = pmon.log_dir / "pmond.log.1"
    pmon.wait_for(lambda: b"padding" in rotated.read_bytes(), timeout=5, message="pmond.log rotated")
    assert any(e["service"] == "pmond" and e["message"].startswith(f"rotated {own}")
               for e in pmon.json("events", "-n", "1000", "--json"))
    pmon.run("stop", "talker")
    pmon.wait_for(lambda: b"talker" in own.read_bytes(), message="pmond going on writing its emptied log")
    assert b"\0" not in own.read_bytes(), "O_APPEND: no hole after the truncation"


FLOOD = """
    import os, sys, time
    rate, total = float(sys.argv[1]), int(sys.argv[2])
    block = b"y" * 65535 + b"\\n"
    start, sent = time.monotonic(), 0
    while sent < total:
        os.write(1, block)
        sent += len(block)
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    print("done", file=sys.stderr, flush=True)
    time.sleep(3600)
"""


def test_no_rotated_file_passes_twice_the_limit_under_a_50_mb_per_s_writer(pmon: Any) -> None:
    # Checks every 2 s would let 100 MB through: only the adaptive checks keep up. The ledger gets one
    # event per log and interval: the first rotation, then a summary of the others.
    _config(pmon, "log_check_interval = 2\n")
    writer = pmon.script("flood", FLOOD)
    limit = 2 << 20
    svc = pmon.start_service(str(writer), str(50e6), str(200 << 20), "--name", "flood", "--log-max-size", "2M",
                             "--log-keep", "2")
    err, out = Path(svc["err_log"]), Path(svc["out_log"])
    seen = [0]

    def finished() -> bool:
        for n in (1, 2):  # the rotated files on disk, as the writer goes
            with contextlib.suppress(OSError):
                seen[0] = max(seen[0], (out.parent / f"{out.name}.{n}").stat().st_size)
        return b"done" in err.read_bytes()

    pmon.wait_for(finished, timeout=15, message="the writer to finish")
    assert seen[0] <= 2 * limit, f"a rotated file of {seen[0]} bytes"

    def rotations() -> list[dict[str, Any]]:
        return [e["data"] for e in _events(pmon, "flood", "rotate") if "bytes" in (e.get("data") or {})]

    # 200 MB in files of 2 to 4 MiB: at least 48 rotations, once the last summary is written.
    pmon.wait_for(lambda: sum(d.get("rotations", 1) for d in rotations()) >= 48, timeout=10,
                  message=lambda: f"the rotations' events; so far {rotations()}")
    events = rotations()
    largest = max(d["bytes"] for d in events)
    assert largest <= 2 * limit, f"largest rotated file {largest} bytes; events: {events}"
    assert len(events) <= 10, "one event per interval, not one per rotation"
    count = sum(d.get("rotations", 1) for d in events)
    total = sum(d.get("total", d["bytes"]) for d in events)
    assert total / count <= 1.75 * limit, "rotated soon after crossing the limit, not in big batches cut up"
    print(f"\n{count} rotations in {len(events)} events, largest {largest / (1 << 20):.2f} MiB, "
          f"mean {total / count / (1 << 20):.2f} MiB")


CRASHER = """
    import os, sys, time
    # Writes about 6 MB/s for half a second, then crashes: it comes back again and again.
    block = b"z" * 65535 + b"\\n"
    for _ in range(48):
        os.write(1, block)
        time.sleep(0.01)
    sys.exit(1)
"""


def test_the_log_budget_keeps_a_small_disk_free_under_a_crash_loop(pmon: Any) -> None:
    with _tmpfs(pmon, "8m") as disk:
        # Default settings: log_max_size 10M is more than the whole disk; the budget (10 % used at most,
        # 15 % kept free) is what saves it.
        writer = pmon.script("crasher", CRASHER)
        pmon.start_service(str(writer), "--name", "crasher", "--log_dir", str(disk))
        lowest = None
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            vfs = os.statvfs(disk)
            free = vfs.f_bavail * vfs.f_frsize
            lowest = free if lowest is None else min(lowest, free)
            time.sleep(0.01)
        assert lowest is not None and lowest >= (8 << 20) * 0.15, f"free space fell to {lowest} bytes"
        budget = _events(pmon, "crasher", "log_budget")
        assert budget and "emptied" in budget[0]["message"] and "log_max_use" in budget[0]["message"], budget
        restarts = pmon.desc("crasher")["restarts"]
        assert restarts >= 3, f"a crash loop: {restarts} restarts"
        print(f"\nlowest free space {lowest / (1 << 20):.2f} MiB of 8 MiB; {len(budget)} budget events; "
              f"{restarts} restarts")
