#!/usr/bin/env python3
"""Build pmon2's deliverables: a one-file zipapp, a .deb and an .rpm.

    python3 tools/build.py pyz [deb] [rpm] [--out DIR] [--work DIR]

It needs only python3 >= 3.11 with its venv module (Debian/Ubuntu: python3-venv), plus dpkg-deb for the .deb
and rpmbuild for the .rpm. pmon2 itself comes from this checkout (src/pmon2). Its dependencies are fetched
by the build itself, into a private build environment: `python3 -m venv .build/venv`, then that venv's pip
installs pyproject's `dependencies` (wheels only). The system Python is never touched. The venv is made once
and reused while the interpreter and the dependency list stay the same, so later builds need no network;
pip's own settings apply (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, pip.conf) for a mirror or an offline
wheel directory. The script then runs again inside that venv, copies the closure of the dependencies
(resolved with importlib.metadata; requirement markers read with pip's vendored `packaging`) and checks that
all of it is pure Python: the .pyz runs on any Linux with python3 >= 3.11 and the packages are
`Architecture: all` / `noarch`.

Scratch files go to .build/ (.build/venv, .build/stage), never to build/, which is setuptools' own: staging
there made a later `pip install .` fail on the staged dist-info.

Everything is compiled once, to unchecked-hash .pyc files (no mtimes involved: a zip's DOS timestamps
are local time and dpkg/rpm may clamp mtimes, either of which would make timestamp .pyc files stale):
  - the .pyz holds them next to each .py (`compileall -b` layout), the one zipimport reads;
  - the packages hold them in __pycache__/NAME.cpython-3XY.pyc, the one the path importer reads.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.metadata as md
import importlib.util
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
WORK = ROOT / ".build"  # scratch: venv/ (the build environment) and stage/; never build/, which is setuptools'
ENV_STAMP = "pmon2-build.json"  # in the venv: what it was made for
LIB = "/usr/lib/pmon2"
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")
# Native accelerators that their package imports only if present, with a pure-Python fallback: left out, so
# the .pyz and the packages stay universal. PyYAML: yaml/_yaml.*.so (yaml.__with_libyaml__ is then False).
OPTIONAL_NATIVE = (("yaml", "_yaml."),)
# dist-info files that describe one installation, not the distribution.
SKIP_META = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}

PYZ_MAIN = '''\
"""pmon2.pyz: the pmon2 CLI, or pmond when this file is run under the name `pmond` (e.g. a symlink)."""

import os
import sys

if sys.version_info < (3, 11):
    sys.exit("pmon2 needs python3 >= 3.11; " + sys.executable + " is " + sys.version.split()[0])
if os.path.basename(sys.argv[0]).partition(".")[0] == "pmond":
    from pmon2.daemon.__main__ import run

    sys.exit(run())
from pmon2.cli import main

sys.exit(main())
'''

BIN_SCRIPT = '''\
#!/usr/bin/python3 -IS
"""{what}, from the pmon2 package; pmon2 and its vendored dependencies live in {lib}."""
import sys

sys.path.insert(0, "{lib}")
from {module} import {func}

sys.exit({func}())
'''


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"build: {msg}", file=sys.stderr, flush=True)


# what to ship


def project() -> tuple[str, list[str]]:
    """pyproject's version and dependencies; the version must match pmon2.__version__."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    init = (ROOT / "src/pmon2/__init__.py").read_text()
    found = re.search(r'^__version__\s*=\s*"([^"]+)"', init, re.M)
    if not found or found.group(1) != meta["version"]:
        raise BuildError(f"pyproject.toml's version {meta['version']} differs from pmon2.__version__ "
                         f"{found.group(1) if found else '?'}")
    return meta["version"], list(meta.get("dependencies", []))


def _requirement_tools() -> tuple[type, type]:
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pip vendors packaging; every venv has pip
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    return Requirement, canonicalize_name


def closure(requirements: list[str]) -> list[md.Distribution]:
    """The installed distributions that `requirements` need, transitively, with extras and markers honoured."""
    requirement, canonical = _requirement_tools()
    wanted: dict[str, set[str]] = {}
    found: dict[str, md.Distribution] = {}
    queue = [requirement(r) for r in requirements]
    while queue:
        req = queue.pop()
        name = canonical(req.name)
        extras = set(req.extras)
        if name in wanted and extras <= wanted[name]:
            continue
        wanted.setdefault(name, set()).update(extras)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise BuildError(f"{req.name} is not installed in the build environment {sys.prefix}; delete that "
                             "directory and build again to fetch the dependencies afresh") from None
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            raise BuildError(f"{req.name} {dist.version} is installed in {sys.prefix} but pmon2 needs {req}; delete "
                             "that directory and build again")
        found[name] = dist
        for text in dist.requires or []:
            sub = requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ["", *sorted(wanted[name])]):
                queue.append(sub)
    return [found[n] for n in sorted(found)]


