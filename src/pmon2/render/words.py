"""The words every message shares: counts with the right plural, and how an exit is told.

`pmon2 why`, `pmon2 desc`, the dashboard and pmond's ledger describe an exit with exit_status(): one
phrase for each source of the status (code, signal, pending, unknown), so the same exit never reads two
ways. Every message with a count is built here with plural(), and listed in TEMPLATES, which the wording
tests render with 1 and with 2. Standard library only: the CLI and pmond both import it.
"""

from __future__ import annotations

from pmon2.render.text import human_runtime

# Not `typing`: importing it costs the CLI a few ms, and annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 time`, `2 times`, `0 times`; an irregular plural is passed explicitly: plural(n, "child", "children")."""
    return f"{n} {word if n == 1 else many or word + 's'}"


# exits

EXIT_SOURCES = ("code", "signal", "pending", "unknown")


def exit_source(data: dict[str, Any]) -> str:
    """Which of EXIT_SOURCES told this exit: a `last_exit` (`source` is pidfd, waitpid, proc_connector, pending
    or unknown) or the data of an `exit` event (no `source` until the status is known, `while_down` when
    pmond found the process gone at start)."""
    if data.get("code") is not None:
        return "code"
    if data.get("signal"):
        return "signal"
    source = data.get("source")
    if source == "pending" or (source is None and not data.get("while_down")):
        return "pending"
    return "unknown"


def exit_status(data: dict[str, Any]) -> str:
    """The shared phrase: `code 2`, `signal SIGSEGV (core dumped)`, `status pending`, `status unknown`."""
    source = exit_source(data)
    if source == "code":
        return f"code {data['code']}"
    if source == "signal":
        return f"signal {data['signal']}" + (" (core dumped)" if data.get("core") else "")
    return f"status {source}"


def exit_note(data: dict[str, Any]) -> str | None:
    """Why a status is not known (yet), or None."""
    source = exit_source(data)
    if source == "pending":
        return "waiting for init to reap it"
    if source == "unknown" and data.get("while_down"):
        return gone_why(bool(data.get("rebooted")))
    return None


def exit_phrase(data: dict[str, Any]) -> str:
    """An exit with its run time: `code 2 after 3 ms`, `status pending after 1.2 s (waiting for init to reap it)`."""
    runtime = data.get("runtime_s")
    after = f" after {human_runtime(runtime)}" if isinstance(runtime, int | float) else ""
    note = exit_note(data)
    return exit_status(data) + after + (f" ({note})" if note else "")


def exit_message(pid: int, data: dict[str, Any]) -> str:
    """The ledger's `exit` message, written as `pending` and completed once the status is known:
    `process 42 exited after 3 ms: status pending (waiting for init to reap it)`, then `...: code 2`."""
    runtime = data.get("runtime_s")
    after = f" after {human_runtime(runtime)}" if isinstance(runtime, int | float) else ""
    note = exit_note(data)
    return f"process {pid} exited{after}: {exit_status(data)}" + (f" ({note})" if note else "")


def gone_why(rebooted: bool) -> str:
    return "the machine rebooted" if rebooted else "it ended while pmond was down"


def gone_message(pid: int | None, rebooted: bool) -> str:
    """The ledger's `exit` message for a process that pmond, starting, finds gone."""
    return f"process {pid} is gone: {gone_why(rebooted)}; {exit_status({'source': 'unknown'})}"


# failures in a row: exits within min_uptime, and failed starts (ledger kind `start_failed`)

FAILURE_WORDS = {"exit": ("exit", "exits"), "start_failed": ("failed start", "failed starts")}


def failures(kinds: Sequence[str]) -> str:
    """`1 exit, then 4 failed starts`: ledger kinds (`exit`, `start_failed`) in order, told in runs."""
    runs: list[list[Any]] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return ", then ".join(plural(n, *FAILURE_WORDS[kind]) for kind, n in runs)


def failures_in_a_row(fast: int, kinds: Sequence[str]) -> str:
    """`fast` consecutive failures, of which the ledger still holds the last len(kinds)."""
    seen = failures(kinds)
    in_a_row = " in a row" if fast > 1 else ""
    if len(kinds) >= fast:
        return seen + in_a_row
    total = plural(fast, "exit or failed start", "exits or failed starts") + in_a_row
    return f"{total}, the last {len(kinds)} of them: {seen}" if kinds else total


def backoff_message(fast: int, min_uptime: float, retry_in: float) -> str:
    """The ledger's `backoff` message, written right after an exit. `fast` (a service's fast_exits) counts
    exits within min_uptime and failed starts alike, so it is never called a number of exits."""
    streak = f" ({plural(fast, 'exit or failed start', 'exits or failed starts')} in a row)" if fast > 1 else ""
    return f"exited within {min_uptime:g} s of starting{streak}: next start in {retry_in:g} s"


# other counts

def restarted(n: int) -> str:
    return f"restarted {plural(n, 'time')}"


def variables(n: int) -> str:
    return plural(n, "variable")


def last_lines(n: int) -> str:
    """The header of each log in `pmon2 log`: `(last 1 line)`."""
    return f"last {plural(n, 'line')}"


def files_emptied(n: int) -> str:
    """`pmon2 flush`'s answer."""
    return f"emptied {plural(n, 'log file')}"


def other_files_emptied(n: int) -> str:
    """What a flush that failed for one file still did."""
    return f"{plural(n, 'other log file')} emptied"


def services_status(n: int) -> str:
    """pmond's systemd STATUS= line."""
    return plural(n, "service")


# Every template with a count, as a function of that count (the wording tests render each with 1 and 2).
TEMPLATES: dict[str, Callable[[int], str]] = {
    "restarted": restarted,
    "variables": variables,
    "last_lines": last_lines,
    "files_emptied": files_emptied,
    "other_files_emptied": other_files_emptied,
    "services_status": services_status,
    "backoff_message": lambda n: backoff_message(n, 1, 0.4),
    "failures_exits": lambda n: failures_in_a_row(n, ["exit"] * n),
    "failures_failed_starts": lambda n: failures_in_a_row(n, ["start_failed"] * n),
    "failures_mixed": lambda n: failures(["exit"] * n + ["start_failed"] * n),
    "failures_beyond_ledger": lambda n: failures_in_a_row(n + 1, ["exit"] * n),
}
