"""The Task calls on one container that go straight to the agent: Exec,
CloseIO, ResizePty, Pause, Resume, Update, Stats, Pids (a part of
:class:`shim.sandbox.Sandbox`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from agent.api import pb
from keel.errors import AlreadyExists, FailedPrecondition, NotFound
from keel.lifecycle import State
from shim import _pumps, events_pb
from shim._process import Process
from shim._pumps import Endpoints
from shim.state import Stdio
from shim.vmm import _sizing

if TYPE_CHECKING:
    from observability.tracing import Tracing
    from shim._agentconn import AgentConnection
    from shim._events import EventPublisher
    from shim._process import Container
    from shim.state import SandboxRecord
    from shim.vmm.api import Sandbox as VmmSandbox


class ContainerCalls:
    """Mixed into Sandbox, which provides what is declared here."""

    if TYPE_CHECKING:
        vm: VmmSandbox | None
        _events: EventPublisher
        tracing: Tracing

        def container(self, cid: str) -> Container: ...

        def _live_agent(self) -> AgentConnection: ...

        def persist(self) -> SandboxRecord: ...

        tasks: asyncio.TaskGroup

    async def exec(self, cid: str, eid: str, process_json: bytes, stdio: Stdio) -> None:
        c = self.container(cid)
        if eid in c.execs:
            raise AlreadyExists(f"exec {eid} already exists in container {cid}")
        c.init.require("exec in", State.RUNNING, State.PAUSED)
        if stdio.terminal:
            stdio = Stdio(stdio.stdin, stdio.stdout, "", True)
        agent = self._live_agent()
        ends = Endpoints.open(stdio)
        try:
            await agent.call(agent.stub.exec_process, pb.ExecProcessRequest(
                container_id=cid, exec_id=eid, process_json=process_json,
                stdio=ends.wire(stdio.terminal)))
        except BaseException:
            ends.close()
            raise
        p = Process(cid, eid, stdio)
        c.execs[eid] = p
        _pumps.start(p, agent, ends, self.tasks)
        self.persist()
        self._events.publish_nowait("/tasks/exec-added", events_pb.TaskExecAdded(container_id=cid, exec_id=eid))

    async def close_io(self, cid: str, eid: str) -> None:
        p = self.container(cid).process(eid)
        if p.input is not None:
            await p.input.close_input()

    async def resize(self, cid: str, eid: str, width: int, height: int) -> None:
        p = self.container(cid).process(eid)
        if p.state is State.STOPPED:
            return  # ctr resizes after a short-lived process exited; runc's shim ignores it too
        agent = self._live_agent()
        try:
            await agent.call(agent.stub.resize_pty, pb.ResizePtyRequest(
                container_id=cid, exec_id=eid, width=width, height=height))
        except (NotFound, FailedPrecondition):
            pass  # it exited while the call was on its way: as above

    async def pause(self, cid: str) -> None:
        await self._pause(cid, pause=True)

    async def resume(self, cid: str) -> None:
        await self._pause(cid, pause=False)

    async def _pause(self, cid: str, *, pause: bool) -> None:
        c = self.container(cid)
        action, before, after = ("pause", State.RUNNING, State.PAUSED) if pause else \
            ("resume", State.PAUSED, State.RUNNING)
        c.init.require(action, before)
        agent = self._live_agent()
        call = agent.stub.pause_container if pause else agent.stub.resume_container
        await agent.call(call, pb.ContainerRequest(container_id=cid), resend=False)
        c.init.to(after, action)
        if pause:
            self._events.publish_nowait("/tasks/paused", events_pb.TaskPaused(container_id=cid))
        else:
            self._events.publish_nowait("/tasks/resumed", events_pb.TaskResumed(container_id=cid))
        self.persist()

    async def update(self, cid: str, resources_json: bytes) -> None:
        self.container(cid).init.require("update", State.CREATED, State.RUNNING, State.PAUSED)
        agent = self._live_agent()
        assert self.vm is not None
        # The sandbox grows first (a VM hotplugs vCPUs and memory), so the new
        # limits have room; sized by this container's resources alone.
        size = _sizing.of_update(resources_json)
        with self.tracing.tracer.span("hotplug", {"keel.vm.size": size}):
            await self.vm.grow_to(size)
        await agent.call(agent.stub.update_container, pb.UpdateContainerRequest(
            container_id=cid, resources_json=resources_json))

    async def stats(self, cid: str) -> pb.CgroupStats:
        self.container(cid)
        agent = self._live_agent()
        resp = await agent.call(agent.stub.stats_container, pb.ContainerRequest(container_id=cid))
        return resp.stats

    async def pids(self, cid: str) -> list[pb.ProcessEntry]:
        c = self.container(cid)
        if c.init.state is State.STOPPED:
            return []
        agent = self._live_agent()
        resp = await agent.call(agent.stub.list_processes, pb.ContainerRequest(container_id=cid))
        return list(resp.processes)
