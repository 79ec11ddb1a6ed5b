"""Spans without the SDK: what shim, agent and opsd record, stdlib only.

One small span model serves every Keel process.  The guest agent carries
no OpenTelemetry SDK: its spans are plain records that the shim takes over
the ops session, checks (``check``: the guest is untrusted) and exports
with its own.  The shim and opsd hand theirs to ``observability.export``,
which imports the SDK and the OTLP exporter only once tracing is switched
on; with tracing off a span costs one attribute test and nothing on the
container path imports OpenTelemetry.

Context: the current span lives in a ``ContextVar``, so each asyncio task
nests its own spans.  Across processes it travels as a W3C
``traceparent`` (ttrpc metadata from containerd, gRPC metadata to the
agent and between opsd and the shims, the handoff's hello to the new shim).

Sampling follows OpenTelemetry's ``ParentBased(TraceIdRatioBased)``: a
remote or local parent's sampled flag decides; a root span is sampled when
the low 64 bits of its trace id fall under ``ratio * 2**64``.  ``ratio`` is
a plain attribute, so ``opsctl trace on|off`` changes it in a live process.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

log = logging.getLogger("keel.observability")

TRACEPARENT = "traceparent"
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
#: Bounds of one span, checked on what the guest sends and kept by our own.
MAX_NAME = 128
MAX_ATTRIBUTES = 32
MAX_KEY = 64
MAX_VALUE = 256
MAX_ERROR = 512


@dataclasses.dataclass(frozen=True, slots=True)
class SpanContext:
    trace_id: int
    span_id: int
    sampled: bool = True

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The context of a W3C ``traceparent`` header; None when absent or malformed
    (a bad header starts a new trace, as the W3C spec asks, it is no error)."""
    if not value:
        return None
    m = _TRACEPARENT_RE.match(value.strip().lower())
    if m is None:
        return None
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, bool(int(m[3], 16) & 1))


@dataclasses.dataclass(slots=True)
class Span:
    """A span being recorded, then ended (``end_ns`` set)."""

    name: str
    context: SpanContext
    parent_span_id: int
    service: str
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str = ""

    def set(self, key: str, value: object) -> None:
        if len(self.attributes) < MAX_ATTRIBUTES or key in self.attributes:
            self.attributes[key[:MAX_KEY]] = str(value)[:MAX_VALUE]

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


_current: contextvars.ContextVar[SpanContext | None] = contextvars.ContextVar(
    "keel_span", default=None)
_remote: contextvars.ContextVar[SpanContext | None] = contextvars.ContextVar(
    "keel_remote_parent", default=None)


def current() -> SpanContext | None:
    """The context new spans of this task nest under (a local span, else a
    remote parent set with ``remote_parent``)."""
    return _current.get() or _remote.get()


def current_traceparent() -> str | None:
    """What an outgoing call carries as ``traceparent`` (sampled spans only)."""
    ctx = current()
    return ctx.traceparent if ctx is not None and ctx.sampled else None


def remote_parent(value: str | None) -> None:
    """Make the ``traceparent`` a call came with the parent of this task's spans.

    Called from a server's request hook, which runs in the handler's task
    (grpclib's RecvRequest): the value stays with that task only."""
    _remote.set(parse_traceparent(value))


def detached() -> contextvars.Context:
    """A copy of the current context without a current span: for background
    tasks started inside a traced call (output pumps, exit watchers), which
    outlive the call and must not make their calls its children."""
    ctx = contextvars.copy_context()
    ctx.run(_current.set, None)
    ctx.run(_remote.set, None)
    return ctx


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """No current span in the block: calls made there carry no traceparent
    (the shim's own calls for tracing, which must not trace themselves)."""
    a, b = _current.set(None), _remote.set(None)
    try:
        yield
    finally:
        _remote.reset(b)
        _current.reset(a)


Sink = Callable[[Span], None]


