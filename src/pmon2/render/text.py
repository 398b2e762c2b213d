"""Widths, colours and human units for terminal output."""

from __future__ import annotations

import os
import sys
import unicodedata

# Not `typing`: importing it costs the CLI a few ms, and annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

RESET = "\x1b[0m"
STYLES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34",
          "magenta": "35", "cyan": "36", "grey": "90"}


def use_color(stream: TextIO | None = None) -> bool:
    """NO_COLOR wins, then FORCE_COLOR, then whether the stream is a terminal."""
    if os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR")
    if force is not None and force not in ("", "0", "false"):
        return True
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def paint(text: str, style: str | None, color: bool) -> str:
    if not color or not style:
        return text
    codes = ";".join(STYLES[s] for s in style.split())
    return f"\x1b[{codes}m{text}{RESET}"


def char_width(ch: str) -> int:
    if unicodedata.combining(ch) or ch in "\u200b\u200c\u200d\ufe0f":
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def width(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(char_width(c) for c in text)


def truncate(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` columns, marking the cut with '…'."""
    if width(text) <= limit:
        return text
    if limit <= 0:
        return ""
    out, used = [], 0
    for ch in text:
        w = char_width(ch)
        if used + w > limit - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def pad(text: str, cols: int, align: str = "<") -> str:
    gap = max(cols - width(text), 0)
    return " " * gap + text if align == ">" else text + " " * gap


def terminal_width(stream: TextIO | None = None, default: int = 120) -> int:
    env = os.environ.get("COLUMNS")
    if env and env.isdigit():
        return int(env)
    try:
        return os.get_terminal_size((stream or sys.stdout).fileno()).columns
    except (OSError, ValueError, AttributeError):
        return default


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}D"


def human_runtime(seconds: float) -> str:
    """A run's length, precise where it matters: 3 ms, 1.2 s, 5m."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return human_duration(seconds)
