"""`pmon2 startup` / `pmon2 unstartup`: run pmond as a systemd unit, so that it starts at boot.

Imported by these two commands only. The unit runs *this* installation's pmond (the package's
/usr/bin/pmond, the .pyz, or this interpreter with `-m pmon2.daemon`), for root as a system unit and for
other users as a `systemctl --user` unit, with PMON2_HOME carried over when it is set.

KillMode=process is the heart of it: services leave pmond's process tree (setsid + double fork) but not
the unit's cgroup, so with systemd's default KillMode=control-group `systemctl stop/restart pmond` would kill
every service. Nothing here ever stops or restarts a unit that lacks it. Like the packaged pmond.service, the
unit is Type=notify with a watchdog: pmond speaks sd_notify(3) (daemon/sdnotify.py).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from pmon2 import __version__, paths
from pmon2.errors import PmonError

# Not `typing`, like the rest of the CLI.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from pmon2.client import Client

UNIT_NAME = "pmond.service"
SYSTEM_UNIT_DIR = "/etc/systemd/system"
PACKAGE_LIB = "/usr/lib/pmon2"
PACKAGE_BIN = "/usr/bin"
SYSTEMD_RUN_DIR = "/run/systemd/system"
LINGER_DIR = "/var/lib/systemd/linger"
# Variables that move pmon2's files (paths.resolve): the unit's pmond must see the same ones as the CLI.
PATH_VARIABLES = ("PMON2_HOME",)
USER_PATH_VARIABLES = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")
START_TIMEOUT = 15.0

KILLMODE_COMMENT = """\
# KillMode=process, NOT the default control-group: pmond starts every service with setsid and a double
# fork, which leaves pmond's session and process tree but not this unit's cgroup. With KillMode=control-group,
# `systemctl stop pmond` or `systemctl restart pmond` would kill every service along with pmond. With
# KillMode=process only pmond gets the signal: the services keep running, and the next pmond re-adopts them.
# (No sandboxing options here either: the services would inherit them.)"""

NOTIFY_COMMENT = """\
# Type=notify: pmond says READY=1 (sd_notify(3)) once its API socket listens; WatchdogSec=: it says WATCHDOG=1
# from its event loop every 15 s, and a pmond that hangs is killed and started again (Restart=on-failure).
# NotifyAccess=main: only pmond itself may speak for the unit."""
NOTIFY_LINES = ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s")
LIMIT_COMMENT = """\
# pmond raises its soft limit to the hard one; services inherit the soft limit, 1024 (safe for select())."""
LIMIT_LINE = "LimitNOFILE=1024:524288"


class NoSystemd(PmonError):
    """systemd is not the init here. `hint` says what to do instead (a few lines, for stdout)."""

    code = "no_systemd"

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class Installation:
    """How this copy of pmon2 runs pmond (`pmond`) and its CLI (`cli`), and the environment both need."""

    __slots__ = ("cli", "env", "kind", "pmond")

    def __init__(self, kind: str, pmond: list[str], cli: list[str], env: dict[str, str]) -> None:
        self.kind = kind  # "package", "pyz" or "python"
        self.pmond = pmond
        self.cli = cli
        self.env = env

    def __repr__(self) -> str:
        return f"Installation({self.kind!r}, pmond={self.pmond!r}, cli={self.cli!r}, env={self.env!r})"


def package_root() -> str:
    """The directory (or .pyz file) that holds the `pmon2` package now running."""
    import pmon2

    return os.path.dirname(os.path.dirname(os.path.abspath(pmon2.__file__)))


def _on_default_path(root: str) -> bool:
    """Would `python -m pmon2.daemon` find this pmon2 without PYTHONPATH (a venv's or the system's site dir)?"""
    import site

    try:
        dirs = list(site.getsitepackages())
    except AttributeError:  # pragma: no cover - old virtualenv's site.py
        return False
    real = os.path.realpath(root)
    return any(os.path.realpath(d) == real for d in dirs)


def installation(environ: Mapping[str, str] | None = None, root: str | None = None,
                 executable: str | None = None, user: bool | None = None) -> Installation:
    environ = os.environ if environ is None else environ
    root = package_root() if root is None else root
    executable = os.path.abspath(executable or sys.executable)
    user = os.geteuid() != 0 if user is None else user
    # PMON2_HOME decides every path alone; otherwise a user's XDG dirs move them (paths.resolve).
    names = PATH_VARIABLES if environ.get("PMON2_HOME") or not user else PATH_VARIABLES + USER_PATH_VARIABLES
    env = {name: os.path.abspath(environ[name]) for name in names if environ.get(name)}
    pmond_script = os.path.join(PACKAGE_BIN, "pmond")
    if root == PACKAGE_LIB and os.access(pmond_script, os.X_OK):
        return Installation("package", [pmond_script], [os.path.join(PACKAGE_BIN, "pmon2")], env)
    if not executable or not os.path.isabs(executable):
        raise PmonError("cannot tell which python runs pmon2 (sys.executable is empty)")
    if os.path.isfile(root):  # a zipapp: `-m pmon2.daemon` imports from it through PYTHONPATH
        return Installation("pyz", [executable, "-m", "pmon2.daemon"], [executable, root],
                            {**env, "PYTHONPATH": root})
    if not _on_default_path(root):
        env["PYTHONPATH"] = root
    return Installation("python", [executable, "-m", "pmon2.daemon"], [executable, "-m", "pmon2"], env)