class Tracer:
    """Makes spans for one process (*service*) and hands ended ones to *sink*.

    *ratio* (0 to 1) samples new traces; 0 also ignores remote parents
    (tracing off).  With *follow_only* the tracer never starts a trace of
    its own and records only under a sampled parent (the agent: the shim
    decides)."""

    def __init__(self, service: str, sink: Sink | None = None, *, ratio: float = 0.0,
                 follow_only: bool = False) -> None:
        self.service = service
        self.sink = sink
        self.ratio = ratio
        self.follow_only = follow_only

    @property
    def on(self) -> bool:
        return self.ratio > 0 and self.sink is not None

    def _sampled(self, trace_id: int) -> bool:
        if self.follow_only:
            return False
        return (trace_id & 0xFFFF_FFFF_FFFF_FFFF) < int(min(self.ratio, 1.0) * 2**64)

    def _start(self, name: str, attributes: Mapping[str, object] | None,
               parent: SpanContext | str | None, root: bool, force: bool) -> Span | None:
        if self.sink is None or not (self.ratio > 0 or force):
            return None
        if isinstance(parent, str):
            parent = parse_traceparent(parent)
        if parent is None and not root:
            parent = current()
        if parent is not None:
            if not parent.sampled:
                return None
            ctx = SpanContext(parent.trace_id, _new_id(64))
        else:
            trace_id = _new_id(128)
            if force or not self._sampled(trace_id):
                return None
            ctx = SpanContext(trace_id, _new_id(64))
        span = Span(name[:MAX_NAME], ctx, parent.span_id if parent is not None else 0,
                    self.service, time.time_ns())
        for k, v in (attributes or {}).items():
            if v is not None and v != "":
                span.set(k, v)
        return span

    def begin(self, name: str, attributes: Mapping[str, object] | None = None, *,
              parent: SpanContext | str | None = None, force: bool = False,
              start_ns: int = 0) -> Span | None:
        """Start a span that ``end`` ends (one whose phases other code times;
        it is not made current).  None when not sampled."""
        span = self._start(name, attributes, parent, False, force)
        if span is not None and start_ns:
            span.start_ns = start_ns
        return span

    def end(self, span: Span | None, end_ns: int = 0, error: str = "") -> None:
        if span is None:
            return
        span.end_ns = max(end_ns or time.time_ns(), span.start_ns)
        span.error = error[:MAX_ERROR]
        self._emit(span)

    def record(self, name: str, start_ns: int, end_ns: int,
               attributes: Mapping[str, object] | None = None, *,
               parent: SpanContext | str | None = None, force: bool = False) -> Span | None:
        """Record a span measured already (a phase timed by other code)."""
        span = self._start(name, attributes, parent, False, force)
        if span is not None:
            span.start_ns, span.end_ns = start_ns, max(end_ns, start_ns)
            self._emit(span)
        return span

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, object] | None = None, *,
             parent: SpanContext | str | None = None, root: bool = False,
             force: bool = False) -> Iterator[Span | None]:
        """Record *name* around the block; yields the Span, or None when not sampled.

        *parent* (a context or a traceparent) overrides the task's current
        span; *root* starts a new trace even inside one (an upgrade plan).
        *force* records under a sampled parent even while this tracer is off
        (ratio 0): a management operation (an upgrade opsd traces) is
        traced end to end whatever the sandbox's own setting."""
        span = self._start(name, attributes, parent, root, force)
        if span is None:
            yield None
            return
        token = _current.set(span.context)
        try:
            yield span
        except BaseException as exc:
            span.error = (f"{type(exc).__name__}: {exc}")[:MAX_ERROR]
            raise
        finally:
            _current.reset(token)
            span.end_ns = time.time_ns()
            self._emit(span)

    def _emit(self, span: Span) -> None:
        sink = self.sink
        if sink is None:
            return
        try:
            sink(span)
        except Exception:  # a sink's failure never reaches the traced operation
            log.exception("span sink failed")


def _new_id(bits: int) -> int:
    while True:
        v = secrets.randbits(bits)
        if v:
            return v


class Buffer:
    """Ended spans held for a taker (the agent's, taken by the shim), bounded:
    when full, new spans are dropped and counted."""

    def __init__(self, limit: int = 2048) -> None:
        self.limit = limit
        self.dropped = 0
        self._spans: deque[Span] = deque()
        self._waiters: list[Callable[[], None]] = []

    def __call__(self, span: Span) -> None:
        if len(self._spans) >= self.limit:
            self.dropped += 1
            return
        self._spans.append(span)
        waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()

    def __len__(self) -> int:
        return len(self._spans)

    def take(self, n: int) -> list[Span]:
        return [self._spans.popleft() for _ in range(min(n, len(self._spans)))]

    def on_next(self, wake: Callable[[], None]) -> None:
        """Call *wake* once at the next span added."""
        self._waiters.append(wake)

    def off_next(self, wake: Callable[[], None]) -> None:
        if wake in self._waiters:
            self._waiters.remove(wake)


class SpanError(ValueError):
    """A span from the guest that breaks the bounds."""


def check(name: str, trace_id: bytes, span_id: bytes, parent: bytes, start_ns: int,
          end_ns: int, attributes: Mapping[str, str], error: str) -> None:
    """Refuse a span that is not well formed (raises SpanError)."""
    if not name or len(name) > MAX_NAME:
        raise SpanError(f"span name of {len(name)} characters")
    if len(trace_id) != 16 or not any(trace_id):
        raise SpanError("trace id is not 16 bytes, or zero")
    if len(span_id) != 8 or not any(span_id):
        raise SpanError("span id is not 8 bytes, or zero")
    if parent and len(parent) != 8:
        raise SpanError("parent span id is not 8 bytes")
    if not 0 < start_ns <= end_ns:
        raise SpanError("span ends before it starts")
    if len(attributes) > MAX_ATTRIBUTES:
        raise SpanError(f"{len(attributes)} attributes")
    for k, v in attributes.items():
        if not k or len(k) > MAX_KEY or len(v) > MAX_VALUE:
            raise SpanError("attribute key or value too long")
    if len(error) > MAX_ERROR:
        raise SpanError("error text too long")


def span_from_wire(data: Any, service: str, offset_ns: int = 0) -> Span:
    """A checked Span from a SpanData message (keel.ops.v1), its times moved
    by *offset_ns* (the guest clock's lead over ours, subtracted)."""
    attrs = dict(data.attributes)
    check(data.name, data.trace_id, data.span_id, data.parent_span_id, data.start_unix_nano,
          data.end_unix_nano, attrs, data.error)
    if data.start_unix_nano - offset_ns <= 0:
        raise SpanError("span starts before 1970 on our clock")
    ctx = SpanContext(int.from_bytes(data.trace_id, "big"), int.from_bytes(data.span_id, "big"))
    return Span(data.name, ctx, int.from_bytes(data.parent_span_id or b"\0" * 8, "big"), service,
                data.start_unix_nano - offset_ns, data.end_unix_nano - offset_ns, attrs,
                data.error)


def span_to_wire(span: Span, cls: Any) -> Any:
    """The SpanData message (*cls*: keel.ops.v1.SpanData or keel.opsd.v1.Span) of *span*."""
    return cls(trace_id=span.context.trace_id.to_bytes(16, "big"),
               span_id=span.context.span_id.to_bytes(8, "big"),
               parent_span_id=(span.parent_span_id.to_bytes(8, "big")
                               if span.parent_span_id else b""),
               name=span.name, start_unix_nano=span.start_ns, end_unix_nano=span.end_ns,
               attributes=dict(span.attributes), error=span.error, service=span.service)
