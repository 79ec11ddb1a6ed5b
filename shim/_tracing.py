"""The shim's tracing: Task spans, the agent's spans, the live switch.

- ``observe``: the ttrpc server's hook; each Task call runs in a span
  ``Task.<Method>`` (sandbox, container, exec ids and backend as
  attributes), under the ``traceparent`` containerd sent in the ttrpc
  metadata when it sent one (containerd 1.7+; 1.6 does not).
- The agent channel carries the current span's ``traceparent`` in every
  call's gRPC metadata (``observability.grpc.propagate``), so the agent's
  spans nest under ours.
- ``SpanPump``: while tracing is on, takes the agent's ended spans over the
  ops session (a long poll; every ``CLOCK_S`` a few immediate answers
  measure the guest clock's offset), checks each (a guest is untrusted: a bad one
  is dropped, counted, and logged once), moves their times by the guest
  clock's measured offset and exports them with the shim's own.  It never
  runs while a shim handoff holds the ops port.
- ``set_ratio``: ``opsctl trace on|off`` for this sandbox; kept in the
  state file, so a new shim after a handoff goes on with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from agent.api import ops_pb
from keel.errors import KeelError
from observability.spans import SpanError, detached, span_from_wire, span_to_wire, untraced
from shim._agentconn import ops_call
from shim.ttrpc import CallContext, Request

if TYPE_CHECKING:
    from shim.sandbox import Sandbox

log = logging.getLogger("keel.shim.tracing")

#: The pump's pause between two takes, and how many spans it takes at a time.
PUMP_S = 0.5
TAKE = 256
#: An idle agent is asked with a long poll (it answers at its next span):
#: an idle traced pod costs a call every few seconds, not two a second.
LONG_POLL_MS = 5000
#: How often the guest clock's offset is measured again, with how many
#: immediate answers (the one with the shortest round trip counts).
CLOCK_S = 30.0
CLOCK_SAMPLES = 5
#: One ops call's bound (beyond its poll), and the pause after a failed one.
CALL_S = 5.0
RETRY_S = 2.0


def observe(sb: Sandbox) -> Any:
    """The ttrpc server's ``observe`` hook for *sb*'s Task service."""
    tracer = sb.tracing.tracer

    def hook(request: Request, message: Any, ctx: CallContext) -> contextlib.AbstractContextManager[Any]:
        if not tracer.on:
            return contextlib.nullcontext()
        parent = next((v for k, v in ctx.metadata if k.lower() == "traceparent"), None)
        attrs = {"rpc.system": "ttrpc", "rpc.service": request.service,
                 "rpc.method": request.method, "keel.sandbox.id": sb.id,
                 "keel.container.id": getattr(message, "id", ""),
                 "keel.exec.id": getattr(message, "exec_id", ""),
                 "keel.backend": sb.config.backend}
        return tracer.span(f"Task.{request.method}", attrs, parent=parent)

    return hook


def guest_boot(sb: Sandbox, vm: dict[str, Any], hello: Any) -> None:
    """Spans of a VM's boot from the agent's Hello: the guest kernel until
    the agent process ran, then the agent until it answered (durations from
    the guest's own clocks, placed on ours by the answer's time: no offset
    needed).  Not on the process backend, whose "kernel" is the host's."""
    up, kernel = float(hello.agent_uptime_s), float(hello.kernel_uptime_at_start_s)
    if sb.config.backend != "qemu" or "template" in vm or not (0 < up < 3600 and 0 < kernel < 3600):
        return  # a clone's kernel booted with its template; an older agent sends zeros
    tracer, now = sb.tracing.tracer, time.time_ns()
    agent_start = now - int(up * 1e9)
    tracer.record("guest kernel boot", agent_start - int(kernel * 1e9), agent_start)
    tracer.record("guest agent start", agent_start, now)


async def set_ratio(sb: Sandbox, ratio: float) -> str:
    """Set *sb*'s sampling ratio in the shim and tell the agent; persisted.
    Returns "" or why the agent could not be told (the pump tells it later)."""
    sb.tracing.set_ratio(ratio)
    sb.trace_ratio = ratio
    sb.persist()
    log.info("sandbox %s: tracing %s", sb.id, f"on, ratio {ratio:g}" if ratio else "off")
    sb.span_pump.kick(now=True)
    if sb.ops is None or sb.ops_frozen:
        return "" if sb.ops is None else "the agent will be told after the shim upgrade"
    try:
        await ops_call(sb.ops, lambda s: s.set_tracing(ops_pb.SetTracingRequest(ratio=ratio)),
                       CALL_S)
    except KeelError as exc:
        return f"the agent was not told: {exc}"
    sb.span_pump.told(ratio > 0)
    return ""


