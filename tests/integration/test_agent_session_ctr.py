"""A stray client on a running pod's ``agent.chan`` (real containerd, Keel shim,
process backend): the agent refuses it, because it lacks the session key the
shim bound at the pod's first Hello (agent/_session.py), and the pod's output
goes on with every line exactly once.  Before keys, such a client's
ReadOutput took output away from the shim's pump."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from agent.api import API_VERSION, pb
from tests.containerd import Containerd
from tests.integration.keel_ctr import KEEL
from tests.workloads import CtrCounter

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]


async def _stray_calls(path: str, cid: str) -> list[Status]:
    channel = Channel(path=path)
    stub = pb.AgentServiceStub(channel, timeout=10)
    calls = [
        lambda: stub.hello(pb.HelloRequest(api_version=API_VERSION, client_version="stray")),
        lambda: stub.read_output(pb.ReadOutputRequest(
            container_id=cid, stream=pb.OutputStream.STDOUT, offset=0, max_bytes=1 << 20)),
        lambda: stub.get_state(pb.Empty()),
        lambda: stub.signal_process(pb.SignalProcessRequest(container_id=cid, signal=9)),
    ]
    statuses = []
    try:
        for call in calls:
            try:
                await call()
            except GRPCError as exc:
                statuses.append(exc.status)
                assert "belongs to another session" in (exc.message or ""), exc.message
            else:
                raise AssertionError("a stray client's call went through")
    finally:
        channel.close()
    return statuses


def test_a_stray_client_on_agent_chan_is_refused(containerd: Containerd, busybox: str,
                                                  container_ids: Callable[[], str]) -> None:
    counter = CtrCounter(containerd, container_ids(), KEEL, busybox)
    try:
        counter.running()
        chan = counter.sandbox.channel("agent")
        statuses = asyncio.run(_stray_calls(str(chan), counter.cid))
        assert statuses == [Status.PERMISSION_DENIED] * 4
        counter.untouched()  # same pid, running, output flowing, shim never lost
        counter.finish_in_order(at_least=20)  # every line once, in order: nothing stolen
    finally:
        counter.kill()
