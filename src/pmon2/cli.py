"""pmon2's command line: argparse, one function per command, a thin client of pmond's API.

Standard library only on the everyday paths; nothing here knows pmond's internals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pmon2 import __version__
from pmon2.errors import PmonError

# Not `typing`: importing it costs the CLI a few ms, and annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

EXAMPLES = {
    "run": "pmon2 run ./bin/api --name api -- --port 8080\n"
           "  pmon2 run ./bin/gin --args \"-prjHome=/srv\" --user www",
    "ls": "pmon2 ls\n  pmon2 ls --json | jq '.[].status'",
    "desc": "pmon2 desc api",
    "start": "pmon2 start api",
    "stop": "pmon2 stop api\n  pmon2 stop -f 3\n  pmon2 stop 'web-*' worker\n  pmon2 stop all",
    "restart": "pmon2 restart api worker\n  pmon2 restart all",
    "reload": "pmon2 reload api --sig HUP",
    "del": "pmon2 del api\n  pmon2 del -y all",
    "rename": "pmon2 rename all all-old    # fix a name that today's rules refuse",
    "log": "pmon2 log api -n 50\n  pmon2 log              # all services",
    "logf": "pmon2 logf api worker\n  pmon2 logf            # all services",
    "monit": "pmon2 monit      (keys: r restart, s stop, t start, l reload, d delete, q quit)",
    "flush": "pmon2 flush api\n  pmon2 flush            # all services",
    "completion": "pmon2 completion bash > /etc/bash_completion.d/pmon2\n"
                  "  pmon2 completion zsh > \"${fpath[1]}/_pmon2\"\n"
                  "  pmon2 completion fish > ~/.config/fish/completions/pmon2.fish",
    "version": "pmon2 version",
    "events": "pmon2 events api -n 20\n  pmon2 events --json\n"
              "  pmon2 events -f          # then each new event as it happens, like journalctl -f (Ctrl-C ends)\n"
              "  pmon2 events -f api --json   # one JSON object per line",
    "why": "pmon2 why api",
    "daemon": "pmon2 daemon status --json\n"
              "  pmon2 daemon recover   # rebuild a lost database from the running services",
    "startup": "pmon2 startup            # root: system unit; others: systemctl --user unit\n"
               "  pmon2 startup --print    # only show the unit",
    "unstartup": "pmon2 unstartup",
    "apply": "pmon2 apply pmon2.toml\n  pmon2 apply pmon2.toml --dry-run    # the plan alone\n"
             "  pmon2 apply deploy/app.yaml --prune  # also remove what left the file",
    "dump": "pmon2 dump > pmon2.toml\n  pmon2 dump --masked    # secret values as ***",
    "schema": "pmon2 schema > pmon2.schema.json\n  pmon2 schema --format markdown   # docs/app-file.md",
    "update": "pmon2 update api --env LOG_LEVEL=debug --restart\n  pmon2 update api --kill-timeout 30\n"
              "  pmon2 update api --args \"--port 9090\"\n  pmon2 update api -- ./bin/api2 --port 9090",
    "scale": "pmon2 scale web 6\n  pmon2 scale web 1",
    "import": "pmon2 import pmon2-go --dry-run    # what would happen, changing nothing\n"
              "  pmon2 import pmon2-go --stop-old   # stop the Go pmond (not its services), take them over\n"
              "  pmon2 import pmon2-go /etc/pmon2/data/db/data.db --json\n"
              "  pmon2 import ecosystem.config.js --env production   # or .json/.yaml, supervisord.conf, Procfile\n"
              "  pmon2 import /etc/supervisor/supervisord.conf --to pmon2.toml   # write an app file, apply nothing",
}

# Flags of `run`: name -> (destination, takes a value). Long ones are recognised anywhere on the
# line; short ones only before the command, so a service's own `-n 5` is left alone.
RUN_FLAGS: dict[str, tuple[str, bool]] = {
    "--name": ("name", True), "--args": ("args", True), "--user": ("user", True),
    "--log": ("log", True), "--log_dir": ("log_dir", True), "--log-dir": ("log_dir", True),
    "--no-autorestart": ("no_autorestart", False), "--min-uptime": ("min_uptime", True),
    "--kill-timeout": ("kill_timeout", True), "--stop-signal": ("stop_signal", True),
    "--log-max-size": ("log_max_size", True), "--log-keep": ("log_keep", True),
    "--log-compress": ("log_compress", False), "--json": ("json", False),
    "--env": ("env", True), "--env-clear": ("env_clear", False), "--cwd": ("cwd", True),
    "--env-file": ("env_file", True),
    "--group": ("group", True), "--restart": ("restart", True), "--max-restarts": ("max_restarts", True),
    "--reload-signal": ("reload_signal", True), "--instances": ("instances", True), "--port": ("port", True),
    "--tag": ("tags", True), "--ready": ("ready", True), "--no-autostart": ("no_autostart", False),
    "--watchdog-sec": ("watchdog_sec", True),
    "--listen": ("listen", True), "--reuseport": ("reuseport", False),
    "--pidfile": ("pidfile", True), "--reload-timeout": ("reload_timeout", True),
    "--rolling-batch": ("rolling_batch", True),
}
REPEATABLE = {"env", "tags", "env_file", "listen"}
# Flags added since `run` took long flags anywhere: only before the command, since services commonly take
# --port, --env or --group of their own.
BEFORE_ONLY = {"--env", "--env-clear", "--env-file", "--cwd", "--group", "--restart", "--max-restarts",
               "--reload-signal", "--instances", "--port", "--tag", "--ready", "--no-autostart",
               "--watchdog-sec", "--listen", "--reuseport", "--pidfile", "--reload-timeout", "--rolling-batch"}
# run flags whose text goes through the spec model as it is (spec.Field.from_text)
RUN_FIELDS = ("name", "user", "group", "log", "log_dir", "min_uptime", "kill_timeout", "stop_signal", "log_max_size",
              "log_keep", "restart", "max_restarts", "reload_signal", "instances", "port", "ready",
              "watchdog_sec", "pidfile", "reload_timeout", "rolling_batch")
RUN_SHORT = {"-n": "--name", "-a": "--args", "-u": "--user", "-l": "--log", "-d": "--log_dir"}


class UsageError(PmonError):
    code = "usage"


# argparse passes each of its strings through gettext, which searches the disk for a message catalog at
# every call and imports locale: 1.6 ms of each command. CPython ships no catalog for argparse's
# messages, so the identity is what gettext returns anyway.
argparse._ = lambda message: message  # type: ignore[attr-defined]
argparse.ngettext = lambda singular, plural, n: singular if n == 1 else plural  # type: ignore[attr-defined]


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size would say it, without importing shutil (with
    fnmatch, bz2 and lzma: 3 ms of every command, since argparse formats a usage line for each parser)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=_columns() - 2)


def _flag_value(flag: str, eq: str, inline: str, tokens: list[str], i: int) -> tuple[Any, int]:
    """The value of the run flag `flag` (True for one that takes none), and the index of the next token.
    `eq`/`inline`: what stood after an `=` in the same token."""
    if not RUN_FLAGS[flag][1]:
        if eq:
            raise UsageError(f"{flag} takes no value")
        return True, i
    if eq:
        return inline, i
    if i < len(tokens):
        return tokens[i], i + 1
    raise UsageError(f"{flag} needs a value")


def split_run_args(tokens: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Separate pmon2's flags from the service's argv; everything after `--` is the service's."""
    import shlex

    opts: dict[str, Any] = {}
    argv: list[str] = []
    early_args: list[str] = []  # --args given before the command: they follow the command
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok == "--":
            rest = tokens[i:]
            if not argv and rest:
                argv.append(rest.pop(0))
                argv.extend(early_args)
            argv.extend(rest)
            break
        if not argv and tok in RUN_SHORT:
            tok = RUN_SHORT[tok]
        flag, eq, inline = tok.partition("=")
        if flag in RUN_FLAGS and (not argv or (tok.startswith("--") and flag not in BEFORE_ONLY)):
            dest = RUN_FLAGS[flag][0]
            value, i = _flag_value(flag, eq, inline, tokens, i)
            if value is True:
                opts[dest] = True
            elif dest in REPEATABLE:
                opts.setdefault(dest, []).append(value)
            elif dest == "args":
                try:
                    (argv if argv else early_args).extend(shlex.split(value))
                except ValueError as exc:
                    raise UsageError(f"--args: {exc}") from None
            else:
                opts[dest] = value
            continue
        if not argv and tok.startswith("-") and tok not in ("-",):
            raise UsageError(f"unknown option {tok!r} before the command; put the service's own "
                             "flags after it, or after --")
        argv.append(tok)
        if len(argv) == 1:
            argv.extend(early_args)
    if early_args and not argv:
        raise UsageError("--args needs a command: pmon2 run ./bin/app --args \"...\"")
    return opts, argv


