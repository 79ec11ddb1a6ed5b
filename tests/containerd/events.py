"""Subscribe to containerd's event service (gRPC ``containerd.services.events.v1.Events/Subscribe``)
and keep every envelope, decoded: what an event consumer on the node sees.

``ctr events`` cannot show Keel's own events (it only decodes types it was
built with), so tests that check them subscribe here.  The reply is the same
``Envelope`` message as the ttrpc Forward the shim sends (fields 1-4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import betterproto
from grpclib.client import Channel
from grpclib.const import Cardinality

from shim._pb.containerd.services.events.ttrpc.v1 import Envelope
from tests.containerd.daemon import Containerd

SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"


@dataclasses.dataclass(eq=False, repr=False)
class SubscribeRequest(betterproto.Message):
    """containerd.services.events.v1.SubscribeRequest: filters, e.g. ``topic=="/tasks/exit"``."""

    filters: list[str] = betterproto.string_field(1)


class EventWatch:
    """``with EventWatch(ctd, 'topic~="/keel/"') as watch:`` ... ``watch.wait_for(...)``."""

    def __init__(self, ctd: Containerd, *filters: str) -> None:
        self._ctd, self._filters = ctd, list(filters)
        self.envelopes: list[Envelope] = []
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> EventWatch:
        self._thread.start()
        if not self._subscribed.wait(10):
            raise AssertionError(f"could not subscribe to containerd's events: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ or the assertions
            self.error = exc
            self._subscribed.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()  # type: ignore[assignment]
        channel = Channel(path=str(self._ctd.paths.grpc_socket))
        try:
            async with channel.request(SUBSCRIBE, Cardinality.UNARY_STREAM, SubscribeRequest,
                                       Envelope, metadata={"containerd-namespace":
                                                           self._ctd.namespace}) as stream:
                await stream.send_message(SubscribeRequest(filters=self._filters), end=True)
                # containerd sends no headers before the first event: give it a
                # moment to register the subscription (what comes later is seen).
                await asyncio.sleep(0.5)
                self._subscribed.set()
                async for envelope in stream:
                    with self._lock:
                        self.envelopes.append(envelope)
        except asyncio.CancelledError:
            pass
        finally:
            channel.close()

    def of(self, topic: str, message: type[betterproto.Message]) -> list[Any]:
        """The events of *topic* received so far, decoded as *message*."""
        with self._lock:
            return [message().parse(e.event.value) for e in self.envelopes if e.topic == topic]

    def wait_for(self, topic: str, message: type[betterproto.Message],
                 until: Callable[[list[Any]], bool], timeout: float = 30.0) -> list[Any]:
        """Wait until *until* holds for the decoded events of *topic*; them."""
        from tests.containerd import wait_for

        wait_for(lambda: until(self.of(topic, message)), timeout, f"events on {topic}")
        return self.of(topic, message)
