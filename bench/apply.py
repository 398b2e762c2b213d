#!/usr/bin/env python3
"""Services as code, timed: `pmon2 apply` side by side with pm2's `pm2 start ecosystem.config.js` and
supervisor's `supervisorctl reread; supervisorctl update`, on this machine.

    .venv/bin/python bench/apply.py [--install-peers] [--trials 5] [--sizes 100,1000] [--json PATH]
                                    [--home-dir /dev/shm] [--pmon2-src DIR]

For each manager and size, each trial starts a fresh daemon in a scratch home (compare.py's managers:
PMON2_HOME, PM2_HOME, a private supervisord.conf) and writes one file with N services, each `sleep
<unique number>` (a long sleep that names its service), then measures:

- **apply**: from the start of the command (`pmon2 apply pmon2.toml`, `pm2 start ecosystem.config.js`,
  `supervisorctl reread` + `supervisorctl update`) until every one of the N processes runs (found in /proc
  by its command line); also when the command returned;
- **re-apply**: the same command again with the file unchanged, and whether any process was replaced;
- for pmon2 also pmond's own share: the same POST /v1/apply sent without the CLI (the body the CLI sends),
  and the CPU time of pmond's launcher with the intermediates it forked (the launches' side of the work);
- the machine's load average (1 minute) before each trial: this bench shares the machine.

Scratch homes are deleted at the end of the run, not after each trial: on ext4, creating a file within 30 s of
the deletion of thousands (the previous trial's logs) cost 7-9 times the CPU (0.12 ms became 0.8-1.1 ms,
`recently_deleted` in the inode allocator), and every manager creates files for each new service.

pmon2's modules run from bytecode, as they do once installed: the bench compiles them first and takes
PYTHONDONTWRITEBYTECODE out of pmon2's environment (with it, every CLI run compiled its modules again, 50 ms
of a 100 ms re-apply). `--home-dir` puts every manager's scratch home elsewhere than /tmp: on a tmpfs
(/dev/shm) it shows what the disk costs (pmon2 creates three files per new service: two logs and its launch
record; pmond's run dir is a tmpfs on a real install). `--pmon2-src DIR` measures another copy of pmon2's
src/ (an A/B against the tree as it was: `git archive`), as manager "pmon2@DIR", interleaved with the others.

The goals of issue 12: apply of 100 services until all run <= 0.5 s, re-apply of an unchanged file
<= 100 ms, a 1,000-service file <= 5 s. The peers run with 100 services (`--peers-1000` adds 1,000). Peers
are found as compare.py finds them (bench/.peers/, or PATH; `--install-peers` installs them there).
Everything started is killed by pid at the end (compare.Manager.teardown).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import compare  # noqa: E402  (bench/compare.py: managers, peers, /proc helpers)
from compare import SLEEP, find_sleepers, log, timed  # noqa: E402

GOALS = {"apply_100_ms": 500.0, "reapply_100_ms": 100.0, "apply_1000_ms": 5000.0}


def wait_running(mgr: compare.Manager, numbers: list[int], t0: float, timeout: float) -> float:
    """ms from t0 until each number's `sleep` runs exactly once."""
    want = set(numbers)
    deadline = t0 + timeout
    while True:
        found = find_sleepers(want)
        if len(found) == len(want) and all(len(p) == 1 for p in found.values()):
            return (time.perf_counter() - t0) * 1000
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{mgr.name}: {len(found)} of {len(want)} services run after {timeout:g} s")
        time.sleep(0.002)


def daemon_cpu_ms(pid: int | None) -> float | None:
    """CPU time of the daemon process so far (all its threads, schedstat ns), in ms. Unlike wall-clock time,
    hardly affected by what else the machine runs. Not its helpers: pmond's launcher forks a child per launch,
    and pm2's apps are its children."""
    figures = compare.cpu_figures(pid) if pid else None
    return figures["ns"] / 1e6 if figures else None


def launcher_cpu_ms(daemon: int | None) -> float | None:
    """CPU time of pmond's launcher and of the intermediates it forked and reaped (utime, stime, cutime and
    cstime: 10 ms ticks), in ms."""
    if not daemon:
        return None
    for pid in compare.all_pids():
        stat = compare.read_bytes(f"/proc/{pid}/stat")
        if not stat or b"(pmond-launcher)" not in stat:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[1]) == daemon:
            return sum(int(x) for x in fields[11:15]) * 1000 / os.sysconf("SC_CLK_TCK")
    return None


def pids_of(numbers: list[int]) -> dict[int, int]:
    return {n: p[0] for n, p in find_sleepers(set(numbers)).items()}


# each manager: write the file, the apply command(s)


