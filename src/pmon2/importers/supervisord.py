"""supervisor's `supervisord.conf` (with its `[include]`d files) as a pmon2 app file.

Read as supervisor 4 reads it (supervisor/options.py): configparser without interpolation, `;` and `#`
comments (inline ones after a space), then supervisor's own expansion of each value, Python's `%` with
`%(here)s` (the directory of the file that holds the section), `%(program_name)s`, `%(group_name)s`,
`%(process_num)d`, `%(numprocs)d`, `%(host_node_name)s` and `%(ENV_X)s` (the importing user's
environment). `[include] files = ...` are globs relative to the main file, read in sorted order.

`[program:x]`:
- `command` is split with shell rules (supervisor runs no shell), `directory` → cwd (default "/", where a
  supervisord started by init runs), `environment` (`KEY="val",KEY2=val2`, parsed as supervisor parses it,
  over [supervisord]'s `environment`), `user` (default [supervisord]'s);
- `numprocs` → `instances`, and `process_name` is checked: pmon2 names the instances x:0 ... x:N-1, so
  `%(program_name)s_%(process_num)02d` and its kin map, any other pattern is reported. `%(process_num)`
  elsewhere becomes `${instance}`, and a port made of digits and a zero-padded process number
  (`--port=80%(process_num)02d`) becomes `${port}` with `port = 8000`;
- `autostart`; `autorestart` true → restart "always", unexpected (supervisor's default) → "on-failure",
  false → "no"; `exitcodes` → success_exit_codes; `startsecs` → min_uptime; `startretries` → max_restarts;
- `stopsignal` → stop_signal; `stopwaitsecs` → kill_timeout; `stopasgroup` / `killasgroup`: pmon2 always
  signals the whole process group (reported, nothing to set);
- `stdout_logfile` / `stderr_logfile`: AUTO → pmon2's log dir; a path → `log_dir`, or one `log` when both
  streams share a file (`redirect_stderr`); NONE is reported (pmon2 always keeps the output);
  `stdout_logfile_maxbytes` / `_backups` → log_max_size / log_keep.
`[group:x] programs=a,b` → tag "x" on a and b. `[eventlistener:x]` and `[fcgi-program:x]` are reported.
"""

from __future__ import annotations

import configparser
import glob
import os
import platform
import re
import shlex
import signal
from typing import Any

from pmon2.importers.formats import ConvertError, Unmapped, dollars, finish, log_fields, service_name, tag_name

# Placeholders for per-instance values: only word characters, so that supervisor's `%` expansion and
# both of its lexers leave them whole.
INSTANCE = "PMON2INSTANCEx7q"
PORT = "PMON2PORTx7q"
PER_INSTANCE = ("command", "environment", "stdout_logfile", "stderr_logfile")  # where %(process_num) varies
OWN_SECTIONS = ("supervisord", "supervisorctl", "unix_http_server", "inet_http_server", "include")
TRUE = ("yes", "true", "on", "1")
FALSE = ("no", "false", "off", "0")
PROGRAM_KEYS = frozenset({
    "command", "directory", "environment", "user", "numprocs", "numprocs_start", "process_name", "autostart",
    "autorestart", "exitcodes", "startsecs", "startretries", "stopsignal", "stopwaitsecs", "stopasgroup",
    "killasgroup", "redirect_stderr", "stdout_logfile", "stderr_logfile", "stdout_logfile_maxbytes",
    "stderr_logfile_maxbytes", "stdout_logfile_backups", "stderr_logfile_backups",
})
UNMAPPED = {
    "priority": "pmon2 orders starts by depends_on, not by priority",
    "umask": "pmon2 has no umask setting: a service gets pmond's",
    "serverurl": "pmon2 services do not talk to their manager",
    "stdout_capture_maxbytes": "pmon2 has no event listeners",
    "stderr_capture_maxbytes": "pmon2 has no event listeners",
    "stdout_events_enabled": "pmon2 has no event listeners",
    "stderr_events_enabled": "pmon2 has no event listeners",
    "stdout_syslog": "pmon2 writes logs to files only",
    "stderr_syslog": "pmon2 writes logs to files only",
}
LOG_NONE = ("none", "off")


