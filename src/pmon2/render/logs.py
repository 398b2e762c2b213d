"""`log` and `logf`: services' logs as pmond's API gives them (GET /v1/logs), tagged by stream and service.

pmond reads the files (across rotated ones, gzipped included) and follows them; this module only
builds the request and prints the answer. `tail_lines` and `streams` read files directly, for the
views that still do (why, the dashboard).
"""

from __future__ import annotations

import json
import os

from pmon2.render.text import paint

# Not `typing`: importing it costs the CLI a few ms, and annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, TextIO


def api_path(refs: list[str], lines: int, stream: str, follow: bool = False) -> str:
    """GET /v1/logs for these refs (none: all services), the last `lines` of `stream` (out, err, all)."""
    from pmon2.client import quote

    query = f"/v1/logs?lines={lines}&stream={stream}"
    if refs:
        query += "&select=" + ",".join(quote(r) for r in refs)
    return query + ("&follow=true" if follow else "")


def tag(stream: str, combined: bool) -> str:
    """What a line is tagged with: its stream, or `log` for a file that holds both."""
    return "log" if combined else stream


def prefix(name: str | None, stream: str, color: bool) -> str:
    style = "red" if stream == "err" else "green"
    label = f"{name} {stream}" if name else stream
    return paint(f"{label} |", style, color) + " "


def problems(answer: dict[str, Any]) -> list[str]:
    """The files pmond could not (or would not) read, one line each."""
    return [f"{svc['name']} {log['stream']}: {log['error']}" for svc in answer["services"] for log in svc["logs"]
            if log.get("error")]


def render_text(answer: dict[str, Any], n: int, color: bool) -> str:
    """`log`'s output: for each service and stream a grey head naming the file, then its tagged lines."""
    show_name = len(answer["services"]) > 1
    out = []
    for svc in answer["services"]:
        for log in svc["logs"]:
            note = ", more were not searched" if log.get("truncated") else ""
            out.append(paint(f"── {log['file']} (last {n} lines{note})", "grey", color))
            pre = prefix(svc["name"] if show_name else None, tag(log["stream"], log["combined"]), color)
            out.extend(pre + line for line in log["lines"])
    return "\n".join(out) + "\n" if out else ""


def render_json(answer: dict[str, Any]) -> str:
    """`log --json`: one {"service", "stream", "text"} object per line."""
    return "".join(json.dumps({"service": svc["name"], "stream": log["stream"], "text": line}, ensure_ascii=False)
                   + "\n" for svc in answer["services"] for log in svc["logs"] for line in log["lines"])


def follow(batches: Iterable[list[Any]], color: bool, out: TextIO, err: TextIO, as_json: bool = False) -> None:
    """`logf`: print what pmond's stream (GET /v1/logs?follow=true) sends, as it comes. Its first value
    is the answer of `log`, the last lines; then new lines {"service", "stream", "text"} and problems
    {"service", "stream", "file", "error"}, which go to `err`."""
    tags: dict[tuple[str, str], str] = {}  # (service, stream) -> prefix
    show_name = True
    for batch in batches:
        for item in batch:
            if "services" in item:  # the first: the last lines, and which files are followed
                show_name = len(item["services"]) > 1
                for svc in item["services"]:
                    for log in svc["logs"]:
                        tags[svc["name"], log["stream"]] = prefix(svc["name"] if show_name else None,
                                                                  tag(log["stream"], log["combined"]), color)
                        for line in log["lines"]:
                            _line(out, svc["name"], log["stream"], line, tags, show_name, color, as_json)
                for problem in problems(item):
                    err.write(f"pmon2: {problem}\n")
            elif "error" in item:
                err.write(f"pmon2: {item['service']} {item['stream']}: {item['error']}\n")
            elif "text" in item:
                _line(out, item["service"], item["stream"], item["text"], tags, show_name, color, as_json)
        out.flush()
        err.flush()


def _line(out: TextIO, service: str, stream: str, text: str, tags: dict[tuple[str, str], str], show_name: bool,
          color: bool, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({"service": service, "stream": stream, "text": text}, ensure_ascii=False) + "\n")
        return
    pre = tags.get((service, stream))
    if pre is None:  # a service renamed while followed
        pre = tags[service, stream] = prefix(service if show_name else None, stream, color)
    out.write(pre + text + "\n")


# Direct reading, for views that have the files at hand (why, the dashboard).


def streams(svc: dict[str, Any]) -> list[tuple[str, str]]:
    if svc["out_log"] == svc["err_log"]:
        return [("log", svc["out_log"])]
    return [("out", svc["out_log"]), ("err", svc["err_log"])]


def tail_lines(path: str, n: int, block: int = 65536) -> list[str]:
    """The last n lines of a file, reading backwards from its end."""
    if n <= 0:
        return []
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return []
    with fh:
        end = fh.seek(0, os.SEEK_END)
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    lines = data.decode(errors="replace").splitlines()
    return lines[-n:]