class Pmon2Apply:
    name = "pmon2"

    def __init__(self, mgr: compare.Pmon2) -> None:
        self.mgr = mgr
        self.file = os.path.join(mgr.home, "pmon2.toml")

    def write(self, numbers: list[int]) -> None:
        with open(self.file, "w") as fh:
            fh.write("[defaults]\n")
            fh.write(f'cwd = "{self.mgr.home}"\n')
            for i, n in enumerate(numbers):
                fh.write(f'\n[services.s{i}]\ncommand = ["{SLEEP}", "{n}"]\n')

    def commands(self) -> list[list[str]]:
        return [[*self.mgr.cli, "apply", self.file]]

    def api_reapply_ms(self) -> float:
        """pmond's share of a re-apply: the body the CLI sends, POSTed without the CLI."""
        from pmon2 import appfile

        body = appfile.load(self.file)
        t0 = time.perf_counter()
        answer = self.mgr.api("POST", "/v1/apply", body)
        ms = (time.perf_counter() - t0) * 1000
        assert answer["summary"]["unchanged"] == len(body["services"]), answer["summary"]  # type: ignore[index]
        return ms


class Pm2Apply:
    name = "pm2"

    def __init__(self, mgr: compare.Pm2) -> None:
        self.mgr = mgr
        self.file = os.path.join(mgr.home, "ecosystem.config.js")

    def write(self, numbers: list[int]) -> None:
        apps = [{"name": f"s{i}", "script": SLEEP, "args": str(n), "interpreter": "none", "autorestart": True,
                 "cwd": self.mgr.home} for i, n in enumerate(numbers)]
        with open(self.file, "w") as fh:
            fh.write("module.exports = " + json.dumps({"apps": apps}, indent=1) + ";\n")

    def commands(self) -> list[list[str]]:
        return [[self.mgr.bin, "start", self.file]]


class SupervisorApply:
    name = "supervisor"

    def __init__(self, mgr: compare.Supervisor) -> None:
        self.mgr = mgr
        self.file = os.path.join(mgr.home, "programs", "apps.ini")

    def write(self, numbers: list[int]) -> None:
        with open(self.file, "w") as fh:
            for i, n in enumerate(numbers):
                fh.write(f"[program:s{i}]\ncommand={SLEEP} {n}\nautorestart=true\n\n")

    def commands(self) -> list[list[str]]:
        ctl = [self.mgr.supervisorctl, "-c", self.mgr.conf]
        return [[*ctl, "reread"], [*ctl, "update"]]


