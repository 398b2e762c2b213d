"""`listen` (socket activation): the syntax, the names, the errors, the sets pmond holds and hands over."""

from __future__ import annotations

import errno
import os
import socket
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from pmon2 import cli, spec
from pmon2.daemon import auth, launcher, sockets
from pmon2.errors import BadRequest, SpawnError


def parse(text: str) -> spec.Listen:
    return spec.parse_listen(text)


def test_the_forms_of_an_address():
    assert parse("tcp://127.0.0.1:8080") == spec.Listen("tcp", "127.0.0.1", 8080, "", None, None)
    assert parse("tcp6://[::1]:443,name=https") == spec.Listen("tcp6", "::1", 443, "", "https", None)
    assert parse("tcp6://[0:0:0:0:0:0:0:0]:80").host == "::"  # canonical, as getsockname says it
    assert parse("unix:run/app.sock,mode=0660,name=app") == spec.Listen("unix", "", 0, "run/app.sock", "app", 0o660)
    assert parse("unix:///run/app.sock").path == "/run/app.sock"  # the URL form
    assert parse("unix:@pmon2-abstract").path == "@pmon2-abstract"
    assert parse("tcp://0.0.0.0:80").address() == "tcp://0.0.0.0:80"
    assert parse("tcp6://[::]:80,name=x").address() == "tcp6://[::]:80"


@pytest.mark.parametrize(("text", "problem"), [
    ("tcp://localhost:80", "resolves no names"),
    ("tcp://example.com:80", "not an IPv4 address"),
    ("tcp://[::1]:80", "not an IPv4 address"),
    ("tcp6://::1:80", "in brackets"),
    ("tcp6://[::1%eth0]:80", "scoped"),
    ("tcp://127.0.0.1", "port from 1 to 65535"),
    ("tcp://127.0.0.1:0", "port from 1 to 65535"),
    ("tcp://127.0.0.1:65536", "port from 1 to 65535"),
    ("tcp://127.0.0.1:\uff18\uff10", "port from 1 to 65535"),  # only ASCII digits (fullwidth 80)
    ("http://127.0.0.1:80", "use tcp://"),
    ("127.0.0.1:80", "use tcp://"),
    ("unix:", "give a path"),
    ("unix:@", "give a path"),
    ("unix:/" + "x" * 107, "at most 107 bytes"),
    ("unix:a,b.sock", "unknown or repeated option"),
    ("unix:@x,mode=0600", "abstract socket has no file"),
    ("unix:x,mode=0999", "not an octal mode"),
    ("unix:x,mode=7777", "more than 0777"),
    ("tcp://127.0.0.1:80,mode=0600", "unknown or repeated option"),
    ("tcp://127.0.0.1:80,name=a,name=b", "unknown or repeated option"),
    ("tcp://127.0.0.1:80,name=", "a name is 1-255"),
    ("tcp://127.0.0.1:80,name=a:b", "no ':'"),  # LISTEN_FDNAMES is `:`-separated
    ("tcp://127.0.0.1:80,name=a b", "no space"),
    ("tcp://127.0.0.1:80,name=" + "x" * 256, "1-255"),
])
def test_bad_addresses_are_named_with_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem) as exc:
        parse(text)
    assert "Traceback" not in str(exc.value)


def test_the_field_checks_the_list():
    field = spec.SERVICE["listen"]
    assert field.default == [] and field.flag == "--listen"
    assert field.validate(["tcp://127.0.0.1:8080", "unix:a.sock"]) == ["tcp://127.0.0.1:8080", "unix:a.sock"]
    with pytest.raises(BadRequest, match=r"^listen: .*same address"):
        field.validate(["tcp://127.0.0.1:8080,name=a", "tcp://127.0.0.1:8080,name=b"])
    with pytest.raises(BadRequest, match=r"^listen: must be a list"):
        field.validate("tcp://127.0.0.1:8080")
    with pytest.raises(BadRequest, match=r"^listen: has more than 64"):
        field.validate([f"tcp://127.0.0.1:{1000 + i}" for i in range(65)])
    with pytest.raises(BadRequest, match=r"^listen: must be a string"):
        field.validate([8080])
    assert spec.SERVICE["reuseport"].validate(True) is True
    with pytest.raises(BadRequest, match=r"^reuseport: must be true or false"):
        spec.SERVICE["reuseport"].validate("yes")
    # one SCM_RIGHTS message carries a launch's fds to the launcher: 2 pipes + the sockets
    assert launcher.MAX_LISTEN_FDS == spec.MAX_LISTEN


