"""Signal names as users write them: HUP, SIGHUP, hup or 1."""

from __future__ import annotations

import signal

from pmon2.errors import BadRequest


def parse_signal(text: str | int) -> signal.Signals:
    raw = str(text).strip()
    try:
        if raw.isdigit():
            return signal.Signals(int(raw))
        name = raw.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise BadRequest(f"unknown signal {raw!r} (try HUP, USR1, USR2, TERM, INT or a number)") from None
