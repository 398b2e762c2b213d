"""`pmon2 import pmon2-go`: take over a live Pmon2 (Go, ntt360/pmon2) installation without restarting a process.

What the Go Pmon2 leaves behind, from its source:
- its config, /etc/pmon2/config/config.yml or $PMON2_CONF, a flat YAML file whose `data:` key names the data
  dir (default /etc/pmon2/data); the database is SQLite, <data>/db/data.db;
- the table `process` (gorm, snake_case): id, created_at, updated_at, deleted_at (a soft delete), pid, log,
  name, process_file, args, status (init, running, stopped, reload, failed), and, in newer versions only,
  auto_restart, uid, username, gid;
- argv: Go's executor runs `process_file` with `strings.Split(args, " ")` appended only when `args` is not
  empty (`if len(extArgs) > 0`). So "" means no arguments (never one empty argument, although
  strings.Split("", " ") is [""]), and "a  b" means a, "", b: empty strings are kept;
- its pmond restarts the rows whose status is `running` or `failed`.

The database is read with the caller's rights and never written: it is copied (with its -wal or -journal)
into a private temporary directory and the copy is read, so neither a lock, a WAL checkpoint nor a
rollback ever touches the original. Services are sent to pmond one by one (POST /v1/adopt), which checks
each pid again itself and alone adopts processes (root only).

A running Go pmond would restart whatever pmon2 restarts, so the import refuses while one runs, and prints
the steps that stop it without stopping any of its services; `--stop-old` carries them out. The commands
(busctl, systemctl, initctl) are looked up on PATH, so tests put stand-ins there. Two more seams, for tests
only: PMON2_IMPORT_INIT (systemd, upstart or none) names the init system instead of detecting it, and
PMON2_IMPORT_CGROUP names the directory of the Go unit's cgroup (whose cgroup.procs lists its processes).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pmon2 import importers, procfs
from pmon2 import spec as model
from pmon2.errors import PmonError

DEFAULT_CONF = "/etc/pmon2/config/config.yml"
DEFAULT_DATA = "/etc/pmon2/data"
SQLITE_MAGIC = b"SQLite format 3\0"
REQUIRED_COLUMNS = ("id", "pid", "name", "process_file", "args", "status")
OPTIONAL_COLUMNS = ("deleted_at", "log", "created_at", "auto_restart", "uid", "username", "gid")
NEWER_COLUMNS = ("auto_restart", "uid", "username", "gid")
RESTARTED = ("running", "failed")  # the statuses Go's pmond restarts
TOOL = "pmon2-go"
SCOPE = "pmon2-adopted.scope"
SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
INIT_ENV = "PMON2_IMPORT_INIT"  # test seam: systemd, upstart or none
CGROUP_ENV = "PMON2_IMPORT_CGROUP"  # test seam: the Go unit's cgroup directory
STOP_WAIT = 15.0  # seconds for the Go pmond to exit once asked
MOVE_WAIT = 5.0  # seconds for systemd to move the services into the scope

OUTCOMES = {"adopted": ("adopted", "would adopt"), "started": ("started", "would start"),
            "stopped": ("left stopped", "would leave stopped"), "not_imported": ("not imported", "would not import")}


# where the Go Pmon2 keeps its data


@dataclass
class Source:
    database: str
    config: str | None
    notes: list[str] = field(default_factory=list)


def parse_config(text: str) -> dict[str, str]:
    """The top-level `key: value` scalars of Pmon2's flat YAML config (quoted or not, comments dropped).
    Nested blocks and lists are skipped: Pmon2's config has none."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line[0] in " \t#-" or line.startswith("---"):
            continue
        key, sep, rest = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = _scalar(rest.strip())
    return out