def top_level(dist: md.Distribution) -> list[str]:
    """The import names a distribution installs: top_level.txt, or the first parts of its RECORD."""
    text = dist.read_text("top_level.txt")
    if text:
        return sorted({n.strip() for n in text.split() if n.strip()})
    names = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info", ".pth")):
            continue
        if parts[0].startswith("__editable__") or parts[0] in SKIP_DIRS:
            continue
        if len(parts) == 1:
            if f.suffix == ".py":
                names.add(f.stem)
            elif f.suffix in NATIVE_SUFFIXES:
                raise BuildError(f"{dist.name} has a native module {f}: only pure-Python dependencies can be shipped")
        else:
            names.add(parts[0])
    return sorted(names)


def copy_tree(src: Path, dest: Path, owner: str) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        target = dest / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(filenames):
            if name.endswith(SKIP_SUFFIXES):
                continue
            if name.endswith(NATIVE_SUFFIXES) or ".cpython-" in name:
                if any(Path(dirpath).name == pkg and name.startswith(prefix) for pkg, prefix in OPTIONAL_NATIVE):
                    continue
                raise BuildError(f"{owner} has a native module {Path(dirpath, name)}: only pure-Python "
                                 "dependencies can be shipped")
            shutil.copyfile(Path(dirpath, name), target / name)


def copy_module(name: str, dest: Path, owner: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        raise BuildError(f"cannot find the files of {name} (from {owner})")
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
        if len(locations) != 1:
            raise BuildError(f"{name} (from {owner}) is a namespace package spread over {locations}")
        copy_tree(Path(locations[0]), dest / name, owner)
    elif spec.origin.endswith(".py"):
        shutil.copyfile(spec.origin, dest / f"{name}.py")
    else:
        raise BuildError(f"{name} (from {owner}) is not pure Python: {spec.origin}")


def copy_metadata(dist: md.Distribution, dest: Path, version: str | None = None) -> None:
    """The dist-info (METADATA, licences, entry points) so importlib.metadata.version() works from the zip."""
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    info = dest / f"{name}-{version or dist.version}.dist-info"
    files = [f for f in dist.files or [] if f.parts and f.parts[0].endswith(".dist-info")]
    for f in files:
        rel = Path(*f.parts[1:])
        if str(rel) in SKIP_META:
            continue
        src = Path(f.locate())
        if src.is_file():
            (info / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, info / rel)
    if not (info / "METADATA").exists():
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.metadata['Name']}\n"
                                       f"Version: {version or dist.version}\n")


def stage_lib(dest: Path) -> tuple[str, list[str]]:
    """pmon2 and its dependency closure, as .py files plus compiled .pyc next to each (legacy layout)."""
    version, deps = project()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copy_tree(ROOT / "src/pmon2", dest / "pmon2", "pmon2")
    (dest / f"pmon2-{version}.dist-info").mkdir()
    (dest / f"pmon2-{version}.dist-info/METADATA").write_text(
        f"Metadata-Version: 2.1\nName: pmon2\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {d}\n" for d in deps))
    shipped = [f"pmon2 {version}"]
    for dist in closure(deps):
        names = top_level(dist)
        if not names:
            raise BuildError(f"{dist.name} installs no importable module")
        for name in names:
            copy_module(name, dest, dist.name)
        copy_metadata(dist, dest)
        shipped.append(f"{dist.metadata['Name']} {dist.version}")
    log("shipping " + ", ".join(shipped))
    return version, shipped


