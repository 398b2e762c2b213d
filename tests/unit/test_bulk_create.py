"""Supervisor.create_many, the bulk create of an apply, on services that do not start (autostart = false):
no fork, a real store in a temporary dir."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pmon2.config import Config
from pmon2.daemon import watch
from pmon2.daemon.store import Store
from pmon2.daemon.supervisor import Supervisor
from pmon2.errors import PmonError
from pmon2.paths import Paths


def _supervisor(tmp: Path) -> Supervisor:
    paths = Paths("user", str(tmp / "config.toml"), str(tmp / "data"), str(tmp / "logs"), str(tmp / "run"))
    for d in (paths.data_dir, paths.log_dir, paths.run_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    return Supervisor(Config(paths, log_check_interval=0), Store(paths.database),
                      watch.Watcher(asyncio.get_running_loop()))


def _req(name: str, tmp: Path, **more: Any) -> dict[str, Any]:
    return {"name": name, "argv": ["/bin/sleep", "60"], "cwd": str(tmp), "env": {}, "autostart": False, **more}


def test_a_bulk_create_is_one_command_and_a_bad_request_fails_alone(tmp_path: Path) -> None:
    async def main() -> None:
        sup = _supervisor(tmp_path)
        await sup.create_many([_req("taken", tmp_path)])
        before = sup.store.commits()
        reqs = [_req(f"s{i}", tmp_path) for i in range(20)]
        reqs.insert(5, _req("TAKEN", tmp_path))  # the same name but for case: refused, alone
        reqs.append(_req("web", tmp_path, instances=3))
        made = await sup.create_many(reqs)
        assert isinstance(made[5], PmonError) and "taken" in made[5].message
        assert all(isinstance(m, list) for i, m in enumerate(made) if i != 5)
        assert [s.name for s in made[-1]] == ["web:0", "web:1", "web:2"]  # type: ignore[union-attr]
        # All 23 rows in one transaction: one command for the crash check (launches.write_commits).
        assert sup.store.commits() == before + 1
        rows = {r["name"]: r for r in sup.store.load_services()}
        assert len(rows) == 1 + 20 + 3 and "TAKEN" not in rows
        assert all(r["desired"] == "stopped" for r in rows.values())
        # A group's name is checked too, and a name given twice in one bulk create is refused once.
        again = await sup.create_many([_req("Web", tmp_path, instances=2), _req("new", tmp_path),
                                       _req("NEW", tmp_path)])
        assert isinstance(again[0], PmonError) and isinstance(again[2], PmonError)
        assert "given twice" in again[2].message
        assert [s.name for s in again[1]] == ["new"]  # type: ignore[union-attr]
        sup.store.close()

    asyncio.run(main())
