"""opsd's Prometheus metrics: what each sandbox's shim reports, and opsd's own work.

Per sandbox (from each shim's ``ShimOps.Metrics``, shim/_metrics.py):

=====================================  ==========================================
``keel_sandbox_up``                    1 if its shim answered, else 0 (labels
                                       ``sandbox``, ``namespace``, ``backend``)
``keel_sandbox_info``                  1, labels ``sandbox``, ``shim_version``,
                                       ``agent_version``, ``backend``
``keel_sandbox_uptime_seconds``        since the sandbox started
``keel_sandbox_containers``            containers in it
``keel_sandbox_console_sessions``      open console sessions (absent when the
                                       agent did not say in time)
``keel_sandbox_vm_rss_bytes``, ``_pss_bytes``  host memory of its VMM (qemu)
                                       or agent (process backend)
``keel_sandbox_vcpus``                 the VM's vCPUs (0: process backend)
``keel_container_cpu_seconds_total``   per container (``sandbox``, ``container``);
``keel_container_memory_bytes``        absent for a container whose stats were late
=====================================  ==========================================

A shim older than ``Metrics`` is asked ``Status`` instead: up, info and the
number of containers, nothing else.

Per node: ``keel_upgrades_total`` and ``keel_upgrades_failed_total``
(``component``: every UpgradeShim/UpgradeAgent call opsd made, rollbacks
included, and those that failed), ``keel_upgrade_freeze_seconds`` and
``keel_upgrade_agent_gap_seconds`` (histograms of the successful ones),
``keel_rollout_state`` (``state``: 1 for the current one, 0 for the others;
``idle`` before any plan, a finished plan's end state until the next one),
``keel_releases_installed``; per sandbox ``keel_sandbox_spans_dropped_total``
(the node's: ``sum(keel_sandbox_spans_dropped_total)``).

Everything lives on a registry of opsd's own, never prometheus_client's
global one.  A scrape first gathers, asynchronously: every shim is asked at
once (at most :data:`_FANOUT` calls in flight), all within one deadline, so
a shim that does not answer is ``keel_sandbox_up 0`` and never holds the
scrape up; then it renders, synchronously, from that snapshot
(:meth:`NodeCollector.scrape`), so no other scrape can change it halfway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from keel.errors import KeelError
from opsd._discovery import SandboxMetrics, Switched, check_id
from opsd.state import COMPONENTS, Plan, PlanState
from shim.api import SandboxDir, load_record

log = logging.getLogger("opsd.metrics")

#: Seconds a scrape waits for the shims, in all (a shim bounds its agent's part
#: to 2 s: shim/_metrics.py); below Prometheus's default scrape_timeout (10 s).
DEADLINE_S = 4.0
_FANOUT = 32
#: ``keel_rollout_state`` values: ``idle``, ``paused`` (between batches) and the plan states.
ROLLOUT_STATES = ("idle", "paused", *(s.value for s in PlanState))
#: A shim's freeze window is tens of ms (DESIGN section 6); an agent's gap about 0.25 s.
FREEZE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
GAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class UpgradeMetrics:
    """What opsd's rollouts feed (:class:`opsd._rollout.Rollout`).  Without a
    registry the figures are kept but shown nowhere (tests, tools)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._calls = Counter("keel_upgrades", "UpgradeShim/UpgradeAgent calls opsd made"
                              " (rollbacks included)", ["component"], registry=registry)
        self._failed = Counter("keel_upgrades_failed", "UpgradeShim/UpgradeAgent calls that"
                               " failed (an agent that went back included)", ["component"],
                               registry=registry)
        self._freeze = Histogram("keel_upgrade_freeze_seconds", "Freeze window of each shim"
                                 " handoff", buckets=FREEZE_BUCKETS, registry=registry)
        self._gap = Histogram("keel_upgrade_agent_gap_seconds", "Gap in service of each agent"
                              " upgrade", buckets=GAP_BUCKETS, registry=registry)
        for component in COMPONENTS:  # both series exist from the start, at 0
            self._calls.labels(component)
            self._failed.labels(component)

    def upgraded(self, component: str, done: Switched) -> None:
        self._calls.labels(component).inc()
        if component == "shim":
            self._freeze.observe(done.freeze_s)
        else:
            self._gap.observe(done.gap_s)

    def failed(self, component: str) -> None:
        self._calls.labels(component).inc()
        self._failed.labels(component).inc()


class MetricsSource(Protocol):
    """The sandboxes of this node (opsd._discovery.ShimClient)."""

    def ids(self) -> list[str]: ...

    async def metrics(self, sandbox_id: str) -> SandboxMetrics: ...


@dataclass(frozen=True, slots=True)
class Unreached:
    """A sandbox whose shim did not answer; its labels from its state file."""

    id: str
    namespace: str
    backend: str


#: A sandbox's namespace and backend without its shim ("" where unknown).
Identity = Callable[[str], tuple[str, str]]


def state_identity(state_root: Path) -> Identity:
    """:data:`Identity` from the sandbox's state file under *state_root*."""
    def identity(sandbox_id: str) -> tuple[str, str]:
        try:
            rec = load_record(SandboxDir.of(state_root, check_id(sandbox_id)))
        except (KeelError, OSError):
            return "", ""
        return rec.namespace, rec.backend
    return identity


