from pmon2.render.detail import describe_exit, render_detail


def test_describe_exit_code():
    text = describe_exit({"code": 0, "signal": None, "runtime_s": 125, "at": "2024-01-01T00:00:00.000Z"})
    assert text == "code 0 after 2m, at 2024-01-01T00:00:00.000Z"


def test_describe_exit_signal():
    text = describe_exit({"code": None, "signal": "SIGSEGV", "core": True, "runtime_s": 3, "at": "T"})
    assert text == "signal SIGSEGV (core dumped) after 3.0 s, at T"
    assert describe_exit({"code": None, "signal": "SIGKILL", "at": "T"}) == "signal SIGKILL, at T"


def test_describe_exit_pending_and_unknown():
    pending = describe_exit({"code": None, "signal": None, "source": "pending", "runtime_s": None, "at": None})
    assert pending == "status pending (waiting for init to reap it), at an unknown time"
    unknown = describe_exit({"code": None, "signal": None, "source": "unknown", "at": "T"})
    assert unknown == "status unknown, at T"
    assert describe_exit(None) == "-"
    assert describe_exit({}) == "-"


def test_render_detail_masks_and_lists():
    svc = {"id": 3, "name": "api", "status": "running", "pid": 42, "argv": ["./api", "--x", "a b"],
           "exe": "/srv/api", "cwd": "/srv", "restarts": 1, "out_log": "/l/o", "err_log": "/l/e",
           "env": {"TOKEN": "***", "PORT": "80"}, "env_masked": True, "autorestart": True}
    out = render_detail(svc, False)
    assert out.splitlines()[0] == "api"
    assert "./api --x 'a b'" in out
    assert "TOKEN=***" in out and "secrets masked" in out
    assert "PORT=80" in out
    assert "2 variables" in out
    assert "\x1b[" not in out


def test_describe_exit_short_runs_in_milliseconds():
    text = describe_exit({"code": 4, "signal": None, "runtime_s": 0.3, "at": "T"})
    assert text == "code 4 after 300 ms, at T"


def test_earlier_exits_use_the_shared_phrases():
    # recent_exits are the data of exit events, oldest first (as Store.events gives them); one not completed
    # yet has no `source`: it is pending, as last_exit says.
    svc = {"id": 3, "name": "api", "status": "running", "pid": 42, "argv": ["./api"], "cwd": "/srv", "restarts": 2,
           "out_log": "/l/o", "err_log": "/l/e", "env": {}, "autorestart": True,
           "last_exit": {"code": None, "signal": None, "at": "T2", "runtime_s": 0.004, "source": "pending"},
           "recent_exits": [{"at": "T0", "pid": 7, "while_down": True, "rebooted": True},
                            {"at": "T1", "pid": 8, "runtime_s": 1.5, "code": None, "signal": "SIGKILL",
                             "core": False, "source": "pidfd"},
                            {"at": "T2", "pid": 9, "runtime_s": 0.004}]}
    lines = render_detail(svc, False).splitlines()
    assert "last exit       status pending after 4 ms (waiting for init to reap it), at T2" in lines[15]
    assert lines[16].endswith("earlier exits   signal SIGKILL after 1.5 s, at T1")
    assert lines[17].endswith("status unknown (the machine rebooted), at T0")
