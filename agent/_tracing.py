"""The agent's spans: recorded under the shim's sampled calls, taken by the shim.

The agent has no route to a collector (a VM's guest has no network of
ours) and carries no OpenTelemetry SDK: it records plain spans
(observability/spans.py) into a bounded buffer, and the shim takes them
over the ops session (TakeSpans) and exports them with its own.

It never starts a trace: a call is traced when it carries a sampled
``traceparent`` (the shim sends one only while it traces), unless the shim
switched the agent off (SetTracing ratio 0, when tracing goes off).  Its handler then runs inside a span
``agent.<Method>``, and the runtime commands it runs become child spans
(``agent/_runc.py``).  The buffer does not survive an in-place upgrade:
the spans not yet taken then are lost (the shim takes each within a
second of its end).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from grpclib.events import RecvRequest

from agent._rpc import rpc
from agent._rpc import uint as _uint
from agent.api import ops_pb
from observability.spans import TRACEPARENT, Buffer, Tracer, parse_traceparent, span_to_wire

#: Spans the agent holds for the shim; more are dropped and counted.
BUFFER_SPANS = 4096
#: TakeSpans bounds: spans per answer, and the longest wait.
MAX_TAKE = 256
MAX_WAIT_MS = 5000


class AgentTracing:
    def __init__(self) -> None:
        self.buffer = Buffer(BUFFER_SPANS)
        # On until the shim says off: a call is traced only when it carries a
        # sampled traceparent, which the shim sends only while it traces.
        self.tracer = Tracer("keel-agent", self.buffer, ratio=1.0, follow_only=True)

    def set(self, on: bool) -> None:
        self.tracer.ratio = 1.0 if on else 0.0

    async def on_request(self, event: RecvRequest) -> None:
        """RecvRequest hook: run a call that carries a sampled traceparent in a span."""
        if not self.tracer.on:
            return
        value = event.metadata.get(TRACEPARENT)
        parent = parse_traceparent(value) if isinstance(value, str) else None
        if parent is None or not parent.sampled:
            return
        inner = event.method_func
        name = event.method_name.rsplit("/", 1)[-1]
        tracer = self.tracer

        async def traced(stream: Any) -> None:
            with tracer.span(f"agent.{name}", {"rpc.system": "grpc", "rpc.method": name},
                             parent=parent):
                await inner(stream)

        event.method_func = traced

    async def take(self, max_spans: int, wait_ms: int) -> list[Any]:
        if not len(self.buffer) and wait_ms:
            ready = asyncio.Event()
            self.buffer.on_next(ready.set)
            try:
                async with asyncio.timeout(wait_ms / 1000):
                    await ready.wait()
            except TimeoutError:
                pass
            finally:
                self.buffer.off_next(ready.set)
        return [span_to_wire(s, ops_pb.SpanData) for s in self.buffer.take(max_spans)]


class TracingRpcs:
    """OpsService's tracing calls (a mixin; needs ``self._tracing`` and ``self._core``)."""

    _tracing: AgentTracing

    @rpc
    async def set_tracing(self, req: ops_pb.SetTracingRequest) -> ops_pb.SetTracingResponse:
        on = isinstance(req.ratio, float) and req.ratio > 0
        self._tracing.set(on)
        return ops_pb.SetTracingResponse(ratio=self._tracing.tracer.ratio)

    @rpc
    async def take_spans(self, req: ops_pb.TakeSpansRequest) -> ops_pb.TakeSpansResponse:
        n = min(_uint(req.max_spans, "max_spans") or MAX_TAKE, MAX_TAKE)
        wait = min(_uint(req.wait_ms, "wait_ms"), MAX_WAIT_MS)
        spans = await self._tracing.take(n, wait)
        return ops_pb.TakeSpansResponse(spans=spans, dropped=self._tracing.buffer.dropped,
                                        now_unix_nano=time.time_ns())
