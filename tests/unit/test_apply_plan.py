"""Apply's plan (a pure function of the file's services and the groups that exist) and its execution order,
against an in-memory supervisor: create / change / unchanged / remove, restarts, sources, prune, dependency
problems (unknown names, cycles), every problem named at once, and failures that stop only dependents."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from pmon2 import spec
from pmon2.daemon import apply
from pmon2.daemon.apply import Current, plan
from pmon2.errors import PmonError, SpawnError

SRC = "/srv/app/pmon2.toml"
OTHER = "/srv/other/pmon2.toml"


def svc(name: str, *argv: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "argv": list(argv or ["sleep", "100"]), **fields}


def cur(name: str, *argv: str, running: bool = True, **fields: Any) -> Current:
    return Current({"source": SRC} | svc(name, *argv, **fields), running)


def rows(p: apply.Plan) -> list[tuple[str, str, list[str], bool]]:
    return [(s.name, s.action, s.fields, s.restart) for s in p.steps]


# the plan


def test_a_fresh_pmond_creates_everything_in_dependency_order() -> None:
    p = plan([svc("web", depends_on={"db": "ready", "migrate": "completed"}),
              svc("migrate", depends_on={"db": "started"}, restart="no"), svc("db"), svc("cache")], {}, SRC)
    assert p.valid
    assert [(s.name, s.action) for s in p.steps] == [("db", "create"), ("migrate", "create"), ("web", "create"),
                                                      ("cache", "create")]
    assert all(s.want["source"] == SRC for s in p.steps)


def test_the_same_file_again_changes_nothing() -> None:
    file = [svc("db"), svc("web", instances=3, env={"A": "1"}, depends_on={"db": "ready"})]
    current = {"db": cur("db"), "web": cur("web", instances=3, env={"A": "1"}, depends_on={"db": "ready"})}
    assert rows(plan(file, current, SRC)) == [("db", "unchanged", [], False), ("web", "unchanged", [], False)]


def test_defaults_given_or_omitted_are_the_same() -> None:
    file = [svc("a"), svc("b", autorestart=False), svc("c", restart="no")]
    current = {"a": cur("a", restart="always", env={}, tags=[], instances=1, cwd="/"),
               "b": cur("b", restart="no"), "c": cur("c", autorestart=False)}
    assert {s.action for s in plan(file, current, SRC).steps} == {"unchanged"}


@pytest.mark.parametrize(("change", "restart"), [
    ({"env": {"LOG_LEVEL": "debug"}}, True),  # env alone restarts
    ({"argv": ["sleep", "200"]}, True), ({"cwd": "/tmp"}, True), ({"user": "nobody"}, True),
    ({"log_dir": "/var/log/app"}, True), ({"port": 8000}, True),
    ({"kill_timeout": 30.0}, False),  # takes effect at the next stop
    ({"stop_signal": "SIGINT"}, False), ({"restart": "on-failure"}, False), ({"max_restarts": 3}, False),
    ({"log_max_size": 1 << 20}, False), ({"tags": ["workers"]}, False), ({"instances": 4}, False),
])
def test_a_change_lists_its_fields_and_restarts_only_when_needed(change: dict[str, Any], restart: bool) -> None:
    base = svc("api", env={"LOG_LEVEL": "info"})
    p = plan([base | change], {"api": cur("api", env={"LOG_LEVEL": "info"})}, SRC)
    (step,) = p.steps
    assert (step.action, step.fields, step.restart) == ("change", list(change), restart)
    assert step.changes == change


def test_a_stopped_service_is_changed_but_not_restarted() -> None:
    (step,) = plan([svc("api", "sleep", "200")], {"api": cur("api", running=False)}, SRC).steps
    assert (step.action, step.fields, step.restart) == ("change", ["argv"], False)


def test_a_field_left_out_goes_back_to_its_default() -> None:
    (step,) = plan([svc("api")], {"api": cur("api", kill_timeout=30.0, tags=["x"], restart="no")}, SRC).steps
    assert step.changes == {"restart": "always", "kill_timeout": None, "tags": []}
    assert step.restart is False


def test_a_service_made_by_run_is_taken_over_without_a_restart() -> None:
    current = {"api": Current(svc("api"))}  # no source: `pmon2 run`
    (step,) = plan([svc("api")], current, SRC).steps
    assert (step.action, step.fields, step.restart, step.changes) == ("change", ["source"], False, {"source": SRC})


def test_a_service_of_another_file_is_a_conflict_unless_the_file_says_so() -> None:
    current = {"api": Current({"source": OTHER} | svc("api")), "web": Current({"source": OTHER} | svc("web"))}
    p = plan([svc("api"), svc("web", source=OTHER)], current, SRC)
    assert not p.valid and not p.problems
    assert len(p.conflicts) == 1 and p.conflicts[0].startswith(f"services.api: service 'api' comes from {OTHER}")
    assert [(s.name, s.action) for s in p.steps] == [("web", "unchanged")]  # `dump` writes each one's source


def test_names_taken_in_another_case_or_by_another_user_are_conflicts() -> None:
    p = plan([svc("API"), svc("theirs")], {"api": cur("api")}, SRC, taken={"theirs"})
    assert p.conflicts == ["services.API: service 'api' exists, and names are unique regardless of case: rename "
                           "one of them", "services.theirs: the name is taken by another user's service"]


def test_prune_removes_only_this_files_services_dependents_first() -> None:
    current = {"db": cur("db"), "worker": cur("worker", depends_on={"db": "started"}), "web": cur("web"),
               "manual": Current(svc("manual")), "theirs": Current({"source": OTHER} | svc("theirs"))}
    file = [svc("web")]
    assert rows(plan(file, current, SRC)) == [("web", "unchanged", [], False)]
    p = plan(file, current, SRC, prune=True)
    assert [(s.name, s.action) for s in p.steps] == [("worker", "remove"), ("db", "remove"), ("web", "unchanged")]


def test_duplicates_unknown_dependencies_and_cycles_are_all_named() -> None:
    p = plan([svc("a", depends_on={"b": "started"}, restart="on-failure"), svc("b", depends_on={"c": "ready"}),
              svc("c", depends_on={"a": "completed"}), svc("self", depends_on={"self": "started"}),
              svc("web", depends_on={"dbb": "ready"}), svc("db"), svc("DB")], {}, SRC,
             problems=["services.x.kill_timeout: must be between 0 and 86400 seconds"])
    assert p.problems == [
        "services.x.kill_timeout: must be between 0 and 86400 seconds",
        "services.DB: the name is given twice (as 'db': names are unique regardless of case)",
        "services.web.depends_on: 'dbb' is not a service of this file; did you mean 'db'?",
        "services.a.depends_on: a cycle: a -> b -> c -> a",
        "services.self.depends_on: a cycle: self -> self",
    ]
    assert not p.valid


def test_dependency_order_and_cycles() -> None:
    assert apply.dependency_order({"c": ["b"], "b": ["a"], "a": [], "x": []}) == ["a", "b", "c", "x"]
    assert apply.dependency_order({"a": ["b"], "b": ["a"], "z": []}) == ["z", "a", "b"]
    assert apply.find_cycles({"a": ["b"], "b": ["a"], "c": ["c"], "d": ["a"]}) == [["a", "b", "a"], ["c", "c"]]
    assert apply.find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_check_services_names_every_problem() -> None:
    checked, problems = spec.check_services([
        {"name": "web", "argv": ["x"], "instnces": 2, "kill_timeout": -1},
        {"argv": ["y"]}, {"name": "ok", "argv": ["z"], "restart": "sometimes"}, {"name": "a:b"}])
    assert problems == [
        "services.web.instnces: unknown field; did you mean 'instances'?",
        "services.web.kill_timeout: must be between 0 and 86400 seconds",
        "services[1]: name is required",
        "services.ok.restart: must be one of 'always', 'on-failure', 'no', not 'sometimes'",
        "services[3].name: 'a:b': ':' is reserved for instances (web:0) (letters, digits and . _ - @ +, at most 64 "
        "characters, not starting with '.' or '-', not only digits)",
        "services[3]: argv is required",
    ]
    assert [s["name"] for s in checked] == ["web", "ok"]  # the plan goes on to find more problems


def test_apply_body_shape() -> None:
    assert spec.check_body({"source": "/a/b/../app.toml", "services": [], "prune": True},
                           spec.APPLY_FIELDS) == {"source": "/a/app.toml", "services": [], "prune": True}
    for body, message in (({"source": "app.toml"}, "source: must be an absolute path"),
                          ({"services": {}}, "services: must be a list"),
                          ({"services": ["web"]}, "services: item 0 must be an object"),
                          ({"dry_run": "yes"}, "dry_run: must be true or false")):
        with pytest.raises(PmonError, match=re.escape(message)):
            spec.check_body(body, spec.APPLY_FIELDS)
    assert spec.check_query({"masked": ["true"]}, spec.DUMP_QUERY) == {"masked": True}


def test_docs_list_the_apply_fields() -> None:
    text = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    block = text.split("<!-- generated from pmon2/spec.py: APPLY_FIELDS -->\n")[1].split("\n<!-- end generated -->")[0]
    assert block == spec.markdown_table(spec.APPLY_FIELDS), "docs/api.md is stale: paste markdown_table(APPLY_FIELDS)"


def test_the_answer() -> None:
    p = plan([svc("a"), svc("b", "sleep", "1")], {"b": cur("b")}, SRC)
    p.steps[0].fail("spawn_failed", "command not found: sleepy")
    assert apply.answer(p.steps, False) == {
        "plan": [{"name": "a", "action": "create", "fields": [], "restart": False, "ok": False,
                  "error": {"code": "spawn_failed", "message": "command not found: sleepy"}},
                 {"name": "b", "action": "change", "fields": ["argv"], "restart": True, "ok": True}],
        "summary": {"create": 1, "change": 1, "unchanged": 0, "remove": 0, "failed": 1}, "dry_run": False}


# execution, against an in-memory supervisor


class FakeService:
    def __init__(self, sid: int, name: str, fields: dict[str, Any]) -> None:
        self.id, self.name, self.uid, self.desired = sid, name, 0, "running"
        self.fields = fields


class FakeSupervisor:
    """Records what apply asks, in order, with the loop's clock. `slow` delays each named group's readiness;
    argv[0] "missing" fails to start; argv[0] "false" completes with a failure."""

    def __init__(self, slow: dict[str, float] | None = None) -> None:
        self.services: dict[str, FakeService] = {}
        self.log: list[tuple[str, str]] = []
        self.slow = slow or {}
        self.next_id = 1

    def groups(self) -> dict[str, list[FakeService]]:
        return {name: [s] for name, s in self.services.items()}

    def request_fields(self, s: FakeService) -> dict[str, Any]:
        return s.fields

    async def create(self, fields: dict[str, Any]) -> FakeService:
        await asyncio.sleep(0.001)
        if fields["argv"][0] == "missing":
            raise SpawnError(f"command not found: {fields['argv'][0]}")
        s = self.services[fields["name"]] = FakeService(self.next_id, fields["name"], fields)
        self.next_id += 1
        s.desired = "running" if fields.get("autostart", True) else "stopped"
        self.log.append(("create", s.name))
        return s

    async def create_many(self, reqs: list[dict[str, Any]]) -> list[list[FakeService] | PmonError]:
        async def one(fields: dict[str, Any]) -> list[FakeService] | PmonError:
            try:
                return [await self.create(fields)]
            except PmonError as exc:
                return exc
        return list(await asyncio.gather(*(one(r) for r in reqs)))

    async def update(self, ref: str, changes: dict[str, Any]) -> tuple[list[FakeService], bool]:
        s = self.services[ref]
        s.fields = {k: v for k, v in (s.fields | changes).items() if v is not None}
        self.log.append(("update", ref))
        return [s], bool(set(changes) & {"argv", "cwd", "env"})

    async def restart(self, ref: str) -> FakeService:
        s = next(s for s in self.services.values() if str(s.id) == ref)
        await asyncio.sleep(0.001)
        self.log.append(("restart", s.name))
        return s

    async def delete(self, ref: str) -> FakeService:
        s = next(s for s in self.services.values() if str(s.id) == ref)
        await asyncio.sleep(0.005 if s.name == "db" else 0.001)
        del self.services[s.name]
        self.log.append(("delete", s.name))
        return s

    async def wait_for(self, s: FakeService, condition: str, timeout: float) -> None:
        await asyncio.sleep(self.slow.get(s.name, 0.0))
        if s.fields["argv"][0] == "false" and condition == "completed":
            raise PmonError(f"{s.name} exited with code 1, not a success code")
        self.log.append((condition, s.name))


def run_apply(sup: FakeSupervisor, file: list[dict[str, Any]], *, prune: bool = False) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        a = apply.Apply(sup)
        current = {name: Current(s.fields, s.desired == "running", [s]) for name, s in sup.services.items()}
        p = plan(file, current, SRC, prune=prune)
        assert p.valid, p.problems + p.conflicts
        await apply._Run(a.sup, p.steps).execute()
        return apply.answer(p.steps, False)
    return asyncio.run(go())


def test_dependents_start_after_their_conditions_and_the_rest_at_once() -> None:
    sup = FakeSupervisor(slow={"db": 0.05})
    out = run_apply(sup, [svc("web", depends_on={"db": "ready", "migrate": "completed"}),
                          svc("migrate", depends_on={"db": "started"}, restart="no"),
                          svc("db", ready="tcp://127.0.0.1:5432"),
                          svc("cache")])
    assert out["summary"] == {"create": 4, "change": 0, "unchanged": 0, "remove": 0, "failed": 0}
    log = sup.log
    assert log.index(("create", "cache")) < log.index(("ready", "db"))  # not held up by db's readiness
    assert log.index(("started", "db")) < log.index(("create", "migrate"))
    assert log.index(("ready", "db")) < log.index(("create", "web"))
    assert log.index(("completed", "migrate")) < log.index(("create", "web"))
    assert log.count(("ready", "db")) == 1  # one wait, shared by db's own check and web's gate


def test_a_failed_start_stops_only_its_dependents() -> None:
    sup = FakeSupervisor()
    out = run_apply(sup, [svc("db", "missing"), svc("web", depends_on={"db": "started"}),
                          svc("job", "false", restart="no"), svc("after", depends_on={"job": "completed"}),
                          svc("cache")])
    by = {r["name"]: r for r in out["plan"]}
    assert by["db"]["error"] == {"code": "spawn_failed", "message": "command not found: missing"}
    assert by["web"]["error"]["code"] == "dependency_failed"
    assert by["web"]["error"]["message"] == "not started: dependency 'db' failed: command not found: missing"
    assert by["after"]["error"]["message"] == ("not started: dependency 'job' is not completed successfully: job "
                                               "exited with code 1, not a success code")
    assert by["job"]["ok"] and by["cache"]["ok"]
    assert set(sup.services) == {"job", "cache"} and out["summary"]["failed"] == 3


def test_a_dependency_that_does_not_run_fails_its_dependents_at_once() -> None:
    sup = FakeSupervisor()
    out = run_apply(sup, [svc("db", autostart=False), svc("web", depends_on={"db": "started"})])
    assert out["plan"][1]["error"]["message"] == "not started: dependency 'db' does not run (autostart = false)"


def test_changes_restart_only_what_needs_it_dependencies_first() -> None:
    sup = FakeSupervisor()
    run_apply(sup, [svc("db"), svc("web", depends_on={"db": "started"}), svc("cache")])
    sup.log.clear()
    out = run_apply(sup, [svc("db", env={"A": "1"}), svc("web", depends_on={"db": "started"}, kill_timeout=9.0),
                          svc("cache")])
    assert [(r["name"], r["action"], r["restart"]) for r in out["plan"]] == [
        ("db", "change", True), ("web", "change", False), ("cache", "unchanged", False)]
    assert ("restart", "web") not in sup.log and ("restart", "db") in sup.log


def test_removals_go_dependents_first() -> None:
    sup = FakeSupervisor()
    run_apply(sup, [svc("db"), svc("worker", depends_on={"db": "started"}), svc("web")])
    sup.log.clear()
    out = run_apply(sup, [svc("web")], prune=True)
    assert sup.log == [("delete", "worker"), ("delete", "db")]
    assert out["summary"]["remove"] == 2 and set(sup.services) == {"web"}


def test_the_diff_looks_only_at_given_fields_and_agrees_with_a_full_comparison() -> None:
    def full(fields: dict[str, Any]) -> dict[str, Any]:  # every compared field, a missing one at its default
        out = {name: fields.get(name, spec.SERVICE[name].default) for name in apply.COMPARED}
        if "restart" not in fields and "autorestart" in fields:
            out["restart"] = "always" if fields["autorestart"] else "no"
        return out

    base = {"name": "web", "argv": ["./web"], "cwd": "/srv", "env": {"A": "1"}}
    cases = [
        ({}, {}), ({"kill_timeout": 5.0}, {}), ({"kill_timeout": 9.0}, {}), ({"autorestart": False}, {}),
        ({"restart": "no"}, {"autorestart": False}), ({"restart": "always"}, {"autorestart": False}),
        ({"env": {"A": "2"}, "tags": ["x"]}, {"tags": ["x"]}), ({}, {"port": 8000, "instances": 2}),
        ({"source": "/a.toml"}, {"source": "/b.toml"}),
    ]
    for new, old in cases:
        a, b = full(base | new), full(base | old)
        expected = {k: a[k] for k in apply.COMPARED if a[k] != b[k]}
        assert apply.differing(base | new, base | old) == expected, (new, old)
        assert list(apply.differing(base | new, base | old)) == [k for k in apply.COMPARED if k in expected]


# REVIEW12: what runs, whose service it is, "completed" that cannot hold, autostart turned on


def test_a_change_stored_but_not_yet_run_is_planned_again_with_a_restart() -> None:
    """A rolling restart that stopped leaves the new spec stored and old processes running (their ids in
    Current.pending): the same file again is a change of those fields, not "unchanged"."""
    current = {"web": Current({"source": SRC} | svc("web", env={"V": "2"}), True, [], pending={7: ["env"]})}
    (step,) = plan([svc("web", env={"V": "2"})], current, SRC).steps
    assert (step.action, step.fields, step.restart, step.changes, step.pending) == ("change", ["env"], True, {},
                                                                                   ["env"])
    assert step.row()["pending"] == ["env"]
    # with another change: each field once, in the spec's order
    (step,) = plan([svc("web", env={"V": "2"}, kill_timeout=3.0)], current, SRC).steps
    assert (step.fields, step.restart, step.changes) == (["env", "kill_timeout"], True, {"kill_timeout": 3.0})
    (step,) = plan([svc("web", env={"V": "2"})], {"web": cur("web", env={"V": "2"})}, SRC).steps
    assert step.action == "unchanged" and "pending" not in step.row()


def test_apply_never_takes_a_service_from_its_user() -> None:
    nobody = 65534
    theirs = {"api": Current({"user": "nobody"} | svc("api"), uid=nobody)}
    p = plan([svc("api", "sleep", "1")], theirs, SRC, caller_uid=0)  # root's file: runs as root
    assert not p.valid and len(p.conflicts) == 1 and not p.steps
    assert p.conflicts[0].startswith("services.api: service 'api' runs as nobody, and this file would run it as ")
    assert 'set user = "nobody" in services.api, or delete it first (pmon2 del api)' in p.conflicts[0]
    p = plan([svc("api", "sleep", "1", user="nobody")], theirs, SRC, caller_uid=0)  # the same user: root may
    assert p.valid and [(s.action, s.fields) for s in p.steps] == [("change", ["argv", "source"])]
    mine = {"api": Current(svc("api"), uid=0)}  # root's own service: root may give it to another user
    assert plan([svc("api", user="nobody")], mine, SRC, caller_uid=0).valid
    assert plan([svc("api")], theirs, SRC, caller_uid=nobody).valid  # its own user (the user set by _as_caller)


@pytest.mark.parametrize(("restart", "ok"), [({}, False), ({"restart": "always"}, False), ({"restart": "no"}, True),
                                             ({"restart": "on-failure"}, True), ({"autorestart": False}, True)])
def test_completed_on_a_service_that_restarts_always_is_refused(restart: dict[str, Any], ok: bool) -> None:
    p = plan([svc("migrate", **restart), svc("app", depends_on={"migrate": "completed"})], {}, SRC)
    assert p.valid is ok
    if not ok:
        assert p.problems == ['services.app.depends_on: \'migrate\' = "completed" waits until migrate exits '
                              'successfully, but migrate restarts whenever it exits (restart = "always", the '
                              'default): set restart = "no" or "on-failure" in services.migrate']


def test_autostart_turned_on_starts_a_group_that_does_not_run() -> None:
    stopped = {"job": cur("job", autostart=False, running=False)}
    (step,) = plan([svc("job")], stopped, SRC).steps  # autostart back to its default, true
    assert (step.action, step.fields, step.restart, step.start) == ("change", ["autostart"], False, True)
    assert step.row()["start"] is True
    (step,) = plan([svc("job", autostart=True)], {"job": cur("job", autostart=False)}, SRC).steps  # runs already
    assert step.start is False and "start" not in step.row()
    (step,) = plan([svc("job", autostart=False)], {"job": cur("job", running=False)}, SRC).steps  # turned off
    assert step.start is False


class StartingSupervisor(FakeSupervisor):
    async def start(self, ref: str) -> FakeService:
        s = next(s for s in self.services.values() if str(s.id) == ref)
        s.desired = "running"
        self.log.append(("start", s.name))
        return s


def test_execution_starts_a_group_whose_autostart_was_turned_on_after_its_dependencies() -> None:
    sup = StartingSupervisor(slow={"db": 0.02})
    run_apply(sup, [svc("db"), svc("job", autostart=False, depends_on={"db": "ready"})])
    assert sup.services["job"].desired == "stopped"
    sup.log.clear()
    out = run_apply(sup, [svc("db"), svc("job", depends_on={"db": "ready"})])
    assert [(r["name"], r["action"], r.get("start")) for r in out["plan"]] == [
        ("db", "unchanged", None), ("job", "change", True)]
    assert sup.log.index(("ready", "db")) < sup.log.index(("start", "job"))
    assert sup.services["job"].desired == "running" and out["summary"]["failed"] == 0


def test_execution_restarts_the_members_a_change_left_pending() -> None:
    sup = FakeSupervisor()
    run_apply(sup, [svc("web", env={"V": "2"}), svc("db")])
    sup.log.clear()

    async def go() -> dict[str, Any]:
        web, db = sup.services["web"], sup.services["db"]
        current = {"web": Current(web.fields, True, [web], pending={web.id: ["env"]}),
                   "db": Current(db.fields, True, [db])}
        p = plan([svc("web", env={"V": "2"}), svc("db")], current, SRC)
        await apply._Run(sup, p.steps).execute()
        return apply.answer(p.steps, False)

    out = asyncio.run(go())
    assert [(r["name"], r["action"], r["restart"]) for r in out["plan"]] == [("web", "change", True),
                                                                             ("db", "unchanged", False)]
    assert sup.log == [("restart", "web")]  # nothing stored again: only the restart


# the supervisor's side: the mark of a change that waits for a restart (pure)


def test_a_change_waits_for_a_restart_of_the_process_that_runs_until_a_new_one_starts() -> None:
    from pmon2.daemon.supervisor import Service, pending_mark, restart_pending

    def spec_of(version: str, kill: float = 5.0) -> dict[str, Any]:
        return {"exe": "/bin/sleep", "argv": ["sleep", "1"], "cwd": "/", "env": {"V": version}, "user": None,
                "out_log": "/l/o", "err_log": "/l/e", "kill_timeout": kill}

    s = Service(id=1, name="web:0", spec=spec_of("1"), uid=0, pid=100, start_ticks=5, pidfd=3)
    assert restart_pending(s) == []
    v2 = spec_of("2")
    v2["pending_restart"] = pending_mark(s, v2, ["env"])
    s.spec = v2
    assert restart_pending(s) == ["env"]  # process 100 runs V=1
    v3 = spec_of("2", kill=9.0)  # a later change that needs no restart keeps the mark
    v3["pending_restart"] = pending_mark(s, v3, [])
    s.spec = v3
    assert restart_pending(s) == ["env"]
    back = spec_of("1", kill=9.0)  # changed back: process 100 runs what the spec says
    assert pending_mark(s, back, ["env"]) is None
    s.pid, s.start_ticks = 101, 9  # a new process (a restart, a roll's hand over) runs the stored spec
    assert restart_pending(s) == []
    s.pidfd = None  # nothing runs: the next start takes the spec as it is
    assert pending_mark(s, spec_of("3"), ["env"]) is None and restart_pending(s) == []
