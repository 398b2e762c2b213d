#!/usr/bin/env python3
"""`pmon2 ls` before and after whole-service CPU and memory (issue 11, requirement 7), on a crowded host.

    .venv/bin/python bench/usage.py [--services 100] [--others 2000] [--runs 20] [--base HEAD]

The code before is a git revision (default HEAD), checked out into a temporary worktree
(`git worktree add --detach /tmp/pmon2-base REV`, removed at the end) and run from there with
PYTHONPATH; the code after is this tree (or `--after SRC_DIR`). Both run side by side, each with its
own pmond (PMON2_HOME in /tmp) and `--services` services (`sleep <unique number>`), on a host where the
bench has started `--others` idle `sleep` processes of its own (at most 10,000). Then, alternating
between the two, and each figure the median of `--runs`:

- `pmon2 ls` back to back (ls in a loop, as monit does; the PSS cache of the code after holds);
- `pmon2 ls` every PSS_TTL + 0.5 s (the idle services' PSS is still kept);
- `pmon2 ls` after PSS_IDLE_TTL + 1 s of quiet each time (`--cold-runs`: every PSS read again);
- `GET /v1/services` on the socket, without the CLI (pmond's own part of `ls`);
- the same `ls` once the other processes are gone (the host at rest).

It also times the two reads per process: /proc/PID/stat against /proc/PID/smaps_rollup, for a `sleep`
and for a process with 50 MB touched. Everything started is killed by pid at the end: the other
sleeps, both pmonds, every process of their services (by unique number and by the run's marker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from compare import (  # noqa: E402  (bench/ is not a package)
    Pmon2,
    cpu_figures,
    find_sleepers,
    log,
    machine,
    read_bytes,
    summary,
    timed,
)

MAX_OTHERS = 10_000
PSS_TTL = 2.0  # pmon2.daemon.usage.PSS_TTL
PSS_IDLE_TTL = 30.0  # pmon2.daemon.usage.PSS_IDLE_TTL: a `cold` ls waits longer than this


class Variant(Pmon2):
    """pmon2 from one source tree: the CLI and pmond import it through PYTHONPATH."""

    def __init__(self, label: str, src: str, numbers: list[int], marker: str) -> None:
        super().__init__(numbers, marker, label)
        self.name = label
        self.src = src
        self.env["PYTHONPATH"] = src
        self.cli = [os.path.join(ROOT, ".venv", "bin", "pmon2")]
        if not os.path.exists(self.cli[0]):
            self.cli = [sys.executable, "-m", "pmon2"]

    def api_ms(self) -> float:
        """One GET /v1/services on the socket, wall-clock ms."""
        t0 = time.perf_counter()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        try:
            s.connect(self.socket)
            s.sendall(b"GET /v1/services HTTP/1.1\r\nHost: pmon2\r\nConnection: close\r\n\r\n")
            while s.recv(262144):
                pass
        finally:
            s.close()
        return (time.perf_counter() - t0) * 1000

    def ls(self) -> tuple[float, float]:
        ms, code, err, cpu = timed([*self.cli, "ls"], self.env)
        if code != 0:
            raise RuntimeError(f"{self.name}: pmon2 ls exited {code}: {err}")
        return ms, cpu

    def pmond_cpu_ns(self) -> int:
        figures = cpu_figures(self.daemon_pid() or 0)
        if figures is None:
            raise RuntimeError(f"{self.name}: pmond is gone")
        return figures["ns"]

    def measured(self, fn) -> tuple[float, float, float]:
        """fn(self) -> (wall ms, CLI CPU ms), plus pmond's CPU ms meanwhile (schedstat, ns precision): the
        work of a request, which the load of a shared machine barely changes."""
        before = self.pmond_cpu_ns()
        wall, cli = fn(self)
        return wall, cli, (self.pmond_cpu_ns() - before) / 1e6


def start_others(count: int, numbers: range) -> list[subprocess.Popen[bytes]]:
    procs = []
    for n in numbers[:count]:
        procs.append(subprocess.Popen(["sleep", str(n)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    return procs


def stop_others(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(OSError):
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    procs.clear()


def read_cost_us(pid: int, name: str, runs: int = 200) -> float:
    path = f"/proc/{pid}/{name}"
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        read_bytes(path)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def read_costs() -> dict[str, dict[str, float]]:
    """µs per read of stat and smaps_rollup, for a `sleep` and for a process with 50 MB touched."""
    script = 'x = bytearray(50_000_000)\nx[::4096] = b"\\1" * len(range(0, len(x), 4096))\nprint(1, flush=True)\n' \
             'import time\ntime.sleep(600)\n'
    small = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    big = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert big.stdout is not None
        big.stdout.readline()
        return {label: {"stat_us": read_cost_us(pid, "stat"), "smaps_rollup_us": read_cost_us(pid, "smaps_rollup")}
                for label, pid in (("sleep", small.pid), ("python, 50 MB touched", big.pid))}
    finally:
        for p in (small, big):
            p.kill()
            p.wait()


def alternate(variants: list[Variant], runs: int, fn, pause: float = 0.0) -> dict[str, list[tuple[float, ...]]]:
    """`runs` rounds; each calls fn(variant) for every variant, in an order that alternates by round, after
    `pause` seconds of quiet."""
    out: dict[str, list[tuple[float, ...]]] = {v.name: [] for v in variants}
    for i in range(runs):
        time.sleep(pause)
        order = variants if i % 2 == 0 else variants[::-1]
        for v in order:
            out[v.name].append(v.measured(fn))
    return out


def figures(samples: dict[str, list[tuple[float, ...]]]) -> dict[str, dict[str, object]]:
    return {name: {"wall_ms": summary([s[0] for s in rows]), "cpu_ms": summary([s[1] for s in rows]),
                   "pmond_cpu_ms": summary([s[2] for s in rows]),
                   "total_cpu_ms": summary([s[1] + s[2] for s in rows])}
            for name, rows in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--others", type=int, default=2000, help=f"idle sleeps started on the host (at most {MAX_OTHERS})")
    ap.add_argument("--runs", type=int, default=20, help="runs per figure (median)")
    ap.add_argument("--cold-runs", type=int, default=6, help=f"runs of the cold ls, {PSS_IDLE_TTL + 1:g} s apart")
    ap.add_argument("--base", default="e3b3a4c",
                    help="the revision measured as before (default e3b3a4c: the code before whole-service usage)")
    ap.add_argument("--worktree", default="/tmp/pmon2-base", help="where to check it out (must not exist)")
    ap.add_argument("--after", default=os.path.join(ROOT, "src"),
                    help="the source dir measured as after (default: this tree's src)")
    ap.add_argument("--json", default=os.path.join(HERE, "usage-results.json"))
    args = ap.parse_args(argv)
    if not 0 <= args.others <= MAX_OTHERS:
        ap.error(f"--others: 0 to {MAX_OTHERS}")
    if os.path.exists(args.worktree):
        ap.error(f"{args.worktree} exists: remove it or pass --worktree")

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.base], capture_output=True, text=True,
                            check=True).stdout.strip()
    marker = f"usage-{os.getpid()}-{random.randrange(1 << 30)}"
    while True:
        base_number = random.randrange(100_000, 900_000) * 100_000
        if not find_sleepers(set(range(base_number, base_number + 100_000))):
            break
    block = max(args.services + 2, 1000)
    others: list[subprocess.Popen[bytes]] = []
    variants: list[Variant] = []
    report: dict[str, object] = {"machine": machine(), "base": commit, "settings": vars(args),
                                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", args.worktree, args.base], check=True,
                   capture_output=True)
    try:
        variants = [
            Variant(f"before ({commit})", os.path.join(args.worktree, "src"),
                    list(range(base_number, base_number + block)), marker),
            Variant("after", os.path.abspath(args.after),
                    list(range(base_number + block, base_number + 2 * block)), marker),
        ]
        for v in variants:
            log(f"{v.name}: pmond and {args.services} services")
            v.start()
            v.add(args.services)
            v.wait_services(args.services)
        log(f"starting {args.others} idle sleeps")
        others = start_others(args.others, range(base_number + 2 * block, base_number + 2 * block + args.others))
        time.sleep(1.0)
        report["host_processes"] = sum(1 for n in os.listdir("/proc") if n.isdigit())
        results: dict[str, object] = {}
        for v in variants:
            v.ls()  # warm-up
        log("ls, back to back")
        results["ls_warm"] = figures(alternate(variants, args.runs, Variant.ls))
        log(f"ls, {PSS_TTL + 0.5:g} s apart")
        results["ls_apart"] = figures(alternate(variants, args.runs, Variant.ls, pause=PSS_TTL + 0.5))
        if args.cold_runs:
            log(f"ls, {PSS_IDLE_TTL + 1:g} s apart, {args.cold_runs} times")
            results["ls_cold"] = figures(alternate(variants, args.cold_runs, Variant.ls, pause=PSS_IDLE_TTL + 1))
        log("GET /v1/services on the socket")
        results["api"] = figures(alternate(variants, args.runs, lambda v: (v.api_ms(), 0.0)))
        log("ls, the other processes gone")
        stop_others(others)
        time.sleep(1.0)
        results["ls_warm_no_others"] = figures(alternate(variants, args.runs, Variant.ls))
        log("read costs")
        results["read_costs"] = read_costs()
        report["results"] = results
    finally:
        stop_others(others)
        for v in variants:
            v.teardown()
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", args.worktree], capture_output=True)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print_report(report)
    print(f"\nJSON: {args.json}")
    return 0


def print_report(report: dict[str, object]) -> None:
    res = report["results"]
    assert isinstance(res, dict)
    print(f"host: {report.get('host_processes')} processes while measuring; "
          f"{report['settings']['services']} services per pmond")  # type: ignore[index]
    rows = [("ls, back to back", "ls_warm"), (f"ls, {PSS_TTL + 0.5:g} s apart", "ls_apart"),
            (f"ls, {PSS_IDLE_TTL + 1:g} s apart (PSS read again)", "ls_cold"),
            ("GET /v1/services (pmond's part)", "api"), ("ls, the other processes gone", "ls_warm_no_others")]
    rows = [(label, key) for label, key in rows if key in res]
    names = list(res["ls_warm"])
    print(f"{'medians, ms: wall / CPU of CLI+pmond':<44}" + "".join(f"{n:>24}" for n in names)
          + f"{'ratios':>14}")
    for label, key in rows:
        cells = []
        for n in names:
            f = res[key][n]
            cells.append(f"{f['wall_ms']['median']:.1f} / {f['total_cpu_ms']['median']:.1f}")
        a, b = (res[key][n] for n in names)
        ratios = (f"{b['wall_ms']['median'] / a['wall_ms']['median']:.2f} / "
                  f"{b['total_cpu_ms']['median'] / a['total_cpu_ms']['median']:.2f}")
        print(f"{label:<44}" + "".join(f"{c:>24}" for c in cells) + f"{ratios:>14}")
    print("reads, µs:", json.dumps(res["read_costs"]))


if __name__ == "__main__":
    sys.exit(main())
