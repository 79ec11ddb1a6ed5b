"""The persisted upgrade plan (``<state_dir>/plan.json``) and its state machines.

A plan lists its target sandboxes in order, split into batches of
``batch_size``; each target remembers the versions it started from (the
rollback destination) and the containers that were running when its
upgrade began (the health gate checks they still are).  opsd saves the
plan after every transition, so a restarted opsd resumes it: the rollout
re-reads each sandbox's real versions before acting (see opsd._rollout).

Legal transitions are tables; an illegal one raises FailedPrecondition
naming the current state.  Schema history: 1 = first version.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.errors import FailedPrecondition
from upgrade.store import Doc, StateStore

SCHEMA_VERSION = 1
KIND = "keel.opsd.plan"
COMPONENTS = ("shim", "agent")  # the order a sandbox is upgraded in; rollback reverses it


class PlanState(enum.Enum):
    RUNNING = "running"
    ROLLING_BACK = "rolling-back"  # a batch failed; its sandboxes go back
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled-back"  # a batch failed and went back; later batches untouched
    FAILED = "failed"  # a rollback failed too: an operator must look
    ABORTED = "aborted"


class TargetState(enum.Enum):
    PENDING = "pending"
    UPGRADING = "upgrading"
    UPGRADED = "upgraded"  # every component switched; the gate has not passed yet
    HEALTHY = "healthy"  # passed the gate after its batch
    FAILED = "failed"  # upgrade or gate failed; its batch is rolled back
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"


_P, _T = PlanState, TargetState
PLAN_MOVES: dict[PlanState, frozenset[PlanState]] = {
    _P.RUNNING: frozenset({_P.ROLLING_BACK, _P.SUCCEEDED, _P.ABORTED}),
    _P.ROLLING_BACK: frozenset({_P.ROLLED_BACK, _P.FAILED}),
    _P.SUCCEEDED: frozenset(), _P.ROLLED_BACK: frozenset(), _P.FAILED: frozenset(),
    _P.ABORTED: frozenset(),
}
TARGET_MOVES: dict[TargetState, frozenset[TargetState]] = {
    _T.PENDING: frozenset({_T.UPGRADING, _T.ROLLING_BACK}),
    _T.UPGRADING: frozenset({_T.UPGRADING, _T.UPGRADED, _T.FAILED, _T.ROLLING_BACK}),
    _T.UPGRADED: frozenset({_T.HEALTHY, _T.FAILED, _T.ROLLING_BACK}),
    _T.HEALTHY: frozenset({_T.ROLLING_BACK}),
    _T.FAILED: frozenset({_T.ROLLING_BACK}),
    _T.ROLLING_BACK: frozenset({_T.ROLLING_BACK, _T.ROLLED_BACK, _T.ROLLBACK_FAILED}),
    _T.ROLLED_BACK: frozenset(), _T.ROLLBACK_FAILED: frozenset(),
}
ACTIVE = frozenset({PlanState.RUNNING, PlanState.ROLLING_BACK})


@dataclass(frozen=True, slots=True)
class Target:
    sandbox_id: str
    batch: int
    from_shim: str
    from_agent: str
    state: TargetState = TargetState.PENDING
    #: Containers running when this target's upgrade began (health gate input).
    running: tuple[str, ...] = ()
    message: str = ""

    def moved(self, state: TargetState, message: str | None = None, **changes: Any) -> Target:
        if state not in TARGET_MOVES[self.state]:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} is {self.state.value};"
                                     f" it cannot become {state.value}")
        msg = self.message if message is None else message
        return dataclasses.replace(self, state=state, message=msg, **changes)


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    to_version: str
    components: tuple[str, ...]
    batch_size: int
    pause_s: float
    targets: tuple[Target, ...]
    state: PlanState = PlanState.RUNNING
    #: Index of the batch in progress (== batches when all are done).
    batch: int = 0
    #: Wall-clock end of the pause that follows batch ``batch``; None: no pause running.
    pause_until: float | None = None
    abort_requested: bool = False
    message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def batches(self) -> int:
        return max((t.batch for t in self.targets), default=-1) + 1

    def batch_targets(self, batch: int) -> tuple[Target, ...]:
        return tuple(t for t in self.targets if t.batch == batch)

    def target(self, sandbox_id: str) -> Target:
        return next(t for t in self.targets if t.sandbox_id == sandbox_id)

    def done(self) -> int:
        """Targets that passed their gate."""
        return sum(t.state is TargetState.HEALTHY for t in self.targets)

    def with_target(self, target: Target) -> Plan:
        targets = tuple(target if t.sandbox_id == target.sandbox_id else t for t in self.targets)
        return dataclasses.replace(self, targets=targets, updated_at=time.time())

    def moved(self, state: PlanState, message: str | None = None, **changes: Any) -> Plan:
        if state not in PLAN_MOVES[self.state]:
            raise FailedPrecondition(f"plan {self.id} is {self.state.value};"
                                     f" it cannot become {state.value}")
        msg = self.message if message is None else message
        return dataclasses.replace(self, state=state, message=msg, updated_at=time.time(),
                                   **changes)

    def changed(self, **changes: Any) -> Plan:
        """Fields other than states (batch, pause_until, abort_requested)."""
        return dataclasses.replace(self, updated_at=time.time(), **changes)


def make_plan(plan_id: str, to_version: str, components: tuple[str, ...], batch_size: int,
              pause_s: float, sandboxes: list[tuple[str, str, str]]) -> Plan:
    """A fresh plan: *sandboxes* are (id, shim version, agent version), in order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    comps = tuple(c for c in COMPONENTS if c in components)
    targets = tuple(Target(sid, i // batch_size, shim, agent)
                    for i, (sid, shim, agent) in enumerate(sandboxes))
    now = time.time()
    return Plan(plan_id, to_version, comps, batch_size, pause_s, targets,
                created_at=now, updated_at=now)


def _encode(plan: Plan) -> Doc:
    doc = dataclasses.asdict(plan)
    doc["state"] = plan.state.value
    doc["components"] = list(plan.components)
    doc["targets"] = [{**dataclasses.asdict(t), "state": t.state.value, "running": list(t.running)}
                      for t in plan.targets]
    return doc


def _decode(doc: Doc) -> Plan:
    targets = tuple(Target(
        sandbox_id=str(t["sandbox_id"]), batch=int(t["batch"]), from_shim=str(t["from_shim"]),
        from_agent=str(t["from_agent"]), state=TargetState(t["state"]),
        running=tuple(str(c) for c in t["running"]), message=str(t["message"]),
    ) for t in doc["targets"])
    pause = doc["pause_until"]
    return Plan(
        id=str(doc["id"]), to_version=str(doc["to_version"]),
        components=tuple(str(c) for c in doc["components"]), batch_size=int(doc["batch_size"]),
        pause_s=float(doc["pause_s"]), targets=targets, state=PlanState(doc["state"]),
        batch=int(doc["batch"]), pause_until=None if pause is None else float(pause),
        abort_requested=bool(doc["abort_requested"]), message=str(doc["message"]),
        created_at=float(doc["created_at"]), updated_at=float(doc["updated_at"]),
    )


def plan_store(state_dir: Path) -> StateStore[Plan]:
    """The plan file of an opsd state directory (created 0700 if missing)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return StateStore(state_dir / "plan.json", kind=KIND, version=SCHEMA_VERSION,
                      encode=_encode, decode=_decode, migrations={})
