"""One shim session owns the agent (agent/_session.py), with a real agent and runc.

The first Hello that carries a session key binds it; from then on a client
without that key (a stray tool on ``agent.chan``, a second shim) is refused
on both channels, except ops Health, and cannot read output away from the
owner.  The key lives in the agent's state file, so an in-place upgrade keeps
enforcing it; a client of agent API 1 (the shim of a release before keys,
after a rollback) drops it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from grpclib.const import Status

from agent.api import SESSION_KEY_API, ops_pb, pb
from tests.agent_harness import AgentProcess, Client, connect, expect_error, retrying
from tests.integration.agent_upgrade.scenario import B, Counter, agent_health, launcher, upgrade

KEY = "0123456789abcdef0123456789abcdef"
DENIED = "belongs to another session"


def _saved_key(agent: AgentProcess) -> str:
    return str(json.loads((agent.state_dir / "state.json").read_text())["session_key"])


async def _refused_everywhere(agent: AgentProcess, key: str = "") -> None:
    """A client presenting *key* (none, or a wrong one) is refused all but Health."""
    with pytest.raises(Exception) as err:  # Hello itself is refused
        async with connect(agent, key):
            pass
    assert DENIED in str(err.value), err.value
    stray = Client(agent, key)  # never says Hello, as a stray tool would not
    try:
        agent_stub, ops_stub = stray.agent, stray.ops
        await expect_error(agent_stub.get_state(pb.Empty()), Status.PERMISSION_DENIED, DENIED)
        await expect_error(agent_stub.read_output(pb.ReadOutputRequest(
            container_id="seq", stream=pb.OutputStream.STDOUT, offset=0, max_bytes=4096)),
            Status.PERMISSION_DENIED, DENIED)
        await expect_error(agent_stub.signal_process(pb.SignalProcessRequest(
            container_id="seq", signal=9)), Status.PERMISSION_DENIED, DENIED)
        await expect_error(ops_stub.upgrade_agent(ops_pb.UpgradeAgentRequest(agent_path="/x")),
                           Status.PERMISSION_DENIED, DENIED)
        health = await ops_stub.health(ops_pb.HealthRequest())  # open: it changes nothing
        assert health.ok
    finally:
        stray.close()


@pytest.mark.requires_root
def test_the_first_keyed_hello_owns_the_agent(agent: AgentProcess, rootfs: str) -> None:
    async def main() -> None:
        async with connect(agent) as keyless:  # no key bound yet: a keyless session works
            assert (await keyless.agent.get_state(pb.Empty())).containers == []
        async with connect(agent, KEY) as owner:
            assert _saved_key(agent) == KEY
            counter = Counter(owner)
            await counter.start(rootfs)
            await counter.seen(20)
            await _refused_everywhere(agent)
            await _refused_everywhere(agent, "f" * 32)
            await _refused_everywhere(agent, "k" * 4096)  # over the cap: never compared whole
            await counter.seen(40)  # the owner's output went on, from its own offsets
            state = await owner.agent.get_state(pb.Empty())
            assert [c.container_id for c in state.containers] == ["seq"]
            assert await counter.finish() > 40
            await retrying(lambda: owner.agent.remove_process(
                pb.RemoveProcessRequest(container_id="seq", exec_id="stop")))
            await owner.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))

    asyncio.run(main())
    log = agent.log()
    assert "session key bound by 'test'" in log, log
    # Refusals are logged once, then every thousandth: never a line per call.
    assert log.count("refused ") <= 6, log


@pytest.mark.requires_root
def test_the_key_survives_an_in_place_upgrade_and_an_old_client_drops_it(
        agent: AgentProcess, releases: Path) -> None:
    async def main() -> None:
        async with connect(agent, KEY) as owner:
            resp = await upgrade(owner, launcher(releases, "b"), B)
            assert resp.to_version == B
            assert (await agent_health(owner)).agent_version == B
            await retrying(lambda: owner.agent.get_state(pb.Empty()))  # the new image serves
        assert _saved_key(agent) == KEY
        await _refused_everywhere(agent)  # the new image enforces the same key
        # The shim of a release before keys speaks API 1 and sends none: it takes over.
        async with connect(agent, api_version=SESSION_KEY_API - 1) as old_shim:
            assert (await old_shim.agent.get_state(pb.Empty())).containers == []
        assert _saved_key(agent) == ""
        async with connect(agent) as anyone:  # keyless again, as before keys
            await anyone.agent.get_state(pb.Empty())

    asyncio.run(main())
    assert "before session keys: the session key is dropped" in agent.log()
