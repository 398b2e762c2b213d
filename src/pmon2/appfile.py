"""App files, the CLI's side: read a TOML, YAML or JSON file of services, check all of it through the spec
model, resolve what belongs to the caller (variables, relative paths, env files) and build the body of
POST /v1/apply; render the plan pmond answers; write `dump` as TOML; generate docs/app-file.md.

The CLI reads the file and every env_file with the caller's rights, so pmond never opens a user's file as
root. Every field is checked by `spec` (Field.validate, check_body); this module only finds the values,
and says where each problem is: `FILE:LINE: services.web.instances: must be a whole number from 1 to 1000`.
PyYAML and python-dotenv are imported only by the paths that need them; TOML is read by tomllib and
written here (arrays on one line, which tomli-w does not do).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from pmon2 import spec
from pmon2.errors import BadRequest, PmonError

FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}
PER_INSTANCE = ("instance", "port")  # ${instance} and ${port}: pmond's, per instance, in command and env
# What the CLI resolves itself, before the fields go through spec as the API's.
RESOLVED_HERE = ("command", "env_file", "inherit_env", "env", "cwd")
YAML_BOOL_HINT = " (YAML reads a bare yes, no, on or off as a boolean: quote it)"
# Bounds on what a file may make the CLI do (pmond takes requests of at most 4 MiB anyway): the bytes of an
# app file or env file; the levels of nesting (the docs' deepest is 4: services.web.env.KEY); the values of a
# file with its YAML aliases expanded.
MAX_FILE_SIZE = 16 << 20
MAX_DEPTH = 64
MAX_VALUES = 1_000_000
_END = object()

Path = tuple[Any, ...]


class Problem(NamedTuple):
    file: str
    line: int | None
    path: Path
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {dotted(self.path)}: {self.message}" if self.path else f"{where}: {self.message}"


class AppFileError(PmonError):
    """Every problem of a file, all at once; nothing was sent to pmond."""

    code = "bad_app_file"

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted(path: Path) -> str:
    """("services", "web.1", "env", "A") -> services."web.1".env.A; list items as [i]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part) if _BARE_KEY.fullmatch(str(part)) else json.dumps(str(part), ensure_ascii=False)
        out += f".{text}" if out else text
    return out


# parsing, with the line of each key where the parser can tell


class Lines:
    """Path -> line: the line of a key, or of the nearest table above it that has one. `scan` finds them
    when a line is first asked for: a file without problems never needs them."""

    def __init__(self, lines: dict[Path, int] | None = None, scan: Callable[[], Lines] | None = None) -> None:
        self._lines = lines or {}
        self.scan = scan

    @property
    def lines(self) -> dict[Path, int]:
        if self.scan is not None:
            self._lines, self.scan = self.scan()._lines, None
        return self._lines

    def __call__(self, path: Path) -> int | None:
        lines = self.lines
        for end in range(len(path), 0, -1):
            line = lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


def _toml_key(text: str) -> tuple[list[str], str] | None:
    """A dotted TOML key at the start of `text` (bare, "basic" or 'literal' parts) -> (parts, the rest)."""
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return None
            raw = text[i + 1:j]
            try:
                parts.append(json.loads(f'"{raw}"'))
            except ValueError:
                parts.append(raw)
            i = j + 1
        elif i < n and text[i] == "'":
            j = text.find("'", i + 1)
            if j < 0:
                return None
            parts.append(text[i + 1:j])
            i = j + 1
        else:
            m = _BARE_KEY.match(text, i)
            if m is None:
                return None
            parts.append(m.group())
            i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        return parts, text[i:]


def toml_lines(text: str) -> Lines:
    """tomllib gives no positions: a scan of table headers and `key =` lines (first occurrence of each path;
    multi-line strings skipped). Keys inside an inline table get the line of the key that holds it."""
    lines: dict[Path, int] = {}
    table: Path = ()
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            found = _toml_key(stripped[2:] if stripped.startswith("[[") else stripped[1:])
            if found and found[1].lstrip().startswith("]"):
                table = tuple(found[0])
                lines.setdefault(table, number)
            continue
        found = _toml_key(line)
        if found and found[1].startswith("="):
            lines.setdefault(table + tuple(found[0]), number)
            rest = found[1][1:]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_string = quote
                    break
    return Lines(lines)


def _parse_toml(text: str, name: str) -> tuple[Any, Lines]:
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = re.search(r"\s*\(at line (\d+), column \d+\)$", message)
        line = int(m.group(1)) if m else None
        message = message[:m.start()] if m else message.replace(" (at end of document)", "")
        raise AppFileError([Problem(name, line, (), f"not valid TOML: {message}")]) from None
    return data, Lines(scan=lambda: toml_lines(text))


