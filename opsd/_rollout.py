"""Executing an upgrade plan: batches, health gate, pause, rollback, abort.

Every step reconciles against what the sandbox reports instead of
trusting the plan's memory: a component already at the wanted version is
skipped.  That makes each step idempotent, so a plan resumed by a restarted
opsd (killed in the middle of a call) just runs its current step again.

- A batch upgrades its sandboxes concurrently (shim, then agent).  After
  each UpgradeShim the new shim must answer Status with the new version.
- Health gate after the batch: Status answers, both versions are the ones
  planned, and every container that was running when the sandbox's
  upgrade began is still running; polled until ``gate_timeout_s``.
- A failed upgrade or gate fails the batch: all of its sandboxes go back
  to their own from-versions (agent, then shim), the plan ends
  ``rolled-back`` (or ``failed`` if a rollback failed too) and later
  batches are never touched.
- Abort never interrupts a sandbox's handoff: the batch in flight
  finishes (and is gated, and rolled back if unhealthy); no further batch
  starts; a pause ends at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keel import retry
from keel.errors import Unavailable
from observability.spans import Tracer
from opsd._discovery import SandboxView, Shims
from opsd._metrics import UpgradeMetrics
from opsd.state import Plan, PlanState, Target, TargetState
from upgrade.releases import ReleaseStore

log = logging.getLogger("opsd.rollout")
_T = TargetState


class _NotYet(Exception):
    """A sandbox answered but is not where the poll wants it yet."""


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    #: How long a batch may take to look healthy after its upgrade.
    gate_timeout_s: float = 30.0
    #: How long a new shim may take to answer with its version after UpgradeShim.
    settle_timeout_s: float = 30.0
    #: First delay between Status polls (doubles up to 2 s).
    poll_s: float = 0.1


def health_problem(expect: dict[str, str], running: tuple[str, ...],
                   view: SandboxView) -> str | None:
    """Why *view* fails the gate (versions *expect*, containers *running*); None: healthy."""
    for component, want in expect.items():
        if view.version_of(component) != want:
            return f"{component} reports {view.version_of(component)!r}, expected {want}"
    lost = sorted(set(running) - view.running())
    if lost:
        return f"containers no longer running: {', '.join(lost)}"
    return None


def planned(plan: Plan, t: Target) -> dict[str, str]:
    """Versions *t* must report once upgraded."""
    up = set(plan.components)
    return {"shim": plan.to_version if "shim" in up else t.from_shim,
            "agent": plan.to_version if "agent" in up else t.from_agent}


def original(t: Target) -> dict[str, str]:
    return {"shim": t.from_shim, "agent": t.from_agent}


class Rollout:
    """Runs one plan until it is no longer active.

    *save* is called with every new plan value (persist + tell watchers);
    *event* with progress lines; *metrics* counts every upgrade call.  The
    caller owns the task that awaits :meth:`run`; cancelling it leaves the
    plan persisted as it was, to resume later.
    """

    def __init__(self, plan: Plan, *, shims: Shims, releases: ReleaseStore,
                 save: Callable[[Plan], None], event: Callable[[str], None],
                 config: RolloutConfig = RolloutConfig(),
                 metrics: UpgradeMetrics | None = None, tracer: Tracer | None = None) -> None:
        self._plan = plan
        #: One trace per plan run by this opsd: batches, sandboxes, each switch
        #: (the shims' handoff and agent-upgrade spans nest under it).
        self._tracer = tracer or Tracer("opsd")
        self._shims = shims
        self._releases = releases
        self._save = save
        self._event = event
        self._config = config
        self._metrics = metrics or UpgradeMetrics()
        self._wake = asyncio.Event()

    @property
    def plan(self) -> Plan:
        return self._plan

    def request_abort(self) -> Plan:
        """Stop at the next safe point (see the module docstring)."""
        if not self._plan.abort_requested:
            self._set(self._plan.changed(abort_requested=True))
        self._wake.set()
        return self._plan

    async def run(self) -> Plan:
        p = self._plan
        with self._tracer.span(f"upgrade plan {p.id}", {
                "keel.plan.id": p.id, "keel.to_version": p.to_version,
                "keel.components": ",".join(p.components), "keel.batches": p.batches,
                "keel.sandboxes": len(p.targets)}, root=True) as span:
            plan = await self._run()
            if span is not None:
                span.set("keel.plan.state", plan.state.value)
            return plan

    async def _run(self) -> Plan:
        while self._plan.active:
            p = self._plan
            if p.state is PlanState.ROLLING_BACK:
                await self._rollback(p.batch)
            elif p.batch >= p.batches:
                done = f"{len(p.targets)} sandboxes at {p.to_version}"
                self._set(p.moved(PlanState.SUCCEEDED, done))
            elif p.pause_until is not None:
                await self._pause()
            elif p.abort_requested and all(t.state is _T.PENDING for t in p.batch_targets(p.batch)):
                self._abort()
            elif not await self._run_batch(p.batch):
                self._set(self._plan.moved(PlanState.ROLLING_BACK))
            elif self._plan.abort_requested:
                self._abort()
            elif p.pause_s > 0 and p.batch + 1 < p.batches:
                self._set(self._plan.changed(pause_until=time.time() + p.pause_s))
            else:
                self._set(self._plan.changed(batch=p.batch + 1))
        self._event(f"plan {self._plan.id} {self._plan.state.value}: {self._plan.message}")
        return self._plan

    def _set(self, plan: Plan) -> None:
        self._plan = plan
        self._save(plan)

    def _move(self, sid: str, state: TargetState, message: str | None = None, **kw: object) -> None:
        self._set(self._plan.with_target(self._plan.target(sid).moved(state, message, **kw)))

    def _tag(self, batch: int) -> str:
        return f"[batch {batch + 1}/{self._plan.batches}]"

    def _abort(self) -> None:
        p = self._plan
        first = min((t.batch for t in p.targets if t.state is _T.PENDING), default=p.batches)
        rest = f"; batches {first + 1}-{p.batches} untouched" if first < p.batches else ""
        self._set(p.moved(PlanState.ABORTED,
                          f"aborted: {p.done()} of {len(p.targets)} sandboxes upgraded{rest}"))

    async def _pause(self) -> None:
        remaining = (self._plan.pause_until or 0) - time.time()
        self._event(f"{self._tag(self._plan.batch)} done; pausing {max(remaining, 0):.1f} s")
        if remaining > 0 and not self._plan.abort_requested:
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._set(self._plan.changed(pause_until=None, batch=self._plan.batch + 1))
        if self._plan.abort_requested and self._plan.batch < self._plan.batches:
            self._abort()

    async def _run_batch(self, batch: int) -> bool:
        """Upgrade and gate one batch; False if any sandbox failed."""
        with self._tracer.span(f"batch {batch + 1}/{self._plan.batches}") as span:
            ok = await self._run_batch_traced(batch)
            if span is not None and not ok:
                span.error = "a sandbox failed its upgrade or health gate"
            return ok

    async def _run_batch_traced(self, batch: int) -> bool:
        targets = self._plan.batch_targets(batch)
        self._event(f"{self._tag(batch)} {', '.join(t.sandbox_id for t in targets)}")
        async with asyncio.TaskGroup() as tg:
            for t in targets:
                if t.state in (_T.PENDING, _T.UPGRADING):
                    tg.create_task(self._upgrade_target(t.sandbox_id, batch))
        if any(t.state is _T.FAILED for t in self._plan.batch_targets(batch)):
            return False
        async with asyncio.TaskGroup() as tg:
            for t in self._plan.batch_targets(batch):
                if t.state is _T.UPGRADED:
                    tg.create_task(self._gate(t.sandbox_id, batch))
        return all(t.state is _T.HEALTHY for t in self._plan.batch_targets(batch))

    async def _upgrade_target(self, sid: str, batch: int) -> None:
        with self._tracer.span(f"sandbox {sid}", {"keel.sandbox.id": sid}) as span:
            await self._upgrade_target_traced(sid, batch)
            if span is not None and self._plan.target(sid).state is _T.FAILED:
                span.error = self._plan.target(sid).message or "failed"

    async def _upgrade_target_traced(self, sid: str, batch: int) -> None:
        try:
            view = await self._shims.status(sid)
            if self._plan.target(sid).state is _T.PENDING:
                self._move(sid, _T.UPGRADING, running=tuple(sorted(view.running())))
            for component in self._plan.components:
                view = await self._switch(sid, component, self._plan.to_version, view, batch)
            self._move(sid, _T.UPGRADED)
        except Exception as exc:  # any failure fails the batch, never the daemon
            log.warning("sandbox %s: upgrade failed: %s", sid, exc)
            self._move(sid, _T.FAILED, f"upgrade failed: {exc}")
            self._event(f"{self._tag(batch)} {sid}: upgrade failed: {exc}")

    async def _switch(self, sid: str, component: str, version: str, view: SandboxView,
                      batch: int) -> SandboxView:
        """Make *component* of *sid* run *version* (no call if it already does)."""
        current = view.version_of(component)
        if current == version:
            return view
        release = self._releases.get(version)
        path: Path = release.shim_path if component == "shim" else release.agent_path
        try:
            with self._tracer.span(f"switch {component}", {"keel.from": current,
                                                            "keel.to": version}):
                done = await self._shims.upgrade(sid, component, path, version)
        except Exception:
            self._metrics.failed(component)
            raise
        self._metrics.upgraded(component, done)
        self._event(f"{self._tag(batch)} {sid}: {component} {current} -> {version} ({done.detail})")

        def settled(v: SandboxView) -> str | None:
            if v.version_of(component) != version:
                return f"{component} still reports {v.version_of(component)!r}"
            if done.new_pid and v.shim_pid != done.new_pid:
                return f"shim pid {v.shim_pid} answers, not the new {done.new_pid}"
            return None

        return await self._poll(sid, settled, self._config.settle_timeout_s)

    async def _gate(self, sid: str, batch: int) -> None:
        t = self._plan.target(sid)
        expect = planned(self._plan, t)
        try:
            await self._poll(sid, lambda v: health_problem(expect, t.running, v),
                             self._config.gate_timeout_s)
        except Exception as exc:  # reported in the plan
            self._move(sid, _T.FAILED, f"health gate: {exc}")
            self._event(f"{self._tag(batch)} {sid}: health gate failed: {exc}")
            return
        self._move(sid, _T.HEALTHY, "healthy")
        self._event(f"{self._tag(batch)} {sid}: healthy at {self._plan.to_version}")

    async def _poll(self, sid: str, problem: Callable[[SandboxView], str | None],
                    within: float) -> SandboxView:
        """Status of *sid* until *problem* says None; Unavailable with the last reason."""
        reason = "no answer"
        try:
            async with asyncio.timeout(within):
                async for attempt in retry.retrying(first=self._config.poll_s, cap=2.0):
                    with attempt:
                        try:
                            view = await self._shims.status(sid)
                        except Exception as exc:  # retried until the deadline
                            reason = str(exc)
                            raise
                        if (reason_now := problem(view)) is not None:
                            reason = reason_now
                            raise _NotYet(reason)
                        return view
        except TimeoutError:
            raise Unavailable(f"after {within:.0f} s: {reason}") from None
        raise AssertionError("unreachable: retrying never stops by itself")

    async def _rollback(self, batch: int) -> None:
        with self._tracer.span(f"rollback of batch {batch + 1}"):
            await self._rollback_traced(batch)

    async def _rollback_traced(self, batch: int) -> None:
        todo = [t for t in self._plan.batch_targets(batch)
                if t.state not in (_T.ROLLED_BACK, _T.ROLLBACK_FAILED)]
        self._event(f"{self._tag(batch)} failed; rolling back {len(todo)} sandboxes")
        async with asyncio.TaskGroup() as tg:
            for t in todo:
                tg.create_task(self._rollback_target(t.sandbox_id, batch))
        targets = self._plan.batch_targets(batch)
        failed = [t for t in targets if t.state is _T.ROLLBACK_FAILED]
        why = "; ".join(f"{t.sandbox_id}: {t.message}" for t in targets
                        if t.message and t.message != "healthy")
        if failed:
            self._set(self._plan.moved(PlanState.FAILED, f"batch {batch + 1} failed and could not"
                                       f" be fully rolled back: {why}"))
        else:
            self._set(self._plan.moved(PlanState.ROLLED_BACK, f"batch {batch + 1} failed and was"
                                       f" rolled back; later batches untouched: {why}"))

    async def _rollback_target(self, sid: str, batch: int) -> None:
        t = self._plan.target(sid)
        if t.state is not _T.ROLLING_BACK:
            self._move(sid, _T.ROLLING_BACK)
        cause = t.message
        try:
            view = await self._poll(sid, lambda v: None, self._config.gate_timeout_s)
            for component in reversed(self._plan.components):
                view = await self._switch(sid, component, original(t)[component], view, batch)
            problem = await self._problem_after(sid, t)
            # The answer may come from a shim that handed the sandbox to one
            # that died since: "rolled back" only for the sandbox's live owner.
            owner = self._shims.owner_problem(view)
        except Exception as exc:  # reported in the plan
            self._move(sid, _T.ROLLBACK_FAILED, f"{cause}; rollback failed: {exc}")
            self._event(f"{self._tag(batch)} {sid}: rollback failed: {exc}")
            return
        if owner is not None:
            self._move(sid, _T.ROLLBACK_FAILED, f"{cause}; {owner}")
            self._event(f"{self._tag(batch)} {sid}: {owner}")
            return
        note = f" (but: {problem})" if problem else ""
        self._move(sid, _T.ROLLED_BACK, f"{cause}; rolled back{note}")
        self._event(f"{self._tag(batch)} {sid}: back at shim {t.from_shim},"
                    f" agent {t.from_agent}{note}")

    async def _problem_after(self, sid: str, t: Target) -> str | None:
        """One look after a rollback (versions were checked already): lost containers."""
        return health_problem(original(t), t.running, await self._shims.status(sid))
