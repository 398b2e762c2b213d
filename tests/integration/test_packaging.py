"""Deployment (issue 5, issue 11): the README's Install commands in a fresh copy of the tree, the one-file .pyz,
the .deb and .rpm, and `pmon2 startup` handing pmond to systemd.

The README's Install commands run as written (`/opt/pmon2` replaced by a temporary directory) in a copy of
this tree (`git ls-files -co --exclude-standard`: uncommitted changes included, no .venv, no build output),
with the PATH of a fresh login, the way a new user runs them: `pip install .` before and after the builds,
`make pyz`, `make deb`, `make rpm` (which fetch the dependencies into their own .build/venv), and, as root,
`apt install` of the .deb for real, then its removal and purge. pip's cache (~/.cache/pip, or PIP_CACHE_DIR)
is reused from run to run. These steps are marked slow; CI runs them.

The .pyz is then run the way a user without any install runs it: /usr/bin/python3 -I, from a directory where
pmon2 is not installed. The packages are inspected with dpkg-deb / rpm and their code is run from an
extracted tree. Tools that may be missing (rpmbuild, systemd-analyze) skip their checks.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pmon2 import __version__, startup
from pmon2.config import load
from pmon2.paths import resolve

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DEB_FILES = ("/usr/lib/pmon2/pmon2/cli.py", "/usr/lib/pmon2/pmon2/__pycache__/cli.cpython-311.pyc",
             "/usr/lib/pmon2/h11/__init__.py", "/usr/lib/pmon2/textual/app.py", "/usr/bin/pmon2", "/usr/bin/pmond",
             "/etc/pmon2/config.toml", "/usr/share/bash-completion/completions/pmon2")
# A fresh root login's PATH: no .venv, no pyenv.
FRESH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The README's Install commands, word for word (checked against the README below).
PIP_INSTALL = "python3 -m venv /opt/pmon2 && /opt/pmon2/bin/pip install ."
APT_INSTALL = f"apt install ./dist/pmon2_{VERSION}_all.deb"
DNF_INSTALL = f"dnf install ./dist/pmon2-{VERSION}-1.noarch.rpm"
README_COMMANDS = (PIP_INSTALL, "make pyz", "python3 pmon2.pyz run ...", "make deb", "make rpm", APT_INSTALL,
                   DNF_INSTALL)
# Not copied into the fresh tree whatever .gitignore says: a venv, the builds' scratch and results.
NOT_COPIED = {".venv", ".build", "build", "dist", ".git"}
BUILD_TIMEOUT = 240.0  # one command (pip from PyPI, xz of the packages), on a busy 2-core machine

pytestmark = pytest.mark.timeout(90)


def slow(func: Any) -> Any:
    """The steps that build in a fresh tree: the first test to use it pays for the builds (about 1-2 minutes)."""
    return pytest.mark.slow(pytest.mark.timeout(360)(func))


def system_python_ok() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    proc = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import sys; print(sys.version_info >= (3, 11))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() == "True"


needs_system_python = pytest.mark.skipif(not system_python_ok(), reason=f"no {SYSTEM_PYTHON} >= 3.11")


def sh(*cmd: str | Path, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    what = shlex.join(str(c) for c in cmd)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


def fresh_env() -> dict[str, str]:
    """A fresh login's environment, keeping only how to reach a package index (pip's settings, proxies)."""
    env = {"PATH": FRESH_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    passed = ("PIP_", "XDG_CACHE_HOME", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "http_proxy", "https_proxy", "no_proxy",
              "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
    env.update({k: v for k, v in os.environ.items() if k.startswith(passed)})
    return env


def copy_tree(dest: Path) -> None:
    """This checkout as a fresh clone of it would be, plus its uncommitted changes and new files."""
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout: cannot tell the tree's files from its build products")
    listed = sh("git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    for rel in sorted(set(listed.split("\0")) - {""}):
        src = ROOT / rel
        if rel.split("/")[0] in NOT_COPIED or not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree, or never part of a clone
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)


@dataclass
class Fresh:
    """A fresh copy of the tree where the README's Install commands ran, and what each one printed."""

    tree: Path
    venv: Path  # /opt/pmon2 of the README
    env: dict[str, str]
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, step: str, command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """One README command, through sh, in the tree."""
        started = time.monotonic()
        proc = sh("sh", "-c", command.replace("/opt/pmon2", str(self.venv)), cwd=self.tree, env=env or self.env,
                  stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT)
        self.runs[step], self.seconds[step] = proc, time.monotonic() - started
        return proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Fresh:
    base = tmp_path_factory.mktemp("fresh")
    tree = base / "pmon2"
    copy_tree(tree)
    env = fresh_env()
    probe = subprocess.run(["python3", "-c", "import sys; print(sys.version_info >= (3, 11))"], capture_output=True,
                           text=True, env=env)
    if probe.stdout.strip() != "True":
        pytest.skip(f"no python3 >= 3.11 on {FRESH_PATH}")
    for tool in ("make", "dpkg-deb"):
        assert shutil.which(tool, path=FRESH_PATH), f"{tool} is not installed (.ci/run installs it)"
    fresh = Fresh(tree, base / "opt-pmon2", env)
    fresh.run("pip before make", PIP_INSTALL)
    fresh.run("make pyz", "make pyz")
    fresh.run("make deb", "make deb")
    if shutil.which("rpmbuild"):
        fresh.run("make rpm", "make rpm")
    fresh.run("pip after make", PIP_INSTALL)
    print("fresh tree, seconds per step:", json.dumps({k: round(v, 1) for k, v in fresh.seconds.items()}),
          file=sys.stderr)
    return fresh