def test_run_flags_come_before_the_command():
    opts, argv = cli.split_run_args(["--listen", "tcp://127.0.0.1:1", "--listen=unix:x", "--reuseport", "./srv",
                                     "--listen", "mine"])
    assert opts["listen"] == ["tcp://127.0.0.1:1", "unix:x"] and opts["reuseport"] is True
    assert argv == ["./srv", "--listen", "mine"]  # after the command: the service's own flag
    assert cli._switches({"reuseport": True}) == {"reuseport": True}
    fields = cli.update_fields({"listen": ["tcp://127.0.0.1:9"], "reuseport": True}, None, lambda: {})
    assert fields == {"listen": ["tcp://127.0.0.1:9"], "reuseport": True}


def svc(sid: int = 1, name: str = "web", **fields: Any) -> Any:
    s = {"cwd": "/srv/app", "user": None, "env": {}, **fields}
    return SimpleNamespace(id=sid, name=name, spec=s, desired="running", alive=False, pid=None, pidfd=None)


def test_which_set_a_service_uses():
    assert sockets.key(svc()) is None
    assert sockets.key(svc(listen=["unix:a"])) == "group:web"
    assert sockets.key(svc(3, "web:1", listen=["unix:a"], instance_of="web", instance=1)) == "group:web"
    assert sockets.key(svc(3, "web:1", listen=["unix:a"], instance_of="web", reuseport=True)) == "id:3"


def test_unix_paths_are_relative_to_the_cwd():
    (entry, ident), (_, hidden) = sockets.wanted(svc(listen=["unix:run/../app.sock", "unix:@x"]).spec)
    assert ident[3] == "/srv/app/app.sock" and ident[4] == 0o666 and entry.scheme == "unix"
    assert hidden[3] == "@x"


class Table:
    """What the supervisor gives Sockets: its services, and a list of the events it records."""

    def __init__(self, *services: Any) -> None:
        self.services = list(services)
        self.events: list[tuple[str, str]] = []

    def make(self) -> sockets.Sockets:
        return sockets.Sockets(lambda s, kind, message, **_: self.events.append((kind, message)),
                               lambda: self.services)


def abstract(tag: str = "") -> str:
    return f"unix:@pmon2-test-{uuid.uuid4().hex}{tag}"


def test_launch_binds_once_and_passes_fds_and_names():
    a, b = abstract(), abstract(",name=admin")
    web = svc(listen=[a, b])
    table = Table(web)
    held = table.make()
    fds, env = held.launch(web, {"PATH": "/bin", "LISTEN_PID": "1", "LISTEN_FDS": "9"})
    assert env == {"PATH": "/bin", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}
    assert len(fds) == 2 and all(not os.get_inheritable(fd) for fd in fds)
    again, _ = held.launch(web, {})
    assert again == fds, "held across launches, not bound again"
    with socket.socket(fileno=os.dup(fds[1])) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getsockname() == ("\0" + b[6:].split(",")[0]).encode()
    assert [k for k, _ in table.events] == ["listen"]
    held.close()


def test_instances_share_a_set_and_reuseport_gives_each_its_own():
    text = abstract()
    group = [svc(10 + i, f"web:{i}", listen=[text], instance_of="web", instance=i) for i in range(2)]
    table = Table(*group)
    held = table.make()
    fds = {held.launch(s, {})[0] for s in group}
    assert len(fds) == 1
    assert held.launch(group[1], {})[1]["LISTEN_FDNAMES"] == "web"  # NAME, never web:1 (':' separates names)
    held.close()
    tcp = [svc(20 + i, f"rp:{i}", listen=["tcp://127.0.0.1:1"], instance_of="rp", reuseport=True) for i in range(2)]
    assert {sockets.key(s) for s in tcp} == {"id:20", "id:21"}


