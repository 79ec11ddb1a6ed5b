"""opsd's metrics without a node: the collector over a stand-in source of
shim answers (one that answers, one without stats, one that fails, one
that never answers), the upgrade metrics, the HTTP endpoint on a real
socket, where its address comes from; and the shim's small parts (host
memory from /proc, the spans-dropped hook, the persisted start time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from keel import procfs
from keel.errors import FailedPrecondition, InvalidArgument, Unavailable
from opsd._discovery import ContainerUsage, SandboxMetrics, Switched
from opsd._metrics import NodeCollector, UpgradeMetrics
from opsd._metrics_http import (
    DEFAULT_ADDRESS,
    MAX_REQUEST_BYTES,
    Address,
    MetricsServer,
    configured_address,
    parse_address,
)
from opsd.state import PlanState, make_plan

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _metrics(sid: str, **changes: object) -> SandboxMetrics:
    m = SandboxMetrics(
        id=sid, namespace="k8s.io", backend="qemu", shim_version="0.2.0", agent_version="0.1.9",
        uptime_s=12.5, console_sessions=2, vm_rss_bytes=300 << 20, vm_pss_bytes=200 << 20,
        vcpus=2, containers=(ContainerUsage("c1", 1_500_000_000, 4096),
                             ContainerUsage("c2", None, None)), spans_dropped=3)
    return dataclasses.replace(m, **changes)  # type: ignore[arg-type]


class Source:
    """Stand-in shims: "ok" and "quiet" answer, "broken" fails, "hung" never answers."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def ids(self) -> list[str]:
        return ["ok", "quiet", "broken", "hung"]

    async def metrics(self, sandbox_id: str) -> SandboxMetrics:
        self.asked.append(sandbox_id)
        if sandbox_id == "broken":
            raise Unavailable("sandbox broken: connection refused")
        if sandbox_id == "hung":
            await asyncio.Event().wait()
        if sandbox_id == "quiet":
            return _metrics("quiet", console_sessions=None, backend="process", vcpus=0,
                            containers=(), spans_dropped=4)
        return _metrics(sandbox_id)


def _samples(text: bytes) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _collector(plan: object = None, releases: int = 3) -> tuple[NodeCollector, UpgradeMetrics]:
    registry = CollectorRegistry()
    upgrades = UpgradeMetrics(registry)
    identity = {"broken": ("default", "process")}
    collector = NodeCollector(registry, Source(), plan=lambda: plan,  # type: ignore[arg-type,return-value]
                              releases=lambda: releases,
                              identity=lambda sid: identity.get(sid, ("", "")), deadline_s=0.3)
    return collector, upgrades


def test_collector_renders_each_sandbox_and_cuts_a_hung_one() -> None:
    collector, _ = _collector()
    t0 = time.monotonic()
    s = _samples(asyncio.run(collector.scrape()))
    assert time.monotonic() - t0 < 2.0  # the hung shim is cut at the 0.3 s deadline
    assert _value(s, "keel_sandbox_up", sandbox="ok", namespace="k8s.io", backend="qemu") == 1
    assert _value(s, "keel_sandbox_up", sandbox="broken", namespace="default",
                  backend="process") == 0
    assert _value(s, "keel_sandbox_up", sandbox="hung", namespace="", backend="") == 0
    assert _value(s, "keel_sandbox_info", sandbox="ok", shim_version="0.2.0",
                  agent_version="0.1.9", backend="qemu") == 1
    ok = {"sandbox": "ok"}
    assert [_value(s, f"keel_sandbox_{n}", **ok) for n in (
        "uptime_seconds", "containers", "console_sessions", "vm_rss_bytes", "vm_pss_bytes",
        "vcpus")] == [12.5, 2, 2, 300 << 20, 200 << 20, 2]
    assert _value(s, "keel_container_cpu_seconds_total", sandbox="ok", container="c1") == 1.5
    assert _value(s, "keel_container_memory_bytes", sandbox="ok", container="c1") == 4096
    # A container without stats, a console count not known: no sample, not a 0.
    assert not [k for k in s if dict(k[1]).get("container") == "c2"]
    assert _value(s, "keel_sandbox_console_sessions", sandbox="quiet") is None
    assert _value(s, "keel_sandbox_containers", sandbox="quiet") == 0
    # Nothing but "up" for a sandbox whose shim did not answer.
    assert {k[0] for k in s if dict(k[1]).get("sandbox") in ("broken", "hung")} == {
        "keel_sandbox_up"}
    assert _value(s, "keel_sandbox_spans_dropped_total", sandbox="ok") == 3
    assert _value(s, "keel_sandbox_spans_dropped_total", sandbox="quiet") == 4
    assert _value(s, "keel_releases_installed") == 3
    assert _value(s, "keel_rollout_state", state="idle") == 1
    assert sum(v for (n, _), v in s.items() if n == "keel_rollout_state") == 1


