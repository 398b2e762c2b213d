#!/usr/bin/env python3
"""CLI start-up of the one-file build against the installed CLI: median wall time of `version`, N runs each.

    python tools/startup_time.py [--runs 20] [--pyz dist/pmon2.pyz] [--python /usr/bin/python3]

The runs alternate between the commands so that a busy machine slows both alike. `version` does not start
pmond; a private PMON2_HOME keeps it away from any running one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pyz", default=str(ROOT / "dist/pmon2.pyz"))
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter that runs the .pyz")
    parser.add_argument("--installed", default=str(ROOT / ".venv/bin/pmon2"), help="the installed CLI")
    args = parser.parse_args()
    commands = {"installed": [args.installed, "version"], "pyz": [args.python, args.pyz, "version"]}
    with tempfile.TemporaryDirectory(prefix="pmst") as home:
        env = dict(os.environ, PMON2_HOME=home)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(args.runs + 2):
            for name, cmd in commands.items():
                start = time.perf_counter()
                pid = os.posix_spawn(cmd[0], cmd, env, file_actions=[
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
                _, status = os.waitpid(pid, 0)
                if status != 0:
                    print(f"{' '.join(cmd)} failed", file=sys.stderr)
                    return 1
                if i >= 2:  # warm-up runs fill the page cache
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, cmd in commands.items():
        print(f"{name:9s} {medians[name]:6.1f} ms  median of {args.runs}  ({' '.join(cmd)})")
    print(f"pyz - installed: {medians['pyz'] - medians['installed']:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
