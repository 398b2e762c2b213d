"""`why` and `events`: the ledger, told for a human."""

from __future__ import annotations

import time
from typing import Any

from pmon2.render.logs import tail_lines
from pmon2.render.text import human_duration, paint
from pmon2.render.words import exit_phrase, exit_status, failures_in_a_row, restarted


def local_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def render_events(events: list[dict[str, Any]], color: bool, widths: dict[str, int] | None = None) -> str:
    """One line per event: time, service, kind, message, in aligned columns. `widths` ({"service", "kind"}),
    kept by the caller across calls (`events -f` renders batch after batch), lets columns only grow, so that
    later lines stay aligned with earlier ones."""
    if not events:
        return "no events"
    widths = {} if widths is None else widths
    name_w = widths["service"] = max(widths.get("service", 0), *(len(e["service"]) for e in events))
    kind_w = widths["kind"] = max(widths.get("kind", 0), *(len(e["kind"]) for e in events))
    styles = {"exit": "red", "exit_status": "red", "start_failed": "red", "kill": "red", "backoff": "magenta",
              "start": "green", "restart": "green", "adopt": "cyan", "stop": "yellow", "reload": "blue",
              "delete": "yellow", "recover": "cyan", "leftovers": "yellow", "lost": "magenta"}
    lines = []
    for e in events:
        when = paint(local_time(e["at"]), "grey", color)
        kind = paint(e["kind"].ljust(kind_w), styles.get(e["kind"]), color)
        lines.append(f"{when}  {e['service'].ljust(name_w)}  {kind}  {e['message']}")
    return "\n".join(lines)


def streak(events: list[dict[str, Any]], fast: int) -> list[str]:
    """The kinds of the last `fast` failures (`exit` and `start_failed` events) the ledger holds: the
    failures in a row that put a service in backoff (a run that lasts, a stop or a start resets them)."""
    kinds = [e["kind"] for e in events if e["kind"] in ("exit", "start_failed")]
    return kinds[-fast:] if fast > 0 else []


def followed(svc: dict[str, Any], events: list[dict[str, Any]]) -> str | None:
    """Why the main process is not the one pmon2 started (daemon/follow.py): from the service's `followed`,
    or, after a restart of pmond, from the handover event that named its pid."""
    f = svc.get("followed") or next((e.get("data") for e in reversed(events) if e["kind"] == "reload"
                                     and (e.get("data") or {}).get("pid") == svc.get("pid")
                                     and (e.get("data") or {}).get("from_pid")), None)
    if not f or not svc.get("pid"):
        return None
    if f.get("pattern") == "daemonize":
        return (f"Process {f['from_pid']}, which pmon2 started, exited 0 at once and left process {f['pid']}: the "
                f"program daemonized itself, and pmon2 follows process {f['pid']} as the service. Better: "
                f"{f.get('hint') or 'run it in the foreground, or give --pidfile'}.")
    if f.get("pattern") == "forking":
        return (f"Its main process {f['pid']} took over from process {f['from_pid']}, which pmon2 started and "
                "which exited 0 as --pidfile (systemd's Type=forking) expects.")
    return f"Its main process {f['pid']} took over from process {f['from_pid']} ({f.get('why') or 'a handover'})."


def explain(svc: dict[str, Any], events: list[dict[str, Any]], err_lines: int = 5) -> str:
    name = svc["name"]
    exits = [e for e in events if e["kind"] == "exit"]
    recent = ", ".join(exit_phrase(e.get("data") or {}) for e in exits[-5:])
    status = svc["status"]
    parts: list[str] = []
    if status == "running":
        up = human_duration(svc.get("uptime_s"))
        if svc["restarts"]:
            parts.append(f"{name} is running (pid {svc['pid']}, up {up}). It has {restarted(svc['restarts'])}; "
                         f"recent exits: {recent or 'none recorded'}.")
        else:
            parts.append(f"{name} is running (pid {svc['pid']}, up {up}) and has not restarted.")
        if (handed := followed(svc, events)) is not None:
            parts.append(handed)
    elif status == "backoff":
        fast = svc.get("fast_exits") or 0
        wait = svc.get("retry_in_s")
        kinds = streak(events, fast)
        when = f"in {wait:.1f} s" if wait is not None else "at once"
        if fast == 0:
            parts.append(f"{name} is about to be started again ({when}).")
        else:
            within = f"within {svc.get('min_uptime', 1):g} s of starting"
            if kinds == ["start_failed"]:
                parts.append(f"{name} failed to start.")
            elif kinds == ["exit"]:
                parts.append(f"{name} exited {within} ({exit_phrase(exits[-1].get('data') or {})}).")
            elif "exit" in kinds or len(kinds) < fast:
                parts.append(f"{name} keeps dying: {failures_in_a_row(fast, kinds)}, each exit {within} "
                             f"(recent exits: {recent or 'none recorded'}).")
            else:
                parts.append(f"{name} keeps failing to start: {failures_in_a_row(fast, kinds)}.")
            parts.append(f"pmon2 starts it again {when}; the delay doubles up to 15 s and resets once it stays up.")
        if svc.get("last_error"):
            parts.append(f"The last start failed: {svc['last_error']}.")
    elif status == "stopped":
        stops = [e for e in events if e["kind"] == "stop"]
        when = f" at {local_time(stops[-1]['at'])}" if stops else ""
        parts.append(f"{name} is not running because it was stopped{when}. Start it with: pmon2 start {name}")
    elif status == "stopping":
        parts.append(f"{name} is stopping: the stop signal was sent and pmon2 waits for it to exit.")
    elif status == "exited":
        last = (exits[-1].get("data") or {}) if exits else svc.get("last_exit")
        parts.append(f"{name} exited ({exit_phrase(last) if last else exit_status({'source': 'unknown'})}) and is not "
                     f"started again because autorestart is off. Start it with: pmon2 start {name}")
    elif status == "errored":
        parts.append(f"{name} could not start: {svc.get('last_error') or 'unknown error'}. "
                     f"Fix it, then: pmon2 start {name}")
    tail = tail_lines(svc["err_log"], err_lines)
    text = " ".join(parts)
    if tail:
        text += f"\nLast lines of {svc['err_log']}:\n" + "\n".join("  " + line for line in tail)
    elif status != "running":
        text += f"\nIts error log ({svc['err_log']}) is empty."
    return text