def test_rollout_state_follows_the_plan() -> None:
    plan = make_plan("p1", "0.2.0", ("shim",), 1, 5.0, [("a", "0.1.0", "0.1.0")])
    for p, want in ((plan, "running"), (plan.changed(pause_until=time.time() + 5), "paused"),
                    (plan.moved(PlanState.ROLLING_BACK).moved(PlanState.FAILED), "failed")):
        collector, _ = _collector(p)
        s = _samples(asyncio.run(collector.scrape()))
        states = {dict(k[1])["state"]: v for k, v in s.items() if k[0] == "keel_rollout_state"}
        assert states[want] == 1 and sum(states.values()) == 1, states
        assert {"idle", "paused", "running", "succeeded", "rolled-back", "aborted"} <= set(states)


def test_upgrade_counters_and_histograms() -> None:
    collector, upgrades = _collector()
    upgrades.upgraded("shim", Switched("0.1.0", "0.2.0", 42, "freeze 20 ms", freeze_s=0.02))
    upgrades.upgraded("agent", Switched("0.1.0", "0.2.0", 0, "gap 300 ms", gap_s=0.3))
    upgrades.failed("agent")
    s = _samples(asyncio.run(collector.scrape()))
    assert _value(s, "keel_upgrades_total", component="shim") == 1
    assert _value(s, "keel_upgrades_total", component="agent") == 2
    assert _value(s, "keel_upgrades_failed_total", component="agent") == 1
    assert _value(s, "keel_upgrades_failed_total", component="shim") == 0
    assert _value(s, "keel_upgrade_freeze_seconds_bucket", le="0.025") == 1
    assert _value(s, "keel_upgrade_freeze_seconds_bucket", le="0.01") == 0
    assert _value(s, "keel_upgrade_agent_gap_seconds_count") == 1
    assert _value(s, "keel_upgrade_agent_gap_seconds_sum") == pytest.approx(0.3)


def test_a_shim_older_than_metrics_is_asked_status(tmp_path: Path) -> None:
    """A real ShimOps server without Metrics (a stand-in: grpclib answers
    UNIMPLEMENTED): what Status says, and nothing is made up."""
    from opsd._discovery import ShimClient
    from tests.opsd_harness import Fleet

    with Fleet(tmp_path) as fleet:
        fleet.add("old", shim="0.0.9", containers={"c1": "running", "c2": "stopped"})
        m = asyncio.run(ShimClient(tmp_path).metrics("old"))
    assert (m.shim_version, m.backend, [c.id for c in m.containers]) == (
        "0.0.9", "standin", ["c1", "c2"])
    assert (m.uptime_s, m.vm_rss_bytes, m.vcpus, m.console_sessions) == (None,) * 4
    assert {c.cpu_ns for c in m.containers} == {None}


# -- the HTTP endpoint ---------------------------------------------------------