@pytest.fixture(scope="module")
def dist(fresh: Fresh) -> dict[str, Path]:
    found = {"pyz": fresh.tree / "dist/pmon2.pyz", "deb": fresh.tree / "dist" / f"pmon2_{VERSION}_all.deb",
             "rpm": fresh.tree / "dist" / f"pmon2-{VERSION}-1.noarch.rpm"}
    for target in ("pyz", "deb", "rpm"):
        assert found[target].is_file() or (target == "rpm" and not shutil.which("rpmbuild")), \
            f"{found[target]} was not built"
    return found


@pytest.fixture(scope="module")
def deb_tree(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("debroot")
    sh("dpkg-deb", "-x", dist["deb"], tree)
    return tree


def clean_env(home: Path) -> dict[str, str]:
    """What a fresh login has: no PYTHONPATH, no venv."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            "PMON2_HOME": str(home), "NO_COLOR": "1"}


# the README's Install commands, in a fresh tree


def install_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]


def test_readme_install_section_has_the_commands_tested_here() -> None:
    section = install_section()
    for command in README_COMMANDS:
        assert f"`{command}`" in section, command
    assert "python3-venv" in section  # what a fresh Debian or Ubuntu needs for these commands


@slow
def test_pip_install_works_before_and_after_the_builds(fresh: Fresh) -> None:
    for step in ("pip before make", "pip after make"):
        assert "Successfully installed" in fresh.runs[step].stdout and "pmon2-" in fresh.runs[step].stdout, step
    out = sh(fresh.venv / "bin/pmon2", "version", env=clean_env(fresh.tree / "home")).stdout
    assert out.splitlines() == [f"pmon2 {__version__}", "pmond not running"]
    # What the builds leave is theirs alone: nothing staged in setuptools' build/ (that broke `pip install .`).
    assert not list((fresh.tree / "build").glob("lib/pmon2-*.dist-info"))
    assert not (fresh.tree / "build/lib/h11").exists() and not (fresh.tree / "build/lib/textual").exists()


@slow
def test_builds_fetch_their_dependencies_into_their_own_venv(fresh: Fresh) -> None:
    venv = fresh.tree / ".build/venv"
    stamp = json.loads((venv / "pmon2-build.json").read_text())
    assert stamp["dependencies"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    log = fresh.runs["make pyz"].stderr
    assert f"-m venv {venv}" in log and "fetching h11" in log, log
    for step in ("make deb", "make rpm"):  # made once, then reused: no second download
        if step in fresh.runs:
            assert "fetching" not in fresh.runs[step].stderr and "-m venv" not in fresh.runs[step].stderr, step
    code = "import textual, h11; print(textual.__file__)"
    where = sh(venv / "bin/python", "-I", "-c", code).stdout.strip()
    assert where.startswith(f"{venv}/lib/"), where
    # The one file runs as the README says, with python3 and nothing else.
    out = sh("python3", "dist/pmon2.pyz", "version", cwd=fresh.tree, env=dict(fresh.env, PMON2_HOME=str(
        fresh.tree / "home"))).stdout
    assert out.splitlines() == [f"pmon2 {__version__}", "pmond not running"]


# the one-file zipapp


@slow
def test_pyz_is_one_self_contained_file(dist: dict[str, Path]) -> None:
    pyz = dist["pyz"]
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(pyz, os.X_OK)
    names = set(zipfile.ZipFile(pyz).namelist())
    assert "__main__.py" in names
    for module in ("pmon2/cli", "pmon2/daemon/main", "h11/__init__", "textual/app", "rich/console"):
        assert f"{module}.py" in names and f"{module}.pyc" in names, module  # legacy .pyc next to the .py
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    assert not [n for n in names if "__pycache__" in n]
    assert any(n.startswith("textual-") and n.endswith(".dist-info/METADATA") for n in names)


@slow
@needs_system_python
def test_pyz_runs_a_service_with_no_install(pmon: Any, dist: dict[str, Path]) -> None:
    pyz = pmon.work / "pmon2.pyz"
    shutil.copyfile(dist["pyz"], pyz)
    pmon.env = clean_env(pmon.home)
    pmon.cmd = lambda *args: [SYSTEM_PYTHON, "-I", str(pyz), *args]
    assert pmon.run("version").stdout.splitlines() == [f"pmon2 {__version__}", "pmond not running"]

    svc = pmon.start_service("sleep", "616161", "--name", "zipped")  # starts pmond from the zip
    [listed] = pmon.services()
    assert (listed["name"], listed["status"], listed["pid"]) == ("zipped", "running", svc["pid"])
    daemon = pmon.daemon_pid()
    assert daemon and pmon.is_alive(daemon)
    assert Path(f"/proc/{daemon}/cmdline").read_bytes().split(b"\0")[:3] == [SYSTEM_PYTHON.encode(), b"-m",
                                                                             b"pmon2.daemon"]
    assert f"PYTHONPATH={pyz}".encode() in Path(f"/proc/{daemon}/environ").read_bytes().split(b"\0")

    pmon.run("stop", "zipped")
    pmon.wait_dead(svc["pid"], what="the stopped service")
    assert pmon.desc("zipped")["status"] == "stopped"
    pmon.run("daemon", "stop")
    pmon.wait_dead(daemon, what="pmond")


@slow
@needs_system_python
def test_pyz_imports_pmond_and_the_dashboard_from_the_zip(dist: dict[str, Path], tmp_path: Path) -> None:
    pyz = dist["pyz"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import h11, pmon2.daemon.main, pmon2.render.dashboard, "
            "textual; print(h11.__file__); print(pmon2.render.dashboard.__file__); print(textual.__version__)")
    out = sh(SYSTEM_PYTHON, "-I", "-c", code, pyz, cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(f"{pyz}/h11/") and out[1].startswith(f"{pyz}/pmon2/render/dashboard.py")
    assert out[2]  # textual's version comes from its dist-info, read inside the zip
    # Under the name pmond, the same file is the daemon.
    (tmp_path / "pmond").symlink_to(pyz)
    assert sh(SYSTEM_PYTHON, "-I", tmp_path / "pmond", "--version", cwd=tmp_path).stdout.strip() == f"pmond {VERSION}"


# the .deb


@slow
def test_deb_metadata_and_files(dist: dict[str, Path]) -> None:
    deb = dist["deb"]
    info = sh("dpkg-deb", "-I", deb).stdout
    for line in ("Package: pmon2", f"Version: {VERSION}", "Architecture: all", "Depends: python3 (>= 3.11)"):
        assert f" {line}\n" in info, line
    conffiles = sh("dpkg-deb", "-I", deb, "conffiles").stdout.split()
    assert sorted(conffiles) == ["/etc/pmon2/config.toml"]
    listing = sh("dpkg-deb", "-c", deb).stdout
    files = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    for path in (*DEB_FILES, "/lib/systemd/system/pmond.service"):
        assert path in files, path
    assert " root/root " in listing.splitlines()[0]


@slow
def test_deb_unit_and_maintainer_scripts(dist: dict[str, Path], deb_tree: Path, tmp_path: Path) -> None:
    unit = (deb_tree / "lib/systemd/system/pmond.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s", "LimitNOFILE=1024:524288",
                 "ExecStart=/usr/bin/pmond", "Restart=on-failure", "KillMode=process"):
        assert f"\n{line}\n" in unit, line
    # The packaged unit and the one `pmon2 startup` writes agree on these.
    generated = startup.unit_text(startup.installation(user=False), user=False)
    for line in (*startup.NOTIFY_LINES, startup.LIMIT_LINE, "KillMode=process"):
        assert f"\n{line}\n" in generated, line
    assert "setsid" in unit and "control-group" in unit  # the comment says why
    sh("dpkg-deb", "-e", dist["deb"], tmp_path / "control")
    scripts = {name: (tmp_path / "control" / name).read_text() for name in ("postinst", "prerm", "postrm")}
    for name, text in scripts.items():
        sh("sh", "-n", tmp_path / "control" / name)
        assert "[ -d /run/systemd/system ]" in text or name == "postrm", name
    assert all(f"systemctl {verb} pmond.service" in scripts["postinst"] for verb in ("enable", "restart", "start"))
    assert "daemon-reload" in scripts["postinst"]
    prerm = scripts["prerm"]
    assert re.findall(r"^(\S+)\)$", prerm, re.M) == ["remove"]  # not on upgrade
    assert "systemctl stop pmond.service" in prerm and "systemctl disable pmond.service" in prerm
    # Without systemd, a pmond that the CLI started is restarted on the new code, and stopped on removal.
    assert "daemon stop" in scripts["postinst"] and "daemon start" in scripts["postinst"]
    assert "daemon stop" in prerm


@slow
@needs_system_python
def test_deb_code_runs_from_the_extracted_tree(deb_tree: Path, tmp_path: Path) -> None:
    lib = deb_tree / "usr/lib/pmon2"
    env = clean_env(tmp_path / "home")
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from pmon2.cli import main; sys.exit(main())"
    out = sh(SYSTEM_PYTHON, "-I", "-S", "-c", code, lib, "version", env=env, cwd=tmp_path).stdout
    assert out.splitlines() == [f"pmon2 {__version__}", "pmond not running"]
    # The shipped scripts, pointed at the extracted tree instead of /usr/lib/pmon2.
    for name, expected in (("pmon2", f"pmon2 {VERSION}"), ("pmond", f"pmond {VERSION}")):
        script = (deb_tree / "usr/bin" / name).read_text()
        assert script.startswith("#!/usr/bin/python3 -IS\n") and '"/usr/lib/pmon2"' in script
        copy = tmp_path / name
        copy.write_text(script.replace('"/usr/lib/pmon2"', repr(str(lib))))
        assert sh(SYSTEM_PYTHON, "-I", "-S", copy, "--version", env=env).stdout.strip() == expected
    # Bytecode that this interpreter's path importer takes as it is (unchecked hash: no mtime to go stale).
    pyc = (lib / "pmon2/__pycache__/cli.cpython-311.pyc").read_bytes()
    if sys.implementation.cache_tag == "cpython-311":
        assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 0b01


@slow
def test_default_config_is_valid_commented_or_not(deb_tree: Path, tmp_path: Path) -> None:
    text = (deb_tree / "etc/pmon2/config.toml").read_text()
    paths = resolve({"PMON2_HOME": str(tmp_path)})
    (tmp_path / "config.toml").write_text(text)
    assert load(paths).kill_timeout == 5.0  # all commented: the defaults
    settings = [m.group(1) for m in re.finditer(r"^# ([a-z_]+ = \S+)", text, re.M)]
    keys = {s.split(" = ")[0] for s in settings}
    assert {"data_dir", "log_dir", "kill_timeout", "min_uptime"} <= keys
    (tmp_path / "config.toml").write_text("\n".join(settings) + "\n")
    config = load(paths)  # every key known, every value accepted
    assert config.paths.data_dir == "/etc/pmon2/data" and config.paths.log_dir == "/var/log/pmon2"


@slow
def test_no_logrotate_file(deb_tree: Path) -> None:
    # pmond rotates every log itself, pmond.log too: a logrotate file would rotate them a second time.
    assert not (deb_tree / "etc/logrotate.d").exists()


@slow
def test_bash_completion_is_generated(deb_tree: Path) -> None:
    path = deb_tree / "usr/share/bash-completion/completions/pmon2"
    text = path.read_text()
    assert "complete -F _pmon2 pmon2" in text and "monit" in text
    sh("bash", "-n", path)


def verify(unit_text: str, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "verify" / "pmond.service"
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(unit_text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "pmond.service" not in proc.stderr, proc.stderr


@slow
def test_units_pass_systemd_analyze_verify(deb_tree: Path, tmp_path: Path) -> None:
    shipped = (deb_tree / "lib/systemd/system/pmond.service").read_text()
    # ExecStart must exist for verify: use the extracted pmond.
    verify(shipped.replace("ExecStart=/usr/bin/pmond", f"ExecStart={deb_tree}/usr/bin/pmond"), tmp_path)
    inst = startup.installation(user=False)
    verify(startup.unit_text(inst, user=False), tmp_path)
    verify(startup.unit_text(startup.installation(user=True), user=True), tmp_path)


# the .deb, installed for real (as root)

APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
ROOT_DIRS = ("/etc/pmon2", "/var/log/pmon2", "/run/pmon2")  # root mode's config and data, logs, socket


def package_processes() -> set[int]:
    """Live processes that run the installed package's code: a pmond started by /usr/bin/pmon2 (its
    PYTHONPATH is /usr/lib/pmon2), /usr/bin/pmond, and pmond's launcher (its code is in /usr/lib/pmon2)."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            environ = b"\0" + Path(f"/proc/{name}/environ").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and (b"/usr/lib/pmon2" in cmdline or b"/usr/bin/pmond" in cmdline
                                         or b"\0PYTHONPATH=/usr/lib/pmon2" in environ):
            found.add(int(name))
    return found


