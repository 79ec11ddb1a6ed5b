"""Upgrade a sandbox's agent in place, over the ops channel.

The agent execs the new release with the same PID (its containers stay
its children), writing its state first; the agent channel reconnects by
itself and the pumps resume at their offsets.  A release that fails in
the guest execs the previous one again: the answer says which runs now.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agent.api import ops_pb
from keel.errors import FailedPrecondition
from shim._agentconn import DialChannel

if TYPE_CHECKING:
    from shim.sandbox import Sandbox

log = logging.getLogger("keel.shim")

#: Seconds one Hello to an upgraded agent may go unanswered before the shim redials.
UPGRADE_HELLO_ATTEMPT_S = 30.0
#: Deadline of the UpgradeAgent call itself (the agent drains and writes its state).
UPGRADE_CALL_S = 60.0


async def upgrade_agent(sb: Sandbox, agent_path: str,
                        to_version: str) -> ops_pb.UpgradeAgentResponse:
    """Have *sb*'s agent exec *agent_path*; the ops answer, with the gap the
    shim saw and whether the new release was rolled back.

    Raises FailedPrecondition without a running agent, Unavailable when the
    agent does not come back within the shim's agent timeout.
    """
    if sb.vm is None or sb.agent is None:
        raise FailedPrecondition(f"sandbox {sb.id} has no running agent")
    channel = DialChannel(sb.vm.dialer("ops"))
    try:
        stub = ops_pb.OpsServiceStub(channel)
        resp: ops_pb.UpgradeAgentResponse = await sb.agent.call(
            stub.upgrade_agent,
            ops_pb.UpgradeAgentRequest(agent_path=agent_path, to_version=to_version),
            timeout=UPGRADE_CALL_S, attempt_s=None, retry_for=0, resend=False)
    finally:
        channel.close()
    began = asyncio.get_running_loop().time()
    # A VM's agent ends the host's old serial session itself (GOAWAY); should
    # that be lost, a Hello unanswered for long is taken as a dead connection.
    hello = await sb.agent.wait_ready(sb.config.agent_timeout_s, sb.vm.alive,
                                      attempt_s=UPGRADE_HELLO_ATTEMPT_S)
    # The agent answered just before its exec; what runs now tells how it
    # ended.  The gap is as the shim saw it: that answer to the new Hello.
    resp.gap_s = asyncio.get_running_loop().time() - began
    resp.rolled_back = hello.agent_version != resp.to_version
    resp.message = (f"release {resp.to_version} failed; back on {hello.agent_version}"
                    if resp.rolled_back else "upgraded")
    log.info("agent upgraded %s -> %s (now %s, gap %.0f ms%s)", resp.from_version,
             resp.to_version, hello.agent_version, resp.gap_s * 1000,
             ", rolled back" if resp.rolled_back else "")
    sb.persist()
    return resp