async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def test_http_endpoint() -> None:
    async def main() -> None:
        scrapes = 0

        async def scrape() -> bytes:
            nonlocal scrapes
            scrapes += 1
            return b"keel_sandbox_up 1\n"

        server = MetricsServer(scrape)
        bound = await server.start(Address("127.0.0.1", 0, "test"))
        port = int(bound.rsplit(":", 1)[1])
        try:
            # A client that connects and says nothing holds nobody else up.
            _, idle = await asyncio.open_connection("127.0.0.1", port)
            ok = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = ok.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"keel_sandbox_up 1\n"
            assert b"Content-Type: text/plain; version=" in head and b"Content-Length: 18" in head
            ok = await _exchange(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 OK")
            head = await _exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
            assert (await _exchange(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.1 404 Not Found")
            assert (await _exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.1 405 Method Not Allowed")
            assert (await _exchange(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400")
            big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n"
            assert (await _exchange(port, big)).startswith(b"HTTP/1.1 431")
            assert scrapes == 3
            idle.close()
        finally:
            await server.aclose()

    asyncio.run(main())


def test_an_address_in_use_is_a_clear_error() -> None:
    async def main() -> None:
        first = MetricsServer(_never_scraped)
        bound = await first.start(Address("127.0.0.1", 0, "test"))
        port = int(bound.rsplit(":", 1)[1])
        try:
            with pytest.raises(FailedPrecondition) as err:
                await MetricsServer(_never_scraped).start(
                    Address("127.0.0.1", port, "--metrics-address"))
        finally:
            await first.aclose()
        assert str(err.value).startswith(
            f"cannot serve metrics on 127.0.0.1:{port} (--metrics-address): the address is"
            f" already in use; choose another with --metrics-address HOST:PORT")

    asyncio.run(main())


async def _never_scraped() -> bytes:
    raise AssertionError("no scrape expected")


def test_addresses() -> None:
    assert parse_address("0.0.0.0:9464", "f") == Address("0.0.0.0", 9464, "f")
    assert parse_address("[::1]:9100", "f") == Address("::1", 9100, "f")
    assert str(parse_address("[::1]:9100", "f")) == "[::1]:9100"
    assert parse_address("none", "f") is None and parse_address(" ", "f") is None
    for bad in ("9464", "host:", "::1:9464", "[x]:1", "a:99999", ":9464"):
        with pytest.raises(InvalidArgument, match=re.escape(f"f: metrics address '{bad}' is not")):
            parse_address(bad, "f")


def test_address_from_flag_config_or_default(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    monkeypatch.setenv("KEEL_CONFIG", str(config))
    with pytest.raises(InvalidArgument, match="does not exist"):
        configured_address(None)
    config.write_text('[shim]\nbackend = "process"\n')
    assert str(configured_address(None)) == DEFAULT_ADDRESS
    config.write_text('[metrics]\naddress = "127.0.0.2:9999"\n')
    addr = configured_address(None)
    assert addr is not None and (str(addr), addr.origin) == (
        "127.0.0.2:9999", f"[metrics] address in {config}")
    assert configured_address("127.0.0.3:1") == Address("127.0.0.3", 1, "--metrics-address")
    assert configured_address("none") is None  # the flag wins
    config.write_text('[metrics]\naddress = "none"\n')
    assert configured_address(None) is None
    config.write_text('[metrics]\nport = 1\n')
    with pytest.raises(InvalidArgument, match=r"\[metrics\] takes one key"):
        configured_address(None)
    # The shim reads the same file: it leaves opsd's table alone.
    from shim.config import load
    config.write_text('[shim]\nbackend = "process"\n[metrics]\naddress = "none"\n')
    assert load().backend == "process"


# -- the shim's parts ----------------------------------------------------------

def test_host_memory_of_a_process() -> None:
    mem = procfs.memory(os.getpid())
    assert 1 << 20 < mem.rss and 0 < mem.pss <= mem.rss
    with pytest.raises(OSError):
        procfs.memory(2 ** 22 + 1)  # above pid_max's largest value


def test_spans_dropped_reads_the_tracing_hook_when_there_is_one() -> None:
    from shim._metrics import _spans_dropped

    assert _spans_dropped(SimpleNamespace()) == 0  # type: ignore[arg-type]
    assert _spans_dropped(SimpleNamespace(tracing=None)) == 0  # type: ignore[arg-type]
    assert _spans_dropped(SimpleNamespace(tracing=SimpleNamespace(dropped=5))) == 5  # type: ignore[arg-type]


def test_uptime_comes_from_the_recorded_start() -> None:
    from shim._metrics import uptime_s

    started = SimpleNamespace(created_at_ns=time.time_ns() - 5 * 10**9, vm=None)
    assert 5 <= uptime_s(started) < 6  # type: ignore[arg-type]
    # A sandbox an older release started: the age of its VMM (here: this process).
    older = SimpleNamespace(created_at_ns=0, vm=SimpleNamespace(pid=os.getpid()))
    assert 0 < uptime_s(older) == pytest.approx(procfs.uptime_s(os.getpid()), abs=1)  # type: ignore[arg-type]