def compile_lib(lib: Path, ddir: str) -> None:
    ok = compileall.compile_dir(str(lib), ddir=ddir, quiet=1, legacy=True, workers=0,
                                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    if not ok:
        raise BuildError(f"some files under {lib} do not compile")


# the zipapp


def build_pyz(lib: Path, work: Path, out: Path) -> Path:
    src = work / "pyz"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(lib, src)
    (src / "__main__.py").write_text(PYZ_MAIN)
    py_compile.compile(str(src / "__main__.py"), cfile=str(src / "__main__.pyc"), dfile="pmon2.pyz/__main__.py",
                       doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    zipapp.create_archive(src, tmp, interpreter="/usr/bin/env python3", compressed=True)
    tmp.chmod(0o755)
    os.replace(tmp, out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


# the packages' file tree


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def stage_root(lib: Path, root: Path, unit_dir: str, zsh_dir: str) -> None:
    """The installed file system of the packages, under `root`."""
    if root.exists():
        shutil.rmtree(root)
    target = root / LIB.lstrip("/")
    tag = sys.implementation.cache_tag
    for dirpath, dirnames, filenames in os.walk(lib):
        dirnames.sort()
        rel = Path(dirpath).relative_to(lib)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(filenames):
            src = Path(dirpath, name)
            if name.endswith(".pyc"):
                if not (Path(dirpath) / (name[:-1])).exists():
                    continue
                cache = target / rel / "__pycache__"
                cache.mkdir(exist_ok=True)
                shutil.copyfile(src, cache / f"{name[:-4]}.{tag}.pyc")
            else:
                shutil.copyfile(src, target / rel / name)
    bin_dir = root / "usr/bin"
    _write(bin_dir / "pmon2", BIN_SCRIPT.format(what="The pmon2 CLI", lib=LIB, module="pmon2.cli", func="main"),
           0o755)
    _write(bin_dir / "pmond", BIN_SCRIPT.format(what="pmond, the pmon2 daemon", lib=LIB,
                                                module="pmon2.daemon.__main__", func="run"), 0o755)
    _write(root / unit_dir.lstrip("/") / "pmond.service", (PACKAGING / "pmond.service").read_text())
    _write(root / "etc/pmon2/config.toml", (PACKAGING / "config.toml").read_text())
    completions = {"bash": "usr/share/bash-completion/completions/pmon2", "zsh": f"{zsh_dir.lstrip('/')}/_pmon2",
                   "fish": "usr/share/fish/vendor_completions.d/pmon2.fish"}
    for shell, path in completions.items():
        _write(root / path, completion(target, shell))
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            Path(dirpath, d).chmod(0o755)
        for f in filenames:
            p = Path(dirpath, f)
            p.chmod(0o755 if p.stat().st_mode & stat.S_IXUSR else 0o644)


def completion(lib: Path, shell: str) -> str:
    """`pmon2 completion SHELL`, run from the staged code, with nothing else on the path."""
    code = f"import sys; sys.path.insert(0, {str(lib)!r}); from pmon2.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, "completion", shell], capture_output=True,
                          text=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_COLOR": "1"})
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BuildError(f"pmon2 completion {shell} failed: {proc.stderr.strip()}")
    return proc.stdout


def tree_size_kib(root: Path) -> int:
    return sum((p.stat().st_size + 1023) // 1024 for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def build_deb(lib: Path, work: Path, out_dir: Path, version: str) -> Path:
    check_tools(["deb"])
    root = work / "deb"
    stage_root(lib, root, "/lib/systemd/system", "/usr/share/zsh/vendor-completions")
    debian = root / "DEBIAN"
    debian.mkdir()
    control = (PACKAGING / "deb/control").read_text().format(version=version, size=tree_size_kib(root))
    _write(debian / "control", control)
    conffiles = sorted("/" + str(p.relative_to(root)) for p in (root / "etc").rglob("*") if p.is_file())
    _write(debian / "conffiles", "".join(f"{c}\n" for c in conffiles))
    for script in ("preinst", "postinst", "prerm", "postrm"):
        _write(debian / script, (PACKAGING / "deb" / script).read_text(), 0o755)
    out = out_dir / f"pmon2_{version}_all.deb"
    out_dir.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "-z3", "--build", str(root), str(out)])
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def build_rpm(lib: Path, work: Path, out_dir: Path, version: str) -> Path:
    check_tools(["rpm"])
    root = work / "rpmroot"
    stage_root(lib, root, "/usr/lib/systemd/system", "/usr/share/zsh/site-functions")
    top = work / "rpmbuild"
    if top.exists():
        shutil.rmtree(top)
    for d in ("BUILD", "RPMS", "SPECS", "SRPMS", "BUILDROOT", "tmp"):
        (top / d).mkdir(parents=True)
    # rpmbuild tars nothing here: %install copies the staged tree, so no source archive is needed.
    run(["rpmbuild", "-bb", "--nodeps", "--quiet",
         "--define", f"_topdir {top}", "--define", f"_tmppath {top / 'tmp'}",
         "--define", f"pmon2_version {version}", "--define", f"pmon2_root {root}",
         str(PACKAGING / "rpm/pmon2.spec")])
    built = top / "RPMS/noarch" / f"pmon2-{version}-1.noarch.rpm"
    if not built.exists():
        raise BuildError(f"rpmbuild did not write {built}")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / built.name
    shutil.copyfile(built, out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


TOOLS = {"deb": ("dpkg-deb", "Debian/Ubuntu: apt-get install dpkg"),
         "rpm": ("rpmbuild", "Debian/Ubuntu: apt-get install rpm; Fedora: dnf install rpm-build")}


def check_tools(targets: list[str]) -> None:
    for target in targets:
        tool, hint = TOOLS.get(target, ("", ""))
        if tool and not shutil.which(tool):
            raise BuildError(f"{tool} not found, needed for the .{target} ({hint})")


# the build environment


def in_build_env(venv: Path) -> bool:
    return sys.prefix != sys.base_prefix and Path(sys.prefix).resolve() == venv.resolve()


def python_env() -> dict[str, str]:
    """This environment without what would make another interpreter import from elsewhere."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def ensure_build_env(venv: Path, deps: list[str]) -> Path:
    """The private venv holding pyproject's dependencies: made by this interpreter and filled by its own pip
    when it is missing, unfinished, or was made for another interpreter or another dependency list."""
    python = venv / "bin/python"
    stamp = {"python": sys.executable, "version": sys.version, "dependencies": deps}
    try:
        if python.exists() and json.loads((venv / ENV_STAMP).read_text()) == stamp:
            return python
    except (OSError, ValueError):
        pass
    if venv.exists():
        log(f"{venv} is unfinished or was made for another python or other dependencies: making it again")
        shutil.rmtree(venv)
    log(f"making the build environment: {sys.executable} -m venv {venv}")
    proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, env=python_env())
    if proc.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise BuildError(f"{sys.executable} -m venv failed (Debian/Ubuntu: apt-get install python3-venv):\n"
                         f"{(proc.stdout + proc.stderr).strip()}")
    log(f"fetching {', '.join(deps)} and their dependencies into it (pip, wheels only)")
    pip = [str(python), "-I", "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet",
           "--only-binary", ":all:", *deps]
    if subprocess.run(pip, stdout=sys.stderr, env=python_env()).returncode != 0:
        raise BuildError(f"pip could not install {' '.join(deps)} into {venv}. It needs a package index: PyPI, or "
                         "one set with pip's own settings (PIP_INDEX_URL, or PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR)")
    (venv / ENV_STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return python


def forget_old_staging() -> None:
    """Older versions of this script staged in build/lib, setuptools' own directory, where the staged
    pmon2-X.dist-info made every later `pip install .` fail ("File exists"), and each failed wheel build left
    build/bdist.*/wheel/pmon2-X.dist-info behind, which fails the next one the same way. build/ is setuptools'
    scratch, which it makes again: remove it when it holds either."""
    old = ROOT / "build"
    if any(old.glob("lib/pmon2-*.dist-info")) or any(old.glob("bdist.*/wheel/pmon2-*.dist-info")):
        log(f"removing {old}: it holds a staging by an older tools/build.py or what a `pip install .` that "
            "failed on it left, either of which breaks `pip install .`")
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", choices=("pyz", "deb", "rpm"))
    parser.add_argument("--out", default=str(ROOT / "dist"), help="where the results go (default: dist/)")
    parser.add_argument("--work", default=str(WORK),
                        help="scratch directory: venv/ (the build environment) and stage/ (default: .build/)")
    args = parser.parse_args(argv)
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    targets = list(dict.fromkeys(args.targets))
    venv = work / "venv"
    try:
        version, deps = project()
        if not in_build_env(venv):
            check_tools(targets)
            forget_old_staging()
            python = ensure_build_env(venv, deps)
            sys.stdout.flush()
            sys.stderr.flush()
            # -I: nothing from PYTHONPATH, the user's site or tools/ is importable, only the venv's packages.
            return subprocess.call([str(python), "-I", str(Path(__file__).resolve()), *argv], env=python_env())
        stage = work / "stage"
        lib = stage / "lib"
        stage_lib(lib)
        compile_lib(lib, "pmon2.pyz")
        for target in targets:
            if target == "pyz":
                build_pyz(lib, stage, out / "pmon2.pyz")
            elif target == "deb":
                build_deb(lib, stage, out, version)
            else:
                build_rpm(lib, stage, out, version)
    except BuildError as exc:
        print(f"build: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