def run_commands(tool: object, env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Run the apply command(s) in turn: (wall ms, CPU ms of the CLI processes). Raises on a failure."""
    wall = cpu = 0.0
    for argv in tool.commands():  # type: ignore[attr-defined]
        ms, rc, tail, cpu_ms = timed(argv, env, cwd=cwd)
        if rc != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {rc}: {tail}")
        wall += ms
        cpu += cpu_ms
    return wall, cpu


def one_trial(name: str, make: object, size: int, numbers: list[int]) -> dict[str, object]:
    mgr = make(name, numbers)  # type: ignore[operator]
    kind = name.split("@")[0]
    tool = {"pmon2": Pmon2Apply, "pm2": Pm2Apply, "supervisor": SupervisorApply}[kind](mgr)
    try:
        load = os.getloadavg()[0]
        mgr.start()
        tool.write(numbers)
        daemon = mgr.daemon_pid()
        launcher0 = launcher_cpu_ms(daemon) if kind == "pmon2" else None
        cpu0 = daemon_cpu_ms(daemon)
        t0 = time.perf_counter()
        returned_ms, cpu_ms = run_commands(tool, mgr.env, mgr.home)
        running_ms = wait_running(mgr, numbers, t0, timeout=120 + size * 0.2)
        cpu1 = daemon_cpu_ms(daemon)
        launcher1 = launcher_cpu_ms(daemon) if kind == "pmon2" else None
        before = pids_of(numbers)
        cpu2 = daemon_cpu_ms(daemon)
        again_ms, again_cpu = run_commands(tool, mgr.env, mgr.home)
        cpu3 = daemon_cpu_ms(daemon)
        # Anything replaced? (pm2 restarts the apps of a `start` that it already runs.)
        wait_running(mgr, numbers, time.perf_counter(), timeout=60 + size * 0.1)
        after = pids_of(numbers)
        out: dict[str, object] = {
            "apply_returned_ms": round(returned_ms, 1), "apply_running_ms": round(running_ms, 1),
            "apply_cli_cpu_ms": round(cpu_ms, 1), "reapply_ms": round(again_ms, 1),
            "reapply_cli_cpu_ms": round(again_cpu, 1),
            "reapply_replaced": sum(before.get(n) != after.get(n) for n in numbers),
            "apply_daemon_cpu_ms": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 1),
            "reapply_daemon_cpu_ms": None if cpu2 is None or cpu3 is None else round(cpu3 - cpu2, 1),
            "loadavg_1min": round(load, 2),
        }
        if launcher0 is not None and launcher1 is not None:
            out["apply_launcher_cpu_ms"] = round(launcher1 - launcher0, 1)
        if kind == "pmon2":
            out["reapply_api_ms"] = round(min(tool.api_reapply_ms() for _ in range(3)), 1)  # type: ignore[attr-defined]
        return out
    finally:
        mgr.teardown()


def median_of(trials: list[dict[str, object]], key: str) -> float | None:
    values = [t[key] for t in trials if isinstance(t.get(key), int | float)]
    return round(statistics.median(values), 1) if values else None  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--managers", default="pmon2,pm2,supervisor")
    ap.add_argument("--install-peers", action="store_true", help="install pm2 and supervisor into bench/.peers/ "
                    "first (compare.py's installer; never globally)")
    ap.add_argument("--pm2-spec", default="pm2@7")
    ap.add_argument("--supervisor-spec", default="supervisor>=4.2,<5")
    ap.add_argument("--sizes", default="100,1000", help="services per file (default 100,1000)")
    ap.add_argument("--trials", type=int, default=5, help="trials per manager and size (default 5)")
    ap.add_argument("--peers-1000", action="store_true", help="also run the peers above 100 services (slow)")
    ap.add_argument("--pmon2-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for pmon2's CLI and pmond")
    ap.add_argument("--home-dir", default="/tmp", help="where the scratch homes go (default /tmp; /dev/shm: a tmpfs)")
    ap.add_argument("--pmon2-src", action="append", default=[], metavar="DIR",
                    help="also measure the pmon2 of another src/ dir (repeatable), as pmon2@DIR")
    ap.add_argument("--json", default=os.path.join(HERE, "apply-results.json"))
    args = ap.parse_args(argv)
    if args.home_dir != "/tmp":
        real_mkdtemp = compare.tempfile.mkdtemp

        def mkdtemp(*a: object, **k: object) -> str:  # compare.Manager makes each home in /tmp
            if k.get("dir") == "/tmp":
                k["dir"] = args.home_dir
            return real_mkdtemp(*a, **k)  # type: ignore[arg-type]

        compare.tempfile.mkdtemp = mkdtemp  # type: ignore[assignment]
    compile_bytecode([os.path.join(compare.ROOT, "src"), *args.pmon2_src])

    if args.install_peers:
        compare.install_peers(args.pm2_spec, args.supervisor_spec)
    sizes = compare.parse_sizes(args.sizes)
    wanted = [m.strip() for m in args.managers.split(",") if m.strip()]
    pm2_bin, sup_dir = compare.find_pm2(), compare.find_supervisor()
    names, skipped = [], {}
    for name in ("pmon2", *(f"pmon2@{os.path.abspath(d)}" for d in args.pmon2_src), "pm2", "supervisor"):
        if name.startswith("pmon2@") and "pmon2" in wanted:
            names.append(name)
            continue
        if name not in wanted:
            continue
        if (name == "pm2" and not pm2_bin) or (name == "supervisor" and not sup_dir):
            skipped[name] = "not installed (use --install-peers)"
            print(f"{name}: not installed (bench/.peers/ or PATH); `--install-peers` installs it. Measuring "
                  "without it.", file=sys.stderr)
            continue
        names.append(name)

    marker = f"{os.getpid()}-{random.randrange(1 << 30)}"
    slot = [0]
    homes: list[str] = []
    compare.KEEP_HOMES = True  # each trial's teardown keeps its home; all are deleted at the end

    def make(name: str, numbers: list[int]) -> compare.Manager:
        slot[0] += 1
        tag = f"apply-{name.split('@')[0]}-{slot[0]}"
        if name.startswith("pmon2"):
            m: compare.Manager = compare.Pmon2(numbers, marker, tag)
            m.env |= dict(kv.split("=", 1) for kv in args.pmon2_env)
            m.env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode, as installed (compile_bytecode)
            if "@" in name:
                m.env["PYTHONPATH"] = name.split("@", 1)[1]  # ahead of the venv's editable install
        elif name == "pm2":
            m = compare.Pm2(pm2_bin, numbers, marker, tag)
        else:
            m = compare.Supervisor(sup_dir, numbers, marker, tag)
        homes.append(m.home)
        return m

    report: dict[str, object] = {
        "machine": compare.machine(), "command": " ".join([os.path.relpath(sys.executable, compare.ROOT), *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pmon2_commit": compare.git_commit(),
        "settings": {"sizes": sizes, "trials": args.trials, "peers_1000": args.peers_1000,
                     "pmon2_env": args.pmon2_env, "home_dir": args.home_dir, "pmon2_src": args.pmon2_src,
                     "bytecode": "compiled first; PYTHONDONTWRITEBYTECODE removed from pmon2's environment"},
        "versions": {}, "skipped": skipped, "results": {},
    }
    results: dict[str, dict[str, object]] = report["results"]  # type: ignore[assignment]
    try:
        for size in sizes:
            for trial in range(args.trials):
                for name in names:  # interleaved: a busy moment of the machine hits every manager alike
                    if not name.startswith("pmon2") and size > 100 and not args.peers_1000:
                        continue
                    base = random.randrange(100_000, 900_000) * 10_000
                    while find_sleepers(set(range(base, base + size))):
                        base = random.randrange(100_000, 900_000) * 10_000
                    numbers = list(range(base, base + size))
                    log(f"{name}: {size} services, trial {trial + 1}/{args.trials}")
                    entry = results.setdefault(name, {}).setdefault(str(size), {"trials": []})
                    try:
                        entry["trials"].append(one_trial(name, make, size, numbers))  # type: ignore[index, union-attr]
                    except (RuntimeError, OSError) as exc:
                        log(f"{name}: {exc}")
                        entry["trials"].append({"error": str(exc)})  # type: ignore[union-attr]
        for name in names:
            with_version = make(name, [])
            try:
                report["versions"][name] = with_version.version()  # type: ignore[index]
            except (RuntimeError, OSError):
                report["versions"][name] = "?"  # type: ignore[index]
            finally:
                with_version.teardown()
            for entry in results.get(name, {}).values():
                trials = entry["trials"]  # type: ignore[index]
                entry["median"] = {k: median_of(trials, k) for k in (  # type: ignore[index]
                    "apply_returned_ms", "apply_running_ms", "apply_cli_cpu_ms", "reapply_ms", "reapply_cli_cpu_ms",
                    "reapply_api_ms", "reapply_replaced", "apply_daemon_cpu_ms", "reapply_daemon_cpu_ms",
                    "apply_launcher_cpu_ms", "loadavg_1min")}
    finally:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    pm = results.get("pmon2", {})
    report["goals"] = {
        "apply_100_ms": [GOALS["apply_100_ms"], pm.get("100", {}).get("median", {}).get("apply_running_ms")],
        "reapply_100_ms": [GOALS["reapply_100_ms"], pm.get("100", {}).get("median", {}).get("reapply_ms")],
        "apply_1000_ms": [GOALS["apply_1000_ms"], pm.get("1000", {}).get("median", {}).get("apply_running_ms")],
    }
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["loadavg_at_end"] = os.getloadavg()
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report)
    print(f"\nJSON: {args.json}")
    return 0


def print_table(report: dict[str, object]) -> None:
    results: dict[str, dict[str, dict[str, object]]] = report["results"]  # type: ignore[assignment]
    versions: dict[str, str] = report["versions"]  # type: ignore[assignment]
    names = list(results)
    print("\nmedians, ms" + "".join(f" | {n} {versions.get(n, '')}".rstrip() for n in names))
    rows = [("apply: all running", "apply_running_ms"), ("apply: command returned", "apply_returned_ms"),
            ("re-apply, unchanged", "reapply_ms"), ("re-apply: pmond's share (API)", "reapply_api_ms"),
            ("re-apply: processes replaced", "reapply_replaced"), ("CPU of the daemon, apply", "apply_daemon_cpu_ms"),
            ("CPU of the CLI, apply", "apply_cli_cpu_ms"), ("CPU of the daemon, re-apply", "reapply_daemon_cpu_ms"),
            ("CPU of the CLI, re-apply", "reapply_cli_cpu_ms"),
            ("CPU of pmond's launcher and intermediates, apply", "apply_launcher_cpu_ms"),
            ("load average (1 min) before the trial", "loadavg_1min")]
    sizes = sorted({int(s) for r in results.values() for s in r})
    for size in sizes:
        for label, key in rows:
            cells = []
            for n in names:
                entry = results[n].get(str(size))
                value = entry.get("median", {}).get(key) if entry else None  # type: ignore[union-attr]
                cells.append("-" if value is None else f"{value:g}")
            print(f"{size} services, {label}: " + " | ".join(cells))
    for goal, (limit, value) in report["goals"].items():  # type: ignore[union-attr]
        verdict = "-" if value is None else ("met" if value <= limit else "MISSED")
        print(f"goal {goal} <= {limit:g}: {value} {verdict}")


def compile_bytecode(dirs: list[str]) -> None:
    """Write the bytecode of pmon2's modules, as an install does (pip compiles them)."""
    import compileall

    for d in dirs:
        compileall.compile_dir(os.path.join(d, "pmon2"), quiet=1)


if __name__ == "__main__":
    sys.exit(main())
