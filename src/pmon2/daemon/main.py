"""pmond's entry point: one instance per data dir, a single-threaded asyncio loop, no service owned."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

from pmon2 import __version__, paths
from pmon2.config import Config, load
from pmon2.daemon import sdnotify, spawn, watch
from pmon2.daemon.api import Api
from pmon2.daemon.auth import PeerPolicy
from pmon2.daemon.server import HttpServer, Limits
from pmon2.daemon.store import Store, set_aside
from pmon2.daemon.supervisor import Supervisor, iso
from pmon2.errors import PmonError, StoreError
from pmon2.render import words

log = logging.getLogger("pmond")
PR_SET_CHILD_SUBREAPER = 36
USAGE = """usage: pmond [--subreaper] [--recover] [--version]

The pmon2 daemon, in the foreground. The pmon2 CLI starts it by itself; `pmon2 daemon start|stop|status`
manage it. Stopping pmond never stops a service.

  --subreaper  adopt orphaned descendants and reap them (implied when pmond is PID 1)
  --recover    rebuild services that run but that the database lost (`pmon2 daemon recover`)
  --version    print the version"""


class AlreadyRunning(PmonError):
    code = "already_running"


def lock_pidfile(path: str) -> int:
    """Hold an exclusive lock on the pid file for pmond's whole life: one pmond per run dir."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(f"pmond is already running (pid {other or '?'})") from None
        # A pmond on its way out unlinks the file after we opened it: then our lock guards nothing.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def set_subreaper() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise PmonError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


class Reaper:
    """As PID 1 or a subreaper, pmond inherits orphans and must reap them; it keeps their statuses."""

    def __init__(self, wanted: Callable[[int], bool]) -> None:
        self.wanted = wanted
        self.statuses: dict[int, watch.ExitStatus] = {}

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.wanted(pid):
                self.statuses[pid] = watch.ExitStatus.from_wait_status(status, "waitpid")

    def lookup(self, pid: int) -> watch.ExitStatus | None:
        return self.statuses.pop(pid, None)


def exit_status_sources() -> set[str]:
    """PMON2_EXIT_STATUS=none turns off every source (to test the "unknown" path), a list picks some.

    By default the proc connector is used only where pidfds cannot tell an exit status (before Linux
    6.15): it hears every exit on the machine, and each one wakes pmond."""
    value = os.environ.get("PMON2_EXIT_STATUS", "auto").strip().lower()
    if value in ("", "auto"):
        return {"pidfd", "waitpid"} if watch.PidfdInfo.probe() else {"proc_connector", "pidfd", "waitpid"}
    if value == "none":
        return set()
    sources = {v.strip() for v in value.split(",")}
    if "pidfd" in sources:
        watch.PidfdInfo.probe()  # so that `daemon status` does not list it where the kernel lacks it
    return sources


def setup_logging(log_dir: str, foreground: bool) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    root = logging.getLogger("pmond")
    root.setLevel(logging.INFO)
    handler = logging.FileHandler(os.path.join(log_dir, "pmond.log"), encoding="utf-8")
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if foreground and sys.stderr.isatty():
        err = logging.StreamHandler()
        err.setFormatter(fmt)
        root.addHandler(err)


def prepare_dirs(config: Config) -> None:
    p = config.paths
    private = 0o700 if p.mode != "root" else 0o755
    for d, mode in ((p.run_dir, private), (p.data_dir, 0o700), (p.log_dir, 0o750 if p.mode == "root" else 0o700)):
        try:
            os.makedirs(d, mode=mode, exist_ok=True)
        except OSError as exc:
            raise PmonError(f"cannot create {d}: {exc.strerror}") from None


