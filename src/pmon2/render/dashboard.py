"""`pmon2 monit`: a live dashboard on textual, imported by this command only (textual costs ~300 ms).

It is one more client of pmond's API: it polls /v1/services once a second, reads the selected
service's log files, and sends the same requests as the CLI for its keys.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Label, Log, Static

from pmon2.client import Client
from pmon2.errors import PmonError
from pmon2.render.detail import describe_exit
from pmon2.render.logs import streams, tail_lines
from pmon2.render.table import status_text
from pmon2.render.text import human_bytes, human_duration

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 12
STATUS_COLOR = {"running": "green", "stopped": "yellow", "stopping": "yellow", "errored": "red",
                "backoff": "magenta", "exited": "grey50"}


def sparkline(values: deque[float] | list[float]) -> str:
    if not values:
        return ""
    top = max(max(values), 100.0)  # one full core is the top of the scale
    return "".join(SPARK[min(int(v / top * (len(SPARK) - 1)), len(SPARK) - 1)] for v in values)


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n", "answer(False)", "no"),
                Binding("escape", "answer(False)", "cancel")]
    DEFAULT_CSS = """
    Confirm { align: center middle; }
    Confirm > Label { border: thick $warning; padding: 1 2; background: $surface; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Label(f"{self.question}  [b]y[/b]/[b]n[/b]")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class Dashboard(App[None]):
    TITLE = "pmon2 monit"
    CSS = """
    #services { height: 1fr; min-height: 5; }
    #status { height: 1; background: $boost; padding: 0 1; }
    #logs { height: 1fr; min-height: 4; border-top: solid $primary; }
    """
    BINDINGS = [
        Binding("r", "act('restart')", "restart"), Binding("s", "act('stop')", "stop"),
        Binding("t", "act('start')", "start"), Binding("l", "act('reload')", "reload"),
        Binding("d", "act('delete')", "delete"), Binding("q", "quit", "quit"),
    ]
    CONFIRM = {"restart", "stop", "delete"}

    def __init__(self, client: Client, interval: float = 1.0) -> None:
        super().__init__()
        self.client = client
        self.interval = interval
        self.services: list[dict[str, Any]] = []
        self.cpu_history: dict[int, deque[float]] = {}
        self.selected: int | None = None
        self.shown_log: list[str] = []

    def compose(self) -> ComposeResult:
        with Vertical():
            yield DataTable(id="services", cursor_type="row", zebra_stripes=True)
            yield Static("", id="status")
            yield Log(id="logs", max_lines=500)
        yield Footer()

    async def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # cpu and mem: the whole service, all its processes (memory as PSS); procs: how many.
        table.add_columns("id", "name", "status", "pid", "↺", "up", "cpu", "cpu 12s", "mem", "procs")
        await self.refresh_data()
        self.set_interval(self.interval, self.refresh_data)

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.client.request, method, path, body, autostart=False, timeout=30.0)

    async def refresh_data(self) -> None:
        try:
            services = await self._call("GET", "/v1/services")
        except PmonError as exc:
            self.query_one("#status", Static).update(f"[red]{exc.message}[/red]")
            return
        self.services = services
        for svc in services:
            hist = self.cpu_history.setdefault(svc["id"], deque(maxlen=HISTORY))
            hist.append(svc.get("cpu_percent") or 0.0)
        self._fill_table()
        await self._show_selected()

    def _fill_table(self) -> None:
        table = self.query_one(DataTable)
        keep = self.selected
        table.clear()
        for svc in self.services:
            color = STATUS_COLOR.get(svc["status"], "white")
            cpu = svc.get("cpu_percent")
            table.add_row(str(svc["id"]), svc["name"], f"[{color}]{status_text(svc)}[/{color}]",
                          str(svc["pid"] or "-"), str(svc["restarts"]), human_duration(svc.get("uptime_s")),
                          "-" if cpu is None else f"{cpu:.1f}%", sparkline(self.cpu_history[svc["id"]]),
                          human_bytes(svc.get("mem_bytes")), str(svc.get("processes") or "-"), key=str(svc["id"]))
        ids = [s["id"] for s in self.services]
        if keep in ids:
            table.move_cursor(row=ids.index(keep))
        elif ids:
            self.selected = ids[0]
            table.move_cursor(row=0)
        else:
            self.selected = None

    def current(self) -> dict[str, Any] | None:
        return next((s for s in self.services if s["id"] == self.selected), None)

    async def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            self.selected = int(event.row_key.value)
            await self._show_selected()

    async def _show_selected(self) -> None:
        svc = self.current()
        status = self.query_one("#status", Static)
        log = self.query_one(Log)
        if svc is None:
            status.update("no services: start one with  pmon2 run ./bin/app --name app")
            log.clear()
            self.shown_log = []
            return
        main = ""
        if (svc.get("processes") or 0) > 1 and svc.get("main_cpu_percent") is not None:
            main = (f"main process {svc['main_cpu_percent']:.1f}% {human_bytes(svc.get('main_mem_bytes'))}"
                    f" of {svc['processes']}  ")
        status.update(f"[b]{svc['name']}[/b]  {' '.join(svc['argv'])[:50]}  {main}"
                      f"[dim]last exit: {describe_exit(svc.get('last_exit'))}[/dim]")
        lines = await asyncio.to_thread(self._log_lines, svc)
        if lines != self.shown_log:
            self.shown_log = lines
            log.clear()
            log.write_lines(lines)

    @staticmethod
    def _log_lines(svc: dict[str, Any]) -> list[str]:
        out = []
        for stream, path in streams(svc):
            out.extend(f"{stream} | {line}" for line in tail_lines(path, 15))
        return out

    async def action_act(self, action: str) -> None:
        svc = self.current()
        if svc is None:
            return
        if action in self.CONFIRM:
            self.push_screen(Confirm(f"{action} {svc['name']}?"),
                             lambda yes: self._run_action(action, svc) if yes else None)
        else:
            self._run_action(action, svc)

    def _run_action(self, action: str, svc: dict[str, Any]) -> None:
        self.run_worker(self._do(action, svc), exclusive=False)

    async def _do(self, action: str, svc: dict[str, Any]) -> None:
        path = self.client.service_path(str(svc["id"]), "" if action == "delete" else action)
        try:
            await self._call("DELETE" if action == "delete" else "POST", path, {} if action != "delete" else None)
            self.notify(f"{action}: {svc['name']} done")
        except PmonError as exc:
            self.notify(exc.message, severity="error")
        await self.refresh_data()


def run(client: Client) -> None:
    client.request("GET", "/v1/version")  # start pmond first, with the CLI's clear errors
    Dashboard(client).run()