class _Parser(configparser.RawConfigParser):
    """supervisor's UnhosedConfigParser: no interpolation, inline comments, duplicates merged, and the file
    each section came from."""

    def __init__(self) -> None:
        super().__init__(inline_comment_prefixes=(";", "#"), strict=False)
        self.section_to_file: dict[str, str] = {}

    def read_one(self, path: str) -> None:
        before = set(self.sections())
        if not os.path.isfile(path):  # an [include]d FIFO or device: never opened (it would hang or not end)
            raise ConvertError(f"{path}: not a regular file")
        try:
            with open(path, encoding="utf-8") as fh:
                self.read_file(fh, path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConvertError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
        except configparser.Error as exc:
            raise ConvertError(f"{path}: {str(exc).splitlines()[0]}") from None
        for section in set(self.sections()) - before:
            self.section_to_file[section] = path

    def expand_here(self, here: str) -> None:
        for section in self.sections():
            for key, value in self.items(section):
                if "%(here)s" in value:
                    self.set(section, key, value.replace("%(here)s", here))


def expand(text: str, expansions: dict[str, Any], name: str) -> str:
    """supervisor's expansion of one value, with its error messages."""
    try:
        return text % expansions
    except KeyError as exc:
        names = ", ".join(sorted(k for k in expansions if not k.startswith("ENV_")))
        raise ConvertError(f"{name}: {text!r} names {exc} which cannot be expanded (known: {names}, "
                           "ENV_X for a variable X of your environment)") from None
    except (ValueError, TypeError) as exc:
        raise ConvertError(f"{name}: {text!r} is badly formatted: {exc} (write %% for a %)") from None


def boolean(value: str, name: str) -> bool:
    low = value.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ConvertError(f"{name}: not a valid boolean value: {value!r}")


def integer(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConvertError(f"{name}: not a whole number: {value!r}") from None


def key_value_pairs(text: str, name: str) -> dict[str, str]:
    """supervisor's `KEY=val,KEY2="val, with commas"` (datatypes.dict_of_key_value_pairs), quirks kept: it
    is what the programs got under supervisor."""
    lexer = shlex.shlex(text)
    lexer.wordchars += "/.+-():"
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise ConvertError(f"{name}: {exc}") from None
    out = {}
    i = 0
    while i < len(tokens):
        item = tokens[i:i + 3]
        if len(item) != 3 or item[1] != "=":
            raise ConvertError(f"{name}: unexpected end of key/value pairs in {text!r}")
        out[item[0]] = item[2].strip("'\"")
        i += 4
    return out


def byte_size(value: str, name: str) -> int:
    low = value.strip().lower()
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}
    try:
        if low[-2:] in units:
            return int(low[:-2]) * units[low[-2:]]
        return int(low)
    except ValueError:
        raise ConvertError(f"{name}: not a size: {value!r} (such as 50MB)") from None


def size_text(size: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def stop_signal(value: str, name: str) -> str | int:
    text = value.strip()
    if text.isdigit():
        return int(text)
    full = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
    if not isinstance(getattr(signal, full, None), int):
        raise ConvertError(f"{name}: {value!r} is not a valid signal name")
    return full


# per-instance values

_PROCESS_NUM = re.compile(r"(\d*)%\(process_num\)([-#0 +]*)(\d*)([diuxXos])")


class _Instances:
    """Turns `%(process_num)...` into ${instance} or ${port} for a program with numprocs > 1."""

    def __init__(self, start: int, count: int, where: str, unmapped: Unmapped) -> None:
        self.start, self.count, self.where, self.unmapped = start, count, where, unmapped
        self.port: int | None = None
        self.padding_noted = False

    def mark(self, text: str, key: str) -> str:
        return _PROCESS_NUM.sub(lambda m: self._one(m, key), text)

    def _one(self, m: re.Match[str], key: str) -> str:
        digits, flags, width, kind = m[1], m[2], m[3], m[4]
        last = self.start + self.count - 1
        if digits and "0" in flags and width and kind in "diu" and last < 10 ** int(width):
            base = int(digits) * 10 ** int(width) + self.start
            if base > 0 and base + self.count - 1 <= 65535 and self.port in (None, base):
                self.port = base
                return PORT
        if kind not in "dius":
            raise ConvertError(f"{self.where}.{key}: %(process_num){flags}{width}{kind}: only decimal process "
                               "numbers can become ${instance}")
        if key.endswith("_logfile"):
            return digits + INSTANCE  # _logs reports them
        if self.start:
            self.unmapped.append((f"{self.where}.{key}", f"supervisor numbers these processes from {self.start}, "
                                                         "pmon2 from 0: ${instance} is 0 for the first"))
        if width and not self.padding_noted and ("0" in flags or kind == "s"):
            self.padding_noted = True
            self.unmapped.append((f"{self.where}.{key}", f"%(process_num){flags}{width}{kind} becomes ${{instance}} "
                                                         "without its padding (0, not 00)"))
        return digits + INSTANCE


def _instance_vars(text: str) -> str:
    return text.replace(INSTANCE, "${instance}").replace(PORT, "${port}")


# the file


def read(path: str, unmapped: Unmapped) -> _Parser:
    """The main file and every file its [include] names, as supervisor reads them."""
    parser = _Parser()
    parser.read_one(path)
    base = os.path.dirname(path)
    parser.expand_here(base)
    if parser.has_section("include"):
        if not parser.has_option("include", "files"):
            raise ConvertError(f"{path}: [include] has no files setting")
        expansions = {"here": base, "host_node_name": platform.node(), **_env_expansions()}
        files = expand(parser.get("include", "files"), expansions, "include.files")
        for pattern in files.split():
            pattern = os.path.join(base, os.path.expanduser(pattern))
            names = sorted(glob.glob(pattern))
            if not names:
                unmapped.append(("include.files", f"no file matches {pattern}"))
            for name in names:
                parser.read_one(name)
                parser.expand_here(os.path.dirname(os.path.abspath(name)))
    return parser


def _env_expansions() -> dict[str, str]:
    return {f"ENV_{k}": v for k, v in os.environ.items()}


def convert(path: str, *, env_name: str | None = None) -> tuple[dict[str, Any], Unmapped]:
    """A supervisord.conf (or one conf.d file) -> (app-file document, unmapped keys)."""
    path = os.path.abspath(path)
    unmapped: Unmapped = []
    if env_name:
        unmapped.append(("--env", "only pm2 files have env_NAME sections; supervisor's has none"))
    parser = read(path, unmapped)
    here = os.path.dirname(path)
    sections = parser.sections()
    main_expansions = {"here": here, "host_node_name": platform.node(), **_env_expansions()}

    # [supervisord]: what every program inherits
    base_env: dict[str, str] = {}
    base_cwd = "/"
    base_user = None
    if parser.has_section("supervisord"):
        if parser.has_option("supervisord", "environment"):
            text = expand(parser.get("supervisord", "environment"), main_expansions, "supervisord.environment")
            base_env = key_value_pairs(text, "supervisord.environment")
        if parser.has_option("supervisord", "directory"):
            directory = expand(parser.get("supervisord", "directory"), main_expansions, "supervisord.directory")
            base_cwd = os.path.normpath(os.path.join(here, os.path.expanduser(directory)))
        if parser.has_option("supervisord", "user"):
            base_user = parser.get("supervisord", "user").strip() or None

    # [group:x]: tags, and the group_name of its programs
    groups: dict[str, list[str]] = {}
    for section in sections:
        if section.startswith("group:"):
            group = section.split(":", 1)[1].strip()
            programs = parser.get(section, "programs", fallback="")
            programs = expand(programs, main_expansions, f"{section}.programs")
            for program in (p.strip() for p in programs.split(",") if p.strip()):
                if f"program:{program}" not in sections:
                    raise ConvertError(f"[{section}] names unknown program {program}")
                groups.setdefault(program, []).append(group)
            for key in parser.options(section):
                if key not in ("programs", "priority"):
                    unmapped.append((f"{section}.{key}", "not a key of [group:x]"))

    services: dict[str, Any] = {}
    taken: set[str] = set()
    for section in sections:
        kind, _, rest = section.partition(":")
        if kind == "program" and rest:
            name, service = _program(parser, section, rest.strip(), groups.get(rest.strip(), []), base_env,
                                     base_cwd, base_user, here, unmapped, taken)
            services[name] = service
        elif kind == "eventlistener":
            unmapped.append((section, "pmon2 has no event listeners"))
        elif kind == "fcgi-program":
            unmapped.append((section, "pmon2 does not open FastCGI sockets for its services"))
        elif section in OWN_SECTIONS or kind in ("rpcinterface", "group", "ctlplugin"):
            continue  # supervisor's own settings, or done above
        else:
            unmapped.append((section, "not a supervisor section that pmon2 knows"))
    if not services:
        raise ConvertError(f"{path}: no [program:x] section (nor in the files it includes)")
    return {"defaults": {}, "services": services}, unmapped


def _program(parser: _Parser, section: str, program: str, groups: list[str], base_env: dict[str, str],
             base_cwd: str, base_user: str | None, here: str, unmapped: Unmapped,
             taken: set[str]) -> tuple[str, dict[str, Any]]:
    raw = dict(parser.items(section))
    source = parser.section_to_file.get(section, "")
    where = section

    def note(key: str, why: str) -> None:
        unmapped.append((f"{where}.{key}", why))

    numprocs = integer(raw.get("numprocs", "1"), f"{section}.numprocs")
    start = integer(raw.get("numprocs_start", "0"), f"{section}.numprocs_start")
    if numprocs < 1:
        raise ConvertError(f"{section}.numprocs: must be at least 1 (file: {source})")
    group_name = groups[0] if len(groups) == 1 else program
    expansions: dict[str, Any] = {"here": here, "program_name": program, "host_node_name": platform.node(),
                                  "group_name": group_name, "numprocs": numprocs, "process_num": start,
                                  **_env_expansions()}
    instances = _Instances(start, numprocs, where, unmapped) if numprocs > 1 else None

    def get(key: str, default: str | None = None) -> str | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if instances is not None and key in PER_INSTANCE:
            value = instances.mark(value, key)
        elif instances is not None and "%(process_num)" in value:
            note(key, f"the same for every instance: %(process_num) is {start} here")
        return expand(value, expansions, f"{section}.{key}")

    name = service_name(program, taken, unmapped, f"{where}.name")

    command_text = get("command")
    if not command_text or not command_text.strip():
        raise ConvertError(f"[{section}] does not specify a command (file: {source})")
    try:
        argv = shlex.split(command_text)
    except ValueError as exc:
        raise ConvertError(f"{section}.command: {exc}") from None
    directory = get("directory")
    cwd = os.path.normpath(os.path.join(here, os.path.expanduser(directory))) if directory else base_cwd
    env = dict(base_env)
    environment = get("environment")
    if environment:
        env.update(key_value_pairs(environment, f"{section}.environment"))

    service: dict[str, Any] = {
        "command": [_instance_vars(dollars(w)) for w in argv],
        "cwd": cwd,
        "env": {k: _instance_vars(dollars(v)) for k, v in env.items()},
    }
    user = get("user") if "user" in raw else base_user
    if user:
        service["user"] = user.strip()

    if "autostart" in raw and not boolean(raw["autostart"], f"{section}.autostart"):
        service["autostart"] = False
    autorestart = raw.get("autorestart", "unexpected").strip().lower()
    codes: list[int] | None = None
    if "exitcodes" in raw or autorestart == "unexpected":
        try:
            codes = sorted({int(c) for c in raw.get("exitcodes", "0").split(",") if c.strip()})
        except ValueError:
            raise ConvertError(f"{section}.exitcodes: not a list of exit codes: {raw['exitcodes']!r}") from None
        if any(not 0 <= c <= 255 for c in codes):
            raise ConvertError(f"{section}.exitcodes: exit codes are 0 to 255")
    if autorestart in FALSE:
        service["restart"] = "no"
    elif autorestart == "unexpected":
        service["restart"] = "on-failure"
    elif autorestart not in TRUE:
        raise ConvertError(f"{section}.autorestart: invalid value {raw['autorestart']!r} (true, false, unexpected)")
    if codes is not None:
        service["success_exit_codes"] = codes
    if "startretries" in raw:
        retries = integer(raw["startretries"], f"{section}.startretries")
        if retries > 0:
            service["max_restarts"] = retries
        else:
            note("startretries", "0 means never give up in pmon2 (max_restarts); supervisor gave up at once")
    if "startsecs" in raw:
        service["min_uptime"] = integer(raw["startsecs"], f"{section}.startsecs")
    if "stopwaitsecs" in raw:
        service["kill_timeout"] = integer(raw["stopwaitsecs"], f"{section}.stopwaitsecs")
    if "stopsignal" in raw:
        service["stop_signal"] = stop_signal(raw["stopsignal"], f"{section}.stopsignal")
    for key in ("stopasgroup", "killasgroup"):
        if key in raw:
            if boolean(raw[key], f"{section}.{key}"):
                note(key, "pmon2 always signals the whole process group: nothing to set")
            else:
                note(key, "pmon2 always signals the whole process group, never the main process alone")

    service.update(_logs(raw, get, name, here, where, unmapped, numprocs))

    if instances is not None:
        service["instances"] = numprocs
        if instances.port is not None:
            service["port"] = instances.port
    _check_process_name(raw.get("process_name"), program, numprocs, expansions, name, where, unmapped)
    if "numprocs_start" in raw and start and instances is None:
        note("numprocs_start", f"one process: its %(process_num) is {start}, written as such")
    tags = [t for t in (tag_name(g) for g in groups) if t]
    for group in groups:
        if tag_name(group) is None:
            note("group", f"group {group!r} is not a valid tag name")
    if tags:
        service["tags"] = sorted(tags)

    for key in raw:
        if key not in PROGRAM_KEYS:
            note(key, UNMAPPED.get(key, "not a supervisor key that pmon2 knows"))
    return name, finish(service)


def _logs(raw: dict[str, str], get: Any, name: str, here: str, where: str, unmapped: Unmapped,
          numprocs: int) -> dict[str, Any]:
    def note(key: str, why: str) -> None:
        unmapped.append((f"{where}.{key}", why))

    redirect = boolean(raw.get("redirect_stderr", "false"), f"{where}.redirect_stderr")
    paths: dict[str, str | None] = {}
    for stream in ("stdout", "stderr"):
        key = f"{stream}_logfile"
        value = get(key, "AUTO").strip()
        if stream == "stderr" and redirect:
            if key in raw and value.lower() not in ("auto", *LOG_NONE):
                note(key, "redirect_stderr is true: supervisor ignored this file")
            paths[stream] = "redirect"
            continue
        if value.lower() == "auto":
            paths[stream] = None
        elif value.lower() in LOG_NONE:
            note(key, "pmon2 always keeps a service's output: it goes to pmon2's log dir")
            paths[stream] = None
        else:
            path = os.path.normpath(os.path.join(here, os.path.expanduser(value)))
            if INSTANCE in path or PORT in path:
                directory = os.path.dirname(path)
                if INSTANCE in directory or PORT in directory:
                    note(key, "one directory per process: pmon2 keeps the logs of all instances in one place")
                    paths[stream] = None
                    continue
                stream_name = "out" if stream == "stdout" else "err"
                note(key, f"one file per process: pmon2 names the files itself, in {directory}")
                path = os.path.join(directory, f"{name}:N-{stream_name}.log")
            paths[stream] = path
    fields: dict[str, Any] = {}
    out, err = paths["stdout"], paths["stderr"]
    if err == "redirect":
        per_instance = out is not None and ":N-out.log" in out
        if out is not None and not per_instance:
            fields["log"] = out
        else:
            if per_instance:
                fields["log_dir"] = os.path.dirname(out)  # type: ignore[arg-type]
            each = "NAME:N-err.log" if numprocs > 1 else "NAME-err.log"
            note("redirect_stderr", f"pmon2 keeps stderr apart, in {each}")
    else:
        fields.update(log_fields(name, out, err, (f"{where}.stdout_logfile", f"{where}.stderr_logfile"),
                                 unmapped, numprocs))

    for field, suffix, convert in (("log_max_size", "maxbytes", byte_size), ("log_keep", "backups", integer)):
        values = {s: raw[f"{s}_logfile_{suffix}"] for s in ("stdout", "stderr") if f"{s}_logfile_{suffix}" in raw}
        if not values:
            continue
        key = "stdout" if "stdout" in values else "stderr"
        number = convert(values[key], f"{where}.{key}_logfile_{suffix}")
        if "stdout" in values and "stderr" in values and convert(values["stderr"], where) != number:
            note(f"stderr_logfile_{suffix}", f"pmon2 has one {field} for both logs: stdout's, {values['stdout']}")
        if field == "log_max_size":
            if number == 0:
                note(f"{key}_logfile_maxbytes", "0 (never rotate): pmon2 always rotates, above log_max_size")
            elif number < 1024:
                note(f"{key}_logfile_maxbytes", "pmon2 rotates above 1K at the least")
                fields[field] = "1K"
            else:
                fields[field] = size_text(number)
        else:
            fields[field] = number
    return fields


_STANDARD_NAME = re.compile(r"%\(program_name\)s[-_.@+]?%\(process_num\)[-#0 +]*\d*[ds]")


def _check_process_name(pattern: str | None, program: str, numprocs: int, expansions: dict[str, Any], name: str,
                        where: str, unmapped: Unmapped) -> None:
    if pattern is None:
        return
    if numprocs > 1:
        if "%(process_num)" not in pattern:
            raise ConvertError(f"{where}.process_name: %(process_num) must be present within process_name when "
                               "numprocs > 1")
        if not _STANDARD_NAME.fullmatch(pattern.strip()):
            unmapped.append((f"{where}.process_name", f"{pattern.strip()!r} cannot be expressed: pmon2 names the "
                                                      f"instances {name}:0 ... {name}:{numprocs - 1}"))
        return
    expanded = expand(pattern, expansions, f"{where}.process_name").strip()
    if expanded != program:
        unmapped.append((f"{where}.process_name", f"the service is named {name!r}, not {expanded!r}: pmon2 has one "
                                                  "name per service"))
