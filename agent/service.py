"""gRPC adapters: AgentService (channel "agent") and OpsService (channel "ops").

Protobuf types stop here.  Each handler validates what the shim sent
(betterproto checks nothing: a hostile peer can put an int in a bytes
field), calls the core, and converts the answer.  Errors are mapped to
gRPC status codes in one place, :func:`to_grpc_error`.  Every answered
call is noted in the core's :class:`~agent._ops.Activity` (the upgrade
gap is measured from it).

UpgradeAgent is special: after execve nobody could answer it, so its
stream handler sends the answer and the trailers, waits for the socket
to take them, and only then starts the exec (agent/_upgrade.py).  While
an upgrade is under way Hello and Health wait (the next answer comes
from the new image) like lifecycle calls do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpclib.const
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from agent import _bundle, _dial, _ops
from agent._console import Consoles
from agent._console_rpc import ConsoleRpcs
from agent._core import AgentCore
from agent._processes import Stdio
from agent._rpc import as_bytes as _bytes
from agent._rpc import rpc, to_grpc_error
from agent._rpc import uint as _uint
from agent._session import SessionGate
from agent._stage import MAX_CHUNK, Stager
from agent._tracing import AgentTracing, TracingRpcs
from agent._upgrade import Upgrader
from agent.api import API_VERSION, MIN_API_VERSION, ops_pb, pb
from keel import ids, procfs
from keel.errors import FailedPrecondition, InvalidArgument, KeelError
from keel.grpc import serve_raw
from keel.lifecycle import State

log = logging.getLogger("keel.agent.service")

#: Largest ReadOutput answer and WriteStdin payload.
MAX_IO_BYTES = 1 << 20
#: ReadOutput's size when the request says 0.
DEFAULT_READ_BYTES = 64 * 1024
#: Longest ReadOutput long poll.
MAX_WAIT_MS = 300_000

def _ids(request: Any) -> tuple[str, str]:
    """Validated (container_id, exec_id); exec_id "" names the init process."""
    return (ids.check(request.container_id, "container_id"),
            ids.check(request.exec_id, "exec_id", optional=True))


def _stdio(msg: object) -> Stdio:
    if msg is None:
        return Stdio()
    if not isinstance(msg, pb.Stdio):
        raise InvalidArgument("stdio must be a Stdio message")
    return Stdio(terminal=bool(msg.terminal), stdin=bool(msg.stdin), stdout=bool(msg.stdout),
                 stderr=bool(msg.stderr))


def _is_stderr(stream: object) -> bool:
    if stream == pb.OutputStream.STDOUT:
        return False
    if stream == pb.OutputStream.STDERR:
        return True
    raise InvalidArgument(f"stream must be STDOUT or STDERR, not {stream!r}")


class AgentService(pb.AgentServiceBase):
    def __init__(self, core: AgentCore, gate: SessionGate | None = None) -> None:
        self._core = core
        self._gate = gate

    @rpc
    async def hello(self, req: pb.HelloRequest) -> pb.HelloResponse:
        await self._core.wait_open()  # during an upgrade the new image answers
        client = _uint(req.api_version, "api_version")
        if client < MIN_API_VERSION:
            raise FailedPrecondition(
                f"client {req.client_version!r} speaks agent API up to {client}; "
                f"this agent speaks {MIN_API_VERSION}-{API_VERSION}"
            )
        version = min(client, API_VERSION)
        if self._gate is not None:
            self._gate.hello(client, req.client_version[:64])
        log.info("hello from %r (client %r): API %d", req.session, req.client_version, version)
        up = procfs.uptime_s()
        return pb.HelloResponse(api_version=version, agent_version=_ops.agent_version(),
                                boot_id=self._core.boot_id, min_api_version=MIN_API_VERSION,
                                max_api_version=API_VERSION, agent_pid=os.getpid(),
                                agent_uptime_s=up, kernel_uptime_at_start_s=procfs.boot_uptime_s() - up)

    @rpc
    async def create_container(self, req: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        cid = ids.check(req.container_id, "container_id")
        spec = _bytes(req.spec_json, "spec_json", _bundle.MAX_JSON_BYTES)
        if not isinstance(req.rootfs, str):
            raise InvalidArgument("rootfs must be a string")
        pid = await self._core.create_container(cid, spec, req.rootfs, _stdio(req.stdio))
        return pb.CreateContainerResponse(pid=pid)

    @rpc
    async def start_process(self, req: pb.StartProcessRequest) -> pb.StartProcessResponse:
        return pb.StartProcessResponse(pid=await self._core.start_process(*_ids(req)))

    @rpc
    async def exec_process(self, req: pb.ExecProcessRequest) -> pb.ExecProcessResponse:
        cid, eid = _ids(req)
        if not eid:
            raise InvalidArgument("exec_id must not be empty")
        process = _bytes(req.process_json, "process_json", _bundle.MAX_JSON_BYTES)
        await self._core.exec_process(cid, eid, process, _stdio(req.stdio))
        return pb.ExecProcessResponse()

    @rpc
    async def signal_process(self, req: pb.SignalProcessRequest) -> pb.Empty:
        cid, eid = _ids(req)
        await self._core.signal_process(cid, eid, _uint(req.signal, "signal", 64), bool(req.all))
        return pb.Empty()

    @rpc
    async def wait_process(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        cid, eid = _ids(req)
        exit, pid = await self._core.wait_process(cid, eid)
        return pb.WaitProcessResponse(exit_status=exit.status, exited_at_ns=exit.exited_at_ns,
                                      pid=pid, oom_killed=not eid and self._core.oom_killed(cid))

    @rpc
    async def remove_process(self, req: pb.RemoveProcessRequest) -> pb.Empty:
        await self._core.remove_process(*_ids(req))
        return pb.Empty()

    @rpc
    async def read_output(self, req: pb.ReadOutputRequest) -> pb.ReadOutputResponse:
        cid, eid = _ids(req)
        offset = _uint(req.offset, "offset")
        max_bytes = min(_uint(req.max_bytes, "max_bytes"), MAX_IO_BYTES) or DEFAULT_READ_BYTES
        wait_ms = min(_uint(req.wait_ms, "wait_ms"), MAX_WAIT_MS)
        data, eof = await self._core.read_output(cid, eid, _is_stderr(req.stream), offset,
                                                 max_bytes, wait_ms / 1000)
        return pb.ReadOutputResponse(offset=offset, data=data, eof=eof)

    @rpc
    async def write_stdin(self, req: pb.WriteStdinRequest) -> pb.WriteStdinResponse:
        cid, eid = _ids(req)
        data = _bytes(req.data, "data", MAX_IO_BYTES)
        offset = await self._core.write_stdin(cid, eid, _uint(req.offset, "offset"), data)
        return pb.WriteStdinResponse(offset=offset)

    @rpc
    async def close_stdin(self, req: pb.CloseStdinRequest) -> pb.Empty:
        cid, eid = _ids(req)
        await self._core.close_stdin(cid, eid, _uint(req.offset, "offset"))
        return pb.Empty()

    @rpc
    async def resize_pty(self, req: pb.ResizePtyRequest) -> pb.Empty:
        cid, eid = _ids(req)
        await self._core.resize_pty(cid, eid, _uint(req.width, "width"), _uint(req.height, "height"))
        return pb.Empty()

    @rpc
    async def pause_container(self, req: pb.ContainerRequest) -> pb.Empty:
        await self._core.pause(ids.check(req.container_id, "container_id"), resume=False)
        return pb.Empty()

    @rpc
    async def resume_container(self, req: pb.ContainerRequest) -> pb.Empty:
        await self._core.pause(ids.check(req.container_id, "container_id"), resume=True)
        return pb.Empty()

    @rpc
    async def update_container(self, req: pb.UpdateContainerRequest) -> pb.Empty:
        cid = ids.check(req.container_id, "container_id")
        resources = _bytes(req.resources_json, "resources_json", _bundle.MAX_JSON_BYTES)
        await self._core.update(cid, resources)
        return pb.Empty()

    @rpc
    async def stats_container(self, req: pb.ContainerRequest) -> pb.StatsContainerResponse:
        stats = await self._core.stats(ids.check(req.container_id, "container_id"))
        fields = {f: getattr(stats, f) for f in stats.__slots__}  # same names as the message
        fields["cpu_per_cpu_ns"] = list(stats.cpu_per_cpu_ns)
        return pb.StatsContainerResponse(stats=pb.CgroupStats(**fields))

    @rpc
    async def list_processes(self, req: pb.ContainerRequest) -> pb.ListProcessesResponse:
        found = await self._core.list_processes(ids.check(req.container_id, "container_id"))
        return pb.ListProcessesResponse(
            processes=[pb.ProcessEntry(pid=pid, exec_id=eid) for pid, eid in found]
        )

    async def dial(self, frames: AsyncIterator[pb.DialFrame]) -> AsyncIterator[pb.DialFrame]:
        """A stream handler, not an ``@rpc``: our errors map to statuses here."""
        try:
            async for frame in _dial.dial(frames, MAX_IO_BYTES):
                yield frame
        except KeelError as exc:
            log.info("dial -> %s: %s", exc.code.name, exc)
            raise to_grpc_error(exc) from exc

    @rpc
    async def get_state(self, req: pb.Empty) -> pb.GetStateResponse:
        snap = self._core.snapshot()
        return pb.GetStateResponse(containers=[
            pb.ContainerStatus(container_id=c.container_id, processes=[
                pb.ProcessStatus(
                    exec_id=p.exec_id, pid=p.pid, state=_STATES[p.state],
                    exit_status=p.exit_status or 0, exited_at_ns=p.exited_at_ns,
                    terminal=p.terminal, stdout_offset=p.stdout_offset,
                    stderr_offset=p.stderr_offset, stdin_offset=p.stdin_offset,
                ) for p in c.processes
            ]) for c in snap.containers
        ])


#: Our process states -> wire states (same names).
_STATES: dict[str, pb.ProcessState] = {s.value: pb.ProcessState[s.name] for s in State}


#: How long the UpgradeAgent answer may sit in the transport before the exec goes ahead.
FLUSH_TIMEOUT_S = 1.0


async def _flush(stream: Stream[Any, Any]) -> None:
    """Wait until the transport has handed everything it was given to the socket.

    grpclib has no public flush; its transport is reached through the
    private ``_stream._transport`` (if that moves, the kernel has the bytes
    anyway in all but a full-socket case: this is belt and braces).
    """
    transport = getattr(getattr(stream, "_stream", None), "_transport", None)
    size = getattr(transport, "get_write_buffer_size", None)
    if size is None:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(FLUSH_TIMEOUT_S):
            # asyncio has no "write buffer empty" event to wait on: poll, with a deadline.
            while size():  # noqa: ASYNC110
                await asyncio.sleep(0.005)


class OpsService(ConsoleRpcs, TracingRpcs, ops_pb.OpsServiceBase):
    def __init__(self, core: AgentCore, upgrader: Upgrader, stager: Stager,
                 consoles: Consoles, tracing: AgentTracing | None = None) -> None:
        self._core = core
        self._tracing = tracing or AgentTracing()
        self._upgrader = upgrader
        self._stager = stager
        self._consoles = consoles

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = super().__mapping__()
        serve_raw(mapping, "/keel.ops.v1.OpsService/UpgradeAgent", self._upgrade_stream)
        return mapping

    async def _upgrade_stream(self, stream: Stream[Any, Any]) -> None:
        """Answer UpgradeAgent completely, then start the exec."""
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "UpgradeAgent needs a request message")
        plan, response = await self._prepare_upgrade(request)
        try:
            await stream.send_message(response)
            await stream.send_trailing_metadata()
            await _flush(stream)
        except BaseException:
            self._upgrader.abandon(plan)
            raise
        self._upgrader.start(plan)

    @rpc
    async def _prepare_upgrade(self, req: ops_pb.UpgradeAgentRequest) -> Any:
        """Check the request and the release: (plan, answer).  See :meth:`_upgrade_stream`."""
        if not isinstance(req.agent_path, str) or not isinstance(req.to_version, str):
            raise InvalidArgument("agent_path and to_version must be strings")
        plan = await self._upgrader.prepare(req.agent_path, req.to_version)
        return plan, ops_pb.UpgradeAgentResponse(
            from_version=plan.from_version, to_version=plan.to_version, rolled_back=False,
            message="exec", gap_s=0.0)

    @rpc
    async def stage_release(self, req: ops_pb.StageReleaseRequest) -> ops_pb.StageReleaseResponse:
        if not isinstance(req.version, str) or not isinstance(req.sha256, str):
            raise InvalidArgument("version and sha256 must be strings")
        received, path = await self._stager.stage(
            req.version, req.sha256, _uint(req.size, "size"), _uint(req.offset, "offset"),
            _bytes(req.data, "data", MAX_CHUNK))
        return ops_pb.StageReleaseResponse(received=received, path=path)

    @rpc
    async def health(self, req: ops_pb.HealthRequest) -> ops_pb.HealthResponse:
        await self._core.wait_open()  # during an upgrade the new image answers
        h = _ops.health(self._core.boot_id, len(self._core))
        return ops_pb.HealthResponse(
            ok=h.ok, agent_version=h.agent_version, api_version=h.api_version,
            agent_pid=h.agent_pid, boot_id=h.boot_id, containers=h.containers,
            uptime_s=h.uptime_s, state_schema=h.state_schema,
            container_ids=self._core.container_ids(), console_sessions=len(self._consoles),
        )
