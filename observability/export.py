"""OTLP/HTTP export of ended spans, never in the traced operation's way.

``Exporter`` is a span sink: it appends to a bounded queue (full: the span
is dropped and counted) and one daemon thread sends batches with the SDK's
``OTLPSpanExporter``.  A collector that refuses connections or stalls
holds up only that thread, for at most ``export_timeout_s`` per batch; its
failures are counted and logged once, then every hundredth time.

The SDK is imported by the thread, on the first span: a process that
never traces never loads it.  The SDK's own ``BatchSpanProcessor`` would
do the batching, but it reports drops only through a metrics pipeline;
Keel counts them for ``keel_spans_dropped_total`` and ``opsctl``.
Spans become the SDK's ``ReadableSpan`` only to be encoded; each keeps its
process as the resource (``service.name`` keel-shim, keel-agent, opsd).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping
from typing import Any

from observability.config import TracingConfig
from observability.spans import Span

log = logging.getLogger("keel.observability")

#: Spans sent in one OTLP request.
BATCH = 512
#: How long the thread waits for a batch to fill before sending what it has.
FLUSH_S = 2.0


class Exporter:
    """Bounded, asynchronous OTLP/HTTP export (see the module docstring)."""

    def __init__(self, config: TracingConfig, resource: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.resource = dict(resource or {})
        self.dropped = 0
        self.exported = 0
        self.failed_batches = 0
        self._queue: collections.deque[Span] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread: threading.Thread | None = None

    def __call__(self, span: Span) -> None:
        with self._cond:
            if self._closing or len(self._queue) >= self.config.queue_size:
                self.dropped += 1
                return
            self._queue.append(span)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="otlp-export",
                                                daemon=True)
                self._thread.start()
            if len(self._queue) >= BATCH:
                self._cond.notify_all()

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued within *timeout* s; what is left is dropped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            self.dropped += len(self._queue)
            self._queue.clear()
            if self.dropped:
                log.warning("tracing: %d spans were not exported (%d sent) to the collector at"
                            " %s: it did not take them, or not in time", self.dropped,
                            self.exported, self.config.endpoint)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty and nothing is being sent (tests, exit)."""
        with self._cond:
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        with self._cond:  # set up at the first send, not amid the first traced calls
            if len(self._queue) < BATCH and not self._closing:
                self._cond.wait(FLUSH_S)
        try:
            send = self._sender()
        except Exception:
            log.exception("tracing: cannot set up the OTLP exporter; spans are dropped")
            with self._cond:
                self._closing = True
                self.dropped += len(self._queue)
                self._queue.clear()
            return
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.notify_all()  # flush() waiters
                    self._cond.wait(FLUSH_S)
                if not self._queue:
                    if self._closing:
                        self._cond.notify_all()
                        return
                    continue
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._busy = True
            try:
                ok = send(batch)
            except Exception:
                log.exception("tracing: exporting %d spans failed", len(batch))
                ok = False
            with self._cond:
                self._busy = False
                if ok:
                    self.exported += len(batch)
                else:
                    self.failed_batches += 1
                    self.dropped += len(batch)
                    if self.failed_batches % 100 == 1:
                        log.warning("tracing: the collector at %s did not take %d spans"
                                    " (%d batches failed, %d spans dropped so far)",
                                    self.config.endpoint, len(batch), self.failed_batches,
                                    self.dropped)
                self._cond.notify_all()

    def _sender(self) -> Any:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import SpanExportResult
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

        # Our thread logs failures (throttled); the SDK's would log every batch.
        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
        exporter = OTLPSpanExporter(endpoint=self.config.endpoint,
                                    timeout=self.config.export_timeout_s)
        scope = InstrumentationScope("keel")
        resources: dict[str, Any] = {}
        sampled = TraceFlags(TraceFlags.SAMPLED)

        def resource_of(service: str) -> Any:
            if service not in resources:
                resources[service] = Resource.create({**self.resource, "service.name": service})
            return resources[service]

        def readable(s: Span) -> Any:
            ctx = SpanContext(s.context.trace_id, s.context.span_id, False, sampled)
            parent = (SpanContext(s.context.trace_id, s.parent_span_id, False, sampled)
                      if s.parent_span_id else None)
            status = (Status(StatusCode.ERROR, s.error) if s.error else Status(StatusCode.UNSET))
            return ReadableSpan(s.name, ctx, parent, resource_of(s.service),
                                dict(s.attributes), status=status, start_time=s.start_ns,
                                end_time=s.end_ns, instrumentation_scope=scope)

        def send(batch: list[Span]) -> bool:
            return exporter.export([readable(s) for s in batch]) is SpanExportResult.SUCCESS

        return send
