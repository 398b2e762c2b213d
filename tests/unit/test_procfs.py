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


def test_parse_stat_bytes_as_read_from_proc():
    line = stat_line(7, "x) y").encode()
    assert procfs.parse_stat(7, line) == procfs.parse_stat(7, line.decode())
    odd = line.replace(b"x) y", b"a\xff(b")  # comm is any bytes, not always UTF-8
    st = procfs.parse_stat(7, odd)
    assert st.comm == "a\ufffd(b" and st.starttime == 987654 and st.threads == 20000


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


ROLLUP = b"""55facf64f000-7ffd77609000 ---p 00000000 00:00 0                          [rollup]
Rss:               57556 kB
Pss:               52380 kB
Pss_Dirty:         51680 kB
Pss_Anon:          51680 kB
"""


def test_parse_pss_reads_the_pss_line_not_its_neighbours():
    assert procfs.parse_pss(ROLLUP) == 52380 * 1024
    assert procfs.parse_pss(ROLLUP.replace(b"\nPss:", b"\nXss:")) is None
    assert procfs.parse_pss(b"") is None
    assert procfs.parse_pss(b"x\nPss: nonsense kB\n") is None


def test_read_pss_of_self_is_positive_and_at_most_rss():
    pss = procfs.read_pss(os.getpid())
    st = procfs.read_stat(os.getpid())
    assert pss is not None and st is not None
    assert 0 < pss <= st.rss_bytes * 1.1  # PSS shares out the shared pages; RSS counts them whole


def test_read_pss_unreadable_is_none(tmp_path):
    assert procfs.read_pss(12345, proc=str(tmp_path)) is None
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "smaps_rollup").write_bytes(b"")  # a kernel thread's
    assert procfs.read_pss(7, proc=str(tmp_path)) is None


def test_cgroup_pids(tmp_path):
    (tmp_path / "cgroup.procs").write_text("12\n34\n")
    assert procfs.cgroup_pids(str(tmp_path)) == [12, 34]
    assert procfs.cgroup_pids(str(tmp_path / "missing")) is None


def test_children_are_read_from_every_thread():
    import subprocess
    import threading

    kids: list[subprocess.Popen] = []
    try:
        kids.append(subprocess.Popen(["sleep", "60"]))
        t = threading.Thread(target=lambda: kids.append(subprocess.Popen(["sleep", "60"])))
        t.start()
        t.join()  # a thread that exits hands its children to another thread of the process
        gate = threading.Event()
        done = threading.Event()

        def fork_and_wait() -> None:
            kids.append(subprocess.Popen(["sleep", "60"]))
            gate.set()
            done.wait(10)

        t2 = threading.Thread(target=fork_and_wait)
        t2.start()
        gate.wait(10)
        st = procfs.read_stat(os.getpid())
        assert st is not None and st.threads >= 2
        assert sorted(procfs.children(os.getpid(), st.threads)) == sorted(k.pid for k in kids)
        # Read as if single-threaded, the child of the live thread t2 is not there.
        assert kids[2].pid not in procfs.children(os.getpid(), 1)
        done.set()
        t2.join()
    finally:
        for k in kids:
            k.kill()
            k.wait()