def _client() -> Any:
    from pmon2 import paths
    from pmon2.client import Client

    return Client(paths.resolve())


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _color() -> bool:
    from pmon2.render.text import use_color

    return use_color(sys.stdout)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


# commands


def _switches(opts: dict[str, Any]) -> dict[str, Any]:
    """The fields that run's valueless flags set (for `run` and `update`)."""
    fields: dict[str, Any] = {}
    if opts.get("no_autorestart"):
        fields["restart"] = "no"
    if opts.get("no_autostart"):
        fields["autostart"] = False
    if opts.get("log_compress"):
        fields["log_compress"] = True
    if opts.get("reuseport"):
        fields["reuseport"] = True
    return fields


def cmd_run(args: argparse.Namespace) -> int:
    opts, argv = split_run_args(args.rest)
    if not argv:
        raise UsageError("a command is needed: pmon2 run ./bin/app [args...] [--name NAME]")
    from pmon2 import spec

    env = _env_changes(opts, spec.service_env(os.environ))  # --env-clear, --env-file F, --env K=V
    cwd = os.path.abspath(opts["cwd"]) if opts.get("cwd") else os.getcwd()  # relative: to the caller's cwd
    body: dict[str, Any] = {"argv": argv, "cwd": cwd, "env": env, **_switches(opts)}
    for key in RUN_FIELDS:
        if key in opts:
            body[key] = spec.SERVICE[key].from_text(opts[key])
    if "tags" in opts:
        body["tags"] = spec.SERVICE["tags"].validate(opts["tags"])
    if "listen" in opts:
        body["listen"] = spec.SERVICE["listen"].validate(opts["listen"])
    svc = _client().request("POST", "/v1/services", body)
    if opts.get("json"):
        _print_json(svc)
    elif svc["pid"] is None:
        _say(f"created {svc['name']} (id {svc['id']}), not started: pmon2 start {svc['name']}")
    else:
        _say(f"started {svc['name']} (id {svc['id']}, pid {svc['pid']})"
             + (f" and {len(svc['instance_ids']) - 1} more instances" if len(svc.get("instance_ids", [])) > 1 else ""))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    services = _client().request("GET", "/v1/services")
    if args.json:
        _print_json(services)
        return 0
    if not services:
        _say("no services yet: start one with  pmon2 run ./bin/app --name app")
        return 0
    from pmon2.render.table import render_services
    from pmon2.render.text import terminal_width

    _say(render_services(services, _color(), terminal_width(sys.stdout)))
    return 0


def cmd_desc(args: argparse.Namespace) -> int:
    client = _client()
    path = client.service_path(args.service)
    svc = client.request("GET", path + "?show_env=true" if args.show_env else path)
    if args.json:
        _print_json(svc)
        return 0
    from pmon2.render.detail import render_detail

    _say(render_detail(svc, _color()))
    return 0


def _batch(action: str, refs: list[str], done: Callable[[dict[str, Any]], str],
           extra: dict[str, Any] | None = None) -> int:
    """One request for any number of services (ids, names, globs, `all`): pmond resolves the selection
    all or nothing, runs the action on all of them at once, and answers one result each. One line per
    service; non-zero when any one failed."""
    results = _client().request("POST", f"/v1/actions/{action}", {"select": refs, **(extra or {})})["results"]
    failed = 0
    for item in results:
        if item["ok"]:
            _say(done(item["service"]))
        else:
            failed += 1
            sys.stderr.write(f"pmon2: {item['name']}: {item['error']['message']}\n")
    return 1 if failed else 0


