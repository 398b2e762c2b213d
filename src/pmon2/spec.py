"""The one typed model of a service and of every API request: fields, types, defaults, units, docs.

Everything that takes a service field from a user goes through here: the CLI's `run` flags (parsed
from text with `Field.from_text`), the API's request bodies and query strings (checked strictly with
`check_body` / `check_query`), and the JSON Schema (`json_schema`). No other code validates or
defaults a field. Checks are strict: only JSON `true` is true, numbers must be finite JSON numbers,
ids are ASCII digits, and every error names its field (a `BadRequest`, HTTP 400).

Also here, because every view of a service needs them: the secret masking of environments
(`mask_env`) and the session variables a CLI does not hand to a service (`SESSION_ENV`).

This module is imported by the CLI on `run` only: it uses the standard library's cheap modules.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from pmon2.errors import BadRequest

# limits of what a request may hold: a name shows in file names (255 bytes each, with "-out.log.10.gz")
RESERVED_NAMES = frozenset({"all"})  # words a selector uses (pmon2 stop all)
NAME_MAX_CHARS = 64
NAME_MAX_BYTES = 128
MAX_SECONDS = 86400.0
MAX_LOG_SIZE = 1 << 50
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_STRING = 64 * 1024


class FieldError(BadRequest):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# checks of JSON values: each returns the normalised value or raises ValueError with the problem


def _string(value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    if not value and not empty:
        raise ValueError("must not be empty")
    if len(value) > MAX_STRING:
        raise ValueError(f"is longer than {MAX_STRING} characters")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_type_name(value)}")
    return value


def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, not {_type_name(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be a whole number from {lo} to {hi}")
        return value
    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of seconds, not {_type_name(value)}")
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"must be between 0 and {MAX_SECONDS:g} seconds")
    return float(value)


def _abs_path(value: Any) -> str:
    path = _string(value)
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path, not {path!r}")
    return os.path.normpath(path)


def _path(value: Any) -> str:
    return _string(value)


def _argv(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of strings, not {_type_name(value)}")
    if not value:
        raise ValueError("a command is needed: pmon2 run ./bin/app [args...]")
    if len(value) > MAX_ARGS:
        raise ValueError(f"has more than {MAX_ARGS} arguments")
    out = []
    for i, arg in enumerate(value):
        try:
            out.append(_string(arg, empty=i > 0))
        except ValueError as exc:
            raise ValueError(f"item {i} {exc}") from None
    return out


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of names to strings, not {_type_name(value)}")
    if len(value) > MAX_ENV:
        raise ValueError(f"has more than {MAX_ENV} variables")
    for key, item in value.items():
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"{key!r} is not a valid variable name")
        try:
            _string(item, empty=True)
        except ValueError as exc:
            raise ValueError(f"{key} {exc}") from None
    return dict(value)


def _signal(value: Any) -> str:
    from pmon2.signals import parse_signal

    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"must be a signal name or number, not {_type_name(value)}")
    if isinstance(value, str) and not (value.isascii() and value.strip()):
        raise ValueError(f"unknown signal {value!r}")
    try:
        return parse_signal(value).name
    except BadRequest as exc:
        raise ValueError(exc.message) from None


SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
              "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(value: Any) -> int:
    """10485760, "10M", "512K", "1.5G" -> bytes; at least 1 KiB. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a size such as 10M or a number of bytes, not {_type_name(value)}")
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGIB")
        unit = text[len(number):]
        try:
            if unit not in SIZE_UNITS or not number or not number.isascii():
                raise ValueError
            amount = float(number) * SIZE_UNITS[unit]
        except ValueError:
            raise ValueError(f"not a size: {value!r} (try 10M, 512K or a number of bytes)") from None
    else:
        amount = value
    if not math.isfinite(amount) or not 1024 <= amount <= MAX_LOG_SIZE:
        raise ValueError(f"must be from 1K to 1P, not {value!r}")
    return int(amount)


def check_name(value: Any) -> str:
    """A service name: printable Unicode letters and digits plus `. _ - @ +`, NFC-normalised, at most
    64 characters and 128 bytes of UTF-8 (every derived file name then stays under NAME_MAX, 255 bytes,
    see limits.h); not starting with `.` or `-`, not only digits (those are ids), and no `:` (reserved
    for instances, web:0)."""
    name = unicodedata.normalize("NFC", _string(value, empty=True))
    rule = ("letters, digits and . _ - @ +, at most 64 characters, not starting with '.' or '-', "
            "not only digits")
    if not name:
        raise ValueError(f"must not be empty ({rule})")
    if len(name) > NAME_MAX_CHARS or len(name.encode()) > NAME_MAX_BYTES:
        raise ValueError(f"{name[:20]!r}... is too long: at most {NAME_MAX_CHARS} characters and "
                         f"{NAME_MAX_BYTES} bytes")
    if name[0] in ".-":
        raise ValueError(f"{name!r} may not begin with {name[0]!r} ({rule})")
    bad = next((c for c in name if not (c in "._-@+" or unicodedata.category(c)[0] in "LN")), None)
    if bad is not None:
        what = "':' is reserved for instances (web:0)" if bad == ":" else f"{bad!r} is not allowed"
        raise ValueError(f"{name!r}: {what} ({rule})")
    if all(unicodedata.category(c) == "Nd" or c.isdigit() for c in name):
        raise ValueError(f"{name!r} is only digits, which reads as an id ({rule})")
    if name.casefold() in RESERVED_NAMES:
        raise ValueError(f"{name!r} is a word that selects services; choose another name")
    return name


