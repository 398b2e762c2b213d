import os
import stat

import pytest

from pmon2.daemon.supervisor import iso, resolve_executable
from pmon2.errors import SpawnError


def make_exe(path, mode=0o755):
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def test_relative_path_resolved_against_cwd(tmp_path):
    (tmp_path / "bin").mkdir()
    exe = make_exe(tmp_path / "bin" / "app")
    assert resolve_executable("./bin/app", str(tmp_path), "") == str(exe)
    assert resolve_executable("bin/../bin/app", str(tmp_path), "") == str(exe)
    assert resolve_executable(str(exe), "/", "") == str(exe)


def test_path_lookup(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_exe(tmp_path / "a" / "tool", 0o644)  # not executable: skipped
    (tmp_path / "a" / "dir").mkdir()
    exe = make_exe(tmp_path / "b" / "tool")
    path_var = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    assert resolve_executable("tool", "/", path_var) == str(exe)
    with pytest.raises(SpawnError, match="command not found"):
        resolve_executable("dir", "/", path_var)


def test_path_lookup_relative_and_empty_entries(tmp_path):
    (tmp_path / "rel").mkdir()
    exe = make_exe(tmp_path / "rel" / "tool")
    assert resolve_executable("tool", str(tmp_path), "rel") == str(exe)
    here = make_exe(tmp_path / "here")
    assert resolve_executable("here", str(tmp_path), ":/nonexistent") == str(here)


def test_path_lookup_real_sh():
    found = resolve_executable("sh", "/", "/usr/bin:/bin")
    assert os.path.basename(found) == "sh"
    assert os.access(found, os.X_OK)


def test_missing(tmp_path):
    with pytest.raises(SpawnError, match="no such file"):
        resolve_executable("./nope", str(tmp_path), "")
    with pytest.raises(SpawnError, match="command not found"):
        resolve_executable("surely-not-a-command-xyz", str(tmp_path), str(tmp_path))


def test_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(SpawnError, match="directory"):
        resolve_executable("./d", str(tmp_path), "")


def test_not_executable(tmp_path):
    f = make_exe(tmp_path / "script", 0o644)
    assert not f.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    with pytest.raises(SpawnError, match="not executable") as exc:
        resolve_executable("./script", str(tmp_path), "")
    assert exc.value.code == "spawn_failed"


def test_iso():
    assert iso(None) is None
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(1.5) == "1970-01-01T00:00:01.500Z"


class _Store:
    def __init__(self):
        self.deleted = []

    def delete_service(self, service_id):
        self.deleted.append(service_id)


def test_identical_environments_are_kept_once_and_dropped_with_their_last_service():
    from pmon2.daemon.follow import Follower
    from pmon2.daemon.supervisor import Service, Supervisor

    sup = Supervisor.__new__(Supervisor)  # the env bookkeeping only: no loop, no store on disk
    sup.services, sup._envs, sup.store = {}, {}, _Store()
    forgotten: list[int] = []
    sup.launches = type("NoRecords", (), {"remove": lambda self, service_id: None})()
    sup.persist = type("NoPersist", (), {"forget": lambda self, service_id: forgotten.append(service_id)})()
    sup.follow = Follower(sup)  # nothing followed: forget has nothing to close

    def add(service_id, env):
        svc = Service(id=service_id, name=f"s{service_id}", spec=sup._share_env({"env": env}), uid=0)
        sup.services[service_id] = svc
        return svc

    a = add(1, {"PATH": "/bin", "HOME": "/root"})
    b = add(2, {"HOME": "/root", "PATH": "/bin"})  # same variables, another order
    c = add(3, {"PATH": "/usr/bin"})
    assert a.spec["env"] is b.spec["env"] and c.spec["env"] is not a.spec["env"]
    assert len(sup._envs) == 2
    sup._forget(a)
    assert len(sup._envs) == 2, "b still uses that environment"
    sup._forget(b)
    sup._forget(c)
    assert sup._envs == {} and forgotten == [1, 2, 3]
