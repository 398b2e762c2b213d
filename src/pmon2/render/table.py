"""The `ls` table: boxed like pm2's, aligned for wide (CJK) characters, fitted to the terminal."""

from __future__ import annotations

from pmon2.render.text import human_bytes, human_duration, pad, paint, truncate, width

# Not `typing`: importing it costs the CLI a few ms, and annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

STATUS_STYLE = {"running": "green bold", "stopped": "yellow", "stopping": "yellow", "exited": "grey",
                "errored": "red bold", "backoff": "magenta"}


class Column:
    __slots__ = ("align", "min_width", "shrink", "title")

    def __init__(self, title: str, align: str = "<", shrink: bool = False, min_width: int = 4) -> None:
        self.title = title
        self.align = align
        self.shrink = shrink  # may be truncated to fit the terminal
        self.min_width = min_width


# cpu and mem are the whole service's (all its processes, memory as PSS); procs counts those processes.
COLUMNS = (Column("id", ">"), Column("name", shrink=True, min_width=6), Column("pid", ">"),
           Column("status"), Column("↺", ">"), Column("uptime", ">"), Column("cpu", ">"),
           Column("mem", ">"), Column("procs", ">"), Column("user", shrink=True, min_width=4))


def status_text(svc: dict[str, Any]) -> str:
    if svc["status"] == "backoff" and svc.get("retry_in_s") is not None:
        return f"backoff {svc['retry_in_s']:.1f}s"
    return svc["status"]


def service_row(svc: dict[str, Any]) -> list[str]:
    cpu = svc.get("cpu_percent")
    procs = svc.get("processes")
    return [str(svc["id"]), svc["name"], str(svc["pid"]) if svc.get("pid") else "-", status_text(svc),
            str(svc["restarts"]), human_duration(svc.get("uptime_s")), "-" if cpu is None else f"{cpu:.1f}%",
            human_bytes(svc.get("mem_bytes")), "-" if procs is None else str(procs), svc.get("user") or "-"]


def fit(widths: list[int], columns: Sequence[Column], max_width: int) -> list[int]:
    """Shrink the shrinkable columns, widest first, until the table fits in max_width."""
    widths = list(widths)
    total = table_width(widths)
    while total > max_width:
        candidates = [i for i, c in enumerate(columns) if c.shrink and widths[i] > c.min_width]
        if not candidates:
            break
        i = max(candidates, key=lambda j: widths[j])
        widths[i] -= 1
        total -= 1
    return widths


# On a narrow terminal, these columns go first, in this order, once names are cut to their minimum.
DROP_ORDER = ("procs", "user", "uptime", "mem", "cpu", "↺")


def table_width(widths: list[int]) -> int:
    return sum(widths) + 3 * len(widths) + 1


def render_services(services: list[dict[str, Any]], color: bool, max_width: int) -> str:
    all_rows = [service_row(s) for s in services]
    keep = list(range(len(COLUMNS)))
    natural = [max([width(c.title)] + [width(r[i]) for r in all_rows]) for i, c in enumerate(COLUMNS)]
    for title in DROP_ORDER:
        columns = [COLUMNS[i] for i in keep]
        if table_width(fit([natural[i] for i in keep], columns, max_width)) <= max_width:
            break
        keep.remove(next(i for i in keep if COLUMNS[i].title == title))
    columns = [COLUMNS[i] for i in keep]
    rows = [[r[i] for i in keep] for r in all_rows]
    widths = fit([natural[i] for i in keep], columns, max_width)

    def border(left: str, mid: str, right: str) -> str:
        return paint(left + mid.join("─" * (w + 2) for w in widths) + right, "grey", color)

    bar = paint("│", "grey", color)
    lines = [border("┌", "┬", "┐")]
    head = [paint(pad(c.title, w, c.align), "bold cyan", color) for c, w in zip(columns, widths, strict=True)]
    lines.append(bar + bar.join(f" {h} " for h in head) + bar)
    lines.append(border("├", "┼", "┤"))
    for svc, row in zip(services, rows, strict=True):
        cells = []
        for i, (c, w) in enumerate(zip(columns, widths, strict=True)):
            text = pad(truncate(row[i], w), w, c.align)
            style = STATUS_STYLE.get(svc["status"]) if c.title == "status" else ("bold" if c.title == "name" else None)
            cells.append(paint(text, style, color))
        lines.append(bar + bar.join(f" {cell} " for cell in cells) + bar)
    lines.append(border("└", "┴", "┘"))
    return "\n".join(lines)
