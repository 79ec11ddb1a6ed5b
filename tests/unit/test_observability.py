"""observability/: the span model, sampling, context, the bounds on guest
spans, configuration, and the exporter against a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from agent.api import ops_pb
from keel.errors import InvalidArgument
from observability.config import TracingConfig, from_table
from observability.export import Exporter
from observability.spans import (
    Buffer,
    Span,
    SpanContext,
    SpanError,
    Tracer,
    current_traceparent,
    detached,
    parse_traceparent,
    remote_parent,
    span_from_wire,
    span_to_wire,
)
from observability.tracing import Tracing
from tests.otlp import Receiver, refused_endpoint

REPO = Path(__file__).resolve().parents[2]
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_traceparent_round_trip_and_malformed_values_start_a_new_trace() -> None:
    ctx = parse_traceparent(TP)
    assert ctx == SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True)
    assert ctx.traceparent == TP
    assert parse_traceparent(TP[:-1] + "0").sampled is False  # type: ignore[union-attr]
    for bad in ("", "garbage", TP.replace("00-", "01-", 1), "00-" + "0" * 32 + TP[35:],
                TP[:36] + "0" * 16 + "-01", TP + "-extra", "00-" + "g" * 32 + TP[35:]):
        assert parse_traceparent(bad) is None, bad


def test_spans_nest_end_and_carry_errors() -> None:
    got: list[Span] = []
    t = Tracer("svc", got.append, ratio=1.0)
    with t.span("outer", {"a": 1, "empty": ""}) as outer:
        assert outer is not None and current_traceparent() == outer.context.traceparent
        with t.span("inner") as inner:
            assert inner is not None
        with pytest.raises(ValueError), t.span("failing"):
            raise ValueError("boom")
    assert current_traceparent() is None
    inner_s, failing, outer_s = got
    assert inner_s.parent_span_id == outer_s.context.span_id == failing.parent_span_id
    assert inner_s.context.trace_id == outer_s.context.trace_id
    assert outer_s.parent_span_id == 0 and outer_s.attributes == {"a": "1"}
    assert failing.error == "ValueError: boom" and not outer_s.error
    assert outer_s.start_ns <= inner_s.start_ns <= inner_s.end_ns <= outer_s.end_ns


def test_ratio_samples_roots_and_zero_is_off_even_under_a_sampled_parent() -> None:
    got: list[Span] = []
    t = Tracer("svc", got.append, ratio=0.25)
    for _ in range(4000):
        with t.span("x"):
            pass
    assert 800 < len(got) < 1200, len(got)  # about a quarter
    got.clear()
    t.ratio = 0.0
    with t.span("off", parent=TP) as s:
        assert s is None
    with t.span("forced", parent=TP, force=True) as s:  # an upgrade opsd traces
        assert s is not None
    with t.span("forced root", force=True) as s:  # force never starts a trace
        assert s is None
    t.ratio = 1.0
    with t.span("unsampled parent", parent=TP[:-1] + "0") as s:
        assert s is None
    assert [s.name for s in got] == ["forced"]


def test_follow_only_never_starts_a_trace_but_follows_a_sampled_parent() -> None:
    got: list[Span] = []
    t = Tracer("agent", got.append, ratio=1.0, follow_only=True)
    with t.span("root") as s:
        assert s is None
    remote_parent(TP)
    try:
        with t.span("child") as s:
            assert s is not None and s.parent_span_id == 0xB7AD6B7169203331
    finally:
        remote_parent(None)
    assert [s.name for s in got] == ["child"]


def test_a_background_task_started_in_a_span_is_not_its_child() -> None:
    got: list[Span] = []
    t = Tracer("svc", got.append, ratio=1.0)

    async def seen() -> str | None:
        return current_traceparent()

    async def main() -> tuple[str | None, str | None]:
        with t.span("call"):
            inherited = asyncio.create_task(seen())
            background = asyncio.create_task(seen(), context=detached())
        return await inherited, await background

    inherited, background = asyncio.run(main())
    assert inherited is not None and background is None


def test_buffer_is_bounded_and_counts_what_it_drops() -> None:
    b = Buffer(limit=3)
    t = Tracer("agent", b, ratio=1.0)
    for _ in range(5):
        with t.span("s"):
            pass
    assert (len(b), b.dropped) == (3, 2)
    assert len(b.take(2)) == 2 and len(b) == 1


def _wire(**over: object) -> ops_pb.SpanData:
    data = span_to_wire(Span("ok", SpanContext(1, 2), 3, "keel-agent", 10, 20, {"k": "v"}),
                        ops_pb.SpanData)
    for k, v in over.items():
        setattr(data, k, v)
    return data


@pytest.mark.parametrize("over, why", [
    ({"name": ""}, "span name"),
    ({"name": "n" * 129}, "span name"),
    ({"trace_id": b"\0" * 16}, "trace id"),
    ({"trace_id": b"\1" * 15}, "trace id"),
    ({"span_id": b"\1" * 9}, "span id"),
    ({"parent_span_id": b"\1" * 7}, "parent span id"),
    ({"start_unix_nano": 30}, "ends before it starts"),
    ({"start_unix_nano": 0}, "ends before it starts"),
    ({"attributes": {f"k{i}": "v" for i in range(33)}}, "33 attributes"),
    ({"attributes": {"k": "v" * 257}}, "too long"),
    ({"attributes": {"": "v"}}, "too long"),
    ({"error": "e" * 513}, "error text"),
])
def test_a_malformed_guest_span_is_refused(over: dict[str, object], why: str) -> None:
    with pytest.raises(SpanError, match=why):
        span_from_wire(_wire(**over), "keel-agent")


def test_a_guest_span_is_moved_by_the_clock_offset_and_keeps_its_ids() -> None:
    s = span_from_wire(_wire(start_unix_nano=1000, end_unix_nano=2000), "keel-agent", 400)
    assert (s.start_ns, s.end_ns, s.service) == (600, 1600, "keel-agent")
    assert (s.context.trace_id, s.context.span_id, s.parent_span_id) == (1, 2, 3)
    with pytest.raises(SpanError, match="before 1970"):
        span_from_wire(_wire(start_unix_nano=1000, end_unix_nano=2000), "keel-agent", 1000)


def test_config_from_table_and_env() -> None:
    assert from_table(None, {}).start_ratio == 0.0  # off by default
    c = from_table({"enabled": True, "ratio": 0.5, "queue_size": 10}, {})
    assert (c.start_ratio, c.queue_size) == (0.5, 10)
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER_ARG": "0.2",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
           "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500"}
    c = from_table({"enabled": False}, env)
    assert (c.enabled, c.ratio, c.endpoint, c.export_timeout_s) == (
        True, 0.2, "http://collector:4318/v1/traces", 2.5)
    assert not from_table({"enabled": True}, {"OTEL_SDK_DISABLED": "true"}).enabled
    for table, msg in (({"ratio": 2}, "ratio"), ({"enabled": "yes"}, "must be a bool"),
                       ({"endpoint": "collector:4318"}, "http"), ({"bogus": 1}, "unknown key"),
                       ({"queue_size": 0}, "queue_size")):
        with pytest.raises(InvalidArgument, match=msg):
            from_table(table, {})
    with pytest.raises(InvalidArgument, match="OTEL"):
        from_table({}, {"OTEL_TRACES_SAMPLER_ARG": "half"})


def test_exporter_sends_otlp_that_a_collector_decodes() -> None:
    with Receiver() as rx:
        tr = Tracing("keel-shim", TracingConfig(enabled=True, endpoint=rx.endpoint),
                     {"keel.sandbox.id": "sb1"})
        with tr.tracer.span("parent", {"keel.container.id": "c1"}), tr.tracer.span("child"):
            pass
        assert tr.flush(10)
        spans = rx.wait_for(lambda s: s if len(s) == 2 else None, timeout=10)
        child, parent = spans
        assert (parent.name, child.name) == ("parent", "child")
        assert child.parent_span_id == parent.span_id and child.trace_id == parent.trace_id
        assert parent.service == "keel-shim" and parent.resource["keel.sandbox.id"] == "sb1"
        assert parent.attributes == {"keel.container.id": "c1"}
        tr.close()
        assert tr.dropped == 0


@pytest.mark.parametrize("kind", ["refusing", "stalling"])
def test_a_broken_collector_never_blocks_the_caller_and_drops_are_counted(kind: str) -> None:
    with Receiver(stall=True) as stalled:
        endpoint = stalled.endpoint if kind == "stalling" else refused_endpoint()
        ex = Exporter(TracingConfig(enabled=True, endpoint=endpoint, queue_size=100,
                                    export_timeout_s=2.0))
        t = Tracer("svc", ex, ratio=1.0)
        t0 = time.monotonic()
        for _ in range(1000):
            with t.span("s"):
                pass
        assert time.monotonic() - t0 < 1.0  # 1000 spans queued or dropped, never waited on
        assert ex.dropped >= 1000 - 100 - 512  # beyond the queue (and one batch in flight)
        ex.close(timeout=0.5)
        end = time.monotonic() + 10  # a batch in flight is counted when its export gives up
        while ex.dropped < 1000 and time.monotonic() < end:
            time.sleep(0.05)
        assert (ex.exported, ex.dropped) == (0, 1000)


_IMPORTS = """
import sys, time
from shim._launcher_server import WARM_MODULES, TRACING_MODULES
import importlib
for name in (*WARM_MODULES, "shim._start", "shim.__main__"):
    importlib.import_module(name)
from observability.tracing import Tracing
from observability.config import from_table
tr = Tracing("keel-shim", from_table({"enabled": sys.argv[1] == "on",
                                      "endpoint": "http://127.0.0.1:9/v1/traces"}, {}))
with tr.tracer.span("Task.Create"), tr.tracer.span("agent.CreateContainer"):
    pass
tr.close(0.1)
end = time.time() + 30  # the export thread imports the SDK as it sets up (when it runs)
while "opentelemetry.sdk.trace" not in sys.modules and time.time() < end and tr._exporter:
    time.sleep(0.05)
time.sleep(0.2)
print(sorted({m.split(".")[1] for m in sys.modules if m.startswith("opentelemetry.")}))
"""


@pytest.mark.parametrize("tracing", ["off", "on"])
def test_with_tracing_off_nothing_on_the_container_path_imports_the_sdk(tracing: str) -> None:
    """What a shim daemon and a process agent import (the launcher's warm set,
    ``start``) and a traced call: no OpenTelemetry module with tracing off;
    with it on, the exporter loads it (so this check can see it)."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _IMPORTS, tracing], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.strip()
    if tracing == "off":
        assert loaded == "[]", loaded
    else:
        assert "sdk" in loaded and "exporter" in loaded, loaded