def sanitize_name(raw: str) -> str:
    """A name from another manager made to fit check_name's rules as near as it can be: NFC, each other
    character as `-`, no leading `.`/`-`, cut to the limits. May come back empty (or still refused:
    only digits, a reserved word): the caller checks it and reports the change."""
    text = unicodedata.normalize("NFC", raw)
    text = "".join(c if c in "._-@+" or unicodedata.category(c)[0] in "LN" else "-" for c in text)
    text = re.sub(r"-{2,}", "-", text).lstrip(".-").rstrip("-")
    while len(text) > NAME_MAX_CHARS or len(text.encode()) > NAME_MAX_BYTES:
        text = text[:-1]
    return text


def parse_id(ref: str) -> int | None:
    """A service id when `ref` is ASCII digits (so '²' or '٣' are never ids), else None."""
    if ref.isascii() and ref.isdigit() and len(ref) <= 18:
        return int(ref)
    return None


class Field:
    """One field: its JSON type (for the schema), a check of a JSON value, a parser of CLI text, a
    default (a value, or None meaning "set by pmond": see `doc`), a unit and documentation."""

    __slots__ = ("check", "default", "doc", "flag", "name", "parse_text", "schema", "unit")

    def __init__(self, name: str, schema: dict[str, Any], check: Callable[[Any], Any], doc: str, *,
                 default: Any = None, unit: str | None = None, flag: str | None = None,
                 parse_text: Callable[[str], Any] | None = None) -> None:
        self.name = name
        self.schema = schema
        self.check = check
        self.doc = doc
        self.default = default
        self.unit = unit
        self.flag = flag
        self.parse_text = parse_text or (lambda text: text)

    def validate(self, value: Any) -> Any:
        try:
            return self.check(value)
        except ValueError as exc:
            raise FieldError(self.name, str(exc)) from None

    def from_text(self, text: str) -> Any:
        """A CLI flag's text -> the JSON value the API takes; errors name the flag."""
        try:
            return self.check(self.parse_text(text))
        except ValueError as exc:
            raise FieldError(self.flag or self.name, str(exc)) from None


def _number_text(text: str) -> float:
    try:
        if not text.isascii():
            raise ValueError
        return float(text)
    except ValueError:
        raise ValueError(f"must be a number of seconds, not {text!r}") from None


def _bool_text(text: str) -> bool:
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"must be true or false, not {text!r}")
    return text in ("true", "1")


def _int_text(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"must be a whole number, not {text!r}")
    return int(text)


_NUMBER = {"type": "number", "minimum": 0, "maximum": MAX_SECONDS}
RESTART_MODES = ("always", "on-failure", "no")
DEPENDENCY_CONDITIONS = ("started", "ready", "completed")
MAX_INSTANCES = 1000


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(repr(o) for o in options)}, not {value!r}")
        return str(value)
    return check