def _scalar(text: str) -> str:
    if text[:1] == '"':
        out, i = [], 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
                out.append({"n": "\n", "t": "\t"}.get(text[i], text[i]))
            else:
                out.append(text[i])
            i += 1
        return "".join(out)
    if text[:1] == "'":
        out, i = [], 1
        while i < len(text):
            if text[i] == "'":
                if text[i + 1:i + 2] != "'":
                    break
                i += 1  # '' is one quote
            out.append(text[i])
            i += 1
        return "".join(out)
    return re.split(r"\s+#", text, maxsplit=1)[0].strip()


def locate(arg: str | None, env: dict[str, str] | os._Environ[str]) -> Source:
    """The Go database: named by `arg` (the database, its config, or its data dir), else found through
    $PMON2_CONF or /etc/pmon2/config/config.yml, else at Pmon2's default data dir."""
    if arg:
        path = os.path.abspath(arg)
        if os.path.isdir(path):
            for candidate in (os.path.join(path, "db", "data.db"), os.path.join(path, "data.db")):
                if os.path.isfile(candidate):
                    return Source(candidate, None)
            raise PmonError(f"no Pmon2 database in {path} (looked for db/data.db and data.db)")
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise PmonError(f"cannot read {path}: {exc.strerror}") from None
        return Source(path, None) if head == SQLITE_MAGIC else _from_config(path, [])
    conf = env.get("PMON2_CONF") or DEFAULT_CONF
    if os.path.exists(conf):
        return _from_config(conf, [])
    if os.path.exists(conf + ".rpmsave"):  # the Go rpm was removed after the config was edited
        return _from_config(conf + ".rpmsave", [f"{conf} is gone; read {conf}.rpmsave"])
    tried = [conf]
    for db in (os.path.join(DEFAULT_DATA, "db", "data.db"), os.path.expanduser("~/.pmon/db/data.db")):
        if os.path.isfile(db):
            return Source(db, None, [f"no config at {conf}: used {db}"])
        tried.append(db)
    raise PmonError(f"no Pmon2 (Go) database found (tried {', '.join(tried)}); name it: "
                    "pmon2 import pmon2-go /path/to/data.db")


def _from_config(conf: str, notes: list[str]) -> Source:
    try:
        with open(conf, encoding="utf-8", errors="replace") as fh:
            settings = parse_config(fh.read())
    except OSError as exc:
        raise PmonError(f"cannot read the Pmon2 config {conf}: {exc.strerror}") from None
    data = settings.get("data") or DEFAULT_DATA
    if "data" not in settings:
        notes.append(f"{conf} has no `data:` key: Pmon2's default data dir {DEFAULT_DATA}")
    db = os.path.join(data, "db", "data.db")
    if not os.path.isfile(db):
        raise PmonError(f"the Pmon2 config {conf} names the data dir {data}, but there is no {db}")
    return Source(db, conf, notes)


# the database, read-only


@dataclass
class Row:
    id: int
    name: str
    pid: int | None
    process_file: str
    args: str
    status: str
    log: str = ""
    deleted_at: Any = None
    created_at: Any = None
    auto_restart: bool | None = None  # None: the column is missing (older Pmon2)
    uid: str | None = None
    username: str | None = None
    gid: str | None = None


def read_database(path: str) -> tuple[list[Row], list[str]]:
    """Every row of `process`, deleted ones included, and the columns the table has. The database is
    copied first (with its -wal or -journal) and only the copy is opened, so the original is never
    written, locked or checkpointed, whatever SQLite needs to do to read it."""
    with tempfile.TemporaryDirectory(prefix="pmon2-import-") as tmp:
        copy = os.path.join(tmp, "data.db")
        try:
            for suffix in ("", "-wal", "-journal"):
                if suffix and not os.path.exists(path + suffix):
                    continue
                shutil.copyfile(path + suffix, copy + suffix)
        except OSError as exc:
            raise PmonError(f"cannot read the Pmon2 database {path}: {exc.strerror} (run as root?)") from None
        try:
            db = sqlite3.connect(copy)
        except sqlite3.Error as exc:
            raise PmonError(f"cannot open the Pmon2 database {path}: {exc}") from None
        try:
            columns = [r[1] for r in db.execute("PRAGMA table_info(process)")]
            if not columns:
                raise PmonError(f"{path} is not a Pmon2 database: it has no table `process`")
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise PmonError(f"{path}: the table `process` lacks {', '.join(missing)}: not a Pmon2 database")
            chosen = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in columns]
            cursor = db.execute(f"SELECT {', '.join(chosen)} FROM process ORDER BY id")
            rows = [_row(dict(zip(chosen, values, strict=True))) for values in cursor]
        except sqlite3.Error as exc:
            raise PmonError(f"cannot read the Pmon2 database {path}: {exc}") from None
        finally:
            db.close()
    return rows, columns