def test_a_stopped_or_deleted_service_lets_its_sockets_go():
    web = svc(listen=[abstract()])
    table = Table(web)
    held = table.make()
    fd = held.launch(web, {})[0][0]
    web.desired = "stopped"
    held.collect()
    assert held.sets == {}
    with pytest.raises(OSError):
        os.fstat(fd)
    web.desired = "running"
    held.launch(web, {})
    table.services.clear()
    held.collect()
    assert held.sets == {}


def test_a_changed_listen_takes_effect_at_the_next_launch():
    first, second = abstract(), abstract()
    web = svc(listen=[first])
    table = Table(web)
    held = table.make()
    old = held.launch(web, {})[0]
    web.spec = dict(web.spec, listen=[first, second])
    new = held.launch(web, {})[0]
    assert new[0] == old[0] and len(new) == 2, "the unchanged socket is kept, the new one bound"
    web.spec = dict(web.spec, listen=[])
    assert held.launch(web, {}) == ((), {})
    assert held.sets == {}


def test_a_renamed_service_takes_its_sockets_along():
    text = abstract()
    web = svc(listen=[text])
    table = Table(web)
    held = table.make()
    fd = held.launch(web, {})[0][0]
    web.name = "api"
    held.collect()  # something else changed meanwhile: the old set is still its own
    assert held.launch(web, {})[0] == (fd,)
    assert list(held.sets) == ["group:api"]


def test_a_failed_bind_says_why_and_keeps_what_was_held():
    text = abstract()
    web = svc(listen=[text])
    table = Table(web)
    held = table.make()
    held.launch(web, {})
    other = svc(2, "other", listen=[text])
    table.services.append(other)
    with pytest.raises(SpawnError, match=r"address already in use|another process listens"):
        held.launch(other, {})
    assert len(held.sets["group:web"].held) == 1
    held.close()


def test_matches_tells_its_socket_by_address_and_options():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        ident = ("tcp", "127.0.0.1", port, "", None, False, 0)
        assert not sockets.matches(sock, ident), "not listening yet"
        sock.listen(1)
        assert sockets.matches(sock, ident)
        assert not sockets.matches(sock, ("tcp", "127.0.0.1", port, "", None, True, 0)), "no SO_REUSEPORT"
        assert not sockets.matches(sock, ("tcp", "127.0.0.2", port, "", None, False, 0))
        assert not sockets.matches(sock, ("tcp6", "::1", port, "", None, False, 0))


def test_after_a_restart_of_pmond_a_set_that_cannot_be_taken_back_is_bound_again(monkeypatch):
    text = abstract()
    web = svc(listen=[text])
    web.alive, web.pid, web.pidfd = True, 4242, 99

    def refused(pid, pidfd, want):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(sockets, "take_back", refused)
    table = Table(web)
    held = table.make()
    held.recover([web])
    assert "group:web" in held.sets, "the address was free: bound again at once"
    assert "cannot take back" in table.events[-1][1] and "Operation not permitted" in table.events[-1][1]
    # A second pmond's view: the running process still listens, so the bind must wait for its next start.
    again = Table(web)
    later = again.make()
    later.recover([web])
    assert "group:web" not in later.sets
    assert "bound again at the next start" in again.events[-1][1]
    held.close()


def test_only_root_asks_for_a_port_below_1024():
    nobody = auth.Caller(pid=1, uid=65534, gid=65534)
    token = auth.CALLER.set(nobody)
    try:
        with pytest.raises(auth.Forbidden, match="below 1024 are for root only"):
            sockets.check_caller({"listen": ["tcp://127.0.0.1:80"]}, None, [])
        sockets.check_caller({"listen": ["tcp://127.0.0.1:8080", "unix:x"]}, None, [])
        granted = svc(listen=["tcp://127.0.0.1:80"])
        sockets.check_caller({"listen": ["tcp://127.0.0.1:80"]}, granted, [])  # root gave it: an update keeps it
        member = svc(5, "web:0", listen=["tcp://127.0.0.1:443"], instance_of="web")
        sockets.check_caller({"listen": ["tcp://127.0.0.1:443"], "instance_of": "web"}, None, [member])
        with pytest.raises(auth.Forbidden):
            sockets.check_caller({"listen": ["tcp6://[::1]:22"], "instance_of": "web"}, None, [member])
    finally:
        auth.CALLER.reset(token)
    sockets.check_caller({"listen": ["tcp://127.0.0.1:80"]}, None, [])  # pmond itself, or root
