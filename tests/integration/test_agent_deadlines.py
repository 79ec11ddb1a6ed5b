"""Every shim call into the agent has a deadline, and a stalled connection heals.

A real agent (tests/agent_harness.py) is reached through a relay that can
*stall* its connections: bytes are swallowed in both directions and nothing
is closed, which is how a virtio-serial stream fails (agent/_serial.py).
The shim's AgentConnection must then drop the connection after one attempt,
dial anew and send the call again, and the agent must answer the resent
create with the container of the first (one container, one pid).  An agent
that never answers gives DeadlineExceeded, naming the call, within the
deadline; a call that must not be sent twice is sent once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time

import pytest

from agent.api import pb
from keel.errors import DeadlineExceeded
from shim._agentconn import AgentConnection
from tests.agent_harness import AgentProcess, spec_json, stdio

pytestmark = pytest.mark.requires_root


class StallingRelay:
    """Dials the agent through socketpairs; ``stall()`` freezes the live ones."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._live: list[dict[str, bool]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.dials = 0
        self.stall_new = False

    def stall(self) -> None:
        for conn in self._live:
            conn["stalled"] = True

    async def dial(self) -> socket.socket:
        self.dials += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        theirs.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(self._target)
        near_r, near_w = await asyncio.open_unix_connection(sock=theirs)
        state = {"stalled": self.stall_new}
        self._live.append(state)
        for src, dst in ((near_r, writer), (reader, near_w)):
            task = asyncio.ensure_future(self._pump(src, dst, state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return ours

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if not state["stalled"]:  # stalled: swallowed, and nothing closes
                    dst.write(data)
                    await dst.drain()
            dst.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _create_req(cid: str, rootfs: str) -> pb.CreateContainerRequest:
    return pb.CreateContainerRequest(container_id=cid, rootfs=rootfs, stdio=stdio(),
                                     spec_json=spec_json(["sleep", "1000"], cid))


async def _remove(conn: AgentConnection, cid: str) -> None:
    await conn.call(conn.stub.signal_process, pb.SignalProcessRequest(container_id=cid, signal=9),
                    resend=False)
    await conn.call(conn.stub.wait_process, pb.WaitProcessRequest(container_id=cid),
                    timeout=None, attempt_s=None)
    await conn.call(conn.stub.remove_process, pb.RemoveProcessRequest(container_id=cid))


def test_a_stalled_connection_is_redialed_and_the_create_resent(
        agent: AgentProcess, rootfs: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        relay = StallingRelay(str(agent.agent_sock))
        conn = AgentConnection(relay.dial, client_version="test", session="deadlines", timeout=2.0)
        try:
            await conn.call(conn.stub.get_state, pb.Empty())  # Hello and a call, on dial 1
            assert relay.dials == 1
            relay.stall()
            began = time.monotonic()
            resp = await conn.call(conn.stub.create_container, _create_req("st1", rootfs),
                                   timeout=20.0)
            took = time.monotonic() - began
            print(f"[deadline] create over a stalled connection: pid {resp.pid} after "
                  f"{took:.1f}s, {relay.dials} dials")
            assert resp.pid > 0
            assert relay.dials == 2, "the stalled connection was not replaced"
            assert 2.0 <= took < 15.0, took
            state = await conn.call(conn.stub.get_state, pb.Empty())
            assert [(c.container_id, c.processes[0].pid) for c in state.containers] == \
                [("st1", resp.pid)], "the resent create made a second container"
            await _remove(conn, "st1")
        finally:
            conn.close()
            await relay.aclose()
    with caplog.at_level(logging.WARNING, logger="keel.shim.agent"):
        asyncio.run(main())
    assert "CreateContainer unanswered after 2s: redialing and sending it again" in caplog.text


def test_an_agent_that_never_answers_gives_deadline_exceeded(
        agent: AgentProcess, rootfs: str) -> None:
    async def main() -> None:
        relay = StallingRelay(str(agent.agent_sock))
        conn = AgentConnection(relay.dial, client_version="test", session="deadlines", timeout=1.0)
        try:
            await conn.call(conn.stub.get_state, pb.Empty())
            relay.stall()
            relay.stall_new = True  # every new connection stalls too

            began = time.monotonic()
            with pytest.raises(DeadlineExceeded) as err:
                await conn.call(conn.stub.create_container, _create_req("st2", rootfs),
                                timeout=3.0)
            took = time.monotonic() - began
            print(f"[deadline] never answered: {err.value} after {took:.1f}s")
            assert re.fullmatch(r"agent did not answer CreateContainer within 3s \([34] attempts\)",
                                str(err.value)), err.value
            assert 2.9 <= took < 4.5, took

            # A signal is not sent twice: one attempt, then the error.
            dials = relay.dials
            with pytest.raises(DeadlineExceeded, match="did not answer SignalProcess within 1s"):
                await conn.call(conn.stub.signal_process,
                                pb.SignalProcessRequest(container_id="st2", signal=15),
                                resend=False)
            assert relay.dials == dials + 1

            # The agent itself is fine: a fresh path reaches it, and the create
            # sent into the stall may have happened: it is cleaned up.
            relay.stall_new = False
            state = await conn.call(conn.stub.get_state, pb.Empty())
            for c in state.containers:
                await _remove(conn, c.container_id)
        finally:
            conn.close()
            await relay.aclose()
    asyncio.run(main())
