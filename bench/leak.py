#!/usr/bin/env python3
"""pmond's descriptors and memory across many crash-and-restart cycles of a service that dies at once.

    python bench/leak.py [--cycles 1000]

Prints the fd count and RSS of pmond after warm-up and after the cycles; both should be flat.
Runs in a scratch PMON2_HOME and cleans up everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def pmon(home: str, *args: str) -> str:
    env = dict(os.environ, PMON2_HOME=home, NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "pmon2", *args], env=env, check=True, capture_output=True,
                          text=True).stdout


def restarts(home: str) -> int:
    return json.loads(pmon(home, "ls", "--json"))[0]["restarts"]


def daemon_figures(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return fds, rss


def settle(pid: int, quiet: float = 3.0, timeout: float = 40.0) -> tuple[int, int]:
    """Exit statuses may wait for init to reap (seconds here): wait until pmond's fd count is steady."""
    deadline = time.monotonic() + timeout
    last, since = daemon_figures(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.25)
        now = daemon_figures(pid)
        if now[0] != last[0]:
            last, since = now, time.monotonic()
    return last


def run(cycles: int, warmup: int = 50) -> dict[str, float]:
    home = tempfile.mkdtemp(prefix="pmleak", dir="/tmp")
    daemon_pid = None
    try:
        pmon(home, "run", "--min-uptime", "0", "--name", "crasher", "sh", "-c", "exit 1")
        with open(os.path.join(home, "run", "pmond.pid")) as fh:
            daemon_pid = int(fh.read())
        while restarts(home) < warmup:
            time.sleep(0.05)
        pmon(home, "stop", "crasher")
        before = settle(daemon_pid)
        pmon(home, "start", "crasher")
        t0 = time.monotonic()
        while restarts(home) < warmup + cycles:
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        pmon(home, "stop", "crasher")
        after = settle(daemon_pid)
        kinds: dict[str, int] = {}
        for fd in os.listdir(f"/proc/{daemon_pid}/fd"):
            try:
                target = os.readlink(f"/proc/{daemon_pid}/fd/{fd}")
            except OSError:
                continue
            kind = target.split(":")[0] + (":" + target.split(":")[1][:12] if target.startswith("anon") else "")
            kinds[kind] = kinds.get(kind, 0) + 1
        print("pmond fds by kind:", kinds, file=sys.stderr)
        return {"cycles": cycles, "seconds": round(elapsed, 2), "fds_before": before[0], "fds_after": after[0],
                "rss_kib_before": before[1], "rss_kib_after": after[1]}
    finally:
        if daemon_pid:
            os.kill(daemon_pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=1000)
    args = parser.parse_args()
    r = run(args.cycles)
    print(f"{r['cycles']} crash-restarts in {r['seconds']} s")
    print(f"pmond fds: {r['fds_before']} -> {r['fds_after']}")
    print(f"pmond RSS: {r['rss_kib_before']} KiB -> {r['rss_kib_after']} KiB")
    print(json.dumps(r))
    return 0 if r["fds_after"] <= r["fds_before"] else 1


if __name__ == "__main__":
    sys.exit(main())
