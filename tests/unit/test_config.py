from pathlib import Path

import pytest

from pmon2 import config, paths
from pmon2.errors import PmonError


@pytest.fixture
def home(tmp_path):
    return paths.resolve({"PMON2_HOME": str(tmp_path)})


def write(home, text):
    Path(home.config_file).parent.mkdir(parents=True, exist_ok=True)
    Path(home.config_file).write_text(text)


def test_no_file_gives_defaults(home):
    cfg = config.load(home)
    assert cfg.paths == home
    assert cfg.kill_timeout == 5.0
    assert cfg.min_uptime == 1.0


def test_dirs_relative_and_absolute(home, tmp_path):
    write(home, f'data_dir = "mydata"\nlog_dir = "{tmp_path}/abs/logs"\nkill_timeout = 2\nmin_uptime = 0.5\n')
    cfg = config.load(home)
    assert Path(cfg.paths.data_dir) == Path(home.config_file).parent / "mydata"
    assert Path(cfg.paths.log_dir) == tmp_path / "abs" / "logs"
    assert cfg.paths.run_dir == home.run_dir
    assert cfg.kill_timeout == 2.0
    assert cfg.min_uptime == 0.5
    assert Path(cfg.paths.database) == Path(home.config_file).parent / "mydata" / "pmon2.db"


def test_unknown_key_one_line(home):
    write(home, 'data_dir = "d"\nbogus = 1\n')
    with pytest.raises(PmonError) as exc:
        config.load(home)
    assert "'bogus'" in exc.value.message
    assert "\n" not in exc.value.message
    assert str(home.config_file) in exc.value.message


def test_bad_toml(home):
    write(home, "data_dir = [unclosed\n")
    with pytest.raises(PmonError) as exc:
        config.load(home)
    assert str(home.config_file) in exc.value.message
    assert "\n" not in exc.value.message


def test_not_utf8(home):
    Path(home.config_file).parent.mkdir(parents=True, exist_ok=True)
    Path(home.config_file).write_bytes(b'data_dir = "\xff"\n')
    with pytest.raises(PmonError):
        config.load(home)


@pytest.mark.parametrize("text", ["kill_timeout = -1", "kill_timeout = true", 'min_uptime = "3"',
                                  'data_dir = ""', "data_dir = 3"])
def test_bad_values(home, text):
    write(home, text + "\n")
    with pytest.raises(PmonError) as exc:
        config.load(home)
    assert "\n" not in exc.value.message
