"""Where pmon2 keeps its files: root mode, XDG dirs for other users, or everything under PMON2_HOME.

The CLI needs only the run dir (socket, pid file); the config file can move the data and log dirs,
which only pmond reads, so the CLI never pays for parsing TOML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SOCKET_NAME = "pmond.sock"
PIDFILE_NAME = "pmond.pid"
START_LOG_NAME = "pmond.start.log"
# sun_path holds 108 bytes including the NUL.
_SUN_PATH_MAX = 107


@dataclass(frozen=True)
class Paths:
    mode: str  # "home", "root" or "user"
    config_file: Path
    data_dir: Path
    log_dir: Path
    run_dir: Path

    @property
    def socket(self) -> Path:
        return self.run_dir / SOCKET_NAME

    @property
    def pidfile(self) -> Path:
        return self.run_dir / PIDFILE_NAME

    @property
    def start_log(self) -> Path:
        return self.run_dir / START_LOG_NAME

    @property
    def database(self) -> Path:
        return self.data_dir / "pmon2.db"

    def with_dirs(self, data_dir: Path | None, log_dir: Path | None) -> Paths:
        return Paths(self.mode, self.config_file, data_dir or self.data_dir, log_dir or self.log_dir,
                     self.run_dir)


def resolve(env: os._Environ[str] | dict[str, str] | None = None, euid: int | None = None) -> Paths:
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    home = env.get("PMON2_HOME")
    if home:
        base = Path(home).absolute()
        return Paths("home", base / "config.toml", base / "data", base / "logs", base / "run")
    if euid == 0:
        return Paths("root", Path("/etc/pmon2/config.toml"), Path("/etc/pmon2/data"),
                     Path("/var/log/pmon2"), Path("/run/pmon2"))
    user_home = Path(env.get("HOME") or os.path.expanduser("~"))
    config = Path(env.get("XDG_CONFIG_HOME") or user_home / ".config") / "pmon2"
    data = Path(env.get("XDG_DATA_HOME") or user_home / ".local/share") / "pmon2"
    state = Path(env.get("XDG_STATE_HOME") or user_home / ".local/state") / "pmon2"
    runtime = env.get("XDG_RUNTIME_DIR")
    run = Path(runtime) / "pmon2" if runtime else state / "run"
    return Paths("user", config / "config.toml", data, state / "logs", run)


def socket_address(path: Path) -> tuple[str, int | None]:
    """An address for bind/connect that works even when `path` is longer than sun_path allows.

    A long path is reached through /proc/self/fd/N of its directory; the caller closes N afterwards.
    """
    text = os.fsdecode(path)
    if len(os.fsencode(text)) <= _SUN_PATH_MAX:
        return text, None
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dirfd}/{path.name}", dirfd
