"""pmond's config file (TOML). Only the daemon reads it: tomllib costs 26 ms of start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pmon2.errors import PmonError
from pmon2.paths import Paths


@dataclass(frozen=True)
class Config:
    paths: Paths
    kill_timeout: float = 5.0
    min_uptime: float = 1.0


def load(paths: Paths) -> Config:
    import tomllib

    try:
        raw = paths.config_file.read_bytes()
    except FileNotFoundError:
        return Config(paths)
    except OSError as exc:
        raise PmonError(f"cannot read {paths.config_file}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PmonError(f"{paths.config_file}: {exc}") from None

    def dir_setting(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise PmonError(f"{paths.config_file}: {key} must be a path")
        p = Path(value).expanduser()
        return p if p.is_absolute() else paths.config_file.parent / p

    def number_setting(key: str, default: float) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PmonError(f"{paths.config_file}: {key} must be a number of seconds >= 0")
        return float(value)

    known = {"data_dir", "log_dir", "kill_timeout", "min_uptime"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PmonError(f"{paths.config_file}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return Config(
        paths.with_dirs(dir_setting("data_dir"), dir_setting("log_dir")),
        kill_timeout=number_setting("kill_timeout", 5.0),
        min_uptime=number_setting("min_uptime", 1.0),
    )
