"""`desc`: one service in detail."""

from __future__ import annotations

import shlex

from pmon2.render.table import STATUS_STYLE, status_text
from pmon2.render.text import human_bytes, human_duration, paint
from pmon2.render.words import exit_phrase, variables

# Not `typing`: importing it costs the CLI a few ms, and annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def describe_exit(last_exit: dict[str, Any] | None) -> str:
    """A `last_exit` or an item of `recent_exits`, in the words `pmon2 why` uses (pmon2.render.words)."""
    if not last_exit:
        return "-"
    return f"{exit_phrase(last_exit)}, at {last_exit.get('at') or 'an unknown time'}"


def env_lines(env: dict[str, str]) -> list[str]:
    """KEY=VALUE lines, sorted. pmond masks secret values (pmon2.spec.mask_env) before they get here,
    unless `desc --show-env` asked for them in clear."""
    return [f"{k}={v}" for k, v in sorted(env.items())]


MEM_SOURCE = {"pss": "PSS", "rss": "RSS (smaps_rollup unreadable)",
              "mixed": "PSS, RSS where smaps_rollup is unreadable"}


def usage_text(svc: dict[str, Any]) -> tuple[str, str]:
    """The cpu and memory lines: the whole service (all its processes), and its main process alone when it
    has others."""
    cpu, mem, n = svc.get("cpu_percent"), svc.get("mem_bytes"), svc.get("processes")
    if cpu is None or mem is None:
        return "-" if cpu is None else f"{cpu:.1f}%", human_bytes(mem)
    source = MEM_SOURCE.get(svc.get("mem_source") or "", "")
    memory = f"{human_bytes(mem)} {source}".rstrip()
    if not n or n < 2:
        return f"{cpu:.1f}%", memory
    main_cpu, main_mem = svc.get("main_cpu_percent"), svc.get("main_mem_bytes")
    main_cpu_text = "-" if main_cpu is None else f"{main_cpu:.1f}%"
    return (f"{cpu:.1f}% over {n} processes (main process {main_cpu_text})",
            f"{memory} over {n} processes (main process {human_bytes(main_mem)} RSS)")


def imported_text(svc: dict[str, Any]) -> str:
    """`imported_from` (pmon2 import): where from, when, and whether the process is the adopted one, which
    carries no PMON2_SERVICE marker."""
    o = svc["imported_from"]
    tool = {"pmon2-go": "Pmon2 (Go)"}.get(o.get("tool"), o.get("tool"))
    text = f"imported from {tool} on {(o.get('at') or '?')[:10]} (row {o.get('row')} of {o.get('source')}"
    text += f", named {o['name']!r} there)" if o.get("name") and o["name"] != svc["name"] else ")"
    if o.get("adopted_pid") and o["adopted_pid"] == svc.get("pid"):
        text += (f"; process {o['adopted_pid']} adopted without a marker (no PMON2_SERVICE in its environment): "
                 "pmond knows it from its database and launch record only")
    return text


def notify_rows(svc: dict[str, Any]) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """What the service said over sd_notify (its `notify` object and `status_text`): its STATUS= text, a
    reload in progress and a stop it announced (shown under the status); and its socket and watchdog."""
    n = svc["notify"]
    said = []
    if n.get("reloading_since"):
        said.append(f"reloading since {n['reloading_since']} (RELOADING=1, until READY=1)")
    if n.get("stopping"):
        said.append("stopping on its own (STOPPING=1)")
    rows = [("status text", svc.get("status_text") or "-")] + [("", line) for line in said]
    watchdog = (f"; watchdog {n['watchdog_s']:g} s, last WATCHDOG=1 {n.get('watchdog_at') or 'none yet'}"
                if n.get("watchdog_s") else "")
    return rows, ("sd_notify", f"NOTIFY_SOCKET={n['socket']}{watchdog}")


def render_detail(svc: dict[str, Any], color: bool) -> str:
    cpu, memory = usage_text(svc)
    restart = "on exit" if svc.get("autorestart") else "never (--no-autorestart)"
    rows: list[tuple[str, str]] = [
        ("status", paint(status_text(svc), STATUS_STYLE.get(svc["status"]), color)),
        ("id", str(svc["id"])),
        ("pid", str(svc["pid"]) if svc.get("pid") else "-"),
        ("command", shlex.join(svc["argv"])),
        ("executable", svc.get("exe", "-")),
        ("cwd", svc["cwd"]),
        ("user", svc.get("user") or "-"),
        ("started", svc.get("started_at") or "-"),
        ("uptime", human_duration(svc.get("uptime_s"))),
        ("restarts", str(svc["restarts"])),
        ("cpu", cpu),
        ("memory", memory),
        ("restart policy", f"{restart}; backoff after runs shorter than {svc.get('min_uptime', 1):g} s"),
        ("stop", f"{svc.get('stop_signal', 'SIGTERM')}, SIGKILL after {svc.get('kill_timeout', 5):g} s"),
        ("last exit", describe_exit(svc.get("last_exit"))),
    ]
    if svc.get("notify"):
        said, socket_row = notify_rows(svc)
        rows[1:1] = said
        rows.insert(-1, socket_row)
    if svc.get("listen"):  # sockets pmond holds and passes as fds 3.. (daemon/sockets.py)
        per = "; each instance its own (SO_REUSEPORT)" if svc.get("reuseport") else ""
        rows.insert(-1, ("listen", ", ".join(svc["listen"]) + per))
    older = list(reversed(svc.get("recent_exits") or []))[1:]  # the newest is the last exit above
    for i, item in enumerate(older):
        rows.append(("earlier exits" if i == 0 else "", paint(describe_exit(item), "grey", color)))
    if svc.get("last_error"):
        rows.append(("last error", svc["last_error"]))
    if svc.get("imported_from"):
        rows.append(("imported", imported_text(svc)))
    if svc.get("followed"):  # the main process is a successor of the one pmon2 started (daemon/follow.py)
        f = svc["followed"]
        rows.append(("followed", f"pid {f['pid']}, handed over from pid {f['from_pid']} ({f.get('why')})"))
        if f.get("hint"):
            rows.append(("", f"better: {f['hint']}"))
    if svc["status"] == "backoff" and svc.get("retry_at"):
        rows.append(("next attempt", svc["retry_at"]))
    rows += [("stdout log", svc["out_log"]), ("stderr log", svc["err_log"])]
    env = env_lines(svc.get("env") or {})
    masked = " (secrets masked; desc --show-env shows them)" if svc.get("env_masked") else ""
    rows.append(("env", f"{variables(len(env))}{masked}" if env else "-"))
    key_w = max(len(k) for k, _ in rows)
    title = paint(f"{svc['name']}", "bold", color)
    lines = [title] + [f"  {paint(k.ljust(key_w), 'cyan', color)}  {v}" for k, v in rows]
    lines += [f"  {' ' * key_w}    {paint(item, 'grey', color)}" for item in env]
    return "\n".join(lines)
