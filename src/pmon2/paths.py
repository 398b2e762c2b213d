"""Where pmon2 keeps its files: root mode, XDG dirs for other users, or everything under PMON2_HOME.

The CLI needs only the run dir (socket, pid file); the config file can move the data and log dirs,
which only pmond reads, so the CLI never pays for parsing TOML. Plain strings, not pathlib, and no
dataclass: this module is on the path of every CLI call, where those imports cost about 20 ms.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SOCKET_NAME = "pmond.sock"
PIDFILE_NAME = "pmond.pid"
START_LOG_NAME = "pmond.start.log"
# sun_path holds 108 bytes including the NUL.
_SUN_PATH_MAX = 107


class Paths:
    __slots__ = ("config_file", "data_dir", "log_dir", "mode", "run_dir")

    def __init__(self, mode: str, config_file: str, data_dir: str, log_dir: str, run_dir: str) -> None:
        self.mode = mode  # "home", "root" or "user"
        self.config_file = str(config_file)
        self.data_dir = str(data_dir)
        self.log_dir = str(log_dir)
        self.run_dir = str(run_dir)

    def __repr__(self) -> str:
        return (f"Paths(mode={self.mode!r}, config_file={self.config_file!r}, data_dir={self.data_dir!r}, "
                f"log_dir={self.log_dir!r}, run_dir={self.run_dir!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Paths) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, SOCKET_NAME)

    @property
    def pidfile(self) -> str:
        return os.path.join(self.run_dir, PIDFILE_NAME)

    @property
    def start_log(self) -> str:
        return os.path.join(self.run_dir, START_LOG_NAME)

    @property
    def database(self) -> str:
        return os.path.join(self.data_dir, "pmon2.db")

    def with_dirs(self, data_dir: str | os.PathLike[str] | None, log_dir: str | os.PathLike[str] | None) -> Paths:
        return Paths(self.mode, self.config_file, os.fspath(data_dir or self.data_dir),
                     os.fspath(log_dir or self.log_dir), self.run_dir)


def resolve(env: Mapping[str, str] | None = None, euid: int | None = None) -> Paths:
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    home = env.get("PMON2_HOME")
    j = os.path.join
    if home:
        base = os.path.abspath(home)
        return Paths("home", j(base, "config.toml"), j(base, "data"), j(base, "logs"), j(base, "run"))
    if euid == 0:
        return Paths("root", "/etc/pmon2/config.toml", "/etc/pmon2/data", "/var/log/pmon2", "/run/pmon2")
    user_home = env.get("HOME") or os.path.expanduser("~")
    config = j(env.get("XDG_CONFIG_HOME") or j(user_home, ".config"), "pmon2")
    data = j(env.get("XDG_DATA_HOME") or j(user_home, ".local/share"), "pmon2")
    state = j(env.get("XDG_STATE_HOME") or j(user_home, ".local/state"), "pmon2")
    runtime = env.get("XDG_RUNTIME_DIR")
    run = j(runtime, "pmon2") if runtime else j(state, "run")
    return Paths("user", j(config, "config.toml"), data, j(state, "logs"), run)


def socket_address(path: str | os.PathLike[str]) -> tuple[str, int | None]:
    """An address for bind/connect that works even when `path` is longer than sun_path allows.

    A long path is reached through /proc/self/fd/N of its directory; the caller closes N afterwards.
    """
    text = os.fspath(path)
    if len(os.fsencode(text)) <= _SUN_PATH_MAX:
        return text, None
    directory, name = os.path.split(text)
    dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dirfd}/{name}", dirfd