def _codes(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of exit codes, not {_type_name(value)}")
    return sorted({_integer(0, 255)(v) for v in value})


def _positive_seconds(value: Any) -> float:
    # One message for both ends: -1 must not be told "between 0 and ..." when 0 is refused too.
    if isinstance(value, int | float) and not isinstance(value, bool) and not (
            math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise ValueError(f"must be more than 0 and at most {MAX_SECONDS:g} seconds")
    return _seconds(value)


def _tags(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of tag names, not {_type_name(value)}")
    return sorted({check_name(v) for v in value})


def _ready(value: Any) -> str:
    text = _string(value)
    if text == "notify" or (text.startswith("exec:") and text[5:].strip()):
        return text
    for scheme in ("tcp://", "http://", "https://"):
        if text.startswith(scheme):
            hostport, _, path = text[len(scheme):].partition("/")
            host, _, port = hostport.rpartition(":")
            if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"{text!r}: give HOST:PORT, such as {scheme}127.0.0.1:8080")
            if not _IP_HOST.fullmatch(host):
                raise ValueError(f"{text!r}: HOST must be an IP address or localhost (pmond resolves no names)")
            if scheme == "tcp://" and path:
                raise ValueError(f"{text!r}: a tcp check has no path")
            return text
    raise ValueError(f"{text!r}: use notify, tcp://HOST:PORT, http://HOST:PORT/PATH or exec:COMMAND")


_IP_HOST = re.compile(r"localhost|(\d{1,3}\.){3}\d{1,3}|\[[0-9A-Fa-f:.]+\]")


def _depends_on(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of service names to conditions, not {_type_name(value)}")
    out = {}
    for name, condition in value.items():
        out[check_name(name)] = _choice(DEPENDENCY_CONDITIONS)(condition)  # NFC, as the names it refers to
    return out


# `listen` (socket activation, daemon/sockets.py): at most this many sockets per service (the launcher's
# launcher.MAX_LISTEN_FDS, what one SCM_RIGHTS message carries to it, must match).
MAX_LISTEN = 64
LISTEN_SYNTAX = ("tcp://IPV4:PORT, tcp6://[IPV6]:PORT or unix:PATH, each optionally followed by ,name=NAME "
                 "(and ,mode=0660 for unix)")
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL (unix(7))


class Listen(NamedTuple):
    """One `listen` entry, parsed (see parse_listen)."""

    scheme: str  # "tcp" (IPv4), "tcp6" (IPv6) or "unix"
    host: str  # tcp, tcp6: the IP address in its canonical form; unix: ""
    port: int  # tcp, tcp6: 1-65535; unix: 0
    path: str  # unix: the path as given (relative to the service's cwd), or @NAME (abstract namespace)
    name: str | None  # systemd's FileDescriptorName=; None: the service's (group's) name
    mode: int | None  # unix: the socket file's mode (systemd's SocketMode=); None: 0666

    def address(self) -> str:
        """The address alone, as a user writes it (tcp://127.0.0.1:8080, unix:app.sock)."""
        if self.scheme == "unix":
            return f"unix:{self.path}"
        return f"{self.scheme}://{self.host if self.scheme == 'tcp' else f'[{self.host}]'}:{self.port}"


def _fd_name(text: str, value: str) -> str:
    """systemd's rule for FileDescriptorName= (fdname_is_valid): 1-255 printable ASCII characters, no `:`
    (LISTEN_FDNAMES separates names with it)."""
    if not value or len(value) > 255 or not all(" " < c <= "~" and c != ":" for c in value):
        raise ValueError(f"{text!r}: a name is 1-255 printable ASCII characters, no ':' and no space")
    return value


def parse_listen(text: str) -> Listen:
    """`tcp://127.0.0.1:8080`, `tcp6://[::1]:8080`, `unix:PATH` or `unix:@NAME`, each optionally with
    `,name=NAME` (the fd's name in LISTEN_FDNAMES) and, for unix, `,mode=OCTAL`. Hosts are IP literals:
    pmond resolves no names. Raises ValueError with the problem."""
    import ipaddress

    address, *options = _string(text).split(",")
    name = mode = None
    for option in options:
        key, eq, value = option.partition("=")
        if key == "name" and eq and name is None:
            name = _fd_name(text, value)
        elif key == "mode" and eq and mode is None and address.startswith("unix:"):
            if not (value.isascii() and value.isdigit() and len(value) <= 4 and all(c in "01234567" for c in value)):
                raise ValueError(f"{text!r}: mode={value} is not an octal mode such as 0660")
            mode = int(value, 8)
            if mode > 0o777:
                raise ValueError(f"{text!r}: mode={value} is more than 0777")
        else:
            raise ValueError(f"{text!r}: unknown or repeated option {option!r} (options: name=NAME; mode=OCTAL for "
                             "unix; a unix path may not contain a comma)")
    if address.startswith("unix:"):
        path = address[5:]
        if path.startswith("//"):
            path = path[2:]  # unix:///run/app.sock, the URL form
        if not path or path == "@":
            raise ValueError(f"{text!r}: give a path: unix:/run/app.sock, unix:app.sock (relative to cwd) or "
                             "unix:@NAME (abstract)")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"{text!r}: a unix socket's path is at most {UNIX_PATH_MAX} bytes")
        if path.startswith("@") and mode is not None:
            raise ValueError(f"{text!r}: an abstract socket has no file, so no mode")
        return Listen("unix", "", 0, path, name, mode)
    for scheme, version in (("tcp://", 4), ("tcp6://", 6)):
        if not address.startswith(scheme):
            continue
        host, colon, port = address[len(scheme):].rpartition(":")
        if not colon or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            example = "127.0.0.1" if version == 4 else "[::1]"
            raise ValueError(f"{text!r}: give a port from 1 to 65535: {scheme}{example}:8080")
        if version == 6:
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError(f"{text!r}: write an IPv6 address in brackets: tcp6://[::1]:{port}")
            host = host[1:-1]
        try:
            ip = ipaddress.IPv4Address(host) if version == 4 else ipaddress.IPv6Address(host)
        except ValueError:
            other = "tcp6://[ADDR]:PORT for IPv6" if version == 4 else "tcp://ADDR:PORT for IPv4"
            raise ValueError(f"{text!r}: {host!r} is not an IPv{version} address (pmond resolves no names; "
                             f"{other})") from None
        if getattr(ip, "scope_id", None):
            raise ValueError(f"{text!r}: a scoped IPv6 address (with %) is not supported")
        return Listen(scheme[:-3], str(ip), int(port), "", name, None)
    raise ValueError(f"{text!r}: use {LISTEN_SYNTAX}")


def _listen(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of addresses ({LISTEN_SYNTAX}), not {_type_name(value)}")
    if len(value) > MAX_LISTEN:
        raise ValueError(f"has more than {MAX_LISTEN} sockets")
    seen: dict[tuple[str, str, int, str], str] = {}
    for text in value:
        entry = parse_listen(text)
        key = (entry.scheme, entry.host, entry.port, entry.path)
        if key in seen:
            raise ValueError(f"{text!r} listens on the same address as {seen[key]!r}")
        seen[key] = text
    return list(value)


_NULLABLE_STRING = {"type": ["string", "null"]}

# The service: what `run` and POST /v1/services take. Order is the order of docs.
SERVICE_FIELDS: tuple[Field, ...] = (
    Field("argv", {"type": "array", "items": {"type": "string"}, "minItems": 1}, _argv,
          "The command and its arguments, passed verbatim (no shell). argv[0] is looked up in PATH.",
          default=None),
    Field("name", {"type": "string", "maxLength": NAME_MAX_CHARS}, check_name,
          "The service's name; default: the basename of argv[0]. Unicode letters and digits plus `. _ - @ +`, "
          "at most 64 characters and 128 bytes; not starting with `.` or `-`, not only digits, no `:`.",
          flag="--name"),
    Field("cwd", {"type": "string"}, _abs_path, "Working directory, an absolute path; `run` sends the caller's.",
          default="/"),
    Field("env", {"type": "object", "additionalProperties": {"type": "string"}}, _env,
          "The service's environment; `run` sends the caller's minus session variables (SESSION_ENV) "
          "and PMON2_*, or an empty one with --env-clear, plus each --env KEY=VALUE.", default={}),
    Field("user", _NULLABLE_STRING, lambda v: None if v is None else _string(v),
          "Unix user the service runs as (systemd's User=). Default: the caller; pmond's own user for root.",
          flag="--user"),
    Field("log", _NULLABLE_STRING, lambda v: None if v is None else _path(v),
          "One file for stdout and stderr; relative to cwd.", flag="--log"),
    Field("log_dir", _NULLABLE_STRING, lambda v: None if v is None else _path(v),
          "Directory of NAME-out.log and NAME-err.log; relative to cwd. Default: pmond's log dir.",
          flag="--log-dir"),
    Field("group", _NULLABLE_STRING, lambda v: None if v is None else _string(v),
          "Unix group the service runs as (systemd's Group=). Default: the user's primary group.", flag="--group"),
    Field("autostart", {"type": "boolean"}, _boolean, "Start the service when it is created or applied.",
          default=True),
    Field("restart", {"enum": list(RESTART_MODES)}, _choice(RESTART_MODES),
          "When to start it again after it exits on its own (systemd's Restart=): `always`, `on-failure` (an "
          "exit code not in success_exit_codes, a signal, or a status still unknown after exit_status_wait), "
          "or `no`.", default="always", flag="--restart"),
    Field("autorestart", {"type": "boolean"}, _boolean,
          "Deprecated: false means restart = \"no\", true means \"always\".", flag="--no-autorestart"),
    Field("success_exit_codes", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
          _codes, "Exit codes that count as success, for restart = \"on-failure\" and depends_on \"completed\".",
          default=[0]),
    Field("exit_status_wait", _NUMBER, _seconds,
          "How long restart = \"on-failure\" waits for an exit status before counting it as a failure.",
          default=3.0, unit="s"),
    Field("max_restarts", {"type": "integer", "minimum": 0, "maximum": 1_000_000}, _integer(0, 1_000_000),
          "Give up (status `errored`) after this many restarts in a row that ran shorter than min_uptime; 0: "
          "never give up.", default=0, flag="--max-restarts", parse_text=_int_text),
    Field("backoff_base", {"type": "number", "minimum": 0.001, "maximum": MAX_SECONDS}, _positive_seconds,
          "First delay of the backoff after a fast exit; it doubles at each fast exit in a row.", default=0.1,
          unit="s"),
    Field("backoff_cap", {"type": "number", "minimum": 0.001, "maximum": MAX_SECONDS}, _positive_seconds,
          "Longest delay of the backoff.", default=15.0, unit="s"),
    Field("min_uptime", _NUMBER, _seconds, "A shorter run counts as a crash for backoff. Default: config.",
          unit="s", flag="--min-uptime", parse_text=_number_text),
    Field("kill_timeout", _NUMBER, _seconds,
          "Grace time between the stop signal and SIGKILL. Default: config.", unit="s",
          flag="--kill-timeout", parse_text=_number_text),
    Field("stop_signal", {"type": ["string", "integer"]}, _signal, "Signal that asks the service to stop.",
          default="SIGTERM", flag="--stop-signal"),
    Field("reload_signal", {"type": ["string", "integer"]}, _signal, "Signal that `reload` sends by default.",
          default="SIGUSR2", flag="--reload-signal"),
    Field("reload_timeout", _NUMBER, _positive_seconds,
          "The reload window: for this long after `reload`, an exit of the main process that leaves a successor "
          "(a graceful re-exec, even one that called setsid) hands the service over to it instead of counting a "
          "crash; `reload --wait` waits this long by default.", default=30.0, unit="s", flag="--reload-timeout",
          parse_text=_number_text),
    Field("pidfile", _NULLABLE_STRING, lambda v: None if v is None else _path(v),
          "systemd's PIDFile= with Type=forking: the launched process is expected to exit 0, and the process "
          "this file names (if it belongs to the service and runs as its user) is then the service; read "
          "again whenever the main process exits. Relative to cwd.", flag="--pidfile"),
    Field("instances", {"type": "integer", "minimum": 1, "maximum": MAX_INSTANCES}, _integer(1, MAX_INSTANCES),
          "Run this many copies, named NAME:0 ... NAME:N-1; `${instance}` in argv and env is each one's number, "
          "and NAME selects them all.", default=1, flag="--instances", parse_text=_int_text),
    Field("port", {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
          lambda v: None if v is None else _integer(1, 65535)(v),
          "Each instance gets PORT = port + its number (and `${port}` in argv and env).", flag="--port",
          parse_text=_int_text),
    Field("listen", {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LISTEN}, _listen,
          "Sockets pmond creates and holds, passed to the service as fds 3, 4, ... with systemd's LISTEN_FDS, "
          "LISTEN_PID and LISTEN_FDNAMES (sd_listen_fds(3)): `tcp://127.0.0.1:8080`, `tcp6://[::1]:8080`, "
          "`unix:PATH` (relative to cwd) or `unix:@NAME` (abstract), each optionally with `,name=NAME` (default: "
          "the service's name; instances: NAME) and, for unix, `,mode=0660` (default 0666). Instances share "
          "one set unless `reuseport`. Ports below 1024 are root's.", default=[], flag="--listen"),
    Field("reuseport", {"type": "boolean"}, _boolean,
          "With instances: each one gets its own `listen` sockets, bound with SO_REUSEPORT (systemd's "
          "ReusePort=), instead of one set shared by all.", default=False, flag="--reuseport"),
    Field("rolling_batch", {"type": "integer", "minimum": 1, "maximum": MAX_INSTANCES}, _integer(1, MAX_INSTANCES),
          "How many instances a rolling `reload` or `restart` replaces at once (Kubernetes' maxSurge; for "
          "instances on ports of their own, which roll stop-then-start, maxUnavailable).", default=1,
          flag="--rolling-batch", parse_text=_int_text),
    Field("tags", {"type": "array", "items": {"type": "string"}}, _tags,
          "Labels; `tag:NAME` selects every service that has one.", default=[], flag="--tag"),
    Field("ready", _NULLABLE_STRING, lambda v: None if v is None else _ready(v),
          "Readiness check: `notify` (the service sends READY=1 to $NOTIFY_SOCKET, sd_notify(3): systemd's "
          "Type=notify), `tcp://HOST:PORT` (a connection), `http://HOST:PORT/PATH` (a 2xx answer) or "
          "`exec:COMMAND` (exit 0). The service shows `starting` until it passes.", flag="--ready"),
    Field("start_timeout", _NUMBER, _seconds,
          "How long the readiness check may take; past it the start counts as failed.", default=90.0, unit="s"),
    Field("watchdog_sec", _NUMBER, _seconds,
          "The service must send WATCHDOG=1 to $NOTIFY_SOCKET at least this often while running (sd_notify(3); "
          "it gets WATCHDOG_USEC), or it is killed with SIGABRT and restarted as a crash (systemd's "
          "WatchdogSec=). 0: no watchdog.", default=0.0, unit="s", flag="--watchdog-sec", parse_text=_number_text),
    Field("depends_on", {"type": "object", "additionalProperties": {"enum": list(DEPENDENCY_CONDITIONS)}},
          _depends_on, "Services to start first, and what to wait for: `started`, `ready`, or `completed` (it "
          "exited with a success code). Stopped in reverse order.", default={}),
    Field("source", _NULLABLE_STRING, lambda v: None if v is None else _abs_path(v),
          "The app file the service came from (set by apply); `apply --prune` only removes services of the "
          "same file."),
    Field("log_max_size", {"type": ["string", "integer"]}, lambda v: None if v is None else parse_size(v),
          "Rotate a log above this size (10M, 512K, bytes). Default: config.", unit="bytes",
          flag="--log-max-size"),
    Field("log_keep", {"type": "integer", "minimum": 0, "maximum": 1000},
          lambda v: None if v is None else _integer(0, 1000)(v),
          "Rotated files kept per log. Default: config.", flag="--log-keep", parse_text=_int_text),
    Field("log_compress", {"type": "boolean"}, lambda v: None if v is None else _boolean(v),
          "gzip rotated files. Default: config.", flag="--log-compress"),
)
SERVICE = {f.name: f for f in SERVICE_FIELDS}

# The app file (`pmon2 apply`, docs/app-file.md): a table per service with the fields above, less those a
# file spells otherwise, plus FILE_FIELDS, which the CLI resolves before it sends the service (pmond never
# sees them). NOT_IN_FILES says what to write instead: an unknown key's did-you-mean.
NOT_IN_FILES = {"argv": "command", "name": "the table's name, [services.NAME]",
                "autorestart": 'restart = "always", "on-failure" or "no"'}
INHERIT_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_*", "TZ")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _command(value: Any) -> list[str]:
    if isinstance(value, str):
        import shlex

        try:
            value = shlex.split(_string(value))
        except ValueError as exc:
            raise ValueError(f"cannot be split with shell rules: {str(exc).lower()}") from None
        if not value:
            raise ValueError("must name a program: command = \"./bin/api --port 8080\" or a list")
    elif not isinstance(value, list):
        raise ValueError(f"must be a list of strings or one string, not {_type_name(value)}")
    return _argv(value)


def _env_files(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not isinstance(value, list | str):
        raise ValueError(f"must be a path or a list of paths, not {_type_name(value)}")
    return [_string(v) for v in items]


def _inherit_env(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["*"] if value else []
    if not isinstance(value, list):
        raise ValueError(f"must be true, false or a list of variable names, not {_type_name(value)}")
    for name in value:
        text = _string(name)
        if not ENV_NAME.fullmatch(text.replace("*", "_").replace("?", "_")):
            raise ValueError(f"{text!r} is not a variable name (letters, digits, _; * and ? match any)")
    return list(value)


FILE_FIELDS: tuple[Field, ...] = (
    Field("command", {"type": ["array", "string"], "items": {"type": "string"}, "minItems": 1, "minLength": 1},
          _command, "The program and its arguments: a list (the argv, verbatim), or one string split with shell "
          "rules (quotes, backslashes) and still run without a shell: write `[\"sh\", \"-c\", \"...\"]` for one. "
          "A relative program (`./bin/api`) is found from cwd, a bare name in PATH. Sent as `argv`."),
    Field("env_file", {"type": ["string", "array"], "items": {"type": "string"}}, _env_files,
          "A dotenv file, or a list of them, read by the CLI with your rights (pmond never opens it); relative to "
          "the app file's directory. Its variables go under `env`; later files win over earlier ones."),
    Field("inherit_env", {"type": ["boolean", "array"], "items": {"type": "string"}}, _inherit_env,
          "Which variables of the environment `apply` runs in the service starts with, under `env_file` and "
          "`env`: a list of names (`*` and `?` match any characters), `true` for all of them but the login "
          "session's (as `run`), `false` for none.", default=list(INHERIT_ENV)),
)
FILE = {f.name: f for f in FILE_FIELDS}
APP_FILE_KEYS = ("services", "defaults", "$schema")


def app_file_fields() -> tuple[Field, ...]:
    """The keys of a service's table in an app file (and of [defaults], less `command`), in docs order."""
    return (*FILE_FIELDS, *(f for f in SERVICE_FIELDS if f.name not in NOT_IN_FILES))


def unknown_key(key: str, known: Any) -> str:
    """The problem with a key that is not one of `known`, with a did-you-mean."""
    import difflib

    if key in NOT_IN_FILES:
        return f"unknown key {key!r}: an app file writes {NOT_IN_FILES[key]}"
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")

# POST /v1/adopt (`pmon2 import`, root only): a service taken over from another manager, its running process
# adopted in place. The service's own fields, plus these.
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT
IMPORT_TOOLS = ("pmon2-go",)
_ORIGIN_KEYS = ("tool", "source", "row", "name")


def _origin(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"must be an object {{tool, source, row, name}}, not {_type_name(value)}")
    unknown = sorted(set(value) - set(_ORIGIN_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(_ORIGIN_KEYS)})")
    if value.get("tool") not in IMPORT_TOOLS:
        raise ValueError(f"tool must be one of {', '.join(IMPORT_TOOLS)}, not {value.get('tool')!r}")
    try:
        return {"tool": value["tool"], "source": _string(value.get("source")),
                "row": _integer(0, (1 << 63) - 1)(value.get("row")), "name": _string(value.get("name", ""), empty=True)}
    except ValueError as exc:
        raise ValueError(f"source, row or name {exc}") from None


ADOPT_FIELDS: tuple[Field, ...] = (
    *SERVICE_FIELDS,
    Field("pid", {"type": ["integer", "null"], "minimum": 1, "maximum": PID_MAX},
          lambda v: None if v is None else _integer(1, PID_MAX)(v),
          "The process to adopt in place, when it still is the one `argv` names (alive, not a zombie, the same "
          "argv, leading its own process group; pmond checks it through a pidfd): same pid, no signal, no "
          "restart. A stranger holding the pid is never signalled."),
    Field("start", {"type": "boolean"}, _boolean,
          "With no such process: start the service (unless a live process runs argv[0], probably the same service "
          "under other arguments: then nothing starts), or leave it stopped.", default=False),
    Field("imported_from", {"type": "object"}, _origin,
          "Where the service comes from: {tool: \"pmon2-go\", source: the database, row: its id there, name: its "
          "name there}. Stored with the date of the import; `desc` shows it, and the same row is never "
          "imported twice."),
)

# The other request bodies.
STOP_FIELDS = (Field("force", {"type": "boolean"}, _boolean, "SIGKILL at once, no grace time.", default=False),)
def _wait(value: Any) -> bool | float | None:
    if value is None or isinstance(value, bool):
        return value or None
    return _positive_seconds(value)


RELOAD_FIELDS = (Field("signal", {"type": ["string", "integer", "null"]},
                       lambda v: None if v is None else _signal(v), "Signal to send; default USR2.",
                       default=None),
                 Field("wait", {"type": ["boolean", "number", "null"]}, _wait,
                       "Answer once the service's main process has handed over to its successor (true: wait up to "
                       "its reload_timeout; a number: that many seconds), or fail with the reason there was none.",
                       default=None, unit="s"))
NO_FIELDS: tuple[Field, ...] = ()
MAX_SELECT = 1000


def _select(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a list of ids, names, globs or 'all'")
    if len(value) > MAX_SELECT:
        raise ValueError(f"has more than {MAX_SELECT} items")
    return [_string(v) for v in value]


SELECT = Field("select", {"type": "array", "items": {"type": "string"}, "minItems": 1}, _select,
               "Which services: ids, names, shell-style globs ('web-*') or 'all'. All or nothing: a ref that "
               "matches nothing fails the whole request.")
RENAME_FIELDS = (Field("name", SERVICE_FIELDS[1].schema, check_name, "The new name."),)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of service fields, not {_type_name(value)}")
    return value


UPDATE_FIELDS = (Field("fields", {"type": "object"}, _object, "The fields to change (checked as SERVICE_FIELDS)."),
                 Field("restart", {"type": "boolean"}, _boolean, "Restart what the change needs restarted.",
                       default=False))
SCALE_FIELDS = (Field("instances", SERVICE["instances"].schema, SERVICE["instances"].check, "How many instances."),)
# POST /v1/actions/{action}: the selection plus the fields of that action
ACTION_FIELDS = {"start": (SELECT,), "stop": (SELECT, *STOP_FIELDS), "restart": (SELECT,),
                 "reload": (SELECT, *RELOAD_FIELDS), "delete": (SELECT, *STOP_FIELDS), "flush": (SELECT,)}

# POST /v1/apply (`pmon2 apply`): an app file's services, as the CLI resolved them. Only the shape of
# `services` is checked here; each service is checked by `check_services`, which names every problem.
MAX_APPLY_SERVICES = 10_000


def _service_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of service objects, not {_type_name(value)}")
    if len(value) > MAX_APPLY_SERVICES:
        raise ValueError(f"has more than {MAX_APPLY_SERVICES} services")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"item {i} must be an object, not {_type_name(item)}")
    return value


APPLY_FIELDS: tuple[Field, ...] = (
    Field("source", {"type": "string"}, _abs_path,
          "Required: the app file's absolute path. Each service remembers it (`desc` shows it); `prune` removes "
          "only services of this source. A service may name its own `source` (as `dump` writes it)."),
    Field("services", {"type": "array", "items": {"type": "object"}}, _service_list,
          "The file's services: service objects as POST /v1/services takes them, `name` and `argv` required. "
          "Each is checked field by field, and every problem is named.", default=[]),
    Field("prune", {"type": "boolean"}, _boolean,
          "Also remove the services whose source is this file and that the file no longer has.", default=False),
    Field("dry_run", {"type": "boolean"}, _boolean, "Compute and return the plan; change nothing.", default=False),
)


def check_services(services: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each service of an apply body, checked with SERVICE_FIELDS field by field -> (each service with a
    valid name, holding the fields that passed, so that the plan can go on to find more problems; every
    problem as "services.NAME.FIELD: problem"). `name` and `argv` are required; an unknown field gets a
    did-you-mean. Nothing may be applied while a problem is left."""
    import difflib

    checked: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, item in enumerate(services):
        raw_name = item.get("name")
        try:
            where = f"services.{check_name(raw_name)}"
        except ValueError:
            where = f"services[{i}]"
        out: dict[str, Any] = {}
        for key, value in item.items():
            field = SERVICE.get(key)
            if field is None:
                close = difflib.get_close_matches(key, SERVICE, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"{where}.{key}: unknown field{hint}")
                continue
            try:
                out[key] = field.validate(value)
            except FieldError as exc:
                problems.append(f"{where}.{exc.message}")
        for needed in ("name", "argv"):
            if needed not in item:
                problems.append(f"{where}: {needed} is required")
        if "name" in out:
            checked.append(out)
    return checked, problems


# Query strings (values are text).
LIMIT = Field("limit", {"type": "integer", "minimum": 1, "maximum": 100_000},
              lambda v: _integer(1, 100_000)(_int_text(v)), "How many events, newest first.", default=50)
FORCE = Field("force", {"type": "boolean"}, lambda v: _bool_text(v), "SIGKILL at once, no grace time.",
              default=False)
SHOW_ENV = Field("show_env", {"type": "boolean"}, lambda v: _bool_text(v),
                 "Show environment values in clear (root and the service's own user only).", default=False)
# GET /v1/events and /v1/services/{ref}/events
EVENTS_FOLLOW = Field("follow", {"type": "boolean"}, lambda v: _bool_text(v),
                      "Keep the response open: the last `limit` events, then each new one as it happens "
                      "(NDJSON, chunked).", default=False)
EVENTS_QUERY = (LIMIT, EVENTS_FOLLOW)

MAX_LOG_LINES = 100_000
MAX_LOG_REFS = 1000


def _stream_text(text: str) -> str:
    if text not in ("out", "err", "all"):
        raise ValueError(f"must be out, err or all, not {text!r}")
    return text


def _refs_text(text: str) -> list[str]:
    refs = [r.strip() for r in _string(text, empty=True).split(",") if r.strip()]
    if len(refs) > MAX_LOG_REFS:
        raise ValueError(f"has more than {MAX_LOG_REFS} items")
    return refs or ["all"]


# GET /v1/logs and /v1/services/{ref}/logs
LINES = Field("lines", {"type": "integer", "minimum": 0, "maximum": MAX_LOG_LINES},
              lambda v: _integer(0, MAX_LOG_LINES)(_int_text(v)),
              "How many of the last lines of each stream, across rotated files (with follow: shown first).",
              default=20)
STREAM = Field("stream", {"type": "string", "enum": ["out", "err", "all"]}, _stream_text,
               "Which stream: out, err or all. A service whose stdout and stderr share one file (--log) has "
               "only out.", default="all")
FOLLOW = Field("follow", {"type": "boolean"}, lambda v: _bool_text(v),
               "Keep the response open and send new lines as they are written (NDJSON, chunked).", default=False)
LOG_SELECT = Field("select", {"type": "string"}, _refs_text,
                   "Comma-separated ids, names, globs ('web-*') or all; all or nothing, as for actions.",
                   default=["all"])
LOG_QUERY = (LINES, STREAM, FOLLOW)

# GET /v1/dump
MASKED = Field("masked", {"type": "boolean"}, lambda v: _bool_text(v),
               "Mask secret environment values (spec.mask_env); needed by a caller who may not see them.",
               default=False)
DUMP_QUERY = (MASKED,)


def check_body(body: Mapping[str, Any] | None, fields: tuple[Field, ...]) -> dict[str, Any]:
    """A request body (None: empty) -> {field: checked value} for the fields it holds. Unknown fields
    are refused, so a typo is never silently ignored. Raises FieldError / BadRequest."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    known = {f.name: f for f in fields}
    out: dict[str, Any] = {}
    for key, value in body.items():
        field = known.get(key)
        if field is None:
            names = ", ".join(known) or "none"
            raise BadRequest(f"unknown field {key!r} (known: {names})")
        out[key] = field.validate(value)
    return out


def check_query(query: Mapping[str, list[str]], fields: tuple[Field, ...]) -> dict[str, Any]:
    """A query string ({key: [values]}) -> {field: value}, with defaults; the last value of a key wins."""
    known = {f.name: f for f in fields}
    out = {f.name: f.default for f in fields}
    for key, values in query.items():
        field = known.get(key)
        if field is None:
            raise BadRequest(f"unknown query parameter {key!r}")
        out[key] = field.validate(values[-1])
    return out


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of POST /v1/services, derived from SERVICE_FIELDS."""
    props = {}
    for f in SERVICE_FIELDS:
        prop = dict(f.schema, description=f.doc)
        if f.unit:
            prop["x-unit"] = f.unit
        if f.default is not None:
            prop["default"] = f.default
        props[f.name] = prop
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "pmon2 service",
            "type": "object", "properties": props, "required": ["argv"], "additionalProperties": False}


def app_file_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of an app file (TOML, YAML or JSON: the same shape), derived from
    app_file_fields(): `pmon2 schema`, for editor completion."""
    props = {}
    for f in app_file_fields():
        prop = dict(f.schema, description=f.doc)
        if f.unit:
            prop["x-unit"] = f.unit
        if f.default is not None and f.name != "cwd":  # cwd: the file's directory
            prop["default"] = f.default
        props[f.name] = prop
    service = {"type": "object", "properties": props, "additionalProperties": False}
    defaults = dict(service, properties={k: v for k, v in props.items() if k != "command"})
    name = {"type": "string", "minLength": 1, "maxLength": NAME_MAX_CHARS, "pattern": r"^[^.\-:\s][^:\s/]*$",
            "not": {"enum": sorted(RESERVED_NAMES)}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "pmon2 app file",
        "description": "Services as code: `pmon2 apply FILE`. See docs/app-file.md.",
        "type": "object", "additionalProperties": False, "required": ["services"],
        "properties": {
            "$schema": {"type": "string", "description": "This schema, for editors; ignored by pmon2."},
            "defaults": dict(defaults, description="Fields every service gets unless it sets them; `env` "
                                                   "tables are merged key by key."),
            "services": {"type": "object", "description": "One table per service, named by its key.",
                         "propertyNames": name,
                         "additionalProperties": dict(service, required=["command"], description="A service.")},
        },
    }


# environments

# Variables that describe the caller's login session, not the service: a service that kept them would
# hold a dead ssh agent, a display it may not use, or the caller's session id.
SESSION_ENV = frozenset({
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "SSH_ASKPASS",
    "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "XDG_SESSION_ID", "XDG_SESSION_TYPE", "XDG_SESSION_CLASS",
    "XDG_SESSION_DESKTOP", "XDG_SEAT", "XDG_VTNR", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS",
    "GPG_AGENT_INFO", "TMUX", "TMUX_PANE", "STY", "WINDOW", "TERM_SESSION_ID", "OLDPWD", "SHLVL", "_",
    "MAIL", "KRB5CCNAME", "WINDOWID", "COLORTERM", "LS_COLORS",
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",  # a caller's own systemd unit's, not the service's
})


def service_env(caller_env: Mapping[str, str]) -> dict[str, str]:
    """The environment `run` stores: the caller's minus SESSION_ENV and pmon2's own PMON2_* variables."""
    return {k: v for k, v in caller_env.items() if k not in SESSION_ENV and not k.startswith("PMON2_")}


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASS|CREDENTIAL|AUTH|PRIVATE|SESSION|COOKIE|SIGNATURE|SALT|DSN",
                         re.IGNORECASE)
# scheme://user:password@host -> the password part (RFC 3986 userinfo)
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)(?P<pw>[^@\s/]*)(?P<at>@)")
MASK = "***"


def mask_value(name: str, value: str) -> str:
    if SECRET_NAME.search(name):
        return MASK
    return URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["at"], value)


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """The values of names that look secret, and the password of any URL-shaped value, as `***`."""
    return {k: mask_value(k, v) for k, v in env.items()}


def markdown_table(fields: tuple[Field, ...] = SERVICE_FIELDS) -> str:
    """The fields as the Markdown table in docs/api.md (tests/unit/test_spec.py keeps the two in sync)."""
    import json

    rows = ["| field | type | default | unit | meaning |", "|---|---|---|---|---|"]
    for f in fields:
        kind = f.schema.get("type", "")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        default = "required" if f.name == "argv" else ("-" if f.default is None else f"`{json.dumps(f.default)}`")
        rows.append(f"| `{f.name}` | {kind} | {default} | {f.unit or '-'} | {f.doc} |")
    return "\n".join(rows)
