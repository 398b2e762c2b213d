"""pmond's config file (TOML). Only the daemon reads it: tomllib costs 26 ms of start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pmon2.errors import PmonError
from pmon2.paths import Paths


@dataclass(frozen=True)
class Config:
    paths: Paths
    kill_timeout: float = 5.0
    min_uptime: float = 1.0
    log_max_size: int = 10 << 20
    log_keep: int = 5
    log_compress: bool = False
    log_check_interval: float = 10.0
    # The log budget, per filesystem holding logs: bytes, or "N%" of the filesystem (rotate.Budget).
    log_max_use: str | int = "10%"
    log_keep_free: str | int = "15%"
    # Who else may connect to pmond's socket (user and group names); they act as themselves only.
    # Root mode admits group "pmon2" by default (docs/security.md).
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()


def load(paths: Paths) -> Config:
    import tomllib

    try:
        with open(paths.config_file, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return Config(paths, allow_groups=default_groups(paths))
    except OSError as exc:
        raise PmonError(f"cannot read {paths.config_file}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PmonError(f"{paths.config_file}: {exc}") from None

    def dir_setting(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise PmonError(f"{paths.config_file}: {key} must be a path")
        p = os.path.expanduser(value)
        return p if os.path.isabs(p) else os.path.join(os.path.dirname(paths.config_file), p)

    def number_setting(key: str, default: float) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PmonError(f"{paths.config_file}: {key} must be a number of seconds >= 0")
        return float(value)

    def size_setting(key: str, default: int) -> int:
        from pmon2.daemon.rotate import parse_size

        try:
            return parse_size(data.get(key, default))
        except ValueError as exc:
            raise PmonError(f"{paths.config_file}: {key}: {exc}") from None

    keep = data.get("log_keep", 5)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= 1000:
        raise PmonError(f"{paths.config_file}: log_keep must be a whole number from 0 to 1000")
    compress = data.get("log_compress", False)
    if not isinstance(compress, bool):
        raise PmonError(f"{paths.config_file}: log_compress must be true or false")

    def share_setting(key: str, default: str) -> str | int:
        from pmon2.daemon.rotate import parse_share

        value = data.get(key, default)
        try:
            parse_share(value, zero=key == "log_keep_free")
        except (ValueError, TypeError) as exc:
            raise PmonError(f"{paths.config_file}: {key}: {exc} (try \"10%\" or \"2G\")") from None
        return value

    def names_setting(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = data.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PmonError(f"{paths.config_file}: {key} must be a list of names, such as [\"deploy\"]")
        return tuple(value)

    known = {"allow_users", "allow_groups",
             "data_dir", "log_dir", "kill_timeout", "min_uptime", "log_max_size", "log_keep", "log_compress",
             "log_check_interval", "log_max_use", "log_keep_free"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PmonError(f"{paths.config_file}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return Config(
        paths.with_dirs(dir_setting("data_dir"), dir_setting("log_dir")),
        kill_timeout=number_setting("kill_timeout", 5.0),
        min_uptime=number_setting("min_uptime", 1.0),
        log_max_size=size_setting("log_max_size", 10 << 20),
        log_keep=keep,
        log_compress=compress,
        log_check_interval=number_setting("log_check_interval", 10.0),
        log_max_use=share_setting("log_max_use", "10%"),
        log_keep_free=share_setting("log_keep_free", "15%"),
        allow_users=names_setting("allow_users", ()),
        allow_groups=names_setting("allow_groups", default_groups(paths)),
    )


def default_groups(paths: Paths) -> tuple[str, ...]:
    return ("pmon2",) if paths.mode == "root" else ()
