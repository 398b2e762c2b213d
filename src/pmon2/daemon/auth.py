"""Who may connect to pmond, and what each caller may see and do.

The boundary (docs/security.md): root may do anything. Any other caller that the config allows to
connect (`allow_users`, `allow_groups`, plus pmond's own user) acts as itself: it may only create
services that run as its own uid, and it sees and acts on only the services that run as that uid, and
only their events. Actions on pmond as a whole (shutdown, flush of every service, adoption of an
arbitrary pid) are root's alone. Credentials come from SO_PEERCRED (unix(7)), which the kernel fills
in at connect time, so a client cannot lie about them.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from pmon2.errors import PmonError


class Forbidden(PmonError):
    code = "forbidden"
    http_status = 403


@dataclass(frozen=True)
class Caller:
    """A connected client, from SO_PEERCRED: pid, uid and gid as the kernel saw them at connect()."""

    pid: int
    uid: int
    gid: int

    @property
    def privileged(self) -> bool:
        """Root, or pmond's own user (the owner of a per-user pmond, which has no root to defer to)."""
        return self.uid == 0 or self.uid == os.geteuid()

    def owns(self, service_uid: int) -> bool:
        """May this caller see and act on a service that runs as `service_uid`?"""
        return self.privileged or self.uid == service_uid

    def require_root(self, what: str) -> None:
        if not self.privileged:
            raise Forbidden(f"{what} is for root only")


# The caller of the API request being served, for the ledger; None while pmond acts on its own
# (recovery, automatic restarts). Set by the API around each handler; asyncio tasks copy it.
CALLER: ContextVar[Caller | None] = ContextVar("pmon2_caller", default=None)


def uid_of_user(user: str | None) -> int:
    """The uid a service runs as: its `user`, or pmond's own when it has none (a stored service whose
    user is null was created by pmond's user: root in root mode). Unknown user names map to -1, which
    no caller but root owns."""
    if user is None:
        return os.geteuid()
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return -1


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class PeerPolicy:
    """Who may connect: root, pmond's own user, and the users and groups named in the config.

    `allow_users` and `allow_groups` hold names (a group admits its members, by primary gid or by
    membership in /etc/group). The socket's mode follows: 0600 when nobody else is allowed, 0660 with
    the group when exactly one group is allowed, 0666 otherwise (SO_PEERCRED then does the checking).
    """

    def __init__(self, users: Iterable[str] = (), groups: Iterable[str] = ()) -> None:
        self.uids = {0, os.geteuid()}
        self.user_names = sorted(set(users))
        self.group_names: list[str] = []
        self.gids: set[int] = set()
        self.members: set[str] = set()
        for name in self.user_names:
            try:
                self.uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                pass  # a user created later is picked up at pmond's next start
        for name in sorted(set(groups)):
            try:
                g = grp.getgrnam(name)
            except KeyError:
                continue
            self.group_names.append(name)
            self.gids.add(g.gr_gid)
            self.members |= set(g.gr_mem)

    def allows(self, uid: int, gid: int) -> bool:
        if uid in self.uids or gid in self.gids:
            return True
        if not self.members:
            return False
        try:
            return pwd.getpwuid(uid).pw_name in self.members
        except KeyError:
            return False

    def socket_mode(self) -> tuple[int, int | None]:
        """(mode, group id or None) for the socket file."""
        others = set(self.uids) - {0, os.geteuid()}
        if not others and not self.gids:
            return 0o600, None
        if not others and len(self.gids) == 1:
            return 0o660, next(iter(self.gids))
        return 0o666, None

    def describe(self) -> dict[str, object]:
        """For `daemon status`: who may connect, and what that lets them do."""
        return {"root": True, "users": sorted({user_name(u) for u in self.uids}),
                "groups": self.group_names,
                "non_root_callers": "act as themselves: only services that run as their own uid"}
