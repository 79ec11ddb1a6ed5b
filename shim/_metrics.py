"""One sandbox's figures for opsd's Prometheus endpoint (``ShimOps.Metrics``).

What the shim knows itself (versions, containers, uptime, the VMM's host
memory and vCPUs) comes at once; what only the agent knows (each
container's CPU and memory use, the console sessions open) is asked under
a short deadline (:data:`AGENT_S`), so that a scrape never waits on a
stuck agent: a container whose stats fail or come late is reported
without them, a console count that does not come is reported unknown.
Nothing here changes the sandbox.

Host memory is the RSS and PSS of the VMM process (qemu) or of the agent
(process backend: the sandbox's own process, not its containers'), from
``/proc/<pid>/smaps_rollup``.

The agent calls go on the sandbox's existing connections and must not
drop them: a late call is cancelled by this module's own deadline, never
left to ``AgentConnection.call``'s, which would close the connection and
redial (the pumps would feel that on every scrape of a slow agent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from agent.api import ops_pb, pb
from keel import procfs
from shim import version
from shim._agentconn import ops_call

if TYPE_CHECKING:
    from shim._agentconn import AgentConnection
    from shim.sandbox import Sandbox

log = logging.getLogger("keel.shim.metrics")

#: Seconds the agent has to answer the questions of one Metrics call, in all.
AGENT_S = 2.0
#: StatsContainer calls in flight at once, per Metrics call.
_FANOUT = 8


async def gather(sb: Sandbox, *, ask_agent: bool) -> ops_pb.MetricsResponse:
    """The sandbox's figures; returns within about :data:`AGENT_S` seconds.

    *ask_agent*: False while a shim handoff runs or after it, when the
    agent's channels belong (or are about to belong) to the new shim: only
    the shim's own figures then, every container without stats.
    """
    memory = _memory(sb)
    resp = ops_pb.MetricsResponse(
        sandbox_id=sb.id, namespace=sb.namespace, backend=sb.config.backend,
        shim_version=version(), agent_version=sb.agent.agent_version if sb.agent else "",
        uptime_s=uptime_s(sb), vm_rss_bytes=memory.rss, vm_pss_bytes=memory.pss,
        vcpus=_vcpus(sb), spans_dropped=_spans_dropped(sb),
        containers=[ops_pb.ContainerMetrics(id=cid) for cid in sb.containers])
    agent = sb.agent
    if not ask_agent or agent is None:
        return resp
    limit = asyncio.Semaphore(_FANOUT)
    async with asyncio.timeout(AGENT_S + 0.5):  # a safety net: each call has its own bound
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_console_sessions(sb, resp))
            for c in resp.containers:
                tg.create_task(_stats(agent, c, limit))
    return resp


def uptime_s(sb: Sandbox) -> float:
    """Seconds since the sandbox started.  A sandbox an older release started
    has no recorded start: the age of its VMM (or agent) process stands in."""
    if sb.created_at_ns:
        return max(0.0, (time.time_ns() - sb.created_at_ns) / 1e9)
    if sb.vm is not None:
        try:
            return procfs.uptime_s(sb.vm.pid)
        except (OSError, ValueError, IndexError):
            pass  # it is gone: the sandbox watch reports that
    return 0.0


def _memory(sb: Sandbox) -> procfs.Memory:
    if sb.vm is not None:
        try:
            return procfs.memory(sb.vm.pid)
        except (OSError, ValueError) as exc:
            log.debug("sandbox %s: no host memory figures: %s", sb.id, exc)
    return procfs.Memory(rss=0, pss=0)


def _vcpus(sb: Sandbox) -> int:
    """The VM's vCPUs now (hotplug included: the qemu record follows it); 0 for
    a backend without vCPUs (process)."""
    if sb.vm is None:
        return 0
    return int(sb.vm.record().get("vcpus") or 0)


def _spans_dropped(sb: Sandbox) -> int:
    """Spans the sandbox's tracing dropped; 0 while the shim has no tracing
    (the attribute is absent, or None)."""
    tracing = getattr(sb, "tracing", None)
    return int(getattr(tracing, "dropped", 0) or 0) if tracing is not None else 0


async def _stats(agent: AgentConnection, out: ops_pb.ContainerMetrics,
                 limit: asyncio.Semaphore) -> None:
    """Fill *out* from the agent's StatsContainer, or leave it without stats."""
    req = pb.ContainerRequest(container_id=out.id)
    try:
        async with asyncio.timeout(AGENT_S):
            async with limit:
                resp = await agent.call(agent.stub.stats_container, req, timeout=None,
                                        attempt_s=None, retry_for=AGENT_S)
    except Exception as exc:  # noqa: BLE001 - one container's failure is that container's alone
        log.debug("container %s: no stats for metrics: %r", out.id, exc)
        return
    out.has_stats = True
    out.cpu_usage_ns = resp.stats.cpu_usage_ns
    out.memory_usage_bytes = resp.stats.memory_usage


async def _console_sessions(sb: Sandbox, out: ops_pb.MetricsResponse) -> None:
    """The agent's count of console sessions (its ops Health), or unknown."""
    if sb.ops is None or sb.ops_frozen:  # a handoff holds the ops port
        return
    try:
        health = await ops_call(sb.ops, lambda s: s.health(ops_pb.HealthRequest()), AGENT_S)
    except Exception as exc:  # noqa: BLE001 - the count is then unknown, nothing more
        log.debug("sandbox %s: no console count for metrics: %r", sb.id, exc)
        return
    out.console_sessions = health.console_sessions
    out.console_sessions_known = True