def package_state() -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", "pmon2"], capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


@contextlib.contextmanager
def leaves_no_trace() -> Iterator[None]:
    """Afterwards: the package purged, every process it ran killed (by pid), and the group and root-mode
    directories that its installation created removed."""
    before = package_processes()
    had_group = bool(subprocess.run(["getent", "group", "pmon2"], capture_output=True).returncode == 0)
    had_dirs = {d for d in ROOT_DIRS if os.path.lexists(d)}
    try:
        yield
    finally:
        if package_state():
            subprocess.run(["dpkg", "--purge", "pmon2"], capture_output=True, timeout=120,
                           env=dict(fresh_env(), **APT_ENV))
        for pid in package_processes() - before:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for d in set(ROOT_DIRS) - had_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if not had_group:
            with contextlib.suppress(KeyError):
                grp.getgrnam("pmon2")
                subprocess.run(["groupdel", "pmon2"], capture_output=True, timeout=30)


@slow
def test_deb_installs_runs_and_goes_away_with_apt_and_dpkg(fresh: Fresh, dist: dict[str, Path], pmon: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: apt install of the .deb")
    if not shutil.which("apt", path=FRESH_PATH):
        pytest.skip("not a Debian or Ubuntu machine: no apt")
    if package_state():
        pytest.skip(f"pmon2 is installed on this machine ({package_state()}): not touching it")
    root_env = dict(fresh.env, **APT_ENV)
    with leaves_no_trace():
        before = package_processes()
        fresh.run("apt install", APT_INSTALL, env=root_env)  # the README's command, as written, in the fresh tree
        assert package_state() == f"install ok installed {VERSION}"
        assert sh("/usr/bin/pmon2", "version", env=root_env).stdout.splitlines() == [f"pmon2 {__version__}",
                                                                                   "pmond not running"]
        assert sh("/usr/bin/pmond", "--version", env=root_env).stdout.strip() == f"pmond {VERSION}"
        assert package_processes() == before, "installing started a pmond"  # no pmond ran, and no systemd here

        # A service under the installed pmond, in a private home (the fixture kills what is left, by pid).
        pmon.env = clean_env(pmon.home)
        pmon.cmd = lambda *args: ["/usr/bin/pmon2", *args]
        svc = pmon.start_service("sleep", "636363", "--name", "packaged")
        daemon = pmon.daemon_pid()
        assert b"PYTHONPATH=/usr/lib/pmon2" in Path(f"/proc/{daemon}/environ").read_bytes().split(b"\0")
        pmon.run("stop", "packaged")
        pmon.wait_dead(svc["pid"], what="the stopped service")
        pmon.run("daemon", "stop")
        pmon.wait_dead(daemon, what="the private pmond")

        # Root mode's pmond, started by the CLI: removing the package (prerm, no systemd here) stops it.
        sh("/usr/bin/pmon2", "daemon", "start", env=root_env)
        root_pmond = int(Path("/run/pmon2/pmond.pid").read_text())
        assert root_pmond in package_processes()
        removed = sh("dpkg", "-r", "pmon2", env=root_env, timeout=120)
        assert "pmond stopped" in removed.stdout + removed.stderr
        pmon.wait_dead(root_pmond, what="root's pmond after dpkg -r")
        assert package_state().startswith("deinstall ok config-files")
        sh("dpkg", "--purge", "pmon2", env=root_env, timeout=120)
        assert package_state() == ""
        assert not os.path.lexists("/usr/bin/pmon2") and not os.path.lexists("/usr/lib/pmon2")
        pmon.wait_for(lambda: not package_processes() - before, message="no process of the package left")


# the .rpm


@slow
def test_rpm_files_and_metadata(dist: dict[str, Path], tmp_path: Path) -> None:
    if not shutil.which("rpmbuild"):
        pytest.skip("rpmbuild is not installed (apt-get install rpm)")
    rpm = dist["rpm"]
    info = dict(re.findall(r"^(\w[\w ]*?)\s*: (.*)$", sh("rpm", "-qpi", rpm).stdout, re.M))
    expected = {"Name": "pmon2", "Version": VERSION, "Release": "1", "Architecture": "noarch", "License": "MIT",
                "Summary": "Process manager for Linux servers"}
    assert {k: info.get(k) for k in expected} == expected, info
    files = set(sh("rpm", "-qlp", rpm).stdout.split())
    for path in (*DEB_FILES, "/usr/lib/systemd/system/pmond.service"):
        assert path in files, path
    assert set(sh("rpm", "-qp", "--configfiles", rpm).stdout.split()) == {"/etc/pmon2/config.toml"}
    assert "python3 >= 3.11" in sh("rpm", "-qp", "--requires", rpm).stdout
    assert sh("rpm", "-qp", "--qf", "%{ARCH} %{VERSION}-%{RELEASE}", rpm).stdout == f"noarch {VERSION}-1"
    scripts = sh("rpm", "-qp", "--scripts", rpm).stdout
    assert "systemctl enable pmond.service" in scripts and "systemctl stop pmond.service" in scripts
    if shutil.which("rpm2cpio") and shutil.which("cpio"):
        sh("sh", "-c", f"rpm2cpio {shlex.quote(str(rpm))} | cpio -idm --quiet", cwd=tmp_path)
        assert "\nKillMode=process\n" in (tmp_path / "usr/lib/systemd/system/pmond.service").read_text()


# pmon2 startup against a real pmond, with a stand-in for systemd


class ProcessSystemd:
    """A systemctl for one unit that really runs its ExecStart= (KillMode=process: stop signals pmond only)."""

    def __init__(self, unit: Path) -> None:
        self.unit = unit
        self.proc: subprocess.Popen[bytes] | None = None
        self.enabled = False
        self.calls: list[tuple[str, ...]] = []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def directives(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for line in self.unit.read_text().splitlines() if self.unit.exists() else []:
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                out.setdefault(key, []).append(value)
        return out

    def start(self) -> None:
        d = self.directives()
        env = dict(os.environ)
        for item in d.get("Environment", []):
            key, _, value = shlex.split(item)[0].replace("%%", "%").partition("=")
            env[key] = value
        argv = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(d["ExecStart"][0])]
        self.proc = subprocess.Popen(argv, env=env, cwd="/", start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.alive():
            assert self.directives()["KillMode"] == ["process"]
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def __call__(self, user: bool, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        verb, out, code = args[0], "", 0
        if verb in ("start", "restart"):
            self.stop()
            self.start()
        elif verb == "stop":
            self.stop()
        elif verb == "is-active":
            code = 0 if self.alive() else 3
        elif verb == "is-enabled":
            code = 0 if self.enabled else 1
        elif verb in ("enable", "disable"):
            self.enabled = verb == "enable"
        elif verb == "show":
            out = {"MainPID": str(self.proc.pid) if self.alive() and self.proc else "0",
                   "KillMode": (self.directives().get("KillMode") or [""])[0],
                   "ActiveState": "active" if self.alive() else "inactive"}[args[2]]
        return subprocess.CompletedProcess(["systemctl", *args], code, out, "")


@pytest.fixture
def fake_systemd(pmon: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ProcessSystemd]:
    fake = ProcessSystemd(tmp_path / "pmond.service")
    monkeypatch.setenv("PMON2_HOME", str(pmon.home))
    monkeypatch.delenv("PMON2_EXIT_STATUS", raising=False)
    monkeypatch.setattr(startup.os, "geteuid", lambda: 0)
    monkeypatch.setattr(startup, "systemd_running", lambda: True)
    monkeypatch.setattr(startup, "_systemctl", fake)
    monkeypatch.setattr(startup, "unit_path", lambda user, environ=None: str(fake.unit))
    try:
        yield fake
    finally:
        if fake.proc is not None:
            with contextlib.suppress(OSError):
                fake.proc.kill()
            fake.proc.wait(10)


def test_startup_hands_a_running_pmond_to_systemd_and_unstartup_takes_it_back(
        pmon: Any, fake_systemd: ProcessSystemd, tmp_path: Path) -> None:
    svc = pmon.start_service("sleep", "626262", "--name", "boot")
    outside = pmon.daemon_pid()
    out = startup.install()
    assert f"stopped pmond {outside}" in out, out
    pmon.wait_dead(outside, what="the pmond started outside systemd")
    unit = fake_systemd.directives()
    assert unit["KillMode"] == ["process"] and f"PMON2_HOME={pmon.home}" in unit["Environment"]
    assert fake_systemd.alive() and pmon.daemon_pid() == fake_systemd.proc.pid
    [listed] = pmon.services()
    assert (listed["status"], listed["pid"]) == ("running", svc["pid"]), "the service was not re-adopted as is"
    assert pmon.is_alive(svc["pid"])
    verify(fake_systemd.unit.read_text(), tmp_path)

    under_systemd = fake_systemd.proc.pid
    out = startup.remove()
    assert "services keep running" in out and not fake_systemd.unit.exists() and not fake_systemd.enabled
    pmon.wait_dead(under_systemd, what="pmond under the unit")
    assert pmon.is_alive(svc["pid"])
    [listed] = pmon.services()  # the CLI starts pmond again, outside systemd, and it adopts the service
    assert (listed["status"], listed["pid"]) == ("running", svc["pid"])


def test_cli_startup_print_is_a_valid_unit(pmon: Any, tmp_path: Path) -> None:
    text = pmon.run("startup", "--print").stdout
    assert "\nKillMode=process\n" in text and f"\nEnvironment=PMON2_HOME={pmon.home}\n" in text
    verify(text, tmp_path)


@pytest.mark.skipif(startup.systemd_running(), reason="systemd runs here")
def test_cli_startup_without_systemd_says_what_to_do(pmon: Any) -> None:
    proc = pmon.run("startup", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("pmon2: systemd is not running") and proc.stderr.count("\n") == 1
    assert "@reboot " in proc.stdout and "daemon start" in proc.stdout
    proc = pmon.run("unstartup", check=False)
    assert proc.returncode == 1 and "crontab" in proc.stdout
