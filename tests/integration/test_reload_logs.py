"""reload delivers a signal without a restart; log and logf show what a service printed."""

from __future__ import annotations

import os
import signal
import subprocess

SIGNAL_LOGGER = """
import os, signal, sys, time
out = sys.argv[1]
def on(sig, _):
    with open(out, "a") as fh:
        fh.write(f"{signal.Signals(sig).name} {os.getpid()}\\n")
    print(f"got {signal.Signals(sig).name}", flush=True)
for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, on)
open(out + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


def _signal_service(pmon, name):
    got = pmon.work / f"{name}.signals"
    script = pmon.script(f"{name}.py", SIGNAL_LOGGER)
    svc = pmon.start_service(str(script), str(got), "--name", name)
    pmon.wait_for(lambda: (pmon.work / f"{name}.signals.ready").exists(), message="signal handlers installed")
    return svc, got


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_reload_sends_hup_and_keeps_the_pid(pmon):
    svc, got = _signal_service(pmon, "hup")
    out = pmon.run("reload", "hup", "--sig", "HUP").stdout
    assert f"sent SIGHUP to hup (pid {svc['pid']})" in out
    pmon.wait_for(lambda: _lines(got) == [f"SIGHUP {svc['pid']}"], message="the SIGHUP line")
    after = pmon.desc("hup")
    assert after["pid"] == svc["pid"] and after["restarts"] == 0 and after["status"] == "running"


def test_reload_defaults_to_usr2(pmon):
    svc, got = _signal_service(pmon, "usr")
    pmon.run("reload", "usr")
    pmon.run("reload", "usr", "-s", "sigusr1")
    pmon.run("reload", "usr", "--sig", str(int(signal.SIGHUP)))
    expected = [f"SIGUSR2 {svc['pid']}", f"SIGUSR1 {svc['pid']}", f"SIGHUP {svc['pid']}"]
    pmon.wait_for(lambda: _lines(got) == expected, message=f"the lines {expected}")
    assert pmon.desc("usr")["pid"] == svc["pid"]


def test_reload_of_a_stopped_service_is_an_error(pmon):
    pmon.start_service("sleep", "31401", "--name", "still")
    pmon.run("stop", "still")
    proc = pmon.run("reload", "still", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("pmon2: ") and "not running" in proc.stderr
    assert pmon.desc("still")["status"] == "stopped"


TALKER = """
import sys, time
for i in range(1, 6):
    print(f"out-{i}", flush=True)
    print(f"err-{i}", file=sys.stderr, flush=True)
time.sleep(1000)
"""


def test_log_shows_the_last_lines_of_each_stream(pmon):
    pmon.script("talker", TALKER)
    svc = pmon.start_service("./talker")
    pmon.wait_for(lambda: "err-5" in open(svc["err_log"]).read(), message="all lines written")
    out = pmon.run("log", "talker", "-n", "2").stdout
    lines = out.splitlines()
    body = [ln for ln in lines if "|" in ln]
    assert body == ["out | out-4", "out | out-5", "err | err-4", "err | err-5"], out
    assert any(svc["out_log"] in ln for ln in lines) and any(svc["err_log"] in ln for ln in lines)
    full = pmon.run("log", "talker").stdout
    assert all(f"out-{i}" in full and f"err-{i}" in full for i in range(1, 6))
    assert [ln for ln in pmon.run("log", "talker", "-n", "0").stdout.splitlines() if "|" in ln] == []


def test_logf_shows_a_line_written_after_it_started(pmon):
    svc, _ = _signal_service(pmon, "follow")
    capture = pmon.work / "logf.out"
    with open(capture, "w") as fh:
        proc = subprocess.Popen(pmon.cmd("logf", "follow"), stdout=fh, stderr=subprocess.STDOUT,
                                cwd=pmon.work, env=pmon.env, stdin=subprocess.DEVNULL)
    try:
        # The log is empty, so logf prints nothing at first: it is ready once pmond, which reads the logs
        # for it (GET /v1/logs?follow=true), holds the log open.
        pmon.wait_for(lambda: proc.poll() is None and _logf_is_following(pmon.daemon_pid(), svc["out_log"]),
                      message="pmond to open the service's log for logf")
        pmon.run("reload", "follow", "--sig", "HUP")
        pmon.wait_for(lambda: "out | got SIGHUP" in capture.read_text(), timeout=5.0,
                      message=lambda: f"the new line in logf's output: {capture.read_text()!r}")
        assert proc.poll() is None, "logf exited on its own"
    finally:
        proc.kill()
        proc.wait(timeout=5)


def _logf_is_following(pid, path):
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") == path:
                return True
        except OSError:
            pass
    return False


def test_logf_prints_the_last_lines_first(pmon):
    pmon.script("talker", TALKER)
    svc = pmon.start_service("./talker")
    pmon.wait_for(lambda: "err-5" in open(svc["err_log"]).read(), message="all lines written")
    try:
        proc = subprocess.run(pmon.cmd("logf", "talker", "-n", "1"), capture_output=True, text=True,
                              cwd=pmon.work, env=pmon.env, timeout=1.5)
        out = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    assert "out | out-5" in out and "err | err-5" in out, out
    assert "out-4" not in out
