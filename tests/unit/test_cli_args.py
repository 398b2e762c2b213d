import pytest

from pmon2 import cli
from pmon2.cli import UsageError, split_run_args


def test_command_only():
    assert split_run_args(["./bin/api"]) == ({}, ["./bin/api"])


@pytest.mark.parametrize("tokens", [
    ["--name", "api", "./bin/api"],
    ["--name=api", "./bin/api"],
    ["./bin/api", "--name", "api"],
    ["./bin/api", "--name=api"],
    ["-n", "api", "./bin/api"],
])
def test_name_anywhere(tokens):
    assert split_run_args(tokens) == ({"name": "api"}, ["./bin/api"])


@pytest.mark.parametrize(("flag", "dest"), [("-n", "name"), ("-u", "user"), ("-l", "log"), ("-d", "log_dir")])
def test_short_flags_before_command(flag, dest):
    assert split_run_args([flag, "v", "./app", "x"]) == ({dest: "v"}, ["./app", "x"])


@pytest.mark.parametrize("flag", ["-n", "-u", "-l", "-d", "-a"])
def test_short_flags_after_command_belong_to_service(flag):
    assert split_run_args(["./app", flag, "5"]) == ({}, ["./app", flag, "5"])


def test_log_dir_spellings():
    assert split_run_args(["./app", "--log-dir", "/l"])[0] == {"log_dir": "/l"}
    assert split_run_args(["./app", "--log_dir=/l"])[0] == {"log_dir": "/l"}


def test_args_shell_split_spliced_in_place():
    opts, argv = split_run_args(["./app", "first", "--args", "a 'b c'", "last", "--name", "x"])
    assert opts == {"name": "x"}
    assert argv == ["./app", "first", "a", "b c", "last"]


def test_args_inline():
    assert split_run_args(["./app", "--args=-prjHome=/srv -v"]) == ({}, ["./app", "-prjHome=/srv", "-v"])


def test_args_bad_quoting_is_usage_error():
    with pytest.raises(UsageError):
        split_run_args(["./app", "--args", "a 'b"])


@pytest.mark.parametrize("tokens", [["--args", "x 'y z'", "./app", "w"], ["-a", "x 'y z'", "./app", "w"],
                                    ["-a", "x 'y z'", "--", "./app", "w"]])
def test_args_before_command_follow_the_command(tokens):
    opts, argv = split_run_args(tokens)
    assert opts == {}
    assert argv == ["./app", "x", "y z", "w"]


def test_args_without_command_is_usage_error():
    with pytest.raises(UsageError, match="needs a command"):
        split_run_args(["--args", "x"])


@pytest.mark.parametrize("tokens", [["--name", "x", "--help"], ["-n", "x", "-h"], ["--json", "--help"]])
def test_help_after_valued_flags_asks_for_run_help(tokens):
    from pmon2.cli import _asks_help

    assert _asks_help(tokens)
    assert not _asks_help(["--name", "x", "./app", "--help"])


def test_double_dash_passes_rest_verbatim():
    opts, argv = split_run_args(["./app", "--name", "api", "--", "--name", "other", "-n", "5", "--"])
    assert opts == {"name": "api"}
    assert argv == ["./app", "--name", "other", "-n", "5", "--"]


def test_double_dash_before_command():
    assert split_run_args(["-n", "api", "--", "--weird", "x"]) == ({"name": "api"}, ["--weird", "x"])


def test_unknown_long_option_after_command_goes_to_service():
    assert split_run_args(["./app", "--port", "8080", "--port=9"]) == ({}, ["./app", "--port", "8080", "--port=9"])


@pytest.mark.parametrize("tokens", [["--prot", "8080", "./app"], ["-x", "./app"], ["--prot=1", "./app"]])
def test_unknown_option_before_command_is_usage_error(tokens):
    with pytest.raises(UsageError, match="unknown option"):
        split_run_args(tokens)


