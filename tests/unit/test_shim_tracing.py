"""The shim's Task spans on a real ttrpc server: containerd's ``traceparent``
(ttrpc metadata, containerd 1.7+) as the parent, ids as attributes, errors
kept, nothing recorded while tracing is off.  (containerd 1.6 here sends no
trace context, so this is where the metadata path is checked.)"""

from __future__ import annotations

from types import SimpleNamespace

from betterproto.lib.google.protobuf import StringValue

from observability.spans import Span, Tracer, parse_traceparent
from shim._tracing import observe
from shim.ttrpc import TtrpcServer
from shim.ttrpc._messages import KeyValue
from tests.unit.ttrpc_harness import RawPeer, Service, oneshot, request_body

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _sandbox(got: list[Span], ratio: float) -> SimpleNamespace:
    return SimpleNamespace(id="pod1", config=SimpleNamespace(backend="process"),
                           tracing=SimpleNamespace(tracer=Tracer("keel-shim", got.append,
                                                                 ratio=ratio)))


def test_task_calls_nest_under_containerds_traceparent() -> None:
    got: list[Span] = []

    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        ok = await peer.call(1, request_body("Echo", bytes(StringValue("x")),
                                             metadata=[KeyValue("traceparent", TP)]))
        assert ok.status.code == 0
        failed = await peer.call(3, request_body("Fail", bytes(StringValue("NotFound"))))
        assert failed.status.code == 5

    oneshot(check, observe=observe(_sandbox(got, 1.0)))  # type: ignore[arg-type]
    echo, fail = got
    parent = parse_traceparent(TP)
    assert parent is not None
    assert (echo.name, echo.context.trace_id, echo.parent_span_id) == (
        "Task.Echo", parent.trace_id, parent.span_id)
    assert echo.attributes["keel.sandbox.id"] == "pod1"
    assert echo.attributes["rpc.method"] == "Echo" and not echo.error
    # No traceparent: a trace of its own; the handler's error is the span's.
    assert fail.parent_span_id == 0 and fail.context.trace_id != parent.trace_id
    assert fail.error.startswith("NotFound")


def test_nothing_is_recorded_while_tracing_is_off() -> None:
    got: list[Span] = []

    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        r = await peer.call(1, request_body("Echo", bytes(StringValue("x")),
                                            metadata=[KeyValue("traceparent", TP)]))
        assert r.status.code == 0

    oneshot(check, observe=observe(_sandbox(got, 0.0)))  # type: ignore[arg-type]
    assert got == []