async def serve(config: Config, subreaper: bool, notifier: sdnotify.Notifier | None = None,
                rebuild: bool = False) -> None:
    loop = asyncio.get_running_loop()
    reserve_size = os.environ.get("PMON2_FD_RESERVE", "")  # fds kept for restarts; tests set 0 to see EMFILE
    spawn.RESERVE = spawn.FdReserve(int(reserve_size) if reserve_size.isdigit() else 16)
    watch.GroupSignal.probe()  # now, while fds are plenty: a crash clean-up must not need one
    stop = asyncio.Event()
    started = time.time()
    try:
        store = Store(config.paths.database)
    except StoreError as exc:
        if not (rebuild and exc.code == "corrupt"):
            raise
        log.warning("database %s is damaged; kept as %s, rebuilding from the running services",
                    config.paths.database, set_aside(config.paths.database))
        store = Store(config.paths.database)
    recovered: list[dict[str, Any]] | None = None
    watcher = watch.Watcher(loop)
    sources = exit_status_sources()
    if subreaper or os.getpid() == 1:
        from pmon2.daemon import probes

        # Readiness probes (exec:) are pmond's children too: keep their statuses for them (probes.py).
        reaper = Reaper(lambda pid: watcher.watching(pid) or probes.owns(pid))
        probes.reaped_status = reaper.lookup
        loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
        reaper.reap()
        if "waitpid" in sources:
            watcher.status_sources.append(reaper.lookup)
            watcher.reaping = True
    connector = None
    if "proc_connector" in sources and os.geteuid() == 0:
        try:
            connector = watch.ProcConnector(loop)
            watcher.status_sources.insert(0, connector.lookup)
        except OSError as exc:
            log.warning("netlink proc connector unavailable (%s); using pidfd exit info", exc.strerror)
    watcher.use_pidfd_info = "pidfd" in sources
    launcher = None
    if os.environ.get("PMON2_LAUNCHER", "1") != "0":  # 0: pmond forks every service itself (tests, ablation)
        launcher = spawn.Launcher(loop)
        launcher.start()
    supervisor = Supervisor(config, store, watcher, launcher)

    def info() -> dict[str, Any]:
        return {"version": __version__, "pid": os.getpid(), "socket": str(config.paths.socket),
                "pidfile": str(config.paths.pidfile), "data_dir": str(config.paths.data_dir),
                "log_dir": str(config.paths.log_dir), "started_at": iso(started),
                "uptime_s": round(time.time() - started, 3), "mode": config.paths.mode,
                "subreaper": subreaper or os.getpid() == 1,
                "exit_status_sources": describe_sources(),
                # None: pmond forks each service's intermediate itself (slower restarts).
                "launcher_pid": launcher.pid if launcher is not None and launcher.ready else None,
                # What `--recover` rebuilt from running processes (None: not started with it).
                "recovered": recovered}

    def describe_sources() -> list[str]:
        found = []
        if connector is not None:
            found.append("proc_connector")
        if subreaper or os.getpid() == 1:
            found.append("waitpid")
        if watcher.use_pidfd_info and watch.PidfdInfo.supported:
            found.append("pidfd")
        return found or ["unknown"]

    peers = PeerPolicy(config.allow_users, config.allow_groups)
    reserve = spawn.RESERVE
    server = HttpServer(config.paths.socket, Api(supervisor, info, stop.set, peers), peers, Limits.from_env(),
                        may_accept=reserve.ready)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored"))
    try:
        restored = await supervisor.recover(rebuild)
    except PmonError:
        if launcher is not None:
            launcher.close()
        raise
    recovered = restored if rebuild else None
    supervisor.rotator.start(log)  # every log, pmond.log too; a line pmond logs plans a check if none is
    await server.start()
    log.info("pmond %s started, pid %d, %d services", __version__, os.getpid(), len(supervisor.services))
    notifier = notifier or sdnotify.Notifier()
    # systemd: the socket listens
    notifier.notify("READY=1", f"STATUS={words.services_status(len(supervisor.services))}")
    notifier.start_watchdog(loop)  # WATCHDOG=1 from this loop, only when systemd asked for it
    await stop.wait()
    log.info("pmond stopping; services keep running")
    notifier.notify("STOPPING=1")
    await server.close()
    # Let in-flight operations record their outcome, but never wait on services.
    for task in list(supervisor.tasks):
        task.cancel()
    if connector is not None:
        connector.close()
    supervisor.rotator.close()
    if launcher is not None:
        launcher.close()
    watcher.close()
    supervisor.persist.close()
    store.close()
    notifier.close()


def main(argv: list[str] | None = None) -> int:
    # Three flags: not worth argparse's 0.3 MB in a daemon that lives for months.
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print(USAGE)
        return 0
    if "--version" in args:
        print(f"pmond {__version__}")
        return 0
    unknown = [a for a in args if a not in ("--subreaper", "--recover")]
    if unknown:
        print(f"pmond: unknown argument {unknown[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    subreaper = "--subreaper" in args
    # Read systemd's NOTIFY_SOCKET and WATCHDOG_* now, and take them out of os.environ: nothing pmond starts
    # may inherit them (sdnotify.py).
    notifier = sdnotify.Notifier.from_environ()
    os.umask(0o022)
    spawn.raise_nofile_limit()  # a pidfd per service; services still get the soft limit pmond had (spawn.py)
    lock_fd = -1
    try:
        config = load(paths.resolve())
        prepare_dirs(config)
        lock_fd = lock_pidfile(config.paths.pidfile)
        setup_logging(config.paths.log_dir, foreground=True)
        if subreaper:
            set_subreaper()
        asyncio.run(serve(config, subreaper, notifier, rebuild="--recover" in args))
    except AlreadyRunning as exc:
        print(f"pmond: {exc.message}", file=sys.stderr)
        return 3
    except PmonError as exc:
        print(f"pmond: {exc.message}", file=sys.stderr)
        logging.getLogger("pmond").error("%s", exc.message)
        return 1
    except sqlite3.Error as exc:  # a database that fails past its first checks: one line, never a traceback
        message = (f"the database {config.paths.database} failed: {exc}; `pmon2 daemon recover` keeps it aside "
                   "and rebuilds one from the running services")
        print(f"pmond: {message}", file=sys.stderr)
        logging.getLogger("pmond").error("%s", message)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(config.paths.pidfile)
            os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
