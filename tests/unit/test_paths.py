import os
from pathlib import Path

from pmon2 import paths


def test_pmon2_home(tmp_path):
    p = paths.resolve({"PMON2_HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/1"}, euid=0)
    assert p.mode == "home"
    assert Path(p.config_file) == tmp_path / "config.toml"
    assert Path(p.data_dir) == tmp_path / "data"
    assert Path(p.log_dir) == tmp_path / "logs"
    assert Path(p.run_dir) == tmp_path / "run"
    assert Path(p.socket) == tmp_path / "run" / "pmond.sock"
    assert Path(p.pidfile) == tmp_path / "run" / "pmond.pid"
    assert Path(p.database) == tmp_path / "data" / "pmon2.db"


def test_pmon2_home_relative_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    p = paths.resolve({"PMON2_HOME": "rel"}, euid=1000)
    assert Path(p.config_file) == tmp_path / "rel" / "config.toml"
    assert os.path.isabs(p.run_dir)


def test_root():
    p = paths.resolve({"HOME": "/root", "XDG_RUNTIME_DIR": "/run/user/0"}, euid=0)
    assert p.mode == "root"
    assert Path(p.config_file) == Path("/etc/pmon2/config.toml")
    assert Path(p.data_dir) == Path("/etc/pmon2/data")
    assert Path(p.log_dir) == Path("/var/log/pmon2")
    assert Path(p.run_dir) == Path("/run/pmon2")
    assert Path(p.socket) == Path("/run/pmon2/pmond.sock")


def test_user_with_xdg():
    env = {"HOME": "/home/u", "XDG_CONFIG_HOME": "/c", "XDG_DATA_HOME": "/d", "XDG_STATE_HOME": "/s",
           "XDG_RUNTIME_DIR": "/run/user/1000"}
    p = paths.resolve(env, euid=1000)
    assert p.mode == "user"
    assert Path(p.config_file) == Path("/c/pmon2/config.toml")
    assert Path(p.data_dir) == Path("/d/pmon2")
    assert Path(p.log_dir) == Path("/s/pmon2/logs")
    assert Path(p.run_dir) == Path("/run/user/1000/pmon2")


def test_user_without_xdg():
    p = paths.resolve({"HOME": "/home/u"}, euid=1000)
    assert Path(p.config_file) == Path("/home/u/.config/pmon2/config.toml")
    assert Path(p.data_dir) == Path("/home/u/.local/share/pmon2")
    assert Path(p.log_dir) == Path("/home/u/.local/state/pmon2/logs")
    assert Path(p.run_dir) == Path("/home/u/.local/state/pmon2/run")


def test_empty_xdg_vars_fall_back():
    p = paths.resolve({"HOME": "/home/u", "XDG_DATA_HOME": "", "XDG_RUNTIME_DIR": ""}, euid=1000)
    assert Path(p.data_dir) == Path("/home/u/.local/share/pmon2")
    assert Path(p.run_dir) == Path("/home/u/.local/state/pmon2/run")


def test_with_dirs():
    p = paths.resolve({"HOME": "/home/u"}, euid=1000)
    q = p.with_dirs(Path("/x"), None)
    assert Path(q.data_dir) == Path("/x")
    assert q.log_dir == p.log_dir
    assert q.run_dir == p.run_dir


def test_socket_address_short(tmp_path):
    sock = tmp_path / "s.sock"
    assert paths.socket_address(sock) == (str(sock), None)


def test_socket_address_long(tmp_path):
    d = tmp_path / ("d" * 120)
    d.mkdir()
    sock = d / "pmond.sock"
    assert len(str(sock)) > 107
    address, fd = paths.socket_address(sock)
    try:
        assert fd is not None
        assert address == f"/proc/self/fd/{fd}/pmond.sock"
        assert len(address) <= 107
        assert os.readlink(f"/proc/self/fd/{fd}") == str(d)
    finally:
        if fd is not None:
            os.close(fd)