async def gather(source: MetricsSource, deadline_s: float,
                 identity: Identity = lambda sid: ("", "")
                 ) -> list[SandboxMetrics | Unreached]:
    """Every sandbox's answer, or :class:`Unreached`; returns within *deadline_s*."""
    wanted = source.ids()
    limit = asyncio.Semaphore(_FANOUT)
    found: dict[str, SandboxMetrics] = {}

    async def one(sid: str) -> None:
        try:
            async with asyncio.timeout(deadline_s):
                async with limit:
                    found[sid] = await source.metrics(sid)
        except Exception as exc:  # noqa: BLE001 - every failure is that sandbox's "up 0"
            log.debug("sandbox %s: no metrics: %s", sid, str(exc) or type(exc).__name__)

    async with asyncio.TaskGroup() as tg:
        for sid in wanted:
            tg.create_task(one(sid), name=f"metrics-{sid}")
    return [found[sid] if sid in found else Unreached(sid, *identity(sid)) for sid in wanted]


class NodeCollector:
    """The collector of opsd's registry for what is not a plain counter: the
    sandboxes (from the last gathered snapshot), the rollout state and the
    releases installed.  *plan* gives the Manager's plan; *releases* the
    number of releases installed."""

    def __init__(self, registry: CollectorRegistry, source: MetricsSource, *,
                 plan: Callable[[], Plan | None], releases: Callable[[], int],
                 identity: Identity = lambda sid: ("", ""),
                 deadline_s: float = DEADLINE_S) -> None:
        self._registry = registry
        self._source = source
        self._plan = plan
        self._releases = releases
        self._identity = identity
        self._deadline_s = deadline_s
        self._snapshot: list[SandboxMetrics | Unreached] = []
        registry.register(self)

    async def scrape(self) -> bytes:
        """The registry in Prometheus's text format, with every shim asked now."""
        snapshot = await gather(self._source, self._deadline_s, self._identity)
        # No await from here to the end: the text is this snapshot's alone.
        self._snapshot = snapshot
        return generate_latest(self._registry)

    def describe(self) -> list[Metric]:
        return []  # no duplicate-name check, and no collect() at registration

    def collect(self) -> Iterator[Metric]:
        yield from _sandbox_families(self._snapshot)
        yield self._rollout_state()
        installed = GaugeMetricFamily("keel_releases_installed", "Keel releases installed on"
                                      " the node")
        try:
            installed.add_metric([], self._releases())
        except (KeelError, OSError) as exc:
            log.warning("keel_releases_installed left out: %s", exc)
        else:
            yield installed

    def _rollout_state(self) -> GaugeMetricFamily:
        plan = self._plan()
        if plan is None:
            now = "idle"
        elif plan.state is PlanState.RUNNING and plan.pause_until is not None:
            now = "paused"
        else:
            now = plan.state.value
        family = GaugeMetricFamily("keel_rollout_state", "1 for the upgrade plan's state"
                                   " (idle: no plan yet)", labels=["state"])
        for state in ROLLOUT_STATES:
            family.add_metric([state], 1.0 if state == now else 0.0)
        return family


def _sandbox_families(snapshot: list[SandboxMetrics | Unreached]) -> Iterator[Metric]:
    sb, ct = ["sandbox"], ["sandbox", "container"]
    up = GaugeMetricFamily("keel_sandbox_up", "1 if the sandbox's shim answered the scrape",
                           labels=[*sb, "namespace", "backend"])
    info = InfoMetricFamily("keel_sandbox", "The sandbox's shim and agent releases",
                            labels=[*sb, "shim_version", "agent_version", "backend"])
    gauges = {name: GaugeMetricFamily(f"keel_sandbox_{name}", doc, labels=sb) for name, doc in (
        ("uptime_seconds", "Seconds since the sandbox started"),
        ("containers", "Containers in the sandbox"),
        ("console_sessions", "Console sessions open in the sandbox"),
        ("vm_rss_bytes", "Resident memory of the sandbox's VMM (or agent) process on the host"),
        ("vm_pss_bytes", "Proportional set size of the sandbox's VMM (or agent) process"),
        ("vcpus", "vCPUs of the sandbox's VM (0: not a VM)"))}
    cpu = CounterMetricFamily("keel_container_cpu_seconds", "CPU time the container used",
                              labels=ct)
    memory = GaugeMetricFamily("keel_container_memory_bytes", "Memory the container uses",
                               labels=ct)
    spans = CounterMetricFamily("keel_sandbox_spans_dropped", "Spans of the sandbox (its shim's"
                                " and its agent's) that were not exported: a full queue, a"
                                " collector that did not take them, a malformed guest span",
                                labels=["sandbox"])
    for s in snapshot:
        if isinstance(s, Unreached):
            up.add_metric([s.id, s.namespace, s.backend], 0.0)
            continue
        up.add_metric([s.id, s.namespace, s.backend], 1.0)
        info.add_metric([s.id, s.shim_version, s.agent_version, s.backend], {})
        for name, value in (("uptime_seconds", s.uptime_s), ("containers", len(s.containers)),
                            ("console_sessions", s.console_sessions),
                            ("vm_rss_bytes", s.vm_rss_bytes), ("vm_pss_bytes", s.vm_pss_bytes),
                            ("vcpus", s.vcpus)):
            if value is not None:
                gauges[name].add_metric([s.id], float(value))
        for c in s.containers:
            if c.cpu_ns is not None:
                cpu.add_metric([s.id, c.id], c.cpu_ns / 1e9)
            if c.memory_bytes is not None:
                memory.add_metric([s.id, c.id], float(c.memory_bytes))
        spans.add_metric([s.id], float(s.spans_dropped))
    yield from (up, info, *gauges.values(), cpu, memory, spans)
