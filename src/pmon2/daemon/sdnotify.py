"""systemd's readiness and watchdog protocol, sd_notify(3), in a few lines (no libsystemd, no python-systemd).

pmond.service is `Type=notify` with `WatchdogSec=`: systemd counts pmond as started only once it says
READY=1 (its API socket listens, so `systemctl start pmond` returns when the CLI can talk to it), and kills
and restarts a pmond that stops saying WATCHDOG=1 (a pmond stuck in a system call or a busy loop would
otherwise hold every CLI call and every restart of a crashed service forever, while systemd saw it
"active"). STOPPING=1 tells systemd that an exit which follows is wanted.

The protocol (sd_notify(3)): each message is one datagram of newline-separated VAR=value assignments,
sent on an AF_UNIX SOCK_DGRAM socket to the address in $NOTIFY_SOCKET; an address that starts with '@'
is in the abstract namespace. The watchdog (sd_watchdog_enabled(3)) is on when $WATCHDOG_USEC is set and
$WATCHDOG_PID, when set, is our pid; the service should then send WATCHDOG=1 every half of that
interval. Without $NOTIFY_SOCKET (pmond started by the CLI, in a container, by another init) every call
here does nothing, and no timer is ever scheduled: an idle pmond must not wake up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("pmond")

# What systemd passes to a notify service. pmond removes them from its own environment as it reads them,
# so that nothing it starts (the launcher is spawned with pmond's environment) talks to systemd as pmond.
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def address(value: str) -> bytes | None:
    """$NOTIFY_SOCKET as a sockaddr_un path: '@name' is abstract ('\\0name'); a relative path is refused."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # e.g. "vsock:..." (systemd >= 253 in VMs): not AF_UNIX, not for pmond


def watchdog_usec(environ: MutableMapping[str, str], pid: int) -> int | None:
    """The watchdog interval that systemd asks of this process, as sd_watchdog_enabled(3) decides it."""
    value = environ.get("WATCHDOG_USEC", "")
    if not value.isdigit() or int(value) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # the variable was meant for another process (a parent's, inherited by mistake)
    return int(value)


class Notifier:
    """Sends sd_notify(3) messages to systemd; does nothing when systemd did not ask for them."""

    def __init__(self, notify_socket: str | None = None, watchdog: int | None = None) -> None:
        self.address = address(notify_socket) if notify_socket else None
        # sd_watchdog_enabled(3): "send WATCHDOG=1 ... every half of the time" the manager waits.
        self.interval = watchdog / 2e6 if watchdog and self.address is not None else None
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """Read $NOTIFY_SOCKET and $WATCHDOG_USEC/$WATCHDOG_PID, and take them out of `environ` (os.environ)."""
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        notify_socket = environ.get("NOTIFY_SOCKET") or None
        watchdog = watchdog_usec(environ, pid)
        for name in VARIABLES:
            environ.pop(name, None)
        return cls(notify_socket, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram, e.g. notify("READY=1", "STATUS=..."); False when not sent (never raises)."""
        if self.address is None:
            return False
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.sock.setblocking(False)  # a full socket buffer must not stall pmond's loop
            self.sock.sendto("\n".join(assignments).encode(), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify %s to $NOTIFY_SOCKET failed: %s", assignments[0] if assignments else "",
                        exc.strerror or exc)
            return False

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send WATCHDOG=1 from `loop` every half watchdog interval, when systemd asked for it.

        The ping is a callback of pmond's own event loop, not a thread: if the loop stalls, the pings stop
        and systemd restarts pmond, which is the point. Without a watchdog no timer exists at all."""
        interval = self.interval
        if interval is None or self.timer is not None:
            return

        def ping() -> None:
            self.notify("WATCHDOG=1")
            self.timer = loop.call_later(interval, ping)

        self.timer = loop.call_later(interval, ping)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
