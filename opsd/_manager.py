"""The one upgrade plan opsd runs at a time: start, resume, abort, watch.

:meth:`Manager.run` owns the TaskGroup of the rollout task; opsd runs it
for its whole life.  At start it loads ``plan.json`` and resumes an
active plan.  A plan file that cannot be read (corrupt, newer schema) is
left untouched; opsd still serves ``ls`` but refuses upgrades with the
reason until an operator moves the file away.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

from keel.errors import FailedPrecondition, NotFound
from observability.spans import Tracer
from opsd._discovery import Shims
from opsd._metrics import UpgradeMetrics
from opsd._preflight import UpgradeRequest, build_plan
from opsd._rollout import Rollout, RolloutConfig
from opsd.state import Plan, PlanState
from upgrade.releases import ReleaseStore
from upgrade.store import StateStore

log = logging.getLogger("opsd.manager")


def status_line(plan: Plan | None) -> str:
    """One line for systemd's STATUS= and ``opsctl upgrade status``."""
    if plan is None:
        return "idle"
    if plan.active:
        where = f"batch {min(plan.batch + 1, plan.batches)}/{plan.batches}"
        return (f"upgrade {plan.id} to {plan.to_version}: {plan.state.value}, {where},"
                f" {plan.done()}/{len(plan.targets)} sandboxes done")
    return f"idle; last upgrade {plan.id} to {plan.to_version}: {plan.state.value}"


class Manager:
    def __init__(self, *, store: StateStore[Plan], releases: ReleaseStore, shims: Shims,
                 config: RolloutConfig | None = None,
                 on_change: Callable[[Plan | None], None] = lambda p: None,
                 metrics: UpgradeMetrics | None = None, tracer: Tracer | None = None) -> None:
        self._store = store
        self._tracer = tracer
        self._releases = releases
        self._shims = shims
        self._config = config or RolloutConfig()
        self._on_change = on_change
        self._metrics = metrics or UpgradeMetrics()
        self._plan: Plan | None = None
        self._broken: str | None = None
        self._rollout: Rollout | None = None
        self._events: list[str] = []
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tg: asyncio.TaskGroup | None = None

    @property
    def plan(self) -> Plan | None:
        return self._plan

    @property
    def broken(self) -> str | None:
        """Why the persisted plan could not be read (upgrades are refused), or None."""
        return self._broken

    def load(self) -> None:
        """Read the persisted plan; call before serving, so no request races a resume."""
        try:
            self._plan = self._store.load()
        except FailedPrecondition as exc:
            self._broken = str(exc)
            log.error("cannot read the upgrade plan; upgrades are refused: %s", exc)
            return
        if self._plan is not None and self._plan.active:
            self._event(f"resuming upgrade plan {self._plan.id} at batch"
                        f" {self._plan.batch + 1}/{self._plan.batches} (opsd restarted)")

    async def run(self) -> None:
        """Resume an active loaded plan, then own the rollout task group until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if self._plan is not None and self._plan.active:
                self._spawn(self._plan)
            self._on_change(self._plan)
            await asyncio.Event().wait()  # until opsd stops (cancellation)

    async def start(self, req: UpgradeRequest) -> tuple[Plan, list[str]]:
        """Validate, plan and (unless a dry run) persist and start; raise to refuse."""
        req = req.validated()
        async with self._lock:
            self._refuse_if_busy()
            plan_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
            plan, notes = await build_plan(req, plan_id, self._shims, self._releases)
            if req.dry_run or not plan.active:
                return plan, notes
            self._refuse_if_busy()
            self._events = [f"plan {plan.id}: {len(plan.targets)} sandboxes to {plan.to_version}"
                            f" in {plan.batches} batches", *notes]
            self._saved(plan)
            self._spawn(plan)
            return plan, notes

    def abort(self) -> Plan:
        if self._rollout is None:
            raise FailedPrecondition("no upgrade is running")
        if self._rollout.plan.state is PlanState.ROLLING_BACK:
            raise FailedPrecondition("the plan is rolling a failed batch back; that is not aborted")
        self._event("abort requested: no new batch starts; the batch in flight finishes")
        return self._rollout.request_abort()

    async def watch(self, plan_id: str = "") -> AsyncIterator[tuple[Plan, list[str]]]:
        """(plan, new progress lines) at every change, until the plan is finished."""
        if self._plan is None or (plan_id and self._plan.id != plan_id):
            raise NotFound(f"no upgrade plan {plan_id}".rstrip())
        seen = 0
        while True:
            changed = self._changed  # taken before the snapshot: no change is missed
            plan, lines = self._plan, self._events[seen:]
            seen += len(lines)
            yield plan, lines
            running = self._rollout is not None and self._rollout.plan.id == plan.id
            if not running and (not plan.active or self._tg is not None):
                return  # finished (or its rollout crashed: the log says why)
            await changed.wait()

    def _refuse_if_busy(self) -> None:
        if self._broken:
            raise FailedPrecondition(f"upgrades are disabled: {self._broken}")
        if self._plan is not None and self._plan.active:
            p = self._plan
            raise FailedPrecondition(
                f"upgrade {p.id} to {p.to_version} is running ({status_line(p)}); follow it with"
                f" 'opsctl upgrade status' or stop it with 'opsctl upgrade abort'")

    def _spawn(self, plan: Plan) -> None:
        assert self._tg is not None, "Manager.run() owns the rollout tasks"
        self._rollout = Rollout(plan, shims=self._shims, releases=self._releases,
                                save=self._saved, event=self._event, config=self._config,
                                metrics=self._metrics, tracer=self._tracer)
        self._tg.create_task(self._drive(self._rollout), name=f"rollout-{plan.id}")

    async def _drive(self, rollout: Rollout) -> None:
        try:
            await rollout.run()
        except Exception:  # a bug: keep opsd up; the persisted plan resumes on restart
            log.exception("rollout of plan %s crashed", rollout.plan.id)
            self._event(f"plan {rollout.plan.id}: internal error; see the opsd log")
        finally:
            self._rollout = None
            self._notify()

    def _saved(self, plan: Plan) -> None:
        self._store.save(plan)
        self._plan = plan
        self._notify()

    def _event(self, line: str) -> None:
        log.info("%s", line)
        self._events.append(line)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._on_change(self._plan)