def cmd_start(args: argparse.Namespace) -> int:
    return _batch("start", args.service, lambda s: f"{s['name']} running (pid {s['pid']})")


def cmd_stop(args: argparse.Namespace) -> int:
    return _batch("stop", args.service, lambda s: f"{s['name']} stopped", {"force": args.force})


def cmd_restart(args: argparse.Namespace) -> int:
    if getattr(args, "update_env", False):
        return _restart_update_env(args)
    return _batch("restart", args.service, lambda s: f"{s['name']} restarted (pid {s['pid']})")


def cmd_reload(args: argparse.Namespace) -> int:
    return _batch("reload", args.service, _reloaded, {"signal": args.sig, "wait": args.wait or None})


def _reloaded(s: dict[str, Any]) -> str:
    if s.get("handover"):  # reload --wait
        return f"{s['name']}: {s['handover']['message']}"
    if s.get("rolled"):  # a rolling restart (instances, or --listen without reload_signal)
        was = f"pid {s['replaced_pid']} -> " if s.get("replaced_pid") else ""
        return f"{s['name']} replaced ({was}pid {s['pid']})"
    return f"sent {s['signal']} to {s['name']} (pid {s['pid']})"


def cmd_del(args: argparse.Namespace) -> int:
    if "all" in args.service and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("del all deletes every service: add -y to confirm")
        sys.stderr.write("delete every service? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            _say("nothing deleted")
            return 1
    return _batch("delete", args.service, lambda s: f"deleted {s['name']} (id {s['id']})", {"force": args.force})


def _log_path(args: argparse.Namespace, follow: bool) -> str:
    """GET /v1/logs for `log` and `logf`: pmond reads the files, so no access to the log dir is needed."""
    from pmon2.render import logs

    if args.lines < 0:
        raise UsageError("-n must be 0 or more")
    if args.out and args.err:
        raise UsageError("--out or --err, not both (neither shows both)")
    if any("," in ref for ref in args.service):
        raise UsageError("a service reference cannot hold ','")
    return logs.api_path(args.service, args.lines, "out" if args.out else "err" if args.err else "all", follow)


def cmd_log(args: argparse.Namespace) -> int:
    from pmon2.render import logs

    answer = _client().request("GET", _log_path(args, follow=False))
    sys.stdout.write(logs.render_json(answer) if args.json else logs.render_text(answer, args.lines, _color()))
    sys.stdout.flush()
    problems = logs.problems(answer)
    for problem in problems:
        sys.stderr.write(f"pmon2: {problem}\n")
    return 1 if problems else 0


def cmd_logf(args: argparse.Namespace) -> int:
    from pmon2.render import logs

    path = _log_path(args, follow=True)
    try:
        logs.follow(_client().stream("GET", path), _color(), sys.stdout, sys.stderr, as_json=args.json)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_rename(args: argparse.Namespace) -> int:
    client = _client()
    svc = client.request("POST", client.service_path(args.service, "rename"), {"name": args.name})
    _say(f"renamed {args.service} to {svc['name']} (id {svc['id']})")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    def done(result: dict[str, Any]) -> str:
        n = len(result["files"])
        from pmon2.render.words import files_emptied

        return files_emptied(n)

    if not args.service:
        _say(done(_client().request("POST", "/v1/flush")))  # every service: root only
        return 0
    return _batch("flush", args.service, done)


def cmd_monit(args: argparse.Namespace) -> int:
    try:
        from pmon2.render import dashboard
    except ImportError as exc:
        raise PmonError(f"the dashboard needs textual ({exc.name} is missing): pip install textual") from None
    dashboard.run(_client())
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    from pmon2.completion import script

    sys.stdout.write(script(args.shell, build_parser()))
    return 0


def cmd_complete_names(args: argparse.Namespace) -> int:
    """Hidden: service names for shell completion. Never starts pmond, never fails loudly."""
    from pmon2.client import DaemonUnreachable

    try:
        services = _client().request("GET", "/v1/services", autostart=False, timeout=2.0)
    except (DaemonUnreachable, PmonError):
        return 0
    for svc in services:
        _say(svc["name"])
    return 0


def _events(client: Any, ref: str | None, limit: int) -> list[dict[str, Any]]:
    if limit <= 0:
        raise UsageError("-n must be 1 or more")
    path = client.service_path(ref, "events") if ref else "/v1/events"
    return client.request("GET", f"{path}?limit={limit}")


def cmd_events(args: argparse.Namespace) -> int:
    if args.follow:
        return _follow_events(args)
    events = _events(_client(), args.service, args.lines)
    if args.json:
        _print_json(events)
        return 0
    from pmon2.render.why import render_events

    _say(render_events(events, _color()))
    return 0


def _follow_events(args: argparse.Namespace) -> int:
    """`events -f`: the last -n events, then each new one as pmond publishes it (GET /v1/events?follow=true,
    one connection), until Ctrl-C or a closed pipe, which end it quietly with 0."""
    if args.lines <= 0:
        raise UsageError("-n must be 1 or more")
    client = _client()
    path = client.service_path(args.service, "events") if args.service else "/v1/events"
    color = _color()
    widths: dict[str, int] = {}  # columns only grow from batch to batch (render_events)
    try:
        for batch in client.stream("GET", f"{path}?limit={args.lines}&follow=true"):
            for item in batch:
                if "kind" not in item and isinstance(item.get("error"), dict):  # the ledger could not be read
                    raise PmonError(item["error"].get("message") or "pmond could not read the ledger")
            events = [item for item in batch if "kind" in item]
            if not events:
                continue
            if args.json:
                sys.stdout.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events))
            else:
                from pmon2.render.why import render_events

                sys.stdout.write(render_events(events, color, widths) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        _quiet_stdout()
    return 0


def _quiet_stdout() -> None:
    """The reader of our stdout went away (`| head`): send what is left nowhere, so the interpreter's last
    flush does not complain."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def cmd_why(args: argparse.Namespace) -> int:
    from pmon2.render.why import explain

    client = _client()
    try:
        services = [client.request("GET", client.service_path(args.service))]
    except PmonError as exc:  # NAME of an instance group (web for web:0..3), as ls and reload take it
        if exc.code != "not_found":
            raise
        services = [client.request("GET", client.service_path(str(s["id"])))
                    for s in client.request("GET", "/v1/services") if s.get("instance_of") == args.service]
        if not services:
            raise
    _say("\n\n".join(explain(svc, _events(client, str(svc["id"]), 200)) for svc in services))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from pmon2.client import DaemonUnreachable

    daemon = None
    try:
        daemon = _client().request("GET", "/v1/version", autostart=False, timeout=5.0)
    except DaemonUnreachable:
        pass
    if args.json:
        _print_json({"version": __version__, "daemon": daemon})
        return 0
    _say(f"pmon2 {__version__}")
    _say(f"pmond {daemon['version']} (pid {daemon['pid']})" if daemon else "pmond not running")
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from pmon2.client import DaemonUnreachable

    client = _client()
    if args.action == "start":
        already = client.is_running()
        info = client.request("GET", "/v1/daemon")
        if args.json:
            _print_json(info)
        else:
            _say(f"pmond {'was already' if already else 'is'} running: pid {info['pid']}, socket {info['socket']}")
        return 0
    if args.action == "recover":
        if client.is_running():
            _say("pmond is running, so its database matches the running services: nothing to recover")
            return 0
        client.start_daemon("--recover")
        info = client.request("GET", "/v1/daemon")
        report = info.get("recovered") or []
        if args.json:
            _print_json(report)
            return 0
        if not report:
            _say("no running service was missing from the database; pmond is running")
        for item in report:
            if item["restored"]:
                _say(f"restored {item['name']} (id {item['id']}, pid {item['pid']}); not restored, now at "
                     f"their defaults: {', '.join(item['not_restored'])}")
            else:
                _say(f"could not restore service {item['id']}: {item['why']}")
        return 0
    if args.action == "stop":
        try:
            resp = client.request("POST", "/v1/daemon/shutdown", autostart=False, timeout=10.0)
        except DaemonUnreachable:
            _say("pmond is not running")
            return 0
        _wait_gone(resp["pid"], 10.0)
        _say(f"pmond stopped (pid {resp['pid']}); services keep running")
        return 0
    try:
        info = client.request("GET", "/v1/daemon", autostart=False, timeout=5.0)
    except DaemonUnreachable as exc:
        if args.json:
            _print_json({"running": False, "socket": str(client.paths.socket), "version": __version__,
                         "pid": None})
        else:
            detail = "" if exc.message == "pmond is not running" else f": {exc.message}"
            _say(f"pmond is not running{detail}")
        return 3
    info["running"] = True
    if args.json:
        _print_json(info)
    else:
        for key in ("pid", "version", "socket", "uptime_s", "services", "data_dir", "log_dir", "mode",
                    "exit_status_sources", "launcher_pid"):
            _say(f"{key:<20} {info.get(key)}")
        access = info.get("access") or {}
        if access:
            who = ["root", *[u for u in access.get("users", []) if u != "root"],
                   *[f"group {g}" for g in access.get("groups", [])]]
            _say(f"{'may connect':<20} {', '.join(who)} (non-root callers: their own services only)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.source != "pmon2-go":
        return _import_file(args)
    from pmon2.importers import pmon2_go

    return pmon2_go.run(args, _client, _say, lambda text: sys.stderr.write(text + "\n"), _print_json)


def _import_file(args: argparse.Namespace) -> int:
    """`pmon2 import FILE`: convert a pm2, supervisor or Procfile file (pmon2.importers), report what did not
    map, then write it as TOML (--to) or apply it as `pmon2 apply` does (the source recorded is FILE)."""
    import tempfile

    from pmon2 import appfile
    from pmon2.importers import formats
    from pmon2.render.words import plural

    if args.path is not None or args.stop_old:
        raise UsageError(f"{args.path or '--stop-old'}: only for `pmon2 import pmon2-go`")
    fmt, document, unmapped = formats.convert(args.source, env_name=args.env)
    source = os.path.abspath(args.source)
    names = list(document["services"])
    report: dict[str, Any] = {"file": source, "format": fmt, "services": names,
                              "unmapped": [{"key": k, "why": w} for k, w in unmapped]}
    if not args.json and not (args.to and args.dry_run):  # that prints the file, which says the same
        _say(f"{args.source}: {formats.FORMAT_NAMES[fmt]}, {plural(len(names), 'service')}: {', '.join(names)}")
        for key, why in unmapped:
            _say(f"  not mapped: {key}: {why}")
    comments = [f"Imported by `pmon2 import` from {source} ({formats.FORMAT_NAMES[fmt]}).",
                *(["What did not map:"] if unmapped else []), *(f"  {k}: {w}" for k, w in unmapped)]
    text = formats.to_toml(document, comments)
    out = os.path.abspath(args.to) if args.to else None
    with tempfile.TemporaryDirectory(prefix="pmon2-import-") as tmp:
        draft = os.path.join(tmp, os.path.basename(out) if out and out.endswith(".toml") else "pmon2.toml")
        with open(draft, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:  # the checks of `pmon2 apply`, before anything is written or sent
            body = appfile.load(draft, dry_run=args.dry_run)
        except appfile.AppFileError as exc:
            for problem in exc.problems:
                sys.stderr.write(f"{str(problem).replace(draft, source + ' (converted)')}\n")
            sys.stderr.write(f"pmon2: {plural(len(exc.problems), 'problem')} in what {args.source} converts to: "
                             "nothing was written or applied\n")
            return 2
        if out is not None:
            if os.path.isdir(out):
                raise UsageError(f"--to {args.to}: is a directory; name the file, such as pmon2.toml")
            if args.dry_run:
                if args.json:
                    _print_json({**report, "toml": text})
                else:
                    sys.stdout.write(text)
                return 0
            partial = f"{out}.{os.getpid()}.part"
            with open(partial, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(partial, out)
            report["written"] = out
            if args.json:
                _print_json(report)
            else:
                _say(f"wrote {args.to}; `pmon2 apply {args.to}` runs it")
            return 0
    body["source"] = source  # so that pmond ties the services to FILE: a new import of it replaces them
    answer = _new_endpoint(_client(), "POST", "/v1/apply", body)
    if args.json:
        _print_json({**report, "apply": answer})
    else:
        lines, errors = appfile.render_plan(answer, body["services"], args.dry_run)
        _say("\n".join(lines))
        for line in errors:
            sys.stderr.write(line + "\n")
    return 1 if appfile.failed(answer) else 0


def cmd_startup(args: argparse.Namespace) -> int:
    from pmon2 import startup

    try:
        _say(startup.install(print_only=args.print))
    except startup.NoSystemd as exc:
        sys.stderr.write(f"pmon2: {exc.message}\n")
        _say(exc.hint)
        return 1
    return 0


def cmd_unstartup(args: argparse.Namespace) -> int:
    from pmon2 import startup

    try:
        _say(startup.remove())
    except startup.NoSystemd as exc:
        sys.stderr.write(f"pmon2: {exc.message}\n")
        _say(exc.hint)
        return 1
    return 0


def _wait_gone(pid: int, timeout: float) -> None:
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


# services as code (issue 12): app files, dump, schema, update, scale


def cmd_apply(args: argparse.Namespace) -> int:
    """Check the whole file here (every problem, with its line), then send the resolved services; pmond
    plans and applies. Exit 2 for a bad file (nothing sent), 1 when a service of the plan failed."""
    from pmon2 import appfile

    try:
        body = appfile.load(args.file, prune=args.prune, dry_run=args.dry_run)
    except appfile.AppFileError as exc:
        from pmon2.render.words import plural

        for problem in exc.problems:
            sys.stderr.write(f"{problem}\n")
        sys.stderr.write(f"pmon2: {plural(len(exc.problems), 'problem')} in {args.file}: nothing was applied\n")
        return 2
    from pmon2.client import ApiError

    try:
        answer = _new_endpoint(_client(), "POST", "/v1/apply", body)
    except ApiError as exc:
        if "nothing was applied" not in exc.message:
            raise
        # pmond's own checks (a dependency it does not know, a name another file or user holds): as above
        sys.stderr.write(f"pmon2: {args.file}: {exc.message}\n")
        return 2
    if args.json:
        _print_json(answer)
    else:
        out, err = appfile.render_plan(answer, body["services"], args.dry_run)
        _say("\n".join(out))
        for line in err:
            sys.stderr.write(line + "\n")
    return 1 if appfile.failed(answer) else 0


def _new_endpoint(client: Any, method: str, path: str, body: Any = None) -> Any:
    """A request to an endpoint that an older pmond, still running, may not have: say so plainly."""
    from pmon2.client import ApiError

    try:
        return client.request(method, path, body)
    except ApiError as exc:
        if exc.status == 404 and exc.message.startswith("no such endpoint"):
            raise PmonError(f"the running pmond has no {path.split('?')[0]}: it is older than this pmon2 "
                            f"{__version__}; `pmon2 daemon stop` (services keep running), then try again") from None
        raise


def cmd_dump(args: argparse.Namespace) -> int:
    from pmon2 import appfile
    from pmon2.client import ApiError

    try:
        answer = _new_endpoint(_client(), "GET", "/v1/dump?masked=true" if args.masked else "/v1/dump")
    except ApiError as exc:
        if exc.status == 403 and not args.masked:
            raise PmonError(f"{exc.message} (`pmon2 dump --masked` writes secret values as ***)") from None
        raise
    sys.stdout.write(appfile.dump_toml(answer, args.masked))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        from pmon2 import appfile

        sys.stdout.write(appfile.markdown())
        return 0
    from pmon2 import spec

    _print_json(spec.app_file_schema())
    return 0


def split_update_args(tokens: list[str]) -> tuple[dict[str, Any], list[str] | None, bool]:
    """`update`'s tokens -> (run's options, a new command or None, restart now). Flags are run's (RUN_FLAGS);
    a bare --restart means "restart now" (--restart MODE is the restart field); the first token that is
    not a flag, or what follows --, is the new command, verbatim."""
    from pmon2 import spec

    opts: dict[str, Any] = {}
    restart_now = False
    i = 0
    while i < len(tokens):
        tok = RUN_SHORT.get(tokens[i], tokens[i])
        i += 1
        if tok == "--":
            return opts, tokens[i:] or None, restart_now
        if not tok.startswith("-") or tok == "-":
            return opts, tokens[i - 1:], restart_now
        flag, eq, inline = tok.partition("=")
        if flag == "--restart" and not eq and (i >= len(tokens) or tokens[i] not in spec.RESTART_MODES):
            restart_now = True
            continue
        if flag == "--name" or flag not in RUN_FLAGS:
            hint = "; rename it with `pmon2 rename`" if flag == "--name" else " (see 'pmon2 update --help')"
            raise UsageError(f"update takes no {flag}{hint}")
        dest = RUN_FLAGS[flag][0]
        value, i = _flag_value(flag, eq, inline, tokens, i)
        if dest in REPEATABLE and value is not True:
            opts.setdefault(dest, []).append(value)
        else:
            opts[dest] = value
    return opts, None, restart_now


def _stored(client: Any, ref: str) -> dict[str, Any]:
    """A service's detail with its env in clear (root and its own user only); for a group NAME, its NAME:0."""
    from pmon2.client import ApiError

    try:
        svc = client.request("GET", client.service_path(ref) + "?show_env=true")
    except ApiError as exc:
        if exc.status != 404 or ":" in ref:
            raise
        try:
            svc = client.request("GET", client.service_path(f"{ref}:0") + "?show_env=true")
        except ApiError:
            raise exc from None
    if svc.get("env_masked"):
        raise PmonError(f"{ref}: its environment is masked for you, so it cannot be changed key by key")
    return svc


