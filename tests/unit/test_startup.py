"""`pmon2 startup` / `unstartup` (pmon2.startup): the unit text, what it runs, and life without systemd.

No real systemctl here: a fake records the calls. The run against a real pmond (a take-over from a pmond
started outside systemd) is in tests/integration/test_packaging.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pmon2 import startup
from pmon2.errors import PmonError

PY = "/opt/py/bin/python3"


def python_inst(env: dict[str, str] | None = None, user: bool = False,
                root: str = "/srv/app/src") -> startup.Installation:
    return startup.installation(environ=env or {}, root=root, executable=PY, user=user)


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file, comments and section headers left out."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_root_unit_runs_this_python_with_killmode_process() -> None:
    text = startup.unit_text(python_inst(), user=False)
    d = directives(text)
    assert d["ExecStart"] == [f"{PY} -m pmon2.daemon"]
    assert d["Environment"] == ["PYTHONPATH=/srv/app/src"]  # not a site dir: -m needs it
    assert d["KillMode"] == ["process"] and d["Type"] == ["notify"] and d["Restart"] == ["on-failure"]
    assert d["NotifyAccess"] == ["main"] and d["WatchdogSec"] == ["30s"] and d["LimitNOFILE"] == ["1024:524288"]
    assert d["WantedBy"] == ["multi-user.target"] and d["After"] == ["network-online.target"]
    assert "[Unit]" in text and "[Service]" in text and "[Install]" in text
    # The comment says why, right above the setting.
    assert "setsid" in text and "double" in text and "cgroup" in text and "control-group" in text


def test_user_unit_is_wanted_by_default_target() -> None:
    d = directives(startup.unit_text(python_inst(user=True), user=True))
    assert d["WantedBy"] == ["default.target"]
    assert "After" not in d and "Wants" not in d  # no network-online.target in a user manager
    assert d["KillMode"] == ["process"]


def test_unit_paths(tmp_path: Path) -> None:
    assert startup.unit_path(False) == "/etc/systemd/system/pmond.service"
    assert startup.unit_path(True, {"HOME": "/home/ann"}) == "/home/ann/.config/systemd/user/pmond.service"
    assert (startup.unit_path(True, {"HOME": "/home/ann", "XDG_CONFIG_HOME": "/cfg"})
            == "/cfg/systemd/user/pmond.service")


def test_pmon2_home_is_carried_as_an_absolute_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    inst = python_inst({"PMON2_HOME": "state", "XDG_DATA_HOME": "/x"}, user=True)
    d = directives(startup.unit_text(inst, user=True))
    assert f"PMON2_HOME={tmp_path / 'state'}" in d["Environment"]
    assert not any(e.startswith("XDG_") for e in d["Environment"])  # PMON2_HOME decides alone


def test_a_users_xdg_dirs_are_carried_but_not_roots() -> None:
    env = {"XDG_DATA_HOME": "/data/ann", "XDG_STATE_HOME": "/state/ann", "HOME": "/home/ann"}
    assert python_inst(env, user=True).env == {"XDG_DATA_HOME": "/data/ann", "XDG_STATE_HOME": "/state/ann",
                                               "PYTHONPATH": "/srv/app/src"}
    assert python_inst(env, user=False).env == {"PYTHONPATH": "/srv/app/src"}


def test_no_pythonpath_for_a_site_packages_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "_on_default_path", lambda root: True)
    inst = python_inst()
    assert inst.env == {} and inst.pmond == [PY, "-m", "pmon2.daemon"] and inst.cli == [PY, "-m", "pmon2"]


def test_pyz_runs_pmond_from_the_zip(tmp_path: Path) -> None:
    pyz = tmp_path / "pmon2.pyz"
    pyz.write_bytes(b"PK")
    inst = python_inst({"PMON2_HOME": "/srv/pm"}, root=str(pyz))
    assert inst.kind == "pyz" and inst.pmond == [PY, "-m", "pmon2.daemon"] and inst.cli == [PY, str(pyz)]
    assert inst.env == {"PMON2_HOME": "/srv/pm", "PYTHONPATH": str(pyz)}


def test_package_runs_usr_bin_pmond(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("pmond", "pmon2"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setattr(startup, "PACKAGE_BIN", str(tmp_path))
    inst = python_inst(root="/usr/lib/pmon2")
    assert inst.kind == "package" and inst.pmond == [str(tmp_path / "pmond")] and inst.env == {}
    assert directives(startup.unit_text(inst, user=False))["ExecStart"] == [str(tmp_path / "pmond")]


def test_unit_quoting_of_odd_paths() -> None:
    inst = startup.Installation("python", ["/opt/my py/bin/python3", "-m", "pmon2.daemon"], [],
                                {"PMON2_HOME": '/srv/100%/$HOME "x"'})
    d = directives(startup.unit_text(inst, user=False))
    assert d["ExecStart"] == ['"/opt/my py/bin/python3" -m pmon2.daemon']
    assert d["Environment"] == ['"PMON2_HOME=/srv/100%%/$HOME \\"x\\""']  # % is a specifier; no $ expansion here
    money = startup.Installation("python", ["/opt/$x/python3"], [], {})
    assert directives(startup.unit_text(money, user=False))["ExecStart"] == ['"/opt/$$x/python3"']
    with pytest.raises(PmonError):
        startup.unit_text(startup.Installation("python", ["/a\nb"], [], {}), user=False)


def test_print_only_needs_no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "systemd_running", lambda: False)
    monkeypatch.setattr(startup, "_systemctl", fail_systemctl)
    text = startup.install(print_only=True)
    d = directives(text)
    assert d["ExecStart"][0].split()[0] == sys.executable and d["KillMode"] == ["process"]
    assert not text.endswith("\n")  # the CLI adds it


def fail_systemctl(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"systemctl called: {args}")


def test_without_systemd_one_line_and_a_cron_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "systemd_running", lambda: False)
    monkeypatch.setattr(startup, "_systemctl", fail_systemctl)
    monkeypatch.setenv("PMON2_HOME", "/srv/pm 1")
    with pytest.raises(startup.NoSystemd) as err:
        startup.install()
    assert "\n" not in err.value.message and "systemd is not running" in err.value.message
    assert isinstance(err.value, PmonError)
    cron = next(line for line in err.value.hint.splitlines() if line.startswith("@reboot "))
    words = shlex.split(cron.removeprefix("@reboot "))
    assert words[0] == "PMON2_HOME=/srv/pm 1" and words[-2:] == ["daemon", "start"]
    assert sys.executable in words
    with pytest.raises(startup.NoSystemd) as err:
        startup.remove()
    assert "\n" not in err.value.message and "crontab" in err.value.hint


def test_cron_line_escapes_percent() -> None:
    inst = startup.Installation("pyz", [], ["/usr/bin/python3", "/opt/100%/pmon2.pyz"], {})
    assert startup.cron_line(inst) == "@reboot /usr/bin/python3 /opt/100\\%/pmon2.pyz daemon start"


class FakeSystemctl:
    """Answers like systemctl for one unit, with no processes behind it."""

    def __init__(self, active: bool = False, killmode: str = "process", main_pid: int = 0) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.active, self.killmode, self.main_pid, self.enabled = active, killmode, main_pid, False

    def __call__(self, user: bool, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        out, code = "", 0
        if args[0] == "show":
            out = {"KillMode": self.killmode, "MainPID": str(self.main_pid),
                   "ActiveState": "active" if self.active else "inactive"}[args[2]]
        elif args[0] == "is-active":
            code = 0 if self.active else 3
        elif args[0] == "is-enabled":
            code = 0 if self.enabled else 1
        elif args[0] == "enable":
            self.enabled = True
        elif args[0] == "disable":
            self.enabled = False
        elif args[0] in ("start", "restart"):
            self.active = True
        elif args[0] == "stop":
            self.active = False
        return subprocess.CompletedProcess(["systemctl", *args], code, out, "")

    def verbs(self) -> list[str]:
        return [c[0] for c in self.calls if c[0] not in ("show", "is-active", "is-enabled")]


@pytest.fixture
def fake_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSystemctl:
    fake = FakeSystemctl()
    monkeypatch.setattr(startup, "systemd_running", lambda: True)
    monkeypatch.setattr(startup, "_systemctl", fake)
    monkeypatch.setattr(startup, "unit_path", lambda user, environ=None: str(tmp_path / "units" / "pmond.service"))
    monkeypatch.setattr(startup, "_client", lambda: object())
    monkeypatch.setattr(startup, "_lingering", lambda: True)
    return fake


def test_install_writes_enables_and_starts(monkeypatch: pytest.MonkeyPatch, fake_systemd: FakeSystemctl,
                                           tmp_path: Path) -> None:
    pids = iter([None, 4242])
    monkeypatch.setattr(startup, "_daemon_pid", lambda client: next(pids))
    out = startup.install()
    unit = tmp_path / "units" / "pmond.service"
    assert directives(unit.read_text())["KillMode"] == ["process"]
    assert fake_systemd.verbs() == ["daemon-reload", "enable", "reset-failed", "start"]
    assert "pid 4242" in out and str(unit) in out


def test_install_takes_over_a_pmond_outside_systemd(monkeypatch: pytest.MonkeyPatch,
                                                    fake_systemd: FakeSystemctl) -> None:
    pids = iter([1111, 2222])
    stopped: list[int] = []
    monkeypatch.setattr(startup, "_daemon_pid", lambda client: next(pids))
    monkeypatch.setattr(startup, "_stop_daemon", lambda client, pid: stopped.append(pid))
    out = startup.install()
    assert stopped == [1111]
    assert fake_systemd.verbs()[-1] == "start"
    assert "stopped pmond 1111" in out and "services keep running" in out and "pid 2222" in out


def test_install_again_changes_nothing(monkeypatch: pytest.MonkeyPatch, fake_systemd: FakeSystemctl) -> None:
    monkeypatch.setattr(startup, "_daemon_pid", lambda client: 4242)
    monkeypatch.setattr(startup, "_wait_started", lambda client, user: 4242)
    fake_systemd.active, fake_systemd.main_pid = True, 4242
    startup.install()  # a new unit file: restart (KillMode=process), so that pmond runs what it says
    assert fake_systemd.verbs()[-1] == "restart"
    fake_systemd.calls = []
    out = startup.install()
    assert "restart" not in fake_systemd.verbs() and "start" not in fake_systemd.verbs()
    assert "already runs under systemd" in out


def test_never_restarts_a_unit_without_killmode_process(monkeypatch: pytest.MonkeyPatch,
                                                        fake_systemd: FakeSystemctl) -> None:
    fake_systemd.active, fake_systemd.killmode = True, "control-group"
    monkeypatch.setattr(startup, "_daemon_pid", fail_systemctl)
    with pytest.raises(PmonError, match="KillMode=control-group"):
        startup.install()
    assert "restart" not in fake_systemd.verbs() and "stop" not in fake_systemd.verbs()
    with pytest.raises(PmonError, match="would kill every service"):
        startup.remove()
    assert "stop" not in fake_systemd.verbs()


def test_remove_disables_stops_and_deletes(monkeypatch: pytest.MonkeyPatch, fake_systemd: FakeSystemctl,
                                           tmp_path: Path) -> None:
    unit = tmp_path / "units" / "pmond.service"
    assert "nothing to remove" in startup.remove()
    unit.parent.mkdir()
    unit.write_text("[Service]\n")
    fake_systemd.active, fake_systemd.enabled = True, True
    out = startup.remove()
    assert not unit.exists()
    assert fake_systemd.verbs() == ["disable", "stop", "daemon-reload", "reset-failed"]
    assert "services keep running" in out


def test_user_mode_notes_linger(monkeypatch: pytest.MonkeyPatch, fake_systemd: FakeSystemctl) -> None:
    monkeypatch.setattr(startup.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(startup, "_lingering", lambda: False)
    monkeypatch.setattr(startup, "_user_name", lambda: "ann")
    monkeypatch.setattr(startup, "_daemon_pid", lambda client: None)
    monkeypatch.setattr(startup, "_wait_started", lambda client, user: 77)
    out = startup.install()
    assert "loginctl enable-linger ann" in out
    assert "default.target" in Path(startup.unit_path(True)).read_text()


def test_systemctl_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "Failed to connect to bus: No medium found\n")

    monkeypatch.setattr(startup.subprocess, "run", run)
    with pytest.raises(PmonError) as err:
        startup._systemctl(True, "daemon-reload")
    assert "\n" not in err.value.message and "systemctl --user daemon-reload failed" in err.value.message
    assert "user session" in err.value.message
