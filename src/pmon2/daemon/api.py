"""The API's routes: each maps one HTTP request onto the supervisor. docs/api.md documents them all."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from pmon2.daemon.server import unquote
from pmon2.daemon.supervisor import Supervisor
from pmon2.errors import BadRequest, NotFound

Route = tuple[str, re.Pattern[str], Callable[..., Awaitable[tuple[int, Any]]]]


class Api:
    def __init__(self, supervisor: Supervisor, info: Callable[[], dict[str, Any]],
                 shutdown: Callable[[], None]) -> None:
        self.sup = supervisor
        self.info = info
        self.shutdown = shutdown
        self.routes: list[Route] = [
            ("GET", re.compile(r"/v1/version"), self.get_version),
            ("GET", re.compile(r"/v1/daemon"), self.get_daemon),
            ("POST", re.compile(r"/v1/daemon/shutdown"), self.post_shutdown),
            ("GET", re.compile(r"/v1/services"), self.list_services),
            ("POST", re.compile(r"/v1/services"), self.create_service),
            ("GET", re.compile(r"/v1/services/(?P<ref>[^/]+)"), self.get_service),
            ("DELETE", re.compile(r"/v1/services/(?P<ref>[^/]+)"), self.delete_service),
            ("POST", re.compile(r"/v1/services/(?P<ref>[^/]+)/start"), self.start),
            ("POST", re.compile(r"/v1/services/(?P<ref>[^/]+)/stop"), self.stop),
            ("POST", re.compile(r"/v1/services/(?P<ref>[^/]+)/restart"), self.restart),
            ("POST", re.compile(r"/v1/services/(?P<ref>[^/]+)/reload"), self.reload),
            ("GET", re.compile(r"/v1/services/(?P<ref>[^/]+)/events"), self.service_events),
            ("GET", re.compile(r"/v1/events"), self.all_events),
            ("POST", re.compile(r"/v1/services/(?P<ref>[^/]+)/flush"), self.flush),
            ("POST", re.compile(r"/v1/flush"), self.flush_all),
        ]

    async def __call__(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        path_matched = False
        for verb, pattern, handler in self.routes:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            path_matched = True
            if verb == method:
                params = {k: unquote(v) for k, v in m.groupdict().items()}
                return await handler(query=query, body=body if isinstance(body, dict) else {}, **params)
        if path_matched:
            return 405, {"error": {"code": "method_not_allowed", "message": f"{method} is not allowed on {path}"}}
        raise NotFound(f"no such endpoint: {path}")

    async def get_version(self, **_: Any) -> tuple[int, Any]:
        info = self.info()
        return 200, {"version": info["version"], "pid": info["pid"]}

    async def get_daemon(self, **_: Any) -> tuple[int, Any]:
        return 200, self.info() | self.sup.daemon_status()

    async def post_shutdown(self, **_: Any) -> tuple[int, Any]:
        self.shutdown()
        return 202, {"stopping": True, "pid": self.info()["pid"], "services_left_running": True}

    async def list_services(self, **_: Any) -> tuple[int, Any]:
        return 200, [self.sup.view(s) for s in self.sup.services.values()]

    async def create_service(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        svc = await self.sup.create(body)
        return 201, self.sup.view(svc, detail=True)

    async def get_service(self, ref: str, **_: Any) -> tuple[int, Any]:
        return 200, self.sup.view(self.sup.find(ref), detail=True)

    async def delete_service(self, ref: str, **_: Any) -> tuple[int, Any]:
        svc = await self.sup.delete(ref)
        return 200, {"id": svc.id, "name": svc.name, "deleted": True}

    async def start(self, ref: str, **_: Any) -> tuple[int, Any]:
        return 200, self.sup.view(await self.sup.start(ref), detail=True)

    async def stop(self, ref: str, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        return 200, self.sup.view(await self.sup.stop(ref, force=bool(body.get("force"))), detail=True)

    async def restart(self, ref: str, **_: Any) -> tuple[int, Any]:
        return 200, self.sup.view(await self.sup.restart(ref), detail=True)

    async def reload(self, ref: str, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        svc, sig = await self.sup.reload(ref, body.get("signal"))
        return 200, self.sup.view(svc, detail=True) | {"signal": sig}

    async def service_events(self, ref: str, query: dict[str, list[str]], **_: Any) -> tuple[int, Any]:
        svc = self.sup.find(ref)
        return 200, self.sup.store.events(svc.id, _limit(query))

    async def all_events(self, query: dict[str, list[str]], **_: Any) -> tuple[int, Any]:
        return 200, self.sup.store.events(None, _limit(query))


    async def flush(self, ref: str, **_: Any) -> tuple[int, Any]:
        return 200, {"files": self.sup.flush([self.sup.find(ref)])}

    async def flush_all(self, **_: Any) -> tuple[int, Any]:
        return 200, {"files": self.sup.flush(list(self.sup.services.values()))}


def _limit(query: dict[str, list[str]]) -> int:
    raw = query.get("limit", ["50"])[-1]
    if not raw.isdigit() or not 0 < int(raw) <= 100_000:
        raise BadRequest("limit must be a whole number from 1 to 100000")
    return int(raw)
