import signal

import pytest

from pmon2.daemon.watch import UNKNOWN, ExitStatus


@pytest.mark.parametrize("code", [0, 1, 3, 127, 255])
def test_exit_code(code):
    st = ExitStatus.from_wait_status(code << 8, "waitpid")
    assert (st.code, st.signal, st.core, st.source) == (code, None, False, "waitpid")
    assert st.known
    assert st.describe() == f"exit code {code}"
    assert st.signal_name() is None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGHUP])
def test_signal(sig):
    st = ExitStatus.from_wait_status(int(sig), "pidfd")
    assert (st.code, st.signal, st.core, st.source) == (None, int(sig), False, "pidfd")
    assert st.known
    assert st.signal_name() == sig.name
    assert st.describe() == f"signal {sig.name}"


def test_core_dump():
    st = ExitStatus.from_wait_status(int(signal.SIGSEGV) | 0x80, "pidfd")
    assert st.signal == signal.SIGSEGV
    assert st.core is True
    assert st.describe() == "signal SIGSEGV (core dumped)"


def test_stopped_status_is_unknown():
    st = ExitStatus.from_wait_status((int(signal.SIGSTOP) << 8) | 0x7F, "waitpid")
    assert not st.known
    assert st.source == "unknown"
    assert st.describe() == "unknown exit status"


def test_unknown_signal_number():
    assert ExitStatus(None, 100).signal_name() == "SIG100"


def test_unknown_constant():
    assert UNKNOWN.known is False
    assert UNKNOWN.describe() == "unknown exit status"
