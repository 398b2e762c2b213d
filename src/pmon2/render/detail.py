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


def render_detail(svc: dict[str, Any], color: bool) -> str:
    cpu = svc.get("cpu_percent")
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
        ("cpu", "-" if cpu is None else f"{cpu:.1f}%"),
        ("memory", human_bytes(svc.get("mem_bytes"))),
        ("restart policy", f"{restart}; backoff after runs shorter than {svc.get('min_uptime', 1):g} s"),
        ("stop", f"{svc.get('stop_signal', 'SIGTERM')}, SIGKILL after {svc.get('kill_timeout', 5):g} s"),
        ("last exit", describe_exit(svc.get("last_exit"))),
    ]
    older = list(reversed(svc.get("recent_exits") or []))[1:]  # the newest is the last exit above
    for i, item in enumerate(older):
        rows.append(("earlier exits" if i == 0 else "", paint(describe_exit(item), "grey", color)))
    if svc.get("last_error"):
        rows.append(("last error", svc["last_error"]))
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
