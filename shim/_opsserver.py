"""``ops.sock``: the sandbox's management endpoint for opsd (ShimOps)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from agent.api import ops_pb
from keel.errors import KeelError
from keel.grpc import NO_STATUS_DETAILS, caller, limit_messages, require_uids
from observability.spans import TRACEPARENT, remote_parent
from shim import _console, _metrics, _tracing, version
from shim._agent_upgrade import check_agent_release, upgrade_agent
from shim.state import SCHEMA_VERSION

if TYPE_CHECKING:
    from shim._daemon import Daemon


class ShimOps(ops_pb.ShimOpsBase):
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._sb = daemon.sandbox
        #: The upgrade running (shim handoff or agent upgrade): one at a time, as
        #: both use the agent's ops channel, which virtio-serial gives one client.
        self._upgrading = ""

    @contextlib.contextmanager
    def _one_upgrade(self, what: str) -> Iterator[None]:
        if self._upgrading:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"sandbox {self._sb.id}: {self._upgrading} is running; one upgrade"
                            f" at a time")
        self._upgrading = what
        try:
            yield
        finally:
            self._upgrading = ""

    async def status(self, status_request: ops_pb.StatusRequest) -> ops_pb.StatusResponse:
        sb = self._sb
        agent = sb.agent.agent_version if sb.agent else ""
        return ops_pb.StatusResponse(
            sandbox_id=sb.id, shim_version=version(), shim_pid=os.getpid(), agent_version=agent,
            backend=sb.config.backend, namespace=sb.namespace, state_schema=SCHEMA_VERSION,
            accel=str(sb.vm.record().get("accel", "")) if sb.vm is not None else "",
            console_enabled=_console.enabled(sb),
            containers=[
                ops_pb.ContainerInfo(id=c.id, pid=c.init.pid, status=c.init.state.value,
                                     exec_ids=list(c.execs))
                for c in sb.containers.values()
            ],
        )

    async def metrics(self, metrics_request: ops_pb.MetricsRequest) -> ops_pb.MetricsResponse:
        # During and after a handoff the agent's channels are the new shim's.
        handing_off = self._upgrading == "a shim upgrade" or self._daemon.handed_off
        return await _metrics.gather(self._sb, ask_agent=not handing_off)

    async def upgrade_shim(self, upgrade_shim_request: ops_pb.UpgradeShimRequest) -> ops_pb.UpgradeShimResponse:
        req = upgrade_shim_request
        if not req.shim_path:
            raise GRPCError(Status.INVALID_ARGUMENT, "shim_path is required")
        try:
            with self._one_upgrade("a shim upgrade"):
                r = await self._daemon.upgrade_shim(req.shim_path)
        except KeelError as exc:
            raise GRPCError(Status(exc.code.value), str(exc)) from exc
        return ops_pb.UpgradeShimResponse(from_version=r.from_version, to_version=r.to_version,
                                          new_shim_pid=r.new_pid, freeze_ms=r.freeze_ms)

    async def upgrade_agent(self, upgrade_agent_request: ops_pb.UpgradeAgentRequest) -> ops_pb.UpgradeAgentResponse:
        req = upgrade_agent_request
        if not req.agent_path:
            raise GRPCError(Status.INVALID_ARGUMENT, "agent_path is required")
        try:
            with self._one_upgrade("an agent upgrade"):
                resp = await upgrade_agent(self._sb, req.agent_path, req.to_version)
        except KeelError as exc:
            raise GRPCError(Status(exc.code.value), str(exc)) from exc
        return resp

    async def check_agent_release(
            self, check_agent_release_request: ops_pb.CheckAgentReleaseRequest
    ) -> ops_pb.CheckAgentReleaseResponse:
        req = check_agent_release_request
        if not req.agent_path:
            raise GRPCError(Status.INVALID_ARGUMENT, "agent_path is required")
        return ops_pb.CheckAgentReleaseResponse(
            problem=await check_agent_release(self._sb, req.agent_path) or "")

    # -- console sessions (shim/_console.py) ---------------------------------

    @contextlib.contextmanager
    def _console_call(self) -> Iterator[None]:
        # During and after a handoff the new shim answers (and owns the agent's
        # ops port): never dial it from here again.
        if self._upgrading == "a shim upgrade" or self._daemon.handed_off:
            raise GRPCError(Status.UNAVAILABLE, f"sandbox {self._sb.id}: its shim is being"
                            f" upgraded; console calls resume with the new one")
        try:
            yield
        except KeelError as exc:
            raise GRPCError(Status(exc.code.value), str(exc)) from exc

    async def console_start(self, req: ops_pb.ConsoleStartRequest) -> ops_pb.ConsoleStartResponse:
        with self._console_call():
            return await _console.start(self._sb, req)

    async def console_read(self, req: ops_pb.ConsoleReadRequest) -> ops_pb.ConsoleReadResponse:
        with self._console_call():
            return await _console.relay(self._sb, lambda s: s.console_read(req), req.wait_ms)

    async def console_write(self, req: ops_pb.ConsoleWriteRequest) -> ops_pb.ConsoleWriteResponse:
        with self._console_call():
            return await _console.relay(self._sb, lambda s: s.console_write(req))

    async def console_control(self, req: ops_pb.ConsoleControlRequest
                              ) -> ops_pb.ConsoleControlResponse:
        with self._console_call():
            return await _console.relay(self._sb, lambda s: s.console_control(req))

    async def console_wait(self, req: ops_pb.ConsoleWaitRequest) -> ops_pb.ConsoleWaitResponse:
        with self._console_call():
            return await _console.relay(self._sb, lambda s: s.console_wait(req), req.wait_ms)

    async def console_remove(self, req: ops_pb.ConsoleRemoveRequest
                             ) -> ops_pb.ConsoleRemoveResponse:
        with self._console_call():
            return await _console.remove(self._sb, req)

    async def console_enable(self, req: ops_pb.ConsoleEnableRequest
                             ) -> ops_pb.ConsoleEnableResponse:
        with self._console_call():
            return ops_pb.ConsoleEnableResponse(
                enabled=_console.set_enabled(self._sb, bool(req.enabled), _peer_uid()))

    async def set_tracing(self, req: ops_pb.SetTracingRequest) -> ops_pb.SetTracingResponse:
        if not 0.0 <= req.ratio <= 1.0:  # NaN fails this too
            raise GRPCError(Status.INVALID_ARGUMENT, f"ratio must be within 0 and 1, not {req.ratio}")
        if self._upgrading == "a shim upgrade" or self._daemon.handed_off:
            # The state the new shim takes over is written: a change now would be lost.
            raise GRPCError(Status.UNAVAILABLE, f"sandbox {self._sb.id}: its shim is being"
                                                " upgraded; ask again (the new shim answers)")
        problem = await _tracing.set_ratio(self._sb, req.ratio)
        return ops_pb.SetTracingResponse(ratio=self._sb.tracing.ratio, agent_problem=problem)

    async def follow_spans(self, req: ops_pb.FollowSpansRequest) -> AsyncIterator[ops_pb.SpanData]:
        async for span in _tracing.follow(self._sb, self._daemon.stop):
            yield span


async def _remote_parent(event: RecvRequest) -> None:
    value = event.metadata.get(TRACEPARENT)
    remote_parent(value if isinstance(value, str) else None)


def _peer_uid() -> int:
    cred = caller()
    return cred.uid if cred is not None else -1


async def serve_ops(daemon: Daemon) -> Server:
    """Listen on the sandbox's ops.sock (0600, and peer credentials checked on every call).

    Bound under a temporary name and renamed over the path: after a
    handoff the old shim's socket answers until the very moment the new
    one replaces it, so a client never finds the path missing (the old
    shim waits for that rename before it reports the handoff done).
    """
    daemon.sandbox.dir.create()
    path = daemon.sandbox.dir.ops_socket
    tmp = daemon.sandbox.dir.ops_socket_tmp(os.getpid())
    tmp.unlink(missing_ok=True)
    limit_messages()
    server = Server([ShimOps(daemon)], status_details_codec=NO_STATUS_DETAILS)
    listen(server, RecvRequest, _remote_parent)  # opsd's upgrade spans are our parents
    # UpgradeShim runs a program as this shim's user: its own user and root only.
    require_uids(server, {0, os.geteuid()}, f"shim of sandbox {daemon.sandbox.id}")
    old = os.umask(0o177)
    try:
        await server.start(path=str(tmp))
    finally:
        os.umask(old)
    os.replace(tmp, path)
    return server
