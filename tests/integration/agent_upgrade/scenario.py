"""The agent-upgrade scenario the test_agent_upgrade*.py modules share: two
releases of this checkout, calls that survive an in-place upgrade (retried on
a dropped connection, like the shim's), and a counter container whose output
is read the way the shim reads it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.api import ops_pb, pb
from tests.agent_harness import (
    AgentProcess,
    Client,
    connect,
    process_json,
    read_all,
    retrying,
    spec_json,
    stdio,
)
from tests.workloads import STOPPER, counter

A, B = "9.1.0", "9.2.0"
#: Prints 0, 1, 2... every ~2 ms until STOPPER runs, then "end"; exits 7.
COUNTER = counter(2000)


def launcher(releases: Path, name: str) -> str:
    """The agent launcher of release *name* (``a``, ``b``) under *releases*."""
    return str(releases / name / "bin" / "keel-agent")


def run(agent: AgentProcess, scenario: Callable[[Client], Awaitable[None]]) -> None:
    async def main() -> None:
        async with connect(agent) as client:
            await scenario(client)
    asyncio.run(main())


async def agent_health(c: Client) -> ops_pb.HealthResponse:
    """Health from whichever image serves next (the old one holds it during an upgrade)."""
    return await retrying(lambda: c.ops.health(ops_pb.HealthRequest()))


async def upgrade(c: Client, path: str, to_version: str = "") -> ops_pb.UpgradeAgentResponse:
    return await c.ops.upgrade_agent(ops_pb.UpgradeAgentRequest(agent_path=path,
                                                                to_version=to_version))


async def start_process(c: Client, cid: str, eid: str = "") -> int:
    req = pb.StartProcessRequest(container_id=cid, exec_id=eid)
    return (await retrying(lambda: c.agent.start_process(req))).pid


async def wait_process(c: Client, cid: str, eid: str = "") -> int:
    req = pb.WaitProcessRequest(container_id=cid, exec_id=eid)
    return (await retrying(lambda: c.agent.wait_process(req), timeout=120)).exit_status


async def exec_process(c: Client, cid: str, eid: str, args: list[str], **kw: bool) -> int:
    req = pb.ExecProcessRequest(container_id=cid, exec_id=eid, process_json=process_json(args),
                                stdio=stdio(**kw))
    await retrying(lambda: c.agent.exec_process(req))
    return await start_process(c, cid, eid)


class Counter:
    """The counter container and a shim-like reader of its stdout."""

    def __init__(self, c: Client, cid: str = "seq") -> None:
        self.c, self.cid = c, cid

    async def start(self, rootfs: str) -> None:
        await self.c.agent.create_container(pb.CreateContainerRequest(
            container_id=self.cid, spec_json=spec_json(["sh", "-c", COUNTER], self.cid),
            rootfs=rootfs, stdio=stdio(stderr=False)))
        self.reader = asyncio.ensure_future(read_all(self.c.agent, self.cid))
        self.pid = await start_process(self.c, self.cid)

    async def seen(self, at_least: int, timeout: float = 60.0) -> None:
        """Wait until the agent holds past *at_least* numbers (the counter runs)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            assert asyncio.get_running_loop().time() < deadline, f"counter stuck below {at_least}"
            state = await retrying(lambda: self.c.agent.get_state(pb.Empty()))
            [proc] = [p for ct in state.containers if ct.container_id == self.cid
                      for p in ct.processes if not p.exec_id]
            if proc.stdout_offset > 5 * at_least:
                return
            await asyncio.sleep(0.02)

    async def finish(self) -> int:
        """Stop it; check every number came exactly once, in order; returns the count."""
        assert await exec_process(self.c, self.cid, "stop", list(STOPPER)) > 0
        assert await wait_process(self.c, self.cid, "stop") == 0
        out = (await self.reader).decode().splitlines()
        assert out[-1] == "end", out[-5:]
        numbers = [int(line) for line in out[:-1]]
        assert numbers == list(range(len(numbers))), "output lost, duplicated or reordered"
        assert await wait_process(self.c, self.cid) == 7
        return len(numbers)