def _row(values: dict[str, Any]) -> Row:
    def text(key: str) -> str:
        value = values.get(key)
        if isinstance(value, bytes):
            return value.decode(errors="surrogateescape")
        return "" if value is None else str(value)

    pid = values.get("pid")
    auto = values.get("auto_restart") if "auto_restart" in values else None
    if isinstance(auto, str):
        auto = auto.strip().lower() in ("1", "t", "true")
    return Row(id=int(values["id"]), name=text("name"), pid=pid if isinstance(pid, int) and pid > 0 else None,
               process_file=text("process_file"), args=text("args"), status=text("status").strip().lower(),
               log=text("log"), deleted_at=values.get("deleted_at"), created_at=values.get("created_at"),
               auto_restart=None if "auto_restart" not in values or auto is None else bool(auto),
               uid=text("uid") or None, username=text("username") or None, gid=text("gid") or None)


def go_argv(process_file: str, args: str) -> list[str]:
    """The argv Pmon2 runs: process_file, then `strings.Split(args, " ")` when args is not empty (its
    executor skips the split for ""). Empty strings between double spaces are kept, as Go keeps them."""
    return [process_file, *(args.split(" ") if args else [])]


def deleted(row: Row) -> bool:
    return row.deleted_at not in (None, "")


# names


def pmon2_name(raw: str, process_file: str, row: int, taken: set[str]) -> tuple[str, str | None]:
    """A valid, free pmon2 name for a Pmon2 row, and why it differs from the row's name (None if it does not).
    `taken` holds the casefolded names in use; the new name is added to it."""
    why = None
    try:
        name = model.check_name(raw)
    except ValueError as exc:
        why = str(exc)
        name = model.sanitize_name(raw) or model.sanitize_name(os.path.basename(process_file)) or f"pmon2-go-{row}"
        for fix in (name, f"{name}-go", f"go-{name}"):
            try:
                name = model.check_name(fix)
                break
            except ValueError:
                continue
        else:
            name = f"pmon2-go-{row}"
    if name.casefold() in taken:
        why = why or f"{name!r} is taken by another service"
        base, n = name, 0
        while name.casefold() in taken:
            n += 1
            suffix = f"-{row}" if n == 1 else f"-{row}-{n}"
            name = base[:model.NAME_MAX_CHARS - len(suffix)] + suffix
    model.check_name(name)
    taken.add(name.casefold())
    return name, why




# the plan: one candidate service per row


@dataclass
class Candidate:
    row: int
    go_name: str
    go_status: str
    go_pid: int | None
    name: str | None = None
    renamed: str | None = None  # why the name changed
    argv: list[str] = field(default_factory=list)
    body: dict[str, Any] | None = None  # the POST /v1/adopt request; None when not importable
    problem: str | None = None
    notes: list[str] = field(default_factory=list)


