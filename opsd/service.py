"""The opsd gRPC service (keel.opsd.v1.Opsd): translation at the boundary.

Generated types stop here: handlers validate, call the Manager or the
discovery code with our dataclasses, and map KeelError to its gRPC code
once (:func:`_errors`).  Peer credentials are checked before any handler
runs (keel.grpc.require_uids).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import grpclib.const
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from keel.errors import KeelError
from keel.grpc import caller, serve_raw
from opsd._console import Consoles
from opsd._discovery import SandboxView, Shims, Unreachable, scan
from opsd._manager import Manager
from opsd._pb.keel.opsd import v1 as pb
from opsd._preflight import UpgradeRequest
from opsd._trace import Traces
from opsd.state import Plan
from upgrade.releases import ReleaseStore

log = logging.getLogger("opsd.service")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except KeelError as exc:
        raise GRPCError(Status(exc.code.value), str(exc)) from exc


def plan_pb(plan: Plan) -> pb.Plan:
    return pb.Plan(
        id=plan.id, to_version=plan.to_version, components=list(plan.components),
        batch_size=plan.batch_size, pause_s=plan.pause_s, state=plan.state.value,
        batch=plan.batch, batches=plan.batches, message=plan.message,
        abort_requested=plan.abort_requested, created_at=plan.created_at,
        updated_at=plan.updated_at,
        targets=[pb.Target(sandbox_id=t.sandbox_id, batch=t.batch, state=t.state.value,
                           from_shim=t.from_shim, from_agent=t.from_agent, message=t.message,
                           running=list(t.running)) for t in plan.targets])


def sandbox_pb(v: SandboxView | Unreachable) -> pb.Sandbox:
    if isinstance(v, Unreachable):
        return pb.Sandbox(id=v.id, error=v.reason)
    return pb.Sandbox(
        id=v.id, shim_version=v.shim_version, agent_version=v.agent_version,
        shim_pid=v.shim_pid, backend=v.backend, namespace=v.namespace,
        state_schema=v.state_schema, accel=v.accel,
        containers=[pb.Container(id=c.id, pid=c.pid, status=c.status, execs=c.execs)
                    for c in v.containers])


class OpsdService(pb.OpsdBase):
    def __init__(self, manager: Manager, shims: Shims, releases: ReleaseStore,
                 consoles: Consoles | None = None, traces: Traces | None = None) -> None:
        self._manager = manager
        self._shims = shims
        self._releases = releases
        self._consoles = consoles
        self._traces = traces

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        """Console is served on the raw stream (opsd/_console.py reads and
        writes it concurrently, which the generated handler cannot)."""
        mapping = super().__mapping__()
        serve_raw(mapping, "/keel.opsd.v1.Opsd/Console", self._console)
        return mapping

    def _console_manager(self) -> Consoles:
        if self._consoles is None:
            raise GRPCError(Status.UNIMPLEMENTED, "this opsd serves no console sessions")
        return self._consoles

    async def _console(self, stream: Stream[pb.ConsoleInput, pb.ConsoleOutput]) -> None:
        consoles = self._console_manager()
        who = caller()
        if who is None:  # require_uids admitted the call, so this cannot be
            raise GRPCError(Status.PERMISSION_DENIED, "opsd: cannot verify the caller")
        with _errors():
            await consoles.serve(stream, who)

    async def console_enable(self, console_enable_request: pb.ConsoleEnableRequest
                             ) -> pb.ConsoleEnableResponse:
        r = console_enable_request
        with _errors():
            on = await self._console_manager().enable(r.sandbox_id, r.enabled)
        who = caller()
        log.info("console of sandbox %s %s by uid %s", r.sandbox_id,
                 "enabled" if on else "disabled", who.uid if who else "?")
        return pb.ConsoleEnableResponse(enabled=on)

    async def list_consoles(self, list_consoles_request: pb.ListConsolesRequest
                            ) -> pb.ListConsolesResponse:
        return pb.ListConsolesResponse(sessions=self._console_manager().list())

    async def kill_console(self, kill_console_request: pb.KillConsoleRequest
                           ) -> pb.KillConsoleResponse:
        with _errors():
            await self._console_manager().kill(kill_console_request.session_id, caller())
        return pb.KillConsoleResponse()

    def _trace_manager(self) -> Traces:
        if self._traces is None:
            raise GRPCError(Status.UNIMPLEMENTED, "this opsd does not switch tracing")
        return self._traces

    async def set_tracing(self, set_tracing_request: pb.SetTracingRequest
                          ) -> pb.SetTracingResponse:
        r = set_tracing_request
        with _errors():
            results = await self._trace_manager().set(r.sandbox_ids, r.all, r.ratio)
        return pb.SetTracingResponse(results=results)

    async def follow_spans(self, follow_spans_request: pb.FollowSpansRequest
                           ) -> AsyncIterator[pb.Span]:
        with _errors():
            async for span in self._trace_manager().follow(follow_spans_request.sandbox_id):
                yield span

    async def list_sandboxes(self, list_sandboxes_request: pb.ListSandboxesRequest
                             ) -> pb.ListSandboxesResponse:
        with _errors():
            views, dead = await scan(self._shims)
            current = self._releases.current()
        every: list[SandboxView | Unreachable] = sorted([*views, *dead], key=lambda v: v.id)
        return pb.ListSandboxesResponse(sandboxes=[sandbox_pb(v) for v in every],
                                        current_release=current.version if current else "")

    async def start_upgrade(self, start_upgrade_request: pb.StartUpgradeRequest
                            ) -> pb.StartUpgradeResponse:
        r = start_upgrade_request
        req = UpgradeRequest(to_version=r.to_version, components=tuple(r.components),
                             batch_size=r.batch_size or 1, pause_s=r.pause_s,
                             sandbox_ids=tuple(r.sandbox_ids), dry_run=r.dry_run)
        with _errors():
            plan, notes = await self._manager.start(req)
        log.info("upgrade %s to %s requested%s: %d sandboxes", plan.id, plan.to_version,
                 " (dry run)" if req.dry_run else "", len(plan.targets))
        return pb.StartUpgradeResponse(plan=plan_pb(plan), notes=notes)

    async def watch_upgrade(self, watch_upgrade_request: pb.WatchUpgradeRequest
                            ) -> AsyncIterator[pb.PlanStatus]:
        with _errors():
            async for plan, lines in self._manager.watch(watch_upgrade_request.plan_id):
                yield pb.PlanStatus(found=True, plan=plan_pb(plan), events=lines)

    async def upgrade_status(self, upgrade_status_request: pb.UpgradeStatusRequest
                             ) -> pb.PlanStatus:
        plan = self._manager.plan
        if plan is None and self._manager.broken:
            # Not "no upgrade has run": one may have, and its record is unreadable.
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"the upgrade plan cannot be read, upgrades are refused until it is"
                            f" repaired or removed: {self._manager.broken}")
        if plan is None:
            return pb.PlanStatus(found=False)
        return pb.PlanStatus(found=True, plan=plan_pb(plan))

    async def abort_upgrade(self, abort_upgrade_request: pb.AbortUpgradeRequest) -> pb.PlanStatus:
        with _errors():
            plan = self._manager.abort()
        log.warning("abort of upgrade %s requested", plan.id)
        return pb.PlanStatus(found=True, plan=plan_pb(plan))
