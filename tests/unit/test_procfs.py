import os
import re

from pmon2 import procfs


def stat_line(pid, comm):
    # fields 3..52: state and then numbered values, with the ones parse_stat reads set on purpose
    fields = [str(n * 1000) for n in range(3, 53)]
    fields[0] = "S"          # 3 state
    fields[1] = "1"          # 4 ppid
    fields[2] = "123"        # 5 pgrp
    fields[3] = "124"        # 6 session
    fields[11] = "77"        # 14 utime
    fields[12] = "33"        # 15 stime
    fields[19] = "987654"    # 22 starttime
    fields[21] = "256"       # 24 rss
    assert len(fields) == 50
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def test_parse_stat_comm_with_spaces_and_parens():
    st = procfs.parse_stat(123, stat_line(123, "a (b) c"))
    assert st.comm == "a (b) c"
    assert (st.pid, st.state, st.ppid, st.pgrp, st.session) == (123, "S", 1, 123, 124)
    assert (st.utime, st.stime, st.starttime, st.rss_pages) == (77, 33, 987654, 256)
    assert st.alive
    assert st.cpu_seconds == 110 / procfs.CLOCK_TICKS
    assert st.rss_bytes == 256 * procfs.PAGE_SIZE


def test_parse_stat_comm_ending_with_paren():
    st = procfs.parse_stat(5, stat_line(5, ") S 1 2 3 ("))
    assert st.comm == ") S 1 2 3 ("
    assert st.starttime == 987654


def test_zombie_not_alive():
    line = stat_line(9, "z").replace(") S ", ") Z ", 1)
    assert procfs.parse_stat(9, line).alive is False


def test_read_stat_self():
    st = procfs.read_stat(os.getpid())
    assert st is not None
    assert st.pid == os.getpid()
    assert st.alive
    assert st.starttime > 0
    assert st.ppid == os.getppid()
    assert st.pgrp == os.getpgrp()


def test_read_stat_missing(tmp_path):
    assert procfs.read_stat(12345, proc=str(tmp_path)) is None


def test_group_members_fake_proc(tmp_path):
    for pid, pgrp, state in ((10, 10, "S"), (11, 10, "R"), (12, 10, "Z"), (13, 99, "S")):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(stat_line(pid, "x").replace(") S 1 123 ", f") {state} 1 {pgrp} ", 1))
    (tmp_path / "self").mkdir()
    assert sorted(procfs.group_members(10, proc=str(tmp_path))) == [10, 11]


def test_boot_id_format():
    bid = procfs.boot_id()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", bid)
    assert procfs.boot_id() == bid


def test_start_wall_time_of_self_is_in_the_past():
    import time

    st = procfs.read_stat(os.getpid())
    assert st is not None
    started = procfs.start_wall_time(st.starttime)
    assert time.time() - 3600 * 24 * 365 < started <= time.time() + 1