def plan(rows: list[Row], database: str, taken: set[str], caller_env: dict[str, str]) -> list[Candidate]:
    """A candidate service for every row that is not deleted, checked through the spec model (so a row
    pmond would refuse is reported here, dry run or not)."""
    source = os.path.realpath(database)
    env = model.service_env(caller_env)
    out = []
    for row in rows:
        if deleted(row):
            continue
        c = Candidate(row.id, row.name, row.status, row.pid)
        out.append(c)
        if not row.process_file.startswith("/"):
            c.problem = f"its process_file {row.process_file!r} is not an absolute path"
            continue
        c.argv = go_argv(row.process_file, row.args)
        c.name, c.renamed = pmon2_name(row.name, row.process_file, row.id, taken)
        body: dict[str, Any] = {
            "argv": c.argv, "name": c.name, "cwd": os.path.dirname(row.process_file) or "/", "env": env,
            "pid": row.pid, "start": row.status in RESTARTED,
            "imported_from": {"tool": TOOL, "source": source, "row": row.id, "name": row.name},
        }
        restarts = True if row.auto_restart is None else row.auto_restart  # Go's default: restart it
        if "restart" in model.SERVICE:  # issue 12's field
            body["restart"] = "always" if restarts else "no"
        else:
            body["autorestart"] = restarts
        user = row.username or _user_of(row.uid)
        if user:
            body["user"] = user
        if row.log:
            body["log"] = row.log
        try:
            c.body = model.check_body(body, model.ADOPT_FIELDS)
        except PmonError as exc:
            c.problem = exc.message
    return out


def _user_of(uid: str | None) -> str | None:
    import pwd

    if uid is None or not uid.isdigit():
        return None
    try:
        return pwd.getpwuid(int(uid)).pw_name
    except KeyError:
        return None


def predict(c: Candidate, managed: set[int]) -> dict[str, Any]:
    """What the import would do with a candidate (for --dry-run): the checks pmond makes, made here."""
    assert c.body is not None
    notes = []
    if c.go_pid is not None:
        found = importers.identify(c.go_pid, c.argv)
        if found.same:
            return {"outcome": "adopted", "pid": c.go_pid, "notes": [], "how": found.why}
        notes.append(f"process {c.go_pid} not adopted: {found.why}; it would not be signalled")
    if c.body["start"]:
        busy = importers.runs_file(c.argv[0], exclude=managed)
        if busy:
            why = (f"process {', '.join(map(str, busy))} runs {c.argv[0]} with other arguments, probably this very "
                   "service: nothing would be started")
            return {"outcome": "not_imported", "pid": None, "why": "; ".join([*notes, why])}
        return {"outcome": "started", "pid": None, "notes": notes}
    return {"outcome": "stopped", "pid": None, "notes": notes}


# the Go pmond


@dataclass
class GoDaemon:
    pid: int
    exe: str | None
    init: str  # systemd, upstart or none
    unit: str | None = None  # systemd
    cgroup: str | None = None  # systemd: the unit's cgroup directory
    job: list[str] | None = None  # upstart: `initctl stop` arguments

    def steps(self) -> list[list[str]]:
        """The commands that stop it and leave every process it manages running."""
        if self.init == "systemd":
            assert self.unit is not None
            steps = []
            others = sorted(cgroup_members(self.cgroup) - {self.pid}) if self.cgroup else []
            if others:
                steps.append(move_command(others))
            return [*steps, ["systemctl", "stop", self.unit], ["systemctl", "disable", self.unit]]
        if self.init == "upstart":
            assert self.job is not None
            return [["initctl", "stop", *self.job]]
        return [["kill", "-TERM", str(self.pid)]]


def find_go_pmonds(proc: str = "/proc") -> list[int]:
    """Live processes of the Go pmond: /proc/PID/exe's basename is `pmond`. pmon2's own pmond is also
    called pmond, but it runs under a Python interpreter, so its exe is python. Another user's process,
    whose exe cannot be read without root, is judged by its argv[0]."""
    found = []
    for pid in procfs.pids(proc):
        exe = importers.read_exe(pid, proc)
        if exe is not None:
            if os.path.basename(exe) != "pmond":
                continue
        else:
            argv = importers.read_cmdline(pid, proc)
            if not argv or os.path.basename(argv[0]) != "pmond":
                continue
        st = procfs.read_stat(pid, proc)
        if st is not None and st.alive:
            found.append(pid)
    return sorted(found)