def _env_changes(opts: dict[str, Any], current: dict[str, str] | None) -> dict[str, str]:
    """--env-clear (or the current env), then each --env-file, then each --env KEY=VALUE."""
    env = {} if opts.get("env_clear") or current is None else dict(current)
    if opts.get("env_file"):
        from pmon2 import appfile

        for path in opts["env_file"]:
            try:
                env.update(appfile.read_env_file(path, os.environ))
            except appfile.AppFileError as exc:
                raise UsageError(f"--env-file {exc.message}") from None
    for item in opts.get("env", []):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


def update_fields(opts: dict[str, Any], argv: list[str] | None, stored: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run's options -> the fields to change, each through the spec model. `stored()` gives the service
    as it is, for what changes relative to it (env, --args)."""
    from pmon2 import spec

    fields: dict[str, Any] = {}
    if any(k in opts for k in ("env", "env_file", "env_clear")):
        current = None if opts.get("env_clear") else stored()["env"]
        fields["env"] = spec.SERVICE["env"].validate(_env_changes(opts, current))
    if "args" in opts or argv:
        import shlex

        try:
            extra = shlex.split(opts["args"]) if "args" in opts else []
        except ValueError as exc:
            raise UsageError(f"--args: {exc}") from None
        fields["argv"] = spec.SERVICE["argv"].validate([*(argv or stored()["argv"][:1]), *extra])
    if "cwd" in opts:
        fields["cwd"] = spec.SERVICE["cwd"].validate(os.path.abspath(opts["cwd"]))
    fields.update(_switches(opts))
    done = {"env", "env_file", "env_clear", "args", "cwd", "no_autorestart", "no_autostart", "log_compress",
            "reuseport"}
    for dest, value in opts.items():
        if dest in done:
            continue
        field = spec.SERVICE.get(dest)
        if field is None:
            raise UsageError(f"update cannot change {dest}")
        fields[dest] = field.validate(value) if isinstance(value, list) else field.from_text(value)
    return fields


def cmd_update(args: argparse.Namespace) -> int:
    if args.rest[:1] in (["-h"], ["--help"]):
        build_parser("update").parse_args(["update", "--help"])
    opts, argv, restart_now = split_update_args(args.rest)
    restart_now = restart_now or args.restart
    as_json = opts.pop("json", False) or args.json
    client = _client()
    cache: list[dict[str, Any]] = []

    def stored() -> dict[str, Any]:
        if not cache:
            cache.append(_stored(client, args.service))
        return cache[0]

    fields = update_fields(opts, argv, stored)
    if not fields:
        raise UsageError(f"nothing to change: give run's flags, such as --env KEY=VALUE (`pmon2 restart "
                         f"{args.service}` restarts it as it is)")
    answer = _new_endpoint(client, "POST", client.service_path(args.service, "update"),
                           {"fields": fields, "restart": restart_now})
    if as_json:
        _print_json(answer)
        return 0
    names = ", ".join(s["name"] for s in answer["services"])
    _say(f"updated {names}: {', '.join(fields)}")
    if answer.get("restarted"):
        _say("restarted " + ", ".join(f"{s['name']} (pid {s['pid']})" for s in answer["services"]))
    elif answer.get("restart_needed"):
        _say(f"it takes effect at the next start: `pmon2 restart {args.service}`, or update with --restart")
    return 0


def _restart_update_env(args: argparse.Namespace) -> int:
    """pm2's `restart --update-env`: each service's env takes the caller's variables (minus the login
    session's and PMON2_*) over its own, then the services restart."""
    from pmon2 import spec

    for ref in args.service:
        if ref == "all" or ref.startswith("tag:") or any(c in ref for c in "*?["):
            raise UsageError(f"--update-env takes names or ids, not {ref!r}")
    client = _client()
    caller = spec.service_env(os.environ)
    for ref in args.service:
        env = spec.SERVICE["env"].validate({**_stored(client, ref)["env"], **caller})
        _new_endpoint(client, "POST", client.service_path(ref, "update"), {"fields": {"env": env}, "restart": False})
    return _batch("restart", args.service, lambda s: f"{s['name']} restarted with your environment (pid {s['pid']})")


def cmd_scale(args: argparse.Namespace) -> int:
    from pmon2 import spec

    count = spec.SERVICE["instances"].from_text(args.count)
    client = _client()
    before = {s["name"] for s in client.request("GET", "/v1/services")
              if s["name"] == args.service or s.get("instance_of") == args.service}
    answer = _new_endpoint(client, "POST", client.service_path(args.service, "scale"), {"instances": count})
    if args.json:
        _print_json(answer)
        return 0
    after = [s["name"] for s in answer.get("services", [])]
    added = [n for n in after if n not in before]
    removed = answer.get("removed") or []
    line = f"{args.service}: {count} instance{'s' if count != 1 else ''}"
    if added:
        line += f"; added {', '.join(added)}"
    if removed:
        line += f"; removed {', '.join(removed)}"
    if not added and not removed:
        line += "; nothing to change"
    _say(line)
    return 0


# parser


def _asks_help(tokens: list[str]) -> bool:
    """-h/--help before the command asks for run's help; after it, it is the service's flag."""
    skip = False
    for tok in tokens:
        if skip:
            skip = False
            continue
        if tok in ("-h", "--help"):
            return True
        if tok == "--" or not tok.startswith("-"):
            return False
        flag = RUN_SHORT.get(tok, tok)
        skip = flag in RUN_FLAGS and RUN_FLAGS[flag][1] and "=" not in tok
    return not tokens


COMMAND_NAMES = frozenset({
    "run", "exec", "ls", "list", "desc", "show", "start", "restart", "stop", "reload", "del", "delete", "log",
    "logf", "flush", "monit", "dash", "completion", "events", "why", "version", "daemon", "_names", "rename",
    "startup", "unstartup", "import", "apply", "dump", "schema", "update", "scale",
})


class _Skipped:
    """Stands in for the sub-parsers a call does not need: building all of them costs ~8 ms."""

    usage = None

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self

    def add_mutually_exclusive_group(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self


FLAG_METAVARS = {"reload_signal": "SIG", "tags": "TAG", "port": "PORT", "ready": "CHECK", "pidfile": "PATH",
                 "restart": "WHEN"}


def _field_flags(group: Any) -> None:
    """List in `run --help` every flag of spec.SERVICE_FIELDS not written out above, with the first sentence
    of its doc and its default: a field added to the spec model shows up here without a line of its own."""
    import re

    from pmon2 import spec

    listed = {flag for action in group._group_actions for flag in action.option_strings}
    for field in spec.SERVICE_FIELDS:
        if not field.flag or field.flag in listed or field.flag not in RUN_FLAGS:
            continue
        text = re.split(r"(?<!\.)\. (?=[A-Z`])", field.doc.replace("`", ""))[0].rstrip(".")
        first = text.split(" ", 1)[0]
        if first[1:].islower() and first != "Unix":
            text = text[0].lower() + text[1:]
        if field.default not in (None, [], {}, False, ""):
            text += f" (default {field.default:g})" if isinstance(field.default, float) else \
                f" (default {field.default})"
        if field.flag in BEFORE_ONLY:
            text += "; before the command"
        if RUN_FLAGS[field.flag][1]:
            metavar = "SECONDS" if field.unit == "s" else FLAG_METAVARS.get(field.name) or (
                "N" if field.schema.get("type") == "integer" else field.name.upper())
            group.add_argument(field.flag, metavar=metavar, help=text.replace("%", "%%"))
        else:
            group.add_argument(field.flag, action="store_true", help=text.replace("%", "%%"))


def build_parser(only: str | None = None) -> Parser:
    """The whole parser, or (with `only`) just the sub-parser of that command, for speed."""
    parser = Parser(prog="pmon2", description="pmon2: keep services alive on a Linux server.",
                    epilog="Every command that needs pmond starts it when it is not running.")
    parser.add_argument("-v", "--version", action="version", version=f"pmon2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
                aliases: tuple[str, ...] = ()) -> Any:
        if only is not None and only != name and only not in aliases:
            return _Skipped()
        p = sub.add_parser(name, aliases=list(aliases), help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("run", cmd_run, "start a new service", ("exec",))
    p.usage = "pmon2 run [options] COMMAND [ARG...] [options] [-- SERVICE-ARGS...]"
    group = p.add_argument_group("options (long ones also after the command)")
    group.add_argument("-n", "--name", help="service name (default: the command's basename)")
    group.add_argument("-a", "--args", help="arguments for the service, split with shell rules")
    group.add_argument("-u", "--user", help="run as this user (pmond must be root)")
    group.add_argument("-l", "--log", help="one file for both stdout and stderr")
    group.add_argument("-d", "--log_dir", "--log-dir", help="directory for NAME-out.log and NAME-err.log")
    group.add_argument("--no-autorestart", action="store_true", help="do not start it again when it exits")
    group.add_argument("--min-uptime", metavar="SECONDS",
                       help="a run shorter than this counts as a crash for backoff (default 1)")
    group.add_argument("--kill-timeout", metavar="SECONDS", help="grace time before SIGKILL on stop (default 5)")
    group.add_argument("--stop-signal", metavar="SIG", help="signal sent by stop (default TERM)")
    group.add_argument("--log-max-size", metavar="SIZE", help="rotate a log file above this size (default 10M)")
    group.add_argument("--log-keep", metavar="N", help="rotated files to keep (default 5)")
    group.add_argument("--log-compress", action="store_true", help="gzip rotated files")
    group.add_argument("--env", metavar="KEY=VALUE", help="set a variable for the service (repeatable)")
    group.add_argument("--env-file", metavar="FILE",
                       help="variables from a dotenv file, under --env (repeatable; read with your rights)")
    group.add_argument("--cwd", metavar="DIR", help="working directory (default: yours; relative to yours)")
    group.add_argument("--env-clear", action="store_true",
                       help="start from an empty environment (default: yours, minus session variables)")
    group.add_argument("--listen", metavar="ADDR",
                       help="a socket pmond holds and passes as fd 3.. (systemd's LISTEN_FDS): tcp://IP:PORT, "
                            "tcp6://[IP]:PORT or unix:PATH, optionally ,name=NAME (repeatable; before the command)")
    group.add_argument("--reuseport", action="store_true",
                       help="with --instances: a socket of its own for each instance, with SO_REUSEPORT")
    group.add_argument("--rolling-batch", metavar="N",
                       help="with --instances: how many a rolling reload or restart replaces at once (default 1)")
    group.add_argument("--no-autostart", action="store_true",
                       help="create it stopped; `pmon2 start` starts it; before the command")
    group.add_argument("--json", action="store_true", help="print the new service as JSON")
    if not isinstance(p, _Skipped):
        _field_flags(group)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    p = command("ls", cmd_ls, "list services", ("list",))
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = command("desc", cmd_desc, "show one service in detail", ("show",))
    p.add_argument("service", help="id or name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show-env", action="store_true",
                   help="show environment values in clear (root and the service's own user only)")
    for name, func, text in (("start", cmd_start, "start stopped services"),
                             ("restart", cmd_restart, "stop services, wait until they are gone, start them again")):
        p = command(name, func, text)
        p.add_argument("service", nargs="+", help="ids, names, globs such as 'web-*', or all")
        if name == "restart":
            p.add_argument("--update-env", action="store_true",
                           help="give the services your environment first (yours win; session variables left out)")
    p = command("stop", cmd_stop, "stop services (SIGTERM to each group, SIGKILL after the kill timeout)")
    p.add_argument("service", nargs="+", help="ids, names, globs such as 'web-*', or all")
    p.add_argument("-f", "--force", action="store_true", help="SIGKILL at once (cuts a graceful stop short)")
    p = command("reload", cmd_reload, "send a signal (default USR2) to services without restarting them")
    p.add_argument("service", nargs="+", help="ids, names, globs such as 'web-*', or all")
    p.add_argument("--sig", "-s", help="signal: HUP, USR1, any name or number (default: its reload_signal, USR2)")
    p.add_argument("--wait", action="store_true",
                   help="return once the main process has handed over to its successor, or fail with the reason "
                        "(waits up to the service's reload_timeout, 30 s by default)")
    p = command("del", cmd_del, "stop and forget services", ("delete",))
    p.add_argument("service", nargs="+", help="ids, names, globs such as 'web-*', or all")
    p.add_argument("-f", "--force", action="store_true", help="SIGKILL at once (cuts a graceful stop short)")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask before `del all`")
    for name, func, text, lines in (
            ("log", cmd_log, "print the last lines of services' stdout and stderr, rotated files included", 20),
            ("logf", cmd_logf, "follow services' logs, like tail -f, across rotation", 10)):
        p = command(name, func, text)
        p.add_argument("service", nargs="*", help="ids, names, globs such as 'web-*', or all (default: all)")
        p.add_argument("-n", "--lines", type=int, default=lines, help=f"lines of each stream first (default {lines})")
        p.add_argument("--out", action="store_true", help="stdout only")
        p.add_argument("--err", action="store_true", help="stderr only (none for a service with one --log file)")
        p.add_argument("--json", action="store_true", help='one {"service", "stream", "text"} object per line')
    p = command("rename", cmd_rename, "give a service a new name (its log files keep their paths)")
    p.add_argument("service", help="id or name")
    p.add_argument("name", help="the new name")
    p = command("flush", cmd_flush, "empty the log files of services, or of all")
    p.add_argument("service", nargs="*", help="ids, names or globs (default: all, root only)")
    command("monit", cmd_monit, "live dashboard: cpu, memory, logs; keys restart, stop, start, reload, delete",
            ("dash",))
    p = command("completion", cmd_completion, "print a shell completion script")
    p.add_argument("shell", choices=("bash", "zsh", "fish"))
    if only in (None, "_names"):
        sub.add_parser("_names").set_defaults(func=cmd_complete_names)
    p = command("events", cmd_events, "show the ledger: starts, exits, restarts, stops, adoptions")
    p.add_argument("service", nargs="?", help="id or name (default: all services)")
    p.add_argument("-n", "--lines", type=int, default=30,
                   help="how many of the newest events (default 30; with -f, shown first)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then print each new event as it happens, until Ctrl-C (like journalctl -f)")
    p.add_argument("--json", action="store_true", help="JSON: an array; with -f, one object per line")
    p = command("why", cmd_why, "explain why a service is not running or keeps restarting")
    p.add_argument("service", help="id or name")
    p = command("version", cmd_version, "print the versions of pmon2 and the running pmond")
    p.add_argument("--json", action="store_true")
    p = command("daemon", cmd_daemon, "start, stop or inspect pmond (stopping it never stops a service)")
    p.add_argument("action", choices=("start", "stop", "status", "recover"))
    p.add_argument("--json", action="store_true")
    p = command("startup", cmd_startup, "start pmond at boot: write and enable a systemd unit for it")
    p.add_argument("--print", action="store_true", help="print the unit and change nothing")
    command("unstartup", cmd_unstartup, "disable and remove pmond's systemd unit (services keep running)")
    p = command("import", cmd_import, "take over the services of the Go Pmon2, keeping their running processes; "
                "or convert a pm2, supervisor or Procfile file and apply it")
    p.add_argument("source", metavar="SOURCE",
                   help="pmon2-go (the Go Pmon2), or a file: a pm2 ecosystem file (.config.js, .json, .yaml), a "
                        "supervisord.conf or a Procfile")
    p.add_argument("path", nargs="?", metavar="DB_OR_CONFIG",
                   help="its database or config (default: $PMON2_CONF or /etc/pmon2/config/config.yml)")
    p.add_argument("--dry-run", action="store_true", help="show what would happen and change nothing")
    p.add_argument("--stop-old", action="store_true",
                   help="stop a running Go pmond first, leaving every process it manages running")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--to", metavar="OUT.toml", help="a file: write it as a pmon2 app file and apply nothing")
    p.add_argument("--env", metavar="NAME", help="a pm2 file: merge each app's env_NAME over its env")
    p = command("apply", cmd_apply, "create, change or remove services to match an app file (TOML, YAML, JSON)")
    p.add_argument("file", metavar="FILE", help="the app file: *.toml, *.yaml, *.yml or *.json (docs/app-file.md)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--prune", action="store_true", help="also remove this file's services that it no longer has")
    p.add_argument("--json", action="store_true", help="print pmond's plan as JSON")
    p = command("dump", cmd_dump, "print today's services as an app file (TOML); apply of it changes nothing")
    p.add_argument("--masked", action="store_true", help="write secret values as *** (needed unless you may see them)")
    p = command("schema", cmd_schema, "print the JSON Schema of app files, for editor completion")
    p.add_argument("--format", choices=("json", "markdown"), default="json",
                   help="json (default), or markdown: the reference, docs/app-file.md")
    p = command("update", cmd_update, "change a service's fields with run's flags; --restart applies them now")
    p.usage = "pmon2 update REF [run's flags] [--restart] [--json] [-- COMMAND ARG...]"
    p.add_argument("service", metavar="REF", help="id or name (a group NAME: all its instances)")
    group = p.add_argument_group("flags", "run's flags, as with `run`: --env KEY=VALUE (added to the service's env), "
                                 "--env-file F, --env-clear, --args \"...\" (new arguments), --kill-timeout S, ...")
    group.add_argument("--restart", action="store_true",
                       help="restart it now when the change needs it (--restart MODE sets the restart field)")
    group.add_argument("--json", action="store_true", help="print pmond's answer as JSON")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p = command("scale", cmd_scale, "run N instances of a service (NAME:0 ... NAME:N-1); the highest go first")
    p.add_argument("service", metavar="NAME", help="the service, or group of instances")
    p.add_argument("count", metavar="N", help="how many instances, 1 to 1000")
    p.add_argument("--json", action="store_true", help="print pmond's answer as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    known = argv[0] if argv and not argv[0].startswith("-") and argv[0] in COMMAND_NAMES else None
    if argv and not argv[0].startswith("-") and known is None:
        import difflib

        public = sorted(n for n in COMMAND_NAMES if not n.startswith("_"))
        close = difflib.get_close_matches(argv[0], public, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f": one of {', '.join(public)}"
        sys.stderr.write(f"pmon2: unknown command {argv[0]!r}{hint} (see 'pmon2 --help')\n")
        return 2
    parser = build_parser(only=known)
    if argv and argv[0] in ("run", "exec") and not _asks_help(argv[1:]):
        # argparse cannot interleave our flags with the service's; split_run_args does it.
        args = argparse.Namespace(command="run", func=cmd_run, rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except PmonError as exc:
        sys.stderr.write(f"pmon2: {exc.message}\n")
        return 2 if isinstance(exc, UsageError) else 1
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as exc:
        # Ctrl-C while pmond holds a request (client.Interrupted): one line, no traceback; pmond goes on.
        message = getattr(exc, "message", None)
        if message:
            sys.stderr.write(f"pmon2: {message}\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