class SpanPump:
    """Takes the agent's spans while tracing is on (see the module docstring)."""

    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: The guest clock's lead over ours (ns), from the best answer seen.
        self.offset_ns = 0
        self._best_rtt_ns = 0
        self._window_at = -CLOCK_S  # monotonic time the last measurement began
        #: What the agent was last told (None: nothing; it follows sampled calls then).
        self._told: bool | None = None
        self._refused = 0
        self._agent_dropped = 0

    def kick(self, now: bool = False) -> None:
        """Start the pump; *now*: wake it at once (the ratio changed)."""
        if now:
            self._wake.set()
        if self._task is None or self._task.done():
            self._task = self._sb.tasks.create_task(self._run(), name=f"span-pump-{self._sb.id}",
                                                   context=detached())

    def told(self, on: bool) -> None:
        self._told = on

    async def drain(self, timeout: float = 1.0) -> None:
        """Take what the agent still holds (its sandbox is about to stop), within *timeout*."""
        sb = self._sb
        if sb.tracing.ratio <= 0 or sb.ops is None or sb.ops_frozen:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._take()  # an immediate answer
        except (KeelError, TimeoutError) as exc:
            log.debug("sandbox %s: the agent's last spans: %s", sb.id, exc)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        sb = self._sb
        while True:
            # Wait first: a new sandbox's first Task calls are served without
            # our ops calls beside them (a kick from set_ratio does not wait).
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PUMP_S):
                        await self._wake.wait()
            self._wake.clear()
            on = sb.tracing.ratio > 0
            if sb.ops is not None and not sb.ops_frozen:
                try:
                    # The agent follows sampled calls unless told off: tell it
                    # only what differs from what it was told (or its default).
                    if self._told != on and (self._told is not None or not on):
                        await self._tell(on)
                    if time.monotonic() - self._window_at >= CLOCK_S:
                        await self._measure()
                    await self._take(LONG_POLL_MS if on else 0)
                except KeelError as exc:
                    log.debug("sandbox %s: taking the agent's spans: %s", sb.id, exc)
                    await asyncio.sleep(RETRY_S)
                    continue
            if not on and (self._told is False or sb.ops is None):
                self._task = None
                return  # off, and the agent's last spans taken

    async def _tell(self, on: bool) -> None:
        assert self._sb.ops is not None
        with untraced():
            await ops_call(self._sb.ops, lambda s: s.set_tracing(
                ops_pb.SetTracingRequest(ratio=1.0 if on else 0.0)), CALL_S)
        self._told = on

    async def _take(self, wait_ms: int = 0) -> None:
        """Take what the agent holds; with *wait_ms*, wait that long for a
        first span (a long poll: its answer tells nothing of the clock)."""
        sb = self._sb
        assert sb.ops is not None
        while True:
            t0 = time.time_ns()
            with untraced():  # our own calls are nobody's children
                req = ops_pb.TakeSpansRequest(max_spans=TAKE, wait_ms=wait_ms)
                resp = await ops_call(sb.ops, lambda s: s.take_spans(req),  # noqa: B023
                                      CALL_S + wait_ms / 1000)
            t1 = time.time_ns()
            if not wait_ms:
                self._clock(resp.now_unix_nano, t0, t1)
            wait_ms = 0
            if resp.dropped > self._agent_dropped:
                sb.tracing.dropped_elsewhere += resp.dropped - self._agent_dropped
            self._agent_dropped = resp.dropped
            for data in resp.spans[:TAKE]:
                try:
                    span = span_from_wire(data, "keel-agent", self.offset_ns)
                except SpanError as exc:
                    self._refused += 1
                    sb.tracing.dropped_elsewhere += 1
                    if self._refused == 1 or self._refused % 1000 == 0:
                        log.warning("sandbox %s: refused a span from the agent: %s"
                                    " (%d refused so far)", sb.id, exc, self._refused)
                    continue
                span.attributes.setdefault("keel.sandbox.id", sb.id)
                sb.tracing.ingest(span)
            if len(resp.spans) < TAKE:
                return

    async def _measure(self) -> None:
        """Measure the guest clock's offset afresh: a few immediate answers."""
        self._window_at, self._best_rtt_ns = time.monotonic(), 0
        for _ in range(CLOCK_SAMPLES):
            await self._take()

    def _clock(self, agent_now: int, t0: int, t1: int) -> None:
        """Take the offset from the answer with the shortest round trip of
        the current measurement (the tightest bound); an offset within half
        the round trip is noise, not skew."""
        rtt = t1 - t0
        if not agent_now or rtt <= 0 or (self._best_rtt_ns and rtt >= self._best_rtt_ns):
            return
        self._best_rtt_ns = rtt
        offset = agent_now - (t0 + t1) // 2
        self.offset_ns = offset if abs(offset) > rtt // 2 else 0


#: Spans a follower may lag behind before the oldest are dropped for it.
FOLLOW_QUEUE = 1024


async def follow(sb: Sandbox, stop: asyncio.Event) -> Any:
    """Yield SpanData for each of *sb*'s spans as it ends, until *stop*."""
    queue: asyncio.Queue[Any] = asyncio.Queue(FOLLOW_QUEUE)

    def put(span: Any) -> None:
        if queue.full():
            queue.get_nowait()  # a slow follower loses the oldest, never the exporter
        queue.put_nowait(span)

    unfollow = sb.tracing.follow(put)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            got = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({got, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if got not in done:
                got.cancel()
                return
            yield span_to_wire(got.result(), ops_pb.SpanData)
    finally:
        unfollow()
        stopped.cancel()