def describe(pid: int, env: dict[str, str] | os._Environ[str]) -> GoDaemon:
    """How the Go pmond `pid` is run: by systemd (its unit and cgroup), by upstart (its job), or by hand."""
    exe = importers.read_exe(pid)
    forced = env.get(INIT_ENV)
    path = unit_cgroup_path(pid)
    unit = os.path.basename(path) if path and path.endswith(".service") else None
    if forced == "systemd" or (forced is None and unit is not None and os.path.isdir("/run/systemd/system")):
        cgroup = env.get(CGROUP_ENV) or (cgroup_dir(path) if path else None)
        if cgroup is not None and env.get(CGROUP_ENV):
            unit = os.path.basename(cgroup.rstrip("/"))
        return GoDaemon(pid, exe, "systemd", unit or "pmon2.service", cgroup)
    if forced == "upstart" or (forced is None and shutil.which("initctl") and _ppid(pid) == 1):
        job = upstart_job(pid)
        if job is not None:
            return GoDaemon(pid, exe, "upstart", job=job)
    return GoDaemon(pid, exe, "none")


def _ppid(pid: int) -> int | None:
    st = procfs.read_stat(pid)
    return st.ppid if st else None


def unit_cgroup_path(pid: int, proc: str = "/proc") -> str | None:
    """The cgroup path of a process in systemd's hierarchy (cgroup v2, else v1's name=systemd)."""
    try:
        with open(f"{proc}/{pid}/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    return paths.get("name=systemd") or paths.get("")


def cgroup_dir(path: str) -> str | None:
    """The directory of cgroup `path` in the mounted hierarchy systemd uses."""
    v1 = v2 = None
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) < 5 or len(rest) < 3:
                    continue
                if rest[0] == "cgroup2" and v2 is None:
                    v2 = fields[4]
                elif rest[0] == "cgroup" and "name=systemd" in rest[2].split(","):
                    v1 = fields[4]
    except OSError:
        return None
    for root in (v1, v2):
        if root is not None and os.path.isfile(os.path.join(root, path.lstrip("/"), "cgroup.procs")):
            return os.path.join(root, path.lstrip("/"))
    return None


def cgroup_members(directory: str | None) -> set[int]:
    if directory is None:
        return set()
    try:
        with open(os.path.join(directory, "cgroup.procs")) as fh:
            return {int(x) for x in fh.read().split() if x.isdigit()}
    except OSError:
        return set()


def move_command(pids: list[int], attach: bool = False) -> list[str]:
    """busctl: move processes into pmon2's transient scope (systemd-run cannot move existing pids)."""
    if attach:  # the scope exists already (an earlier import): add to it
        return ["busctl", "call", *SYSTEMD, "AttachProcessesToUnit", "ssau", SCOPE, "", str(len(pids)),
                *map(str, pids)]
    return ["busctl", "call", *SYSTEMD, "StartTransientUnit", "ssa(sv)a(sa(sv))", SCOPE, "fail", "1", "PIDs", "au",
            str(len(pids)), *map(str, pids), "0"]


def upstart_job(pid: int) -> list[str] | None:
    """`initctl stop` arguments for the upstart job whose main process is `pid`, from `initctl list`
    (`pmond (/usr/local/pmon2/bin/pmond) start/running, process 1234`). An instance job is named by the
    variable of its `instance` stanza (Pmon2's jobs: `instance $EXEC`)."""
    try:
        listing = _run(["initctl", "list"], None)
    except PmonError:
        return None
    for line in listing.splitlines():
        m = re.match(r"^(\S+)(?: \(([^)]*)\))? \S+/\S+, process (\d+)\s*$", line.strip())
        if m and int(m.group(3)) == pid:
            job, instance = m.group(1), m.group(2)
            if not instance:
                return [job]
            var = "EXEC"
            try:
                with open(f"/etc/init/{job}.conf") as fh:
                    found = re.search(r"^\s*instance\s+\$\{?(\w+)", fh.read(), re.M)
                if found:
                    var = found.group(1)
            except OSError:
                pass
            return [job, f"{var}={instance}"]
    return None


