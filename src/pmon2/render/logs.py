"""`log` and `logf`: the last lines of a service's logs, and following them across rotation."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

from pmon2.render.text import paint

POLL_INTERVAL = 0.2


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


def prefix(name: str | None, stream: str, color: bool) -> str:
    style = "red" if stream == "err" else "green"
    tag = f"{name} {stream}" if name else stream
    return paint(f"{tag} |", style, color) + " "


def tail_service(svc: dict[str, Any], n: int, color: bool, show_name: bool = False) -> str:
    out = []
    for stream, path in streams(svc):
        head = paint(f"── {path} (last {n} lines)", "grey", color)
        out.append(head)
        pre = prefix(svc["name"] if show_name else None, stream, color)
        out.extend(pre + line for line in tail_lines(path, n))
    return "\n".join(out) + "\n"


@dataclass
class Followed:
    path: str
    prefix: str
    fh: BinaryIO | None = None
    inode: int | None = None
    pending: bytes = b""

    def open(self, at_end: bool) -> None:
        try:
            self.fh = open(self.path, "rb")
        except FileNotFoundError:
            self.fh, self.inode = None, None
            return
        st = os.fstat(self.fh.fileno())
        self.inode = st.st_ino
        if at_end:
            self.fh.seek(0, os.SEEK_END)

    def poll(self) -> list[str]:
        """New complete lines; reopens after truncation (copytruncate) or rename (create)."""
        if self.fh is None:
            self.open(at_end=False)
            if self.fh is None:
                return []
        lines = self._read()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return lines
        if st.st_ino != self.inode:
            lines += self._read()  # the rest of the renamed file first
            self.fh.close()
            self.open(at_end=False)
            lines += self._read()
        elif st.st_size < self.fh.tell():
            self.fh.seek(0)
            self.pending = b""
            lines += self._read()
        return lines

    def _read(self) -> list[str]:
        assert self.fh is not None
        chunk = self.fh.read()
        if not chunk:
            return []
        data = self.pending + chunk
        *complete, self.pending = data.split(b"\n")
        return [line.decode(errors="replace") for line in complete]


def follow(services: list[dict[str, Any]], n: int, color: bool, out: TextIO,
           stop_after: float | None = None) -> None:
    show_name = len(services) > 1
    followed = []
    for svc in services:
        for stream, path in streams(svc):
            pre = prefix(svc["name"] if show_name else None, stream, color)
            for line in tail_lines(path, n):
                out.write(pre + line + "\n")
            f = Followed(path, pre)
            f.open(at_end=True)
            followed.append(f)
    out.flush()
    deadline = None if stop_after is None else time.monotonic() + stop_after
    while deadline is None or time.monotonic() < deadline:
        wrote = False
        for f in followed:
            for line in f.poll():
                out.write(f.prefix + line + "\n")
                wrote = True
        if wrote:
            out.flush()
        time.sleep(POLL_INTERVAL)