def _parse_yaml(text: str, name: str) -> tuple[Any, Lines]:
    try:
        import yaml
    except ImportError:
        raise AppFileError([Problem(name, None, (), "YAML app files need PyYAML: pip install PyYAML")]) from None
    loader = yaml.SafeLoader(text)
    problems: list[Problem] = []
    lines: dict[Path, int] = {}
    walked: set[int] = set()

    def walk(node: Any, path: Path) -> None:
        # Each node once: an aliased one (*base) at its anchor, so that aliases cost nothing here (its
        # other places take the line of the key that holds the alias), and an alias inside itself ends.
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in node.value:
                label = key.value if isinstance(key, yaml.ScalarNode) else "?"
                if label in seen:
                    problems.append(Problem(name, key.start_mark.line + 1, (*path, label),
                                            "appears twice in the same mapping"))
                seen.add(label)
                lines.setdefault((*path, label), key.start_mark.line + 1)
                walk(value, (*path, label))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault((*path, i), item.start_mark.line + 1)
                walk(item, (*path, i))

    try:
        node = loader.get_single_node()
        if node is not None:
            walk(node, ())  # before construction, which folds merge keys (<<: *base) into the mappings
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        raise AppFileError([Problem(name, mark.line + 1 if mark else None, (),
                                    f"not valid YAML: {what or exc}")]) from None
    finally:
        loader.dispose()
    if problems:
        raise AppFileError(problems)
    return data, Lines(lines)


def _parse_json(text: str, name: str) -> tuple[Any, Lines]:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                duplicates.append(key)
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise AppFileError([Problem(name, exc.lineno, (), f"not valid JSON: {exc.msg}")]) from None
    if duplicates:
        raise AppFileError([Problem(name, None, (), f"key {k!r} appears twice in the same object")
                            for k in dict.fromkeys(duplicates)])
    return data, Lines()


def parse(path: str, name: str | None = None) -> tuple[Any, Lines, str]:
    """Read and parse an app file by its extension -> (data, lines, format). Raises AppFileError."""
    name = name or path
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise AppFileError([Problem(name, None, (), "unknown format: name the file *.toml, *.yaml, *.yml or "
                                                    "*.json")])
    text = read_text(path, name).removeprefix("\ufeff")
    parser = {"toml": _parse_toml, "yaml": _parse_yaml, "json": _parse_json}[fmt]
    try:
        data, lines = parser(text, name)
    except RecursionError:  # every parser recurses per level of nesting
        raise AppFileError([Problem(name, None, (), f"nested too deeply: at most {MAX_DEPTH} levels")]) from None
    problem = _shape_problem(data, fmt)
    if problem:
        raise AppFileError([Problem(name, None, (), problem)])
    return data, lines, fmt


