"""launcher._more_waiting: how a launcher child tells a bulk create (more requests queued: the next child is
forked at once) from a request alone (a restart: the next fork waits until its service started)."""

from __future__ import annotations

import _socket
import os
import sys

from pmon2.daemon.launcher import _more_waiting


def test_a_peek_sees_a_queued_request_and_leaves_it_whole_with_its_fds() -> None:
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        assert not _more_waiting(theirs), "nothing queued"
        ours.sendmsg([b"request"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))])
        assert _more_waiting(theirs) and _more_waiting(theirs)
        data, ancillary, flags, _ = theirs.recvmsg(100, _socket.CMSG_SPACE(4))
        assert data == b"request" and flags == 0 and len(ancillary) == 1, "the peek took nothing"
        os.close(int.from_bytes(ancillary[0][2][:4], sys.byteorder))
        assert not _more_waiting(theirs)
        ours.close()
        assert not _more_waiting(theirs), "pmond gone: the next child learns it itself"
    finally:
        theirs.close()
        os.close(r)
        os.close(w)
