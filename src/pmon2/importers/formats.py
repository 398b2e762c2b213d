"""`pmon2 import FILE`: the file formats of other process managers, turned into a pmon2 app file.

Each converter (`pm2`, `supervisord`, `procfile`) has one entry point,

    convert(path, *, env_name=None) -> (document, unmapped)

where `document` has the app file's shape, `{"defaults": {}, "services": {NAME: {fields}}}` (the field
names of an app file: `command` as a list, `cwd`, `env`, ...), and `unmapped` lists `(key, why)` for every
key of the source that pmon2 cannot honour, or honours only in part. Nothing here talks to pmond: the CLI
applies the document through the app-file code, or writes it as TOML (`to_toml`).

What every converter does alike:
- every path in the document is absolute, so the document means the same wherever it is written;
- a `$` of the source is written `$$` in `command` and `env`: the app file expands `${VAR}`, and none of
  these managers does, so the service sees what it saw under its old manager;
- names that pmon2 refuses (a space, `:`...) are mended, and the change is reported as unmapped.

Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from pmon2 import spec as model
from pmon2.errors import PmonError

Unmapped = list[tuple[str, str]]

FORMATS = ("pm2", "supervisord", "procfile")
FORMAT_NAMES = {"pm2": "pm2 ecosystem file", "supervisord": "supervisor config", "procfile": "Procfile"}


class ConvertError(PmonError):
    """A file that cannot be converted at all (unreadable, not the format it claims, a broken value)."""

    code = "import"


# which format


def detect(path: str) -> str:
    """The format of a file, from its name, else from its first bytes: pm2, supervisord or procfile."""
    low = os.path.basename(path).lower()
    if low.startswith("procfile"):
        return "procfile"
    if low.endswith((".js", ".cjs", ".mjs", ".json", ".json5", ".yaml", ".yml")):
        return "pm2"
    if low.endswith((".conf", ".ini")):
        return "supervisord"
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(64 * 1024)
    except OSError as exc:
        raise ConvertError(f"{path}: {exc.strerror or exc}") from None
    if re.search(r"^\[(program:|group:|supervisord\]|include\])", head, re.M):
        return "supervisord"
    if re.search(r"^(\s*[\[{].*)?[\"']?apps[\"']?\s*:", head, re.M | re.S):
        return "pm2"
    if re.search(r"^[A-Za-z0-9_-]+:[ \t]*\S", head, re.M):
        return "procfile"
    raise ConvertError(f"{path}: not a file pmon2 can import: a pm2 ecosystem file (.config.js, .json, .yaml), "
                       "a supervisord.conf or a Procfile")


def convert(path: str, *, fmt: str | None = None, env_name: str | None = None) -> tuple[str, dict[str, Any],
                                                                                         Unmapped]:
    """(format, document, unmapped) of a file, its format detected unless `fmt` names it."""
    if not os.path.exists(path):
        raise ConvertError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ConvertError(f"{path} is a directory: name the file (ecosystem.config.js, supervisord.conf, Procfile)")
    if not os.path.isfile(path):  # a FIFO would hang the reading, a device such as /dev/zero never end
        raise ConvertError(f"{path}: not a regular file")
    fmt = fmt or detect(path)
    if fmt == "pm2":
        from pmon2.importers import pm2 as module
    elif fmt == "supervisord":
        from pmon2.importers import supervisord as module  # type: ignore[no-redef]
    elif fmt == "procfile":
        from pmon2.importers import procfile as module  # type: ignore[no-redef]
    else:
        raise ConvertError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    document, unmapped = module.convert(path, env_name=env_name)
    return fmt, document, unmapped


# shared by the converters


def dollars(text: str) -> str:
    """A string of the source as the app file writes it: `$` doubled, so `${X}` is not expanded."""
    return text.replace("$", "$$")


def finish(service: dict[str, Any]) -> dict[str, Any]:
    """`$` doubled in the service's other text fields (paths, user), which the app file expands too; no
    empty env."""
    if service.get("env") == {}:
        del service["env"]
    for key in ("cwd", "log", "log_dir", "user", "group"):
        if isinstance(service.get(key), str):
            service[key] = dollars(service[key])
    return service


def seconds(value: float) -> int | float:
    """A number of seconds, whole ones as an int (5, not 5.0), others rounded to the millisecond."""
    if value == int(value):
        return int(value)
    return round(value, 3)




def service_name(raw: str, taken: set[str], unmapped: Unmapped, where: str) -> str:
    """A valid pmon2 name for `raw`, not in `taken` (casefolded; the name is added). A change is reported."""
    why = None
    try:
        name = model.check_name(raw)
    except ValueError as exc:
        why = str(exc)
        name = model.sanitize_name(raw)
        try:
            name = model.check_name(name)
        except ValueError:
            name = model.check_name(model.sanitize_name(f"app-{name}") or "app")
    if name.casefold() in taken:
        why = why or f"{name!r} is used by another service of this file"
        base, n = name, 1
        while name.casefold() in taken:
            n += 1
            suffix = f"-{n}"
            name = base[:model.NAME_MAX_CHARS - len(suffix)] + suffix
    taken.add(name.casefold())
    if why is not None:
        unmapped.append((where, f"renamed to {name!r}: {why}"))
    return name


def tag_name(raw: str) -> str | None:
    """`raw` as a tag, or None when pmon2 refuses it."""
    try:
        return model.check_name(raw)
    except ValueError:
        return None


def log_fields(name: str, out: str | None, err: str | None, where: tuple[str, str], unmapped: Unmapped,
               instances: int = 1) -> dict[str, str]:
    """pmon2's `log` / `log_dir` for a service whose old manager wrote stdout to `out` and stderr to `err`
    (absolute paths, or None for the default). pmon2 writes either one file for both streams (`log`) or
    NAME-out.log and NAME-err.log in `log_dir` (NAME:N-out.log... for instances); `where` names the two
    source keys."""
    if out is None and err is None:
        return {}
    if out is not None and out == err:
        return {"log": out}
    present = [(path, key, stream) for path, key, stream in ((out, where[0], "out"), (err, where[1], "err"))
               if path is not None]
    directory = os.path.dirname(present[0][0])
    for path, key, stream in present:
        expected = os.path.join(directory, f"{name}:N-{stream}.log" if instances > 1 else f"{name}-{stream}.log")
        if os.path.dirname(path) != directory:
            unmapped.append((key, f"pmon2 keeps both logs in one directory: {stream} goes to {expected}, "
                                  f"not {path}"))
        elif path != expected:
            each = ", one per instance N" if instances > 1 else ""
            unmapped.append((key, f"pmon2 names the file itself: {expected}{each}, not {path}"))
    return {"log_dir": directory}


# output


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no TOML form here")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise ValueError(f"{type(value).__name__} has no TOML form")


def to_toml(document: dict[str, Any], comments: list[str] | None = None) -> str:
    """The document as TOML: a table per service, `env` and other objects as sub-tables. Enough for the
    shapes the converters make (strings, numbers, booleans, lists, tables); None values are left out."""
    lines = [f"# {c}".rstrip() for c in comments or []]

    def table(path: list[str], body: dict[str, Any]) -> None:
        plain = [(k, v) for k, v in body.items() if v is not None and not isinstance(v, dict)]
        nested = [(k, v) for k, v in body.items() if isinstance(v, dict) and v]
        if path and (plain or not nested):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_key(p) for p in path) + "]")
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in plain)
        for k, v in nested:
            table([*path, k], v)

    for section in ("defaults", "services"):
        body = document.get(section) or {}
        if section == "services":
            for name, service in body.items():
                table(["services", name], service)
        elif body:
            table(["defaults"], body)
    return "\n".join(lines) + "\n"


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
