"""Upgrade plan logic: batching, health gate, rollback, abort, persistence, resume.

The sandboxes are an in-memory stand-in for the ShimOps edge (FakeShims:
each keeps what a shim would report -- versions, the shim's pid, which a
shim upgrade changes, the release entry points it runs from, containers --
and refuses a path that is no release entry point, as a shim does);
releases and the plan file are real (ReleaseStore over a temp directory,
StateStore).  Tests check outcomes: the plan's state and each target's,
what each sandbox reports afterwards, and the progress lines the rollout
reports (opsctl prints them), never which calls the fake received.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from keel.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from opsd._discovery import ContainerView, SandboxView, Switched
from opsd._manager import Manager
from opsd._preflight import UpgradeRequest
from opsd._rollout import Rollout, RolloutConfig, health_problem
from opsd.state import Plan, PlanState, TargetState, make_plan, plan_store
from upgrade.releases import AGENT_ENTRY, SHIM_ENTRY, Manifest, ReleaseStore, manifest_store

FAST = RolloutConfig(gate_timeout_s=0.3, settle_timeout_s=0.3, poll_s=0.01)
#: Shim pids: every shim a sandbox gets is a new process.
_PIDS = itertools.count(100)


@dataclasses.dataclass
class Box:
    shim: str = "0.1.0"
    agent: str = "0.1.0"
    containers: dict[str, str] = dataclasses.field(default_factory=lambda: {"c1": "running"})
    schema: int = 1
    alive: bool = True
    shim_pid: int = dataclasses.field(default_factory=lambda: next(_PIDS))
    #: The release entry points it runs now ("" while it runs what it started with).
    shim_path: str = ""
    agent_path: str = ""


class FakeShims:
    """Sandboxes as a shim reports them; *hooks* inject faults per (id, component, version)."""

    def __init__(self, boxes: dict[str, Box]) -> None:
        self.boxes = boxes
        self.hooks: dict[tuple[str, str, str], Callable[[Box], None]] = {}
        #: Sandboxes whose answering shim is not their live owner: why.
        self.not_owner: dict[str, str] = {}
        #: Sandboxes whose guest cannot run a release's agent: why (CheckAgentRelease).
        self.agent_problems: dict[str, str] = {}

    def ids(self) -> list[str]:
        return sorted(self.boxes)

    async def status(self, sandbox_id: str) -> SandboxView:
        b = self.boxes[sandbox_id]
        if not b.alive:
            raise Unavailable(f"sandbox {sandbox_id}: connection refused")
        return SandboxView(sandbox_id, b.shim, b.agent, b.shim_pid, "process", "default",
                           tuple(ContainerView(c, 1, s, 0) for c, s in b.containers.items()),
                           b.schema)

    def owner_problem(self, view: SandboxView) -> str | None:
        return self.not_owner.get(view.id)

    async def agent_release_problem(self, sandbox_id: str, agent_path: Path) -> str | None:
        return self.agent_problems.get(sandbox_id)

    async def upgrade(self, sandbox_id: str, component: str, path: Path,
                      to_version: str) -> Switched:
        entry = SHIM_ENTRY if component == "shim" else AGENT_ENTRY
        if not path.is_file() or path.parent.parent / entry != path:
            raise FailedPrecondition(f"{path} is not a release's {entry}")
        if path.parent.parent.name != to_version:  # the agent checks what the release is
            raise FailedPrecondition(f"{path} is release {path.parent.parent.name}")
        b = self.boxes[sandbox_id]
        hook = self.hooks.get((sandbox_id, component, to_version))
        if hook is not None:
            hook(b)  # may raise (the shim refused: the old version keeps serving)
        before = getattr(b, component)
        setattr(b, component, to_version)
        setattr(b, f"{component}_path", str(path))
        if component == "shim":  # a new shim process; an agent execs in place
            b.shim_pid = next(_PIDS)
        return Switched(before, to_version, b.shim_pid if component == "shim" else 0, "test")


def make_releases(root: Path, *versions: str, shim_schema: int = 1) -> ReleaseStore:
    """Release directories with the layout ReleaseStore reads (no venv: shims are fakes)."""
    for v in versions:
        for entry in (SHIM_ENTRY, AGENT_ENTRY):
            (root / v / entry).parent.mkdir(parents=True, exist_ok=True)
            (root / v / entry).write_text("#!/bin/sh\n")
        manifest_store(root / v).save(Manifest(v, 0.0, "test", shim_schema, 1))
    return ReleaseStore(root)


def run_plan(plan: Plan, shims: FakeShims, releases: ReleaseStore, store_dir: Path,
             during: Callable[[Rollout, Plan], None] = lambda r, p: None,
             events: list[str] | None = None) -> Plan:
    """Run *plan* to its end; its progress lines go to *events*."""
    store = plan_store(store_dir)
    holder: list[Rollout] = []

    def save(p: Plan) -> None:
        store.save(p)
        if holder:
            during(holder[0], p)

    lines = events if events is not None else []
    rollout = Rollout(plan, shims=shims, releases=releases, save=save, event=lines.append,
                      config=FAST)
    holder.append(rollout)
    return asyncio.run(rollout.run())


def fleet(n: int) -> FakeShims:
    return FakeShims({f"sb{i}": Box() for i in range(n)})


def before_after(events: list[str], first: str, then: str) -> bool:
    """Whether progress line *first* was reported, and before *then*."""
    at = {text: next((i for i, e in enumerate(events) if text in e), None) for text in (first, then)}
    return at[first] is not None and at[then] is not None and at[first] < at[then]


def plan_for(shims: FakeShims, batch: int = 2, pause: float = 0.0,
             comps: tuple[str, ...] = ("shim", "agent")) -> Plan:
    return make_plan("p1", "0.2.0", comps, batch, pause,
                     [(s, b.shim, b.agent) for s, b in sorted(shims.boxes.items())])


def test_batching_splits_in_order() -> None:
    plan = plan_for(fleet(5), batch=2)
    assert [t.batch for t in plan.targets] == [0, 0, 1, 1, 2]
    assert plan.batches == 3 and plan.components == ("shim", "agent")
    with pytest.raises(ValueError):
        make_plan("p", "0.2.0", ("shim",), 0, 0, [])


def test_illegal_transitions_name_the_state() -> None:
    plan = plan_for(fleet(1))
    with pytest.raises(FailedPrecondition, match="pending; it cannot become healthy"):
        plan.targets[0].moved(TargetState.HEALTHY)
    with pytest.raises(FailedPrecondition, match="running; it cannot become rolled-back"):
        plan.moved(PlanState.ROLLED_BACK)


def test_plan_round_trips_through_the_store(tmp_path: Path) -> None:
    plan = plan_for(fleet(3)).changed(pause_until=12.5, abort_requested=True)
    t = plan.targets[1].moved(TargetState.UPGRADING, "x", running=("a", "b"))
    plan = plan.with_target(t)
    store = plan_store(tmp_path / "state")
    store.save(plan)
    assert store.load() == plan
    doc = json.loads((tmp_path / "state/plan.json").read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "keel.opsd.plan"


def test_success_upgrades_every_sandbox_shim_first(tmp_path: Path) -> None:
    shims = fleet(3)
    old_pids = {s: b.shim_pid for s, b in shims.boxes.items()}
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")
    events: list[str] = []
    final = run_plan(plan_for(shims), shims, releases, tmp_path / "st", events=events)
    assert final.state is PlanState.SUCCEEDED, final.message
    new = releases.get("0.2.0")
    for sid, b in shims.boxes.items():
        assert (b.shim, b.agent) == ("0.2.0", "0.2.0")
        assert (b.shim_path, b.agent_path) == (str(new.shim_path), str(new.agent_path))
        assert b.shim_pid != old_pids[sid]
        # Shim first, then agent, then the gate.
        assert before_after(events, f"{sid}: shim 0.1.0 -> 0.2.0", f"{sid}: agent 0.1.0 -> 0.2.0")
        assert before_after(events, f"{sid}: agent 0.1.0 -> 0.2.0", f"{sid}: healthy at 0.2.0")
    assert plan_store(tmp_path / "st").load() == final
    assert {t.state for t in final.targets} == {TargetState.HEALTHY}
    assert [t.batch for t in final.targets] == [0, 0, 1]


def test_only_selected_component_moves(tmp_path: Path) -> None:
    shims = fleet(2)
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")
    final = run_plan(plan_for(shims, comps=("agent",)), shims, releases, tmp_path / "st")
    assert final.state is PlanState.SUCCEEDED
    assert all((b.shim, b.agent) == ("0.1.0", "0.2.0") for b in shims.boxes.values())


def test_failed_upgrade_rolls_back_its_batch_only(tmp_path: Path) -> None:
    shims = fleet(5)

    def refuse(b: Box) -> None:
        raise FailedPrecondition("new agent cannot start")

    shims.hooks[("sb3", "agent", "0.2.0")] = refuse
    untouched = copy.deepcopy(shims.boxes["sb4"])
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")
    final = run_plan(plan_for(shims, batch=2), shims, releases, tmp_path / "st")
    assert final.state is PlanState.ROLLED_BACK
    assert "new agent cannot start" in final.message
    b = shims.boxes
    assert all((b[s].shim, b[s].agent) == ("0.2.0", "0.2.0") for s in ("sb0", "sb1"))  # batch 1 stays
    assert all((b[s].shim, b[s].agent) == ("0.1.0", "0.1.0") for s in ("sb2", "sb3", "sb4"))
    assert b["sb4"] == untouched  # batch 3 never touched: same shim, nothing switched
    states = {t.sandbox_id: t.state for t in final.targets}
    assert states["sb2"] is states["sb3"] is TargetState.ROLLED_BACK
    assert states["sb4"] is TargetState.PENDING


def test_gate_catches_a_lost_container_and_rolls_back(tmp_path: Path) -> None:
    shims = fleet(2)
    shims.hooks[("sb1", "agent", "0.2.0")] = lambda b: b.containers.update(c1="stopped")
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")
    events: list[str] = []
    final = run_plan(plan_for(shims, batch=2), shims, releases, tmp_path / "st", events=events)
    assert final.state is PlanState.ROLLED_BACK
    sb1 = final.target("sb1")
    assert "containers no longer running: c1" in sb1.message
    assert {t.state for t in final.targets} == {TargetState.ROLLED_BACK}
    old = releases.get("0.1.0")
    for b in shims.boxes.values():
        assert (b.shim, b.agent) == ("0.1.0", "0.1.0")
        assert (b.shim_path, b.agent_path) == (str(old.shim_path), str(old.agent_path))
    # sb0 was healthy but goes back with its batch: agent first, then shim.
    assert before_after(events, "sb0: agent 0.2.0 -> 0.1.0", "sb0: shim 0.2.0 -> 0.1.0")
    assert before_after(events, "sb0: shim 0.2.0 -> 0.1.0", "sb0: back at shim 0.1.0")


def test_failed_rollback_fails_the_plan(tmp_path: Path) -> None:
    shims = fleet(1)

    def refuse(b: Box) -> None:
        raise FailedPrecondition("no")

    shims.hooks[("sb0", "agent", "0.2.0")] = refuse
    shims.hooks[("sb0", "shim", "0.1.0")] = refuse
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")
    final = run_plan(plan_for(shims), shims, releases, tmp_path / "st")
    assert final.state is PlanState.FAILED
    assert final.targets[0].state is TargetState.ROLLBACK_FAILED
    assert "rollback failed" in final.targets[0].message
    # Left where the failures left it, for an operator to see.
    assert (shims.boxes["sb0"].shim, shims.boxes["sb0"].agent) == ("0.2.0", "0.1.0")


def test_a_sandbox_whose_new_shim_died_after_commit_is_lost_not_rolled_back(
        tmp_path: Path) -> None:
    """The new shim took the sandbox over and died; the old one still answers
    Status with the old version for a moment before it exits.  opsd must not
    call that "rolled back"."""
    shims = fleet(1)

    def die_after_commit(b: Box) -> None:
        shims.not_owner["sb0"] = "lost: the shim that owns it (pid 4242) is gone"
        raise Unavailable("the new shim exited after commit")

    shims.hooks[("sb0", "shim", "0.2.0")] = die_after_commit
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")
    final = run_plan(plan_for(shims), shims, releases, tmp_path / "st")
    assert final.state is PlanState.FAILED, final
    t = final.targets[0]
    assert t.state is TargetState.ROLLBACK_FAILED, t
    assert "lost: the shim that owns it (pid 4242) is gone" in t.message
    assert "rolled back" not in t.message


def test_abort_during_pause_leaves_later_batches(tmp_path: Path) -> None:
    shims = fleet(4)
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")

    def abort_when_paused(rollout: Rollout, p: Plan) -> None:
        if p.pause_until is not None and not p.abort_requested:
            rollout.request_abort()

    final = run_plan(plan_for(shims, batch=2, pause=3600), shims, releases, tmp_path / "st",
                     during=abort_when_paused)
    assert final.state is PlanState.ABORTED
    assert [t.state for t in final.targets] == [TargetState.HEALTHY] * 2 + [TargetState.PENDING] * 2
    assert [(b.shim, b.agent) for _, b in sorted(shims.boxes.items())] == (
        [("0.2.0", "0.2.0")] * 2 + [("0.1.0", "0.1.0")] * 2)


def test_resume_mid_batch_reconciles_instead_of_repeating(tmp_path: Path) -> None:
    shims = fleet(2)
    releases = make_releases(tmp_path / "rel", "0.1.0", "0.2.0")
    plan = plan_for(shims, batch=2)
    # As persisted by an opsd killed while sb0's shim switch was in flight (and done).
    plan = plan.with_target(plan.target("sb0").moved(TargetState.UPGRADING, running=("c1",)))
    sb0 = shims.boxes["sb0"]
    sb0.shim, sb0.shim_pid = "0.2.0", next(_PIDS)
    switched_shim = sb0.shim_pid
    store = plan_store(tmp_path / "st")
    store.save(plan)
    resumed = store.load()
    assert resumed is not None
    final = run_plan(resumed, shims, releases, tmp_path / "st")
    assert final.state is PlanState.SUCCEEDED
    assert {t.state for t in final.targets} == {TargetState.HEALTHY}
    assert (sb0.shim, sb0.agent) == ("0.2.0", "0.2.0")
    assert sb0.shim_pid == switched_shim  # its shim was not switched a second time
    assert shims.boxes["sb1"].shim_pid != switched_shim


def test_health_problem_checks_versions_then_containers() -> None:
    view = SandboxView("s", "0.2.0", "0.1.0", 1, "process", "ns",
                       (ContainerView("a", 1, "running", 0), ContainerView("b", 2, "stopped", 0)),
                       1)
    assert health_problem({"shim": "0.2.0", "agent": "0.1.0"}, ("a",), view) is None
    assert "agent reports '0.1.0'" in str(health_problem({"shim": "0.2.0", "agent": "0.2.0"},
                                                         (), view))
    assert health_problem({"shim": "0.2.0"}, ("a", "b"), view) == (
        "containers no longer running: b")


def _manager(tmp_path: Path, shims: FakeShims, *versions: str, schema: int = 1) -> Manager:
    releases = make_releases(tmp_path / "rel", *versions, shim_schema=schema)
    m = Manager(store=plan_store(tmp_path / "st"), releases=releases, shims=shims, config=FAST)
    m.load()
    return m


@pytest.mark.parametrize("req, error, text", [
    (UpgradeRequest("latest!"), InvalidArgument, "not a Keel version"),
    (UpgradeRequest("0.3.0"), NotFound, "release 0.3.0 is not installed"),
    (UpgradeRequest("0.2.0", sandbox_ids=("nope",)), NotFound, "no sandbox nope"),
    (UpgradeRequest("1.0.0"), FailedPrecondition, "changes the major version"),
    (UpgradeRequest("0.2.0", components=("kernel",)), InvalidArgument, "unknown component"),
    (UpgradeRequest("0.2.0", batch_size=0), InvalidArgument, "batch size"),
])
def test_refusals_touch_nothing(tmp_path: Path, req: UpgradeRequest, error: type[Exception],
                                text: str) -> None:
    shims = fleet(2)
    before = copy.deepcopy(shims.boxes)
    m = _manager(tmp_path, shims, "0.1.0", "0.2.0", "1.0.0")
    with pytest.raises(error, match=text):
        asyncio.run(m.start(req))
    assert shims.boxes == before and plan_store(tmp_path / "st").load() is None


def test_a_guest_that_cannot_run_the_agent_refuses_the_plan(tmp_path: Path) -> None:
    """A VM whose image lacks what the release's agent needs (the shim says so)
    refuses the whole plan before any sandbox moves; a shim-only upgrade goes."""
    shims = fleet(2)
    shims.agent_problems["sb1"] = "release 0.2.0 needs guest image format 2 or newer"
    before = copy.deepcopy(shims.boxes)
    m = _manager(tmp_path, shims, "0.1.0", "0.2.0")
    with pytest.raises(FailedPrecondition, match=r"no sandbox touched:\n  sb1: agent: release"
                                                 r" 0.2.0 needs guest image format 2"):
        asyncio.run(m.start(UpgradeRequest("0.2.0")))
    assert shims.boxes == before and plan_store(tmp_path / "st").load() is None
    plan, _notes = asyncio.run(m.start(UpgradeRequest("0.2.0", components=("shim",),
                                                      dry_run=True)))
    assert [t.sandbox_id for t in plan.targets] == ["sb0", "sb1"]


def test_unreadable_plan_file_disables_upgrades_and_is_kept(tmp_path: Path) -> None:
    shims = fleet(1)
    (tmp_path / "st").mkdir()
    (tmp_path / "st/plan.json").write_text('{"schema_version": 9, "kind": "keel.opsd.plan"}')
    before = copy.deepcopy(shims.boxes)
    m = _manager(tmp_path, shims, "0.1.0", "0.2.0")
    with pytest.raises(FailedPrecondition, match="upgrades are disabled: .*schema_version 9"):
        asyncio.run(m.start(UpgradeRequest("0.2.0")))
    assert json.loads((tmp_path / "st/plan.json").read_text())["schema_version"] == 9
    assert shims.boxes == before


def test_newer_state_schema_and_missing_rollback_release_are_refused(tmp_path: Path) -> None:
    shims = fleet(1)
    shims.boxes["sb0"].schema = 2
    shims.boxes["sb0"].agent = "0.1.1"  # its release is not installed: no way back
    before = copy.deepcopy(shims.boxes)
    m = _manager(tmp_path, shims, "0.1.0", "0.2.0", schema=1)
    with pytest.raises(FailedPrecondition) as err:
        asyncio.run(m.start(UpgradeRequest("0.2.0")))
    assert "incompatible state schema" in str(err.value)
    assert "0.1.1, whose release is not installed" in str(err.value)
    assert shims.boxes == before and m.plan is None


def test_dry_run_and_second_upgrade(tmp_path: Path) -> None:
    shims = fleet(3)
    shims.boxes["sb2"].alive = False
    before = copy.deepcopy(shims.boxes)
    m = _manager(tmp_path, shims, "0.1.0", "0.2.0")

    async def scenario() -> None:
        plan, notes = await m.start(UpgradeRequest("0.2.0", dry_run=True))
        assert [t.sandbox_id for t in plan.targets] == ["sb0", "sb1"]
        assert any("skipped sb2" in n for n in notes)
        assert shims.boxes == before and m.plan is None
        assert plan_store(tmp_path / "st").load() is None
        runner = asyncio.create_task(m.run())
        try:
            plan, _ = await m.start(UpgradeRequest("0.2.0", pause_s=3600))
            with pytest.raises(FailedPrecondition, match=f"upgrade {plan.id} to 0.2.0 is running"):
                await m.start(UpgradeRequest("0.2.0"))
            m.abort()
            async for p, _lines in m.watch(plan.id):
                last = p
            assert last.state is PlanState.ABORTED
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(scenario())