@pytest.mark.parametrize("tokens", [["./app", "--name"], ["-n"], ["./app", "--user"], ["./app", "--args"]])
def test_missing_value_is_usage_error(tokens):
    with pytest.raises(UsageError, match="needs a value"):
        split_run_args(tokens)


@pytest.mark.parametrize("tok", ["--no-autorestart=x", "--json=1"])
def test_boolean_flag_with_value_is_usage_error(tok):
    with pytest.raises(UsageError, match="takes no value"):
        split_run_args(["./app", tok])


def test_boolean_flags():
    opts, argv = split_run_args(["--no-autorestart", "./app", "--json", "--min-uptime", "2",
                                 "--kill-timeout=3", "--stop-signal", "INT"])
    assert argv == ["./app"]
    assert opts == {"no_autorestart": True, "json": True, "min_uptime": "2", "kill_timeout": "3",
                    "stop_signal": "INT"}


@pytest.fixture
def no_daemon(monkeypatch, tmp_path):
    monkeypatch.setenv("PMON2_HOME", str(tmp_path))

    def refuse():
        raise AssertionError("the CLI tried to reach pmond")

    monkeypatch.setattr(cli, "_client", refuse)


@pytest.mark.parametrize(("argv", "message"), [
    (["run"], "a command is needed"),
    (["exec"], "a command is needed"),
    (["run", "--name", "api"], "a command is needed"),
    (["run", "--name"], "needs a value"),
    (["run", "--prot", "8080", "./app"], "unknown option"),
    (["run", "./app", "--no-autorestart=x"], "takes no value"),
    (["run", "./app", "--args", "'unclosed"], "--args"),
])
def test_main_usage_errors_return_2(no_daemon, capsys, argv, message):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("pmon2: ")
    assert message in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_main_unknown_command_exits_2(no_daemon, capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmon2: unknown command 'frobnicate'") and "see 'pmon2 --help'" in err


def test_main_run_help_before_command(no_daemon, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "-h"])
    assert exc.value.code == 0
    assert "pmon2 run [options] COMMAND" in capsys.readouterr().out


def test_run_help_lists_every_run_flag(no_daemon, capsys, monkeypatch):
    """The spec model's flags show up in `run --help` without a line of their own (cli._field_flags)."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    missing = [flag for flag in cli.RUN_FLAGS if f"  {flag}" not in out and f", {flag}" not in out]
    assert not missing, missing
    assert "--reload-timeout SECONDS" in out and "(default 30); before the command" in out


def test_main_without_command_prints_help(no_daemon, capsys):
    assert cli.main([]) == 0
    assert "pmon2: keep services alive" in capsys.readouterr().out


def test_asks_help():
    assert cli._asks_help(["-h"])
    assert cli._asks_help(["--json", "--help"])
    assert cli._asks_help([])
    assert not cli._asks_help(["./app", "-h"])
    assert not cli._asks_help(["--", "-h"])


def test_command_names_list_every_sub_command():
    import argparse

    from pmon2.cli import COMMAND_NAMES, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == COMMAND_NAMES


def test_a_single_command_parser_parses_like_the_full_one():
    from pmon2.cli import build_parser

    for argv in (["stop", "-f", "api"], ["log", "a", "b", "-n", "3"], ["reload", "x", "--sig", "HUP"]):
        full = vars(build_parser().parse_args(argv))
        single = vars(build_parser(only=argv[0]).parse_args(argv))
        assert full == single


def test_newer_flags_count_only_before_the_command():
    # Services commonly take --port, --env, --group of their own: after the command they are the service's.
    tail = ["--port", "8080", "--env", "production", "--group", "g", "--restart", "no", "--tag", "x"]
    assert split_run_args(["./app", *tail]) == ({}, ["./app", *tail])
    opts, argv = split_run_args(["--port", "9000", "--tag", "a", "--tag", "b", "--restart", "on-failure",
                                 "--instances", "2", "--env", "A=1", "./app", "--name", "api"])
    assert argv == ["./app"]
    assert opts == {"port": "9000", "tags": ["a", "b"], "restart": "on-failure", "instances": "2", "env": ["A=1"],
                    "name": "api"}
