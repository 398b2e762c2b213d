"""CPU and memory of a whole service (issue 11, requirement 7): every process of its session, memory as PSS,
and the main process's own figures beside them."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest

MB = 1_000_000
# 50 MB, written into page by page so that the memory is real (a script body, at column 0)
TOUCH = 'x = bytearray(50_000_000)\nx[::4096] = b"\\1" * len(range(0, len(x), 4096))\n'


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_memory_and_processes_cover_every_process_of_the_service(pmon: Any) -> None:
    hog = shlex.quote(str(pmon.script("hog", TOUCH + "import time\ntime.sleep(1000)\n")))
    pmon.start_service("sh", "-c", f"{hog} & {hog} & wait", "--name", "hogs")
    svc = pmon.wait_service("hogs", lambda s: s["processes"] == 3 and s["mem_bytes"] >= 90 * MB, timeout=20,
                            what="3 processes and at least 90 MB")
    assert svc["mem_source"] == "pss"
    assert svc["main_mem_bytes"] < 10 * MB, "the main process is the shell: its own RSS is small"
    assert svc["main_mem_bytes"] == pytest.approx(rss_bytes(svc["pid"]), rel=0.5)
    listed = {s["name"]: s for s in pmon.services()}["hogs"]
    assert listed["processes"] == 3 and listed["mem_bytes"] >= 90 * MB and listed["main_mem_bytes"] < 10 * MB
    table = pmon.run("ls").stdout
    assert "procs" in table and "MB" in table
    text = pmon.run("desc", "hogs").stdout
    assert "over 3 processes" in text and "PSS" in text


def test_cpu_of_a_busy_child_is_the_service_s_not_the_main_process_s(pmon: Any) -> None:
    burn = shlex.quote(str(pmon.script("burn", "while True:\n    pass\n")))
    pmon.start_service("sh", "-c", f"{burn} & wait", "--name", "burner")
    seen: list[dict[str, Any]] = []

    def busy() -> dict[str, Any] | None:
        svc = pmon.desc("burner")
        seen.append(svc)
        # Two looks at least 0.2 s apart make a figure over that window (the first is a life average).
        return svc if len(seen) >= 2 and svc["cpu_percent"] > 50 else None

    svc = pmon.wait_for(busy, timeout=20, interval=0.3,
                        message=lambda: f"cpu_percent > 50; last: {[s['cpu_percent'] for s in seen[-5:]]}")
    assert svc["processes"] == 2
    assert svc["main_cpu_percent"] < 5, svc


def test_copy_on_write_pages_of_forked_workers_count_once(pmon: Any) -> None:
    cow = pmon.script("cow", "import os, time\n" + TOUCH + """
for _ in range(3):
    if os.fork() == 0:
        total = sum(x[::4096])  # read only: the pages stay shared with the parent
        time.sleep(1000)
        os._exit(0)
time.sleep(1000)
""")
    svc = pmon.start_service(str(cow), "--name", "cow")

    def settled() -> dict[str, Any] | None:
        s = pmon.desc("cow")
        return s if s["processes"] == 4 and s["mem_bytes"] >= 45 * MB else None

    svc = pmon.wait_for(settled, timeout=20, interval=0.2, message="4 processes sharing 50 MB")
    pids = [svc["pid"], *pmon.children_of(svc["pid"])]
    assert len(pids) == 4
    assert sum(rss_bytes(p) for p in pids) >= 200 * MB, "each worker maps the 50 MB: RSS counts it 4 times"
    # PSS shares each page out among the processes that map it: 50 MB once, plus 4 interpreters.
    assert svc["mem_bytes"] < 100 * MB, f"{svc['mem_bytes'] / MB:.0f} MB: the shared pages were counted more than once"
    assert svc["mem_source"] == "pss"
    assert svc["main_mem_bytes"] >= 50 * MB  # the main process's own RSS counts its pages whole


def test_a_service_that_is_not_running_has_no_figures(pmon: Any) -> None:
    pmon.start_service("sleep", "818181", "--name", "idle")
    pmon.run("stop", "idle")
    svc = pmon.desc("idle")
    for field in ("cpu_percent", "mem_bytes", "mem_source", "processes", "main_cpu_percent", "main_mem_bytes"):
        assert svc[field] is None, field


def test_a_lone_process_is_one_process(pmon: Any) -> None:
    svc = pmon.start_service("sleep", "828282", "--name", "lone")
    got = pmon.desc("lone")
    assert got["processes"] == 1 and got["mem_source"] == ("pss" if os.path.exists("/proc/self/smaps_rollup")
                                                             else "rss")
    assert 0 < got["mem_bytes"] <= rss_bytes(svc["pid"]) * 1.1