# the unit


def _unit_word(word: str, dollar: bool = True) -> str:
    """One word of a unit file's command line or Environment= (systemd.syntax(7) quoting)."""
    if any(c in word for c in "\n\r\0"):
        raise PmonError(f"cannot put {word!r} in a unit file: it holds a line break")
    word = word.replace("%", "%%")  # specifiers
    if dollar:
        word = word.replace("$", "$$")  # variable expansion (ExecStart= only)
    if word and all(c.isalnum() or c in "/._-+:,@=" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(inst: Installation, user: bool) -> str:
    who = "this user (systemctl --user)" if user else "root (system unit)"
    lines = [f"# pmond for {who}, written by `pmon2 startup` (pmon2 {__version__}); `pmon2 unstartup` removes it.",
             "[Unit]", "Description=pmon2 daemon (pmond): keeps services alive"]
    if not user:
        lines += ["After=network-online.target", "Wants=network-online.target"]
    lines += ["", "[Service]", NOTIFY_COMMENT, *NOTIFY_LINES,
              "ExecStart=" + " ".join(_unit_word(w) for w in inst.pmond)]
    lines += [f"Environment={_unit_word(f'{k}={v}', dollar=False)}" for k, v in sorted(inst.env.items())]
    lines += [LIMIT_COMMENT, LIMIT_LINE, "Restart=on-failure", "RestartSec=1",
              "# Exit status 3: another pmond already holds the pid file; restarting cannot help.",
              "RestartPreventExitStatus=3", KILLMODE_COMMENT, "KillMode=process", "",
              "[Install]", f"WantedBy={'default.target' if user else 'multi-user.target'}", ""]
    return "\n".join(lines)


def unit_path(user: bool, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    if not user:
        return os.path.join(SYSTEM_UNIT_DIR, UNIT_NAME)
    config = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(config, "systemd", "user", UNIT_NAME)


# without systemd


def systemd_running() -> bool:
    return os.path.isdir(SYSTEMD_RUN_DIR)


def shell_command(inst: Installation, *args: str) -> str:
    """The CLI as one line of sh, environment first: for crontab, or to copy into an init script."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(inst.env.items()))
    return (env + " " if env else "") + shlex.join([*inst.cli, *args])


def cron_line(inst: Installation) -> str:
    return "@reboot " + shell_command(inst, "daemon", "start").replace("%", "\\%")  # % is a newline to cron


def no_systemd(inst: Installation, removing: bool = False) -> NoSystemd:
    if removing:
        return NoSystemd(f"systemd is not running here (no {SYSTEMD_RUN_DIR}): there is no unit to remove",
                         "if you added an @reboot line for pmon2 to your crontab, remove it with  crontab -e")
    return NoSystemd(f"systemd is not running here (no {SYSTEMD_RUN_DIR}), so pmond cannot be a systemd unit",
                     "instead, start pmond at boot from cron: run  crontab -e  and add this line:\n"
                     f"{cron_line(inst)}\n"
                     "(in a container, make pmond the entrypoint instead: "
                     f"{shlex.join(inst.pmond) if inst.kind == 'package' else _pmond_shell(inst)})")


def _pmond_shell(inst: Installation) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(inst.env.items()))
    return (env + " " if env else "") + shlex.join(inst.pmond)


# systemctl


def _systemctl(user: bool, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["systemctl", *(["--user"] if user else []), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise PmonError("systemctl not found, though systemd seems to run here") from None
    except subprocess.TimeoutExpired:
        raise PmonError(f"{shlex.join(cmd)} did not finish within 90 s") from None
    if check and proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        hint = " (is there a user session? log in over ssh, or run as root)" if user and "bus" in detail else ""
        raise PmonError(f"{shlex.join(cmd)} failed: {detail}{hint}")
    return proc


def _show(user: bool, prop: str) -> str:
    return _systemctl(user, "show", "-p", prop, "--value", UNIT_NAME, check=False).stdout.strip()


def _active(user: bool) -> bool:
    return _systemctl(user, "is-active", "--quiet", UNIT_NAME, check=False).returncode == 0


def _require_killmode_process(user: bool, doing: str) -> None:
    mode = _show(user, "KillMode")
    if mode != "process":
        ctl = "systemctl --user" if user else "systemctl"
        raise PmonError(f"{UNIT_NAME} has KillMode={mode or '?'}, so {doing} it would kill every service; "
                        f"see `{ctl} cat {UNIT_NAME}` (a drop-in?) and set KillMode=process")


# the running pmond, through its API


def _client() -> Client:
    from pmon2.client import Client

    return Client(paths.resolve())


def _daemon_pid(client: Client) -> int | None:
    from pmon2.errors import DaemonUnreachable

    try:
        return int(client.request("GET", "/v1/daemon", autostart=False, timeout=5.0)["pid"])
    except DaemonUnreachable:
        return None


def _stop_daemon(client: Client, pid: int) -> None:
    """Stop pmond through its API (its services keep running) and wait until it is gone."""
    import select

    client.request("POST", "/v1/daemon/shutdown", autostart=False, timeout=10.0)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([fd], [], [], 10.0)[0]:
            raise PmonError(f"pmond (pid {pid}) did not stop within 10 s")
    finally:
        os.close(fd)


def _wait_started(client: Client, user: bool) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        pid = _daemon_pid(client)
        if pid:
            return pid
        if _show(user, "ActiveState") == "failed":
            break
        time.sleep(0.05)
    ctl, journal = ("systemctl --user", "journalctl --user") if user else ("systemctl", "journalctl")
    raise PmonError(f"{UNIT_NAME} did not start pmond; see `{ctl} status {UNIT_NAME}` and `{journal} -u {UNIT_NAME}`")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PmonError(f"cannot write {path}: {exc.strerror}") from None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


# the commands


def install(print_only: bool = False) -> str:
    """Write and enable the unit, and hand pmond over to systemd. Returns what to print."""
    user = os.geteuid() != 0
    inst = installation(user=user)
    text = unit_text(inst, user)
    if print_only:
        return text.rstrip("\n")
    if not systemd_running():
        raise no_systemd(inst)
    path = unit_path(user)
    changed = _read(path) != text
    if changed:
        _write(path, text)
    _systemctl(user, "daemon-reload")
    _systemctl(user, "enable", UNIT_NAME)
    _require_killmode_process(user, "restarting")
    client = _client()
    ctl = "systemctl --user" if user else "systemctl"
    out = [f"{'wrote' if changed else 'kept'} {path}; {UNIT_NAME} is enabled: pmond starts at boot"
           + (" (at your login; see below)" if user and not _lingering() else "")]
    running = _daemon_pid(client)
    owned = _active(user) and running is not None and str(running) == _show(user, "MainPID")
    if running and not owned:
        _stop_daemon(client, running)
        out.append(f"stopped pmond {running}, which ran outside systemd (its services keep running)")
    if owned and not changed:
        out.append(f"pmond already runs under systemd (pid {running}); `{ctl} status {UNIT_NAME}` shows it")
    else:
        if _active(user):
            _systemctl(user, "restart", UNIT_NAME)
        else:
            _systemctl(user, "reset-failed", UNIT_NAME, check=False)
            _systemctl(user, "start", UNIT_NAME)
        pid = _wait_started(client, user)
        out.append(f"pmond runs under systemd now (pid {pid}); services kept running and were re-adopted; "
                   f"`{ctl} status {UNIT_NAME}` shows it")
    if user and not _lingering():
        name = _user_name()
        out.append(f"note: a user unit starts when {name} logs in; to start it at boot without a login, "
                   f"run as root:  loginctl enable-linger {name}")
    return "\n".join(out)


def remove() -> str:
    """Disable, stop and delete the unit; the services keep running. Returns what to print."""
    user = os.geteuid() != 0
    if not systemd_running():
        raise no_systemd(installation(user=user), removing=True)
    path = unit_path(user)
    exists = os.path.exists(path)
    enabled = _systemctl(user, "is-enabled", "--quiet", UNIT_NAME, check=False).returncode == 0
    if not exists and not enabled and not _active(user):
        return f"no {UNIT_NAME} at {path} and none enabled: nothing to remove"
    if _active(user):
        _require_killmode_process(user, "stopping")
    out = []
    if enabled:
        _systemctl(user, "disable", UNIT_NAME)
        out.append(f"disabled {UNIT_NAME}")
    if _active(user):
        _systemctl(user, "stop", UNIT_NAME)
        out.append("stopped pmond (its services keep running; the next pmon2 command starts pmond again, "
                   "outside systemd)")
    if exists:
        try:
            os.unlink(path)
        except OSError as exc:
            raise PmonError(f"cannot remove {path}: {exc.strerror}") from None
        out.append(f"removed {path}")
    _systemctl(user, "daemon-reload")
    _systemctl(user, "reset-failed", UNIT_NAME, check=False)
    return "\n".join(out)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.geteuid())


def _lingering() -> bool:
    return os.path.exists(os.path.join(LINGER_DIR, _user_name()))