def _run(argv: list[str], done: list[str] | None) -> str:
    """Run a command found on PATH (the seam for the stand-ins of tests); PmonError when it fails."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise PmonError(f"{argv[0]} not found on PATH; run the steps by hand")
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PmonError(f"`{shlex.join(argv)}` failed: {exc}") from None
    if done is not None:
        done.append(shlex.join(argv))
    if proc.returncode != 0:
        raise PmonError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout


def _exited(pidfd: int, timeout: float) -> bool:
    import select

    return bool(select.select([pidfd], [], [], timeout)[0])


def stop_old(d: GoDaemon) -> list[str]:
    """Stop the Go pmond `d` and nothing else; returns what was done. systemd: its pmond frozen (SIGSTOP)
    so that it starts nothing meanwhile, every other process of its unit's cgroup moved into pmon2's
    scope (systemd would kill them when the unit stops, KillMode=control-group), then the unit stopped
    and disabled. upstart: `initctl stop` of its job (it respawns), refused when that would signal
    other processes of its group. By hand: SIGTERM to its main pid alone."""
    done: list[str] = []
    try:
        pidfd = os.pidfd_open(d.pid)
    except OSError:
        return [f"the Go pmond {d.pid} had already exited"]
    frozen = False
    try:
        if d.init == "systemd":
            assert d.unit is not None
            signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
            frozen = True
            done.append(f"froze the Go pmond (SIGSTOP to pid {d.pid}) while its services move")
            _move_out(d, done)
            _run(["systemctl", "stop", d.unit], done)
            if not _exited(pidfd, 0):  # systemd follows its SIGTERM with a SIGCONT; in case it did not
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
                frozen = False
            _run(["systemctl", "disable", d.unit], done)
        elif d.init == "upstart":
            assert d.job is not None
            st = procfs.read_stat(d.pid)
            others = [p for p in procfs.group_members(st.pgrp)] if st is not None else []
            others = [p for p in others if p != d.pid]
            if others:
                raise PmonError(f"`initctl stop` signals the Go pmond's whole process group, which holds processes "
                                f"{', '.join(map(str, others))} too; stop it by hand instead: kill {d.pid}")
            _run(["initctl", "stop", *d.job], done)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            done.append(f"sent SIGTERM to the Go pmond (pid {d.pid}) only")
        if not _exited(pidfd, STOP_WAIT):
            if d.init != "none":
                raise PmonError(f"the Go pmond (pid {d.pid}) still runs after {done[-1]}")
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            done.append(f"sent SIGKILL to the Go pmond (pid {d.pid}), still running {STOP_WAIT:g} s after SIGTERM")
            _exited(pidfd, 5.0)
        return done
    except BaseException as exc:
        if frozen and not _exited(pidfd, 0):
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
            done.append(f"resumed the Go pmond (SIGCONT to pid {d.pid})")
        if isinstance(exc, PmonError):
            raise PmonError(f"{exc.message}. Done: {'; '.join(done) or 'nothing'}. Nothing was imported") from None
        raise
    finally:
        os.close(pidfd)


def _move_out(d: GoDaemon, done: list[str]) -> None:
    others = cgroup_members(d.cgroup) - {d.pid}
    if d.cgroup is None:
        raise PmonError(f"cannot find the cgroup of {d.unit}: its processes cannot be moved out of it, and stopping "
                        "the unit would kill them")
    if not others:
        done.append(f"{d.unit} holds no process but the Go pmond")
        return
    try:
        _run(move_command(sorted(others)), done)
    except PmonError as exc:
        if "exist" not in exc.message:
            raise
        _run(move_command(sorted(others), attach=True), done)
    asked = set(others)
    deadline = time.monotonic() + MOVE_WAIT
    while True:
        left = cgroup_members(d.cgroup) - {d.pid}
        if not left:
            return
        fresh = left - asked  # forked while they moved: move those too
        if fresh:
            _run(move_command(sorted(fresh), attach=True), done)
            asked |= fresh
        if time.monotonic() > deadline:
            raise PmonError(f"processes {', '.join(map(str, sorted(left)))} are still in {d.unit} after "
                            f"{MOVE_WAIT:g} s; the unit was not stopped")
        time.sleep(0.05)


# the command


def run(args: Any, client_factory: Any, say: Any, err: Any, print_json: Any) -> int:
    """`pmon2 import pmon2-go [DB_OR_CONFIG] [--dry-run] [--json] [--stop-old]`."""
    from pmon2.client import ApiError, DaemonUnreachable

    env = os.environ
    source = locate(args.path, env)
    rows, columns = read_database(source.database)
    report: dict[str, Any] = {
        "database": source.database, "config": source.config, "dry_run": bool(args.dry_run),
        "schema": "newer" if all(c in columns for c in NEWER_COLUMNS)
        else "older (no auto_restart, uid, username, gid)",
        "notes": list(source.notes), "go_pmond": [], "stop_old": [], "services": [],
        "ignored": [{"row": r.id, "go_name": r.name, "why": f"deleted in Pmon2 ({r.deleted_at})"}
                    for r in rows if deleted(r)],
    }
    if "auto_restart" not in columns:
        report["notes"].append("no auto_restart column (an older Pmon2): every service restarts on exit "
                               "(restart = always)")
    daemons = [describe(pid, env) for pid in find_go_pmonds()]
    report["go_pmond"] = [asdict(d) | {"steps": [shlex.join(s) for s in d.steps()]} for d in daemons]
    client = None
    if not args.dry_run:
        client = client_factory()
        if daemons and not args.stop_old:
            return _refuse(daemons, report, args, err, print_json)
        _probe(client)  # root only: learn it now, before the Go pmond is stopped
        if daemons:
            managed = (_live_managed(rows) | {p for d in daemons for p in cgroup_members(d.cgroup)}) - {
                d.pid for d in daemons}
            for d in daemons:
                report["stop_old"] += stop_old(d)
            died = sorted(p for p in managed if not _alive(p))
            if died:
                report["notes"].append(f"processes {', '.join(map(str, died))} died while the Go pmond stopped")
            rows, columns = read_database(source.database)  # what it wrote last
    elif daemons:
        report["notes"].append("the Go pmond runs: a real import refuses until it is stopped (--stop-old stops it, "
                               "leaving its services running)")
    try:
        existing = (client or client_factory()).request("GET", "/v1/services", autostart=not args.dry_run,
                                                        timeout=None if client else 10.0)
    except DaemonUnreachable:
        existing = []
        report["notes"].append("pmond is not running: names were not checked against existing services")
    taken = {s["name"].casefold() for s in existing} | {n.casefold() for n in model.RESERVED_NAMES}
    managed_now = {s["pid"] for s in existing if s.get("pid")}
    for c in plan(rows, source.database, taken, dict(env)):
        item: dict[str, Any] = {"row": c.row, "go_name": c.go_name, "go_status": c.go_status, "go_pid": c.go_pid,
                                "name": c.name, "renamed": c.renamed, "argv": c.argv, "id": None}
        if c.body is None:
            item |= {"outcome": "not_imported", "pid": None, "why": c.problem}
        elif args.dry_run:
            item |= predict(c, managed_now)
        else:
            assert client is not None
            try:
                answer = client.request("POST", "/v1/adopt", c.body)
                item |= {"outcome": answer["outcome"], "pid": answer["pid"], "notes": answer["notes"],
                         "id": answer["service"]["id"]}
            except ApiError as exc:
                if exc.code == "forbidden":
                    raise
                item |= {"outcome": "not_imported", "pid": None, "why": exc.message}
                if exc.code == "already_imported":  # an earlier import took it: not a failure
                    item |= {"already_imported": True, "name": None, "renamed": None}
        if item["outcome"] in ("started", "stopped"):
            item.setdefault("notes", []).append(
                "environment: this command's (Pmon2 keeps none and no process of it runs); cwd: the program's "
                "directory")
        report["services"].append(item)
    if args.json:
        print_json(report)
    else:
        say(render(report))
    failed = [s for s in report["services"] if s["outcome"] == "not_imported" and not s.get("already_imported")]
    return 1 if failed else 0


def _probe(client: Any) -> None:
    """An empty POST /v1/adopt: 403 for a caller that may not adopt, 400 (argv needed) for one that may."""
    from pmon2.client import ApiError

    try:
        client.request("POST", "/v1/adopt", {})
    except ApiError as exc:
        if exc.code == "forbidden":
            raise PmonError(f"{exc.message}: run pmon2 import as root") from None


def _live_managed(rows: list[Row]) -> set[int]:
    return {r.pid for r in rows if r.pid and not deleted(r) and _alive(r.pid)}


def _alive(pid: int) -> bool:
    st = procfs.read_stat(pid)
    return st is not None and st.alive


def _refuse(daemons: list[GoDaemon], report: dict[str, Any], args: Any, err: Any, print_json: Any) -> int:
    report["refused"] = "the Go pmond runs"
    if args.json:
        print_json(report)
    for d in daemons:
        how = {"systemd": f"systemd unit {d.unit}", "upstart": f"upstart job {' '.join(d.job or [])}",
               "none": "started by hand"}[d.init]
        lines = [f"pmon2: the Go Pmon2's pmond runs (pid {d.pid}, {d.exe or 'pmond'}, {how}). It would restart "
                 "whatever pmon2 restarts, so nothing was imported. Stop it without stopping its services:"]
        for i, step in enumerate(d.steps(), 1):
            lines.append(f"  {i}. {shlex.join(step)}")
        if d.init == "systemd":
            lines.append(f"  (1 moves every process of {d.unit} but pmond into {SCOPE}: systemd kills a unit's "
                         "whole cgroup when it stops)")
        lines.append("then import again, or let pmon2 do exactly this: pmon2 import pmon2-go --stop-old")
        err("\n".join(lines))
    return 1


def render(report: dict[str, Any]) -> str:
    dry = report["dry_run"]
    where = report["database"] + (f" (config {report['config']})" if report["config"] else "")
    lines = [f"{'dry run: nothing changed. ' if dry else ''}Pmon2 (Go) database {where}, "
             f"{len(report['services'])} service(s), {report['schema']} schema"]
    for step in report["stop_old"]:
        lines.append(f"  stop-old: {step}")
    rows = []
    for s in report["services"]:
        word = "already imported" if s.get("already_imported") else OUTCOMES[s["outcome"]][1 if dry else 0]
        name = s["name"] or s["go_name"]
        if s["outcome"] == "adopted":
            what = f"pid {s['pid']}: the same process, not restarted"
        elif s["outcome"] == "started":
            what = f"pid {s['pid']}" if s["pid"] else "no process of it runs"
        elif s["outcome"] == "stopped":
            what = f"Pmon2 had it {s['go_status']}"
        else:
            what = s.get("why") or ""
        rows.append((word, name, f"id {s['id']}" if s.get("id") else "", what))
    for r in report["ignored"]:
        rows.append(("ignored", r["go_name"], "", r["why"]))
    if rows:
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    for s in report["services"]:
        if s.get("renamed"):
            lines.append(f"renamed {s['go_name']!r} to {s['name']!r}: {s['renamed']}")
        for note in s.get("notes") or []:
            lines.append(f"{s['name'] or s['go_name']}: {note}")
    if dry:
        for d in report["go_pmond"]:
            lines.append(f"the Go pmond runs (pid {d['pid']}, {d['init']}); --stop-old would run: "
                         + "; ".join(d["steps"]))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
