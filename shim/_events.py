"""Task events to containerd: ttrpc Events/Forward on $TTRPC_ADDRESS.

Events are queued in order and sent by one task, so containerd sees
create -> start -> exit -> delete in the order they happened.  The event
connection is ours (containerd never relies on it), so it is simply
re-dialled when containerd restarts; an event that keeps failing is
retried with backoff and finally dropped with a log line, as the runc shim
does.  ``type_url`` is the bare message name (research: containerd-shim.md
section 4.1).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import betterproto
from betterproto.lib.google.protobuf import Any as PbAny
from betterproto.lib.google.protobuf import Empty

from keel import retry
from shim._pb.containerd.services.events.ttrpc import v1 as events_pb

log = logging.getLogger("keel.shim.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
RETRIES = 5


class EventPublisher:
    def __init__(self, address: str, namespace: str) -> None:
        self._address = address.removeprefix("unix://")
        self._namespace = namespace
        self._queue: asyncio.Queue[tuple[str, betterproto.Message]] = asyncio.Queue()
        self._client: Any = None

    def publish_nowait(self, topic: str, event: betterproto.Message) -> None:
        """Queue *event*; never blocks, never raises."""
        self._queue.put_nowait((topic, event))

    async def _forward(self, topic: str, event: betterproto.Message) -> None:
        from shim.ttrpc import TtrpcClient

        if self._client is None:
            self._client = await TtrpcClient.connect(self._address)
        envelope = events_pb.Envelope(
            timestamp=datetime.datetime.now(datetime.UTC),
            namespace=self._namespace,
            topic=topic,
            event=PbAny(type_url=type_url(event), value=bytes(event)),
        )
        await self._client.call(SERVICE, "Forward", events_pb.ForwardRequest(envelope=envelope),
                                Empty, timeout=5.0,
                                metadata=(("containerd-namespace-ttrpc", self._namespace),))

    async def run(self) -> None:
        """Send queued events forever (until cancelled)."""
        while True:
            topic, event = await self._queue.get()
            try:
                async for attempt in retry.retrying(first=0.05, cap=1.0, attempts=RETRIES + 1):
                    with attempt:
                        try:
                            await self._forward(topic, event)
                        except Exception:  # any failure: drop the connection, retry
                            await self._reset()
                            raise
            except Exception as exc:
                log.warning("dropping event %s after %d attempts: %s", topic, RETRIES + 1, exc)
            self._queue.task_done()

    async def drain(self, timeout: float) -> None:
        """Wait until every queued event was sent or dropped."""
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            log.warning("%d events not sent before exit", self._queue.qsize())

    async def _reset(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except Exception:
                pass

    async def aclose(self) -> None:
        await self._reset()


#: Message names betterproto changed (its class names are CamelCase words).
_RENAMED = {"TaskOom": "TaskOOM", "TaskIo": "TaskIO"}


def type_url(event: object) -> str:
    """``containerd.events.<Name>``, or ``keel.events.v1.<Name>`` for Keel's own events."""
    if type(event).__module__.startswith("shim._pb.keel.events.v1"):
        return f"keel.events.v1.{type(event).__name__}"
    return f"containerd.events.{proto_name(event)}"


def proto_name(event: object) -> str:
    """The proto message name of an event (containerd resolves ``type_url`` by it)."""
    name = type(event).__name__
    return _RENAMED.get(name, name)
