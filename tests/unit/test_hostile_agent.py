"""The shim against a deliberately hostile agent: what the guest sends is
bounded and checked before it is buffered, delivered, logged or shown.

The agent here is a fake (a grpclib server in the test) because no correct
agent answers like this; the shim's side is the real AgentConnection and
OutputPump.  What happens:

* a message declared larger than ``MAX_MESSAGE_BYTES`` is refused with
  RESOURCE_EXHAUSTED before it is read, by the shim as a client and by any
  Keel server;
* an agent version with terminal escapes and 10,000 characters reaches the
  shim's logs and opsctl capped and escaped;
* an output answer at another offset than asked, or larger than asked,
  stops the pump with a protocol violation and delivers none of it.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from agent.api import API_VERSION, pb
from keel.errors import ResourceExhausted
from keel.grpc import MAX_MESSAGE_BYTES, NO_STATUS_DETAILS, limit_messages
from shim._agentconn import AgentConnection
from shim._pumps import OutputPump, ProtocolViolation
from shim._stdio import Sink
from shim.vmm._dialers import unix_dialer


class HostileAgent(pb.AgentServiceBase):
    def __init__(self) -> None:
        self.version = "0.1.0"
        self.output = b""
        self.offset_shift = 0
        self.stdin_seen = 0

    async def hello(self, req: pb.HelloRequest) -> pb.HelloResponse:
        return pb.HelloResponse(api_version=API_VERSION, min_api_version=API_VERSION,
                                max_api_version=API_VERSION, agent_version=self.version,
                                agent_pid=1)

    async def read_output(self, req: pb.ReadOutputRequest) -> pb.ReadOutputResponse:
        return pb.ReadOutputResponse(offset=req.offset + self.offset_shift, data=self.output)

    async def write_stdin(self, req: pb.WriteStdinRequest) -> pb.WriteStdinResponse:
        self.stdin_seen += len(req.data)
        return pb.WriteStdinResponse(offset=req.offset + len(req.data))


@pytest.fixture
def agent_sock() -> Iterator[tuple[HostileAgent, str]]:
    with tempfile.TemporaryDirectory(prefix="keel-hostile-") as tmp:
        yield HostileAgent(), str(Path(tmp) / "agent.sock")


async def _serve(agent: HostileAgent, path: str) -> Server:
    limit_messages()
    server = Server([agent], status_details_codec=NO_STATUS_DETAILS)
    await server.start(path=path)
    return server


def _run(agent: HostileAgent, path: str,
         body: Callable[[AgentConnection], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await _serve(agent, path)
        conn = AgentConnection(unix_dialer(path), client_version="test", session="hostile",
                               timeout=5.0)
        try:
            await body(conn)
        finally:
            conn.close()
            server.close()
            await server.wait_closed()
    asyncio.run(main())


def test_an_oversized_answer_is_refused_before_it_is_read(
        agent_sock: tuple[HostileAgent, str]) -> None:
    agent, path = agent_sock
    agent.output = b"x" * (MAX_MESSAGE_BYTES + 1)

    async def body(conn: AgentConnection) -> None:
        req = pb.ReadOutputRequest(container_id="c1", max_bytes=1 << 20)
        with pytest.raises(ResourceExhausted, match=r"over the limit of 4194304"):
            await conn.call(conn.stub.read_output, req)
        # The connection serves on: a normal answer comes through.
        agent.output = b"fine"
        assert (await conn.call(conn.stub.read_output, req)).data == b"fine"
        # And as a server: a request declared larger than the limit is refused.
        big = pb.WriteStdinRequest(container_id="c1", data=b"y" * (MAX_MESSAGE_BYTES + 1))
        with pytest.raises(GRPCError) as err:
            await conn.stub.write_stdin(big)
        assert err.value.status is Status.RESOURCE_EXHAUSTED, err.value
        assert agent.stdin_seen == 0
    _run(agent, path, body)


def test_a_guest_version_is_capped_and_escaped(agent_sock: tuple[HostileAgent, str]) -> None:
    agent, path = agent_sock
    agent.version = "\x1b[31m" + "9" * 10_000

    async def body(conn: AgentConnection) -> None:
        await conn.ready()
        assert conn.hello is not None
        shown = conn.hello.agent_version
        assert shown.isprintable() and "\x1b" not in shown, shown
        assert len(shown) < 120 and shown.endswith("(10005 characters)"), shown
    _run(agent, path, body)


@pytest.mark.parametrize("shift, size", [(5, 10), (0, (1 << 20) + 1)],
                         ids=["wrong-offset", "larger-than-asked"])
def test_an_answer_off_the_protocol_stops_the_pump(
        agent_sock: tuple[HostileAgent, str], shift: int, size: int) -> None:
    agent, path = agent_sock
    agent.offset_shift, agent.output = shift, b"z" * size
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)

    async def body(conn: AgentConnection) -> None:
        reported: list[tuple[str, str, str]] = []
        conn.on_violation = lambda *what: reported.append(what)
        pump = OutputPump(conn, "c1", "", pb.OutputStream.STDOUT, Sink(write_fd))
        with pytest.raises(ProtocolViolation, match="output stops here"):
            await asyncio.wait_for(pump.run(), 30)
        assert pump.offset == 0
        [(cid, eid, detail)] = reported  # once, to the sandbox (which publishes an event)
        assert (cid, eid) == ("c1", "") and f"at offset {shift}" in detail, detail
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 1)  # nothing of it was delivered
    try:
        _run(agent, path, body)
    finally:
        os.close(read_fd)
        os.close(write_fd)