def read_text(path: str, name: str | None = None) -> str:
    """The text of an app file or env file, read with the caller's rights (symbolic links followed):
    opened without blocking, so that a FIFO never hangs the CLI; refused unless a regular file (a device
    such as /dev/zero has no end) or when over MAX_FILE_SIZE bytes; newlines read as open() reads them.
    Raises AppFileError naming the file."""
    import io
    import stat

    name = name or path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise AppFileError([Problem(name, None, (), f"cannot read it: {exc.strerror}")]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
                     stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
            kind = next((k for test, k in kinds.items() if test(st.st_mode)), "a special file")
            raise AppFileError([Problem(name, None, (), f"not a regular file: {kind}")])
        chunks: list[bytes] = []
        size = st.st_size if st.st_size > MAX_FILE_SIZE else 0  # too large already: nothing to read
        while size <= MAX_FILE_SIZE and (chunk := os.read(fd, min(1 << 20, MAX_FILE_SIZE + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise AppFileError([Problem(name, None, (), f"cannot read it: {exc.strerror}")]) from None
    finally:
        os.close(fd)
    if size > MAX_FILE_SIZE:
        raise AppFileError([Problem(name, None, (), f"larger than {MAX_FILE_SIZE >> 20} MiB: not an app file or "
                                                    "env file")])
    try:
        return io.TextIOWrapper(io.BytesIO(b"".join(chunks)), encoding="utf-8").read()
    except UnicodeDecodeError as exc:
        raise AppFileError([Problem(name, None, (), f"not UTF-8 text: {exc.reason}")]) from None


def _shape_problem(data: Any, fmt: str) -> str | None:
    """What makes parsed data unfit to go on, or None: nesting deeper than MAX_DEPTH (the checks that
    follow recurse), and in YAML, more than MAX_VALUES values once aliases are expanded (a few hundred
    bytes of nested aliases are billions of values: "billion laughs") or an alias inside its own node.
    Without recursion; in YAML each list and table is measured once, however often it is aliased (PyYAML
    builds an aliased node once and shares it)."""
    if fmt != "yaml":  # a tree, as large as its file: only its depth, level by level (4 times faster)
        level, depth = [data], 0
        while level:
            depth += 1
            if depth > MAX_DEPTH:
                return f"nested too deeply: at most {MAX_DEPTH} levels"
            below: list[Any] = []
            for node in level:
                if type(node) is dict or type(node) is list:
                    below += [v for v in (node.values() if type(node) is dict else node)
                              if type(v) is dict or type(v) is list]
            level = below
        return None
    if not isinstance(data, dict | list):
        return None
    measured: dict[int, tuple[int, int]] = {}  # id -> (its values, aliases expanded; its levels of nesting)
    open_ids = {id(data)}
    # per list or table being measured: (it, its items left, [values so far, levels below it so far])
    stack: list[tuple[Any, Any, list[int]]] = [(data, iter(data.values() if isinstance(data, dict) else data),
                                               [1, 0])]
    while stack:
        node, items, acc = stack[-1]
        child = next(items, _END)
        if child is _END:
            stack.pop()
            open_ids.discard(id(node))
            measured[id(node)] = (acc[0], acc[1] + 1)
            if acc[0] > MAX_VALUES:
                expanded = " once its aliases are expanded" if fmt == "yaml" else ""
                return f"too large: more than {MAX_VALUES:,} values{expanded}"
            if not stack:
                break
            child = node
            node, items, acc = stack[-1]
        if not isinstance(child, dict | list):
            acc[0] += 1
        elif id(child) in measured:
            values, levels = measured[id(child)]
            acc[0] += values
            acc[1] = max(acc[1], levels)
            if len(stack) + levels > MAX_DEPTH:
                return f"nested too deeply: at most {MAX_DEPTH} levels"
        elif id(child) in open_ids:
            return "an alias refers to a node that holds it (a cycle)"
        else:
            open_ids.add(id(child))
            stack.append((child, iter(child.values() if isinstance(child, dict) else child), [1, 0]))
            if len(stack) > MAX_DEPTH:
                return f"nested too deeply: at most {MAX_DEPTH} levels"
    return None


# variables


def expand(text: str, lookup: Callable[[str], str | None], per_instance: bool) -> str:
    """`${VAR}` from `lookup` (unset: an error), `${VAR:-default}`, `$$` -> `$`; `${instance}` and `${port}`
    are left for pmond when `per_instance`, refused otherwise. Any other `$` is itself. Raises ValueError."""
    if "$" not in text:
        return text
    out: list[str] = []
    i = 0
    while True:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        follower = text[j + 1:j + 2]
        if follower == "$":
            out.append("$")
            i = j + 2
            continue
        if follower != "{":
            out.append("$")
            i = j + 1
            continue
        end = text.find("}", j + 2)
        if end < 0:
            raise ValueError("'${' without its '}' (write $$ for a literal $)")
        inner = text[j + 2:end]
        name, sep, default = inner.partition(":-")
        if not spec.ENV_NAME.fullmatch(name):
            raise ValueError(f"'${{{inner}}}' does not name a variable (letters, digits and _; $$ is a literal $)")
        if name in PER_INSTANCE:
            if sep:
                raise ValueError(f"'${{{inner}}}': ${{{name}}} is pmond's, per instance, and takes no default")
            if not per_instance:
                raise ValueError(f"${{{name}}} is expanded per instance only in command and env")
            out.append(text[j:end + 1])
        else:
            value = lookup(name)
            if value is None and not sep:
                raise ValueError(f"${{{name}}} is not set in your environment (write ${{{name}:-default}} for "
                                 "a default, $$ for a literal $)")
            out.append(default if value is None else value)
        i = end + 1


# env files


_SINGLE_QUOTED = re.compile(r"\s*(?:export\s+)?(?:'[^']*'|[^=#\s]+)\s*=\s*'")


def read_env_file(path: str, environ: Mapping[str, str], name: str | None = None) -> dict[str, str]:
    """A dotenv file (python-dotenv's parser) -> its variables, in order. Values expand as in app files,
    from the file's earlier variables, then `environ`; 'single-quoted' ones stay literal. Raises
    AppFileError naming each bad line."""
    name = name or path
    try:
        from dotenv.parser import parse_stream
    except ImportError:
        raise AppFileError([Problem(name, None, (), "env files need python-dotenv: pip install python-dotenv")]
                           ) from None
    import io

    bindings = list(parse_stream(io.StringIO(read_text(path, name))))
    values: dict[str, str] = {}
    problems: list[Problem] = []
    for b in bindings:
        line = b.original.line
        if b.error:
            problems.append(Problem(name, line, (), f"not a KEY=VALUE line: {b.original.string.strip()[:60]!r}"))
            continue
        if b.key is None:
            continue
        if b.value is None:
            problems.append(Problem(name, line, (b.key,), "has no value (write KEY= for an empty one)"))
            continue
        if _SINGLE_QUOTED.match(b.original.string):
            values[b.key] = b.value
            continue
        try:
            values[b.key] = expand(b.value, lambda v: values.get(v, environ.get(v)), per_instance=True)
        except ValueError as exc:
            problems.append(Problem(name, line, (b.key,), str(exc)))
    if problems:
        raise AppFileError(problems)
    return values


# resolving a file into the body of POST /v1/apply


class _Reader:
    """One file's problems, each with its line, and the values found so far."""

    def __init__(self, name: str, lines: Lines, fmt: str, base: str, environ: Mapping[str, str]) -> None:
        self.name = name
        self.inherit_cache: dict[tuple[str, ...], dict[str, str]] = {}  # inherit_env patterns -> variables
        self.lines = lines
        self.fmt = fmt
        self.base = base
        self.environ = environ
        self.problems: dict[Problem, None] = {}  # ordered, and a problem of [defaults] is said once

    def add(self, path: Path, message: str) -> None:
        self.problems.setdefault(Problem(self.name, self.lines(path), path, message))

    def extend(self, problems: list[Problem]) -> None:
        for p in problems:
            self.problems.setdefault(p)

    def check(self, field: spec.Field, value: Any, path: Path) -> tuple[bool, Any]:
        try:
            return True, field.validate(value)
        except BadRequest as exc:
            message = exc.message.removeprefix(f"{field.name}: ")
            if self.fmt == "yaml" and _has_bool(value) and "boolean" not in json.dumps(field.schema):
                message += YAML_BOOL_HINT
            elif field.name == "env" and "must be a string, not" in message:
                message += " (environment values are strings: quote it)"
            self.add(path, message)
            return False, None

    def expand(self, value: Any, path: Path, per_instance: bool = False) -> tuple[bool, Any]:
        """Every string inside `value` expanded; a problem names the exact item."""
        if isinstance(value, str):
            try:
                return True, expand(value, self.environ.get, per_instance)
            except ValueError as exc:
                self.add(path, str(exc))
                return False, None
        if isinstance(value, list):
            out = [self.expand(v, (*path, i), per_instance) for i, v in enumerate(value)]
            return all(ok for ok, _ in out), [v for _, v in out]
        if isinstance(value, dict):
            pairs = {k: self.expand(v, (*path, k), per_instance) for k, v in value.items()}
            return all(ok for ok, _ in pairs.values()), {k: v for k, (_, v) in pairs.items()}
        return True, value

    def path_here(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base, value))


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    if isinstance(value, dict):
        return any(_has_bool(v) for v in value.values())
    return False


def load(path: str, environ: Mapping[str, str] | None = None, *, prune: bool = False,
         dry_run: bool = False) -> dict[str, Any]:
    """An app file -> the body of POST /v1/apply: {"source", "services": [service objects with the API's
    field names, `name` included], "prune", "dry_run"}. Every problem of the file is collected first;
    any problem raises AppFileError with all of them (and nothing is sent)."""
    environ = os.environ if environ is None else environ
    source = os.path.abspath(path)
    data, lines, fmt = parse(path)
    r = _Reader(path, lines, fmt, os.path.dirname(source), environ)
    services = _services(r, data)
    if r.problems:  # the file's own problems in line order, then those of env files
        raise AppFileError(sorted(r.problems, key=lambda p: (p.file != path, p.file, p.line or 0)))
    return {"source": source, "services": services, "prune": prune, "dry_run": dry_run}


def _services(r: _Reader, data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        r.add((), "must be a table of [services.NAME] tables (and an optional [defaults])")
        return []
    for key in data:
        if key not in spec.APP_FILE_KEYS:
            r.add((key,), spec.unknown_key(key, spec.APP_FILE_KEYS))
    if "$schema" in data and not isinstance(data["$schema"], str):
        r.add(("$schema",), "must be a string")
    if "services" not in data:
        r.add((), "no services: add a [services.NAME] table for each (services = {} for none)")
    table = data.get("services", {})
    defaults = data.get("defaults", {})
    if not isinstance(table, dict):
        r.add(("services",), "must be a table of services, one per name: [services.web]")
        table = {}
    if not isinstance(defaults, dict):
        r.add(("defaults",), "must be a table of fields: [defaults]")
        defaults = {}
    known = {f.name: f for f in spec.app_file_fields()}
    base_items: dict[str, tuple[Any, Path]] = {}
    for key, value in defaults.items():
        if key == "command":
            r.add(("defaults", key), "each service names its own command, not [defaults]")
        elif key not in known:
            r.add(("defaults", key), spec.unknown_key(key, known))
        else:
            base_items[key] = (value, ("defaults", key))
    out: list[dict[str, Any]] = []
    graph: dict[str, list[str]] = {}
    folded: dict[str, str] = {}
    for name, fields in table.items():
        where: Path = ("services", name)
        try:
            name = spec.check_name(name)
        except ValueError as exc:
            r.add(where, f"not a service name: {exc}")
            continue
        if name.casefold() in folded:
            r.add(where, f"{folded[name.casefold()]!r} and {name!r} differ only in case: names are unique "
                         "regardless of case")
            continue
        folded[name.casefold()] = name
        if not isinstance(fields, dict):
            r.add(where, "must be a table of fields: command = ...")
            continue
        items = dict(base_items)
        env_layers = [base_items["env"]] if "env" in base_items else []
        for key, value in fields.items():
            if key not in known:
                r.add((*where, key), spec.unknown_key(key, known))
            else:
                items[key] = (value, (*where, key))
                if key == "env":
                    env_layers.append((value, (*where, key)))
        svc = _service(r, name, where, items, env_layers)
        if svc is not None:
            out.append(svc)
        needs = items.get("depends_on", ({}, ()))[0]
        # NFC, as names are (spec.check_name), so that a name written decomposed is the same service
        graph[name] = [unicodedata.normalize("NFC", str(k)) for k in needs] if isinstance(needs, dict) else []
    _check_dependencies(r, graph)
    return out


def _service(r: _Reader, name: str, where: Path, items: dict[str, tuple[Any, Path]],
             env_layers: list[tuple[Any, Path]]) -> dict[str, Any] | None:
    """One service's table (with [defaults] under it) -> its object for the API; None after a problem."""
    ok = True
    svc: dict[str, Any] = {"name": name}

    # command -> argv; ${instance} and ${port} stay for pmond
    if "command" not in items:
        r.add(where, 'no command: give command = ["./bin/app", "--flag"] or command = "./bin/app --flag"')
        ok = False
    else:
        value, path = items["command"]
        good, argv = r.check(spec.FILE["command"], value, path)
        if good:
            good, argv = r.expand(argv, path, per_instance=True)
        if good:
            good, argv = r.check(spec.SERVICE["argv"], argv, path)
        ok = ok and good
        svc["argv"] = argv

    # cwd: relative to the file's directory, which is also the default
    value, path = items.get("cwd", (None, (*where, "cwd")))
    if value is None:
        svc["cwd"] = r.base
    else:
        good, value = r.expand(value, path)
        if good and isinstance(value, str) and value and not value.startswith("/"):
            value = r.path_here(value)
        good, svc["cwd"] = r.check(spec.SERVICE["cwd"], value, path) if good else (False, None)
        ok = ok and good

    env = _environment(r, where, items, env_layers)
    ok = ok and env is not None
    svc["env"] = env

    for key, (value, path) in items.items():
        if key in RESOLVED_HERE:
            continue
        good, value = r.expand(value, path)
        if good:
            good, svc[key] = r.check(spec.SERVICE[key], value, path)
        ok = ok and good
    # Every value was checked above by its own field of SERVICE_FIELDS (the name by _services): what
    # check_body would do again, once more per service (pmond checks the whole object anyway).
    return svc if ok else None


def _inherited(r: _Reader, patterns: tuple[str, ...]) -> dict[str, str]:
    """The caller's variables that `inherit_env` patterns take, once per file and set of patterns (the
    same for most services: filtering the whole environment per service was half of a 100-service load)."""
    cache = r.inherit_cache
    if patterns not in cache:
        import fnmatch

        cache[patterns] = {k: v for k, v in spec.service_env(r.environ).items()
                           if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    return cache[patterns]


def _environment(r: _Reader, where: Path, items: dict[str, tuple[Any, Path]],
                 env_layers: list[tuple[Any, Path]]) -> dict[str, str] | None:
    """inherit_env (from the caller's environment, never its login session's) < env_file < env, where
    [defaults] env is merged under the service's env key by key."""
    ok = True
    value, path = items.get("inherit_env", (spec.FILE["inherit_env"].default, (*where, "inherit_env")))
    good, patterns = r.check(spec.FILE["inherit_env"], value, path)
    env: dict[str, str] = {}
    if good and patterns:
        env = dict(_inherited(r, tuple(patterns)))
    ok = ok and good

    if "env_file" in items:
        value, path = items["env_file"]
        good, files = r.check(spec.FILE["env_file"], value, path)
        if good:
            good, files = r.expand(files, path)
        for i, item in enumerate(files if good else []):
            full = r.path_here(item)
            shown = os.path.normpath(os.path.join(os.path.dirname(r.name), item)) if not item.startswith("/") \
                else item
            try:
                env.update(read_env_file(full, r.environ, shown))
            except AppFileError as exc:
                for p in exc.problems:  # the file as a whole (missing, unreadable): said where the file names it
                    if p.line is None and not p.path:
                        r.add((*path, i) if isinstance(value, list) else path, f"{shown}: {p.message}")
                    else:
                        r.extend([p])
                good = False
        ok = ok and good

    # [defaults] env under the service's env, key by key; each table checked where it was written
    layers = []
    for value, path in env_layers:
        if isinstance(value, dict):  # each variable first, so that a problem has the variable's own line
            good = all([r.check(spec.SERVICE["env"], {k: v}, (*path, k))[0] for k, v in value.items()])
            good = good and r.check(spec.SERVICE["env"], value, path)[0]
        else:
            good = r.check(spec.SERVICE["env"], value, path)[0]
        if good:
            good, value = r.expand(value, path, per_instance=True)
        ok = ok and good
        if good:
            layers.append(value)
    for layer in layers:
        env.update(layer)
    if not ok:
        return None
    good, env = r.check(spec.SERVICE["env"], env, (*where, "env"))
    return env if good else None


def _check_dependencies(r: _Reader, graph: dict[str, list[str]]) -> None:
    """depends_on within the file: no service waits for itself, and no cycle (pmond checks the rest)."""
    for name, needs in graph.items():
        if name in needs:
            r.add(("services", name, "depends_on", name), "a service cannot wait for itself")
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name):], name]
            r.add(("services", cycle[0], "depends_on"), f"a cycle: {' -> '.join(cycle)}")
            return
        if name in done or name not in graph:
            return
        for dep in graph[name]:
            if dep != name:
                visit(dep, [*trail, name])
        done.add(name)

    for name in graph:
        visit(name, [])


# the plan pmond answers


PLAN_MARKS = {"create": "+", "change": "~", "unchanged": "=", "remove": "-"}


def render_plan(answer: dict[str, Any], sent: list[dict[str, Any]], dry_run: bool) -> tuple[list[str], list[str]]:
    """pmond's plan -> (one line per service and a summary, for stdout; one line per failure, for stderr)."""
    instances = {s["name"]: s.get("instances", 1) for s in sent}
    out: list[str] = []
    err: list[str] = []
    restarts = 0
    for item in answer.get("plan", []):
        action, name = item.get("action", "?"), item.get("name", "?")
        line = f"{PLAN_MARKS.get(action, '?')} {action} {name}"
        if action == "create" and instances.get(name, 1) > 1:
            line += f" ({instances[name]} instances)"
        if action == "change":
            line += f": {', '.join(item.get('fields') or [])}"
            if item.get("restart"):
                line += " (restart)"
                restarts += 1
            elif item.get("start"):  # autostart turned on for a group that does not run
                line += " (start)"
        if not item.get("ok", True):
            error = item.get("error") or {}
            line += ": failed"
            err.append(f"pmon2: {name}: {error.get('message', 'failed')}")
        out.append(line)
    counts = answer.get("summary") or {}
    n = {k: int(counts.get(k, 0)) for k in ("create", "change", "unchanged", "remove", "failed")}
    # words.plural, without importing render.words for one word (the CLI's every ms counts on a re-apply)
    restart_note = f" ({restarts} restart{'s' if restarts != 1 else ''})" if restarts else ""
    if dry_run:
        parts = [f"{n['create']} to create", f"{n['change']} to change{restart_note}", f"{n['unchanged']} unchanged"]
        parts += [f"{n['remove']} to remove"] if n["remove"] else []
        out.append(f"plan: {', '.join(parts)}; nothing was changed (--dry-run)")
    else:
        parts = [f"{n['create']} created", f"{n['change']} changed{restart_note}", f"{n['unchanged']} unchanged"]
        parts += [f"{n['remove']} removed"] if n["remove"] else []
        parts += [f"{n['failed']} failed"] if n["failed"] else []
        out.append(f"applied: {', '.join(parts)}")
    return out, err


def failed(answer: dict[str, Any]) -> bool:
    return bool((answer.get("summary") or {}).get("failed")) or any(
        not item.get("ok", True) for item in answer.get("plan", []))


# dump


DUMP_HEADER = """\
# pmon2 dump: the services of {who} as an app file. `pmon2 apply` of it gives the same services, field for
# field; [defaults] inherit_env = false because each env below is complete.
"""
MASKED_HEADER = """\
# --masked: the values of secret-looking variables, and URL passwords, read *** below: put the real
# values back (or move them to an env_file) before you apply this file.
"""


def dump_services(services: list[dict[str, Any]]) -> dict[str, Any]:
    """Service objects (the API's field names, one per service, instances folded) -> an app file's data:
    `command` for argv; fields at their defaults left out, but `cwd` (its default would be the file's
    directory) and `instances` where pmond gives it, which it does for a group only (a group of one is
    NAME:0, not NAME); fields pmond shows but a file does not hold ignored. A `$` is written `$$`, as the
    file's reader expands `${VAR}` (escape_dollars)."""
    table: dict[str, dict[str, Any]] = {}
    for svc in services:
        entry: dict[str, Any] = {"command": escape_dollars(list(svc["argv"]), per_instance=True)}
        for f in spec.app_file_fields():
            value = svc.get(f.name)
            if f.name in spec.FILE or value is None or (f.name not in ("cwd", "instances") and value == f.default):
                continue
            entry[f.name] = escape_dollars(value, per_instance=f.name == "env")
        table[svc["name"]] = entry
    return {"defaults": {"inherit_env": False}, "services": table}


_DOLLAR_BUT_PER_INSTANCE = re.compile(r"\$(?!\{(?:" + "|".join(PER_INSTANCE) + r")\})")  # not ${instance}, ${port}


def escape_dollars(value: Any, per_instance: bool = False) -> Any:
    """A stored value as an app file writes it, so that reading it back (expand) gives it unchanged: each
    `$` in its strings (not in table keys, which are never expanded) doubled, but, where `per_instance`
    (command and env), pmond's own `${instance}` and `${port}`, which the reader leaves as they are."""
    if isinstance(value, str):
        return _DOLLAR_BUT_PER_INSTANCE.sub("$$", value) if per_instance else value.replace("$", "$$")
    if isinstance(value, list):
        return [escape_dollars(v, per_instance) for v in value]
    if isinstance(value, dict):
        return {k: escape_dollars(v, per_instance) for k, v in value.items()}
    return value


def toml_value(value: Any) -> str:
    """One value as TOML: strings as basic strings (JSON's escapes are TOML's; DEL must be escaped too),
    lists and tables inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


def dump_toml(answer: dict[str, Any], masked: bool, who: str = "this pmond") -> str:
    """Today's services as TOML: a table per service, its env as a table of its own, arrays on one line."""
    data = dump_services(answer.get("services", []))
    out = [DUMP_HEADER.format(who=who) + (MASKED_HEADER if masked else ""), "[defaults]", "inherit_env = false"]
    def table(header: str, items: dict[str, Any]) -> list[str]:
        return ["", header, *(f"{toml_key(k)} = {toml_value(v)}" for k, v in items.items())]

    for name, fields in data["services"].items():
        env = fields.pop("env", None)
        out += table(f"[services.{toml_key(name)}]", fields)
        if env:
            out += table(f"[services.{toml_key(name)}.env]", env)
    return "\n".join(out) + "\n"


# docs/app-file.md, generated from the spec model (tests/unit/test_appfile.py keeps the file in sync)


FILE_DEFAULTS = {"command": "required", "cwd": "the file's directory"}
FILE_NOTES = {
    "cwd": "In a file: relative to the file's directory, which is also the default.",
    "env": "In a file: `[defaults]` env is merged under it key by key, and both go over `env_file` and "
           "`inherit_env`.",
    "source": "`dump` writes it; without it, a service's source is the file it is applied from.",
}


def _kind(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(o)}`" for o in schema["enum"])
    kinds = schema.get("type", "")
    words = {"object": "table", "array": "array", "null": None}
    out = [words.get(k, k) for k in (kinds if isinstance(kinds, list) else [kinds])]
    return " or ".join(k for k in out if k)


def fields_table() -> str:
    rows = ["| key | type | default | unit | meaning |", "|---|---|---|---|---|"]
    for f in spec.app_file_fields():
        default = FILE_DEFAULTS.get(f.name) or ("-" if f.default is None else f"`{json.dumps(f.default)}`")
        doc = f"{f.doc} {FILE_NOTES[f.name]}" if f.name in FILE_NOTES else f.doc
        rows.append(f"| `{f.name}` | {_kind(f.schema)} | {default} | {f.unit or '-'} | {doc} |")
    return "\n".join(rows)


EXAMPLE_TOML = """\
#:schema ./pmon2.schema.json

[defaults]
kill_timeout = 10
log_max_size = "50M"
env = { APP_ENV = "production" }

[services.migrate]
command = "./bin/migrate up"
restart = "no"

[services.api]
command = ["./bin/api", "--listen", "127.0.0.1:8080"]
env_file = ".env"
env = { DATABASE_URL = "postgres://app:${DB_PASSWORD}@127.0.0.1/app", LOG_LEVEL = "info" }
ready = "http://127.0.0.1:8080/healthz"
depends_on = { migrate = "completed" }

[services.web]
command = "node server.js --port ${port}"
cwd = "web"
instances = 4
port = 3000
depends_on = { api = "ready" }

[services.worker]
command = ["python3", "-m", "app.worker", "--id", "${instance}"]
instances = 2
tags = ["workers"]
restart = "on-failure"
success_exit_codes = [0, 3]
stop_signal = "INT"
"""

EXAMPLE_YAML = """\
# yaml-language-server: $schema=./pmon2.schema.json
defaults:
  kill_timeout: 10
  log_max_size: 50M
  env: {APP_ENV: production}
services:
  migrate:
    command: ./bin/migrate up
    restart: "no"
  api:
    command: [./bin/api, --listen, "127.0.0.1:8080"]
    env_file: .env
    env:
      DATABASE_URL: postgres://app:${DB_PASSWORD}@127.0.0.1/app
      LOG_LEVEL: info
    ready: http://127.0.0.1:8080/healthz
    depends_on: {migrate: completed}
  web:
    command: node server.js --port ${port}
    cwd: web
    instances: 4
    port: 3000
    depends_on: {api: ready}
  worker:
    command: [python3, -m, app.worker, --id, "${instance}"]
    instances: 2
    tags: [workers]
    restart: on-failure
    success_exit_codes: [0, 3]
    stop_signal: INT
"""

EXAMPLE_JSON = """\
{
  "$schema": "./pmon2.schema.json",
  "defaults": {"kill_timeout": 10, "log_max_size": "50M", "env": {"APP_ENV": "production"}},
  "services": {
    "migrate": {"command": "./bin/migrate up", "restart": "no"},
    "api": {
      "command": ["./bin/api", "--listen", "127.0.0.1:8080"],
      "env_file": ".env",
      "env": {"DATABASE_URL": "postgres://app:${DB_PASSWORD}@127.0.0.1/app", "LOG_LEVEL": "info"},
      "ready": "http://127.0.0.1:8080/healthz",
      "depends_on": {"migrate": "completed"}
    },
    "web": {"command": "node server.js --port ${port}", "cwd": "web", "instances": 4, "port": 3000,
            "depends_on": {"api": "ready"}},
    "worker": {"command": ["python3", "-m", "app.worker", "--id", "${instance}"], "instances": 2,
               "tags": ["workers"], "restart": "on-failure", "success_exit_codes": [0, 3], "stop_signal": "INT"}
  }
}
"""

DOC = """\
# App files: services as code

<!-- generated by pmon2/appfile.py from pmon2/spec.py: pmon2 schema --format markdown > docs/app-file.md -->

An app file describes services; `pmon2 apply` makes pmond run exactly them. It belongs in version control
next to the code it runs, and the same file deploys the same services on every server.

```
pmon2 apply pmon2.toml              # create, change and restart only what differs; print the plan
pmon2 apply pmon2.toml --dry-run    # the plan alone: nothing changes
pmon2 apply pmon2.toml --prune      # also remove the services that came from this file and left it
pmon2 apply pmon2.toml --json       # pmond's plan as JSON, for scripts
pmon2 dump > pmon2.toml             # today's services as an app file (apply of it changes nothing)
pmon2 schema > pmon2.schema.json    # the JSON Schema of app files, for editors
```

## An example

TOML is the native format: a `[services.NAME]` table per service, and an optional `[defaults]` table.

```toml
@TOML@```

YAML and JSON files have the same shape; the format follows the extension (`.toml`, `.yaml` or `.yml`,
`.json`). This is the same file in YAML:

```yaml
@YAML@```

and in JSON:

```json
@JSON@```

## How a file is read

The `pmon2` CLI reads the file, and every `env_file` it names, with the rights of the user who runs it, and
sends pmond the resolved services (`POST /v1/apply`): pmond never opens a user's file, so a file that only
its owner may read works, even with pmond running as root.

- **Names.** A service's name is its table's key: `[services.web]` is `web`. The rules of `run` apply
  (letters, digits and `. _ - @ +`; unique regardless of case). With `instances = N` the instances are
  `web:0` ... `web:N-1`, and `web` selects them all.
- **Defaults.** Each key of `[defaults]` applies to every service that does not set it. `env` is merged
  key by key: a service's own `env` adds to the defaults' and wins where both set a variable. Every other
  key is replaced whole. `command` cannot be a default.
- **Variables.** In every string value, `${VAR}` is replaced by the variable `VAR` of the environment
  `pmon2 apply` runs in, and it is an error when `VAR` is not set; `${VAR:-text}` gives `text` then. `$$`
  is a literal `$`; any other `$` is itself. Only `${instance}` and `${port}` are left for pmond, which
  replaces them in `command` and `env` for each instance (its number, and `port` + its number); elsewhere
  they are an error. Keys are never expanded. A string command is split first, then each word is
  expanded, so a value with spaces stays one argument.
- **Paths.** `cwd` and `env_file` are relative to the file's directory, and `cwd` defaults to it. `log`,
  `log_dir` and a relative program (`./bin/api`) are relative to `cwd`, as with `run`: with no `cwd`,
  that is the file's directory too. The file's own path is kept as given (a symbolic link such as
  `/srv/app/current/pmon2.toml` is not resolved), so a deploy that moves the link keeps one source.
- **Commands.** `command` is the argv as a list, or a string split with shell rules (quotes, backslashes);
  neither goes through a shell: write `command = ["sh", "-c", "exec ./a | ./b"]` for one.
- **Environment.** A service starts with the variables of your environment that `inherit_env` names
  (by default `PATH`, `HOME`, `USER`, `LOGNAME`, `SHELL`, `LANG`, `LC_*` and `TZ`; never the login
  session's, such as `SSH_AUTH_SOCK` or `DISPLAY`, nor `PMON2_*`); then the variables of each `env_file`
  (dotenv syntax, read by python-dotenv: `KEY=value`, `export KEY="value"`, comments; values expand as
  above, also from the file's earlier variables, except single-quoted ones); then `env`. Unlike `run`,
  which freezes your whole environment, a file names what its services take from it, so the shell you
  apply from matters only through those few variables (a different `PATH` is a change of `env`, and
  restarts). `inherit_env = true` takes your whole environment, as `run` does, and `inherit_env = false`
  nothing, for a file that lists every variable and gives the same services from any shell.
- **Checks.** The whole file is checked before anything is sent, every field through the same model
  as `run` and the API. Every problem is printed, each with its place, and then nothing is applied (exit
  status 2):

```
pmon2.toml:7: services.web.instances: must be a whole number from 1 to 1000
pmon2.toml:12: services.api.restart: must be one of 'always', 'on-failure', 'no', not 'sometimes'
pmon2.toml:15: services.api.kill_timout: unknown key 'kill_timout'; did you mean 'kill_timeout'?
.env:3: DB_PASSWORD: ${VAULT_PASSWORD} is not set in your environment (write ${VAULT_PASSWORD:-default} \
for a default, $$ for a literal $)
```

  TOML and YAML problems carry the line of their key; JSON ones carry a line only for a syntax error.
  YAML reads a bare `no`, `yes`, `on` or `off` as a boolean: write `restart: "no"`.
- **Limits.** The file and each `env_file` must be regular files (a symbolic link to one is fine) of at
  most 16 MiB: a device or a FIFO is refused, never read. A file nested more than 64 levels deep is
  refused, and so is a YAML file whose aliases expand it to more than 1,000,000 values (an alias bomb).

## What `apply` does

pmond compares each service of the file with the one it runs under that name, and prints the plan, one
line per service, then a summary:

```
+ create web (4 instances)
~ change api: env, kill_timeout (restart)
= unchanged migrate
- remove old-worker
applied: 1 created, 1 changed (1 restart), 1 unchanged, 1 removed
```

- Applying the same file again changes nothing, and no process is touched.
- A change restarts only the services it changes, and only when it needs to: a new `env`, `command`
  or `cwd` restarts that service; a new `kill_timeout` or `tags` restarts nothing.
- Services start in dependency order (`depends_on`), concurrently where the order allows. A failed
  start is reported, the services that do not depend on it go on, and `apply` exits non-zero. Nothing is
  rolled back.
- Each service remembers the file it came from (`desc` shows it). `--prune` removes the services of
  this file that it no longer has: never a service made by `run`, nor one of another file.
- `--dry-run` prints the plan and changes nothing; `--json` prints pmond's answer:
  `{"plan": [{"name", "action", "fields", "restart", "ok", "error"}], "summary": {"create", "change",
  "unchanged", "remove", "failed"}}`.

## `dump`

`pmon2 dump > pmon2.toml` writes today's services as an app file, leaving out the fields at their
defaults, with each service's `source` and complete `env` (so `[defaults] inherit_env = false`). `apply`
of it on a fresh pmond gives the same services, field for field: every `$` of a value is written `$$`
(but `${instance}` and `${port}` in `command` and `env`, which stay pmond's), so nothing is expanded
again, and a group scaled down to one instance (`web:0`) is written with `instances = 1`, which makes
`web:0` again (an `instances` given, even 1, makes a group; left out, one service `web`). Its values are
in clear, so only a caller who may see them gets it: root, or the services' own user, as with
`desc --show-env`. Anyone else needs `pmon2 dump --masked`, which writes secret-looking values as `***`.

## Editor completion

`pmon2 schema > pmon2.schema.json` writes the JSON Schema of app files (draft 2020-12), made from the
same model as the checks. Point your editor at it:

- TOML (taplo, Even Better TOML): a first line `#:schema ./pmon2.schema.json`;
- YAML (yaml-language-server): a first line `# yaml-language-server: $schema=./pmon2.schema.json`;
- JSON: a top-level `"$schema": "./pmon2.schema.json"` (pmon2 ignores the key).

## Fields

Every key of a service's table (and of `[defaults]`, but `command`). The first three are the file's own:
the CLI resolves them. The others are the fields of `run` and of the API ([api.md](api.md)), checked by
the same model.

@FIELDS@
"""


def markdown() -> str:
    """docs/app-file.md."""
    return (DOC.replace("@TOML@", EXAMPLE_TOML).replace("@YAML@", EXAMPLE_YAML).replace("@JSON@", EXAMPLE_JSON)
            .replace("@FIELDS@", fields_table()))
