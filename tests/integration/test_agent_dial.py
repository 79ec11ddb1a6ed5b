"""The agent's Dial stream (the guest half of CRI PortForward into a VM pod):
a real agent dials a TCP server of the test on 127.0.0.1, carries bytes both
ways, half-closes when the caller is done, and refuses what it must.

(The shim's half, the relay on the pod's host-side localhost, runs in
tests/cri/test_streaming.py for handler keel-vm.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from agent.api import pb
from tests.agent_harness import AgentProcess, connect

pytestmark = pytest.mark.requires_root


async def _frames(port: int, *chunks: bytes) -> AsyncIterator[pb.DialFrame]:
    yield pb.DialFrame(port=port)
    for chunk in chunks:
        yield pb.DialFrame(data=chunk)


def test_dial_carries_bytes_both_ways_and_half_closes(agent: AgentProcess) -> None:
    async def main() -> None:
        got = bytearray()

        async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):  # until the caller's half close
                got.extend(data)
            writer.write(bytes(got).upper())  # answered after EOF: proves the half close
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(upper, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        big = b"x" * 300_000
        try:
            async with connect(agent) as c:
                back = b"".join([f.data async for f in c.agent.dial(
                    _frames(port, b"hello ", big, b" end"))])
        finally:
            server.close()
        assert bytes(got) == b"hello " + big + b" end"
        assert back == (b"hello " + big + b" end").upper()
    asyncio.run(main())


def test_dial_refusals(agent: AgentProcess) -> None:
    async def main() -> None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        async with connect(agent) as c:
            for port, status, needle in ((0, Status.INVALID_ARGUMENT, "out of range"),
                                         (70000, Status.INVALID_ARGUMENT, "out of range"),
                                         (closed, Status.UNAVAILABLE, "refused")):
                with pytest.raises(GRPCError) as err:
                    _ = [f async for f in c.agent.dial(_frames(port))]
                assert err.value.status is status, (port, err.value)
                assert needle in (err.value.message or "").lower(), (port, err.value.message)
            # The agent still serves.
            await c.agent.get_state(pb.Empty())
    asyncio.run(main())
