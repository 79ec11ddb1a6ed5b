"""A ttrpc v1.1 client on asyncio (unary calls, multiplexed on one connection).

Used by the shim to publish events to containerd
(``containerd.services.events.ttrpc.v1.Events/Forward``) and by tests to
drive the shim.  Like the Go client: stream ids are odd, from 1, step 2;
calls are pipelined; a response to an unknown stream id is dropped (and
counted); losing the connection fails every pending call with
``Unavailable("ttrpc: closed")``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Iterable
from typing import TypeVar

import betterproto

from keel.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable, from_code
from shim.ttrpc._frames import (
    MAX_BODY,
    STREAM_ID_MAX,
    FrameDecoder,
    FrameType,
    Oversized,
    encode_frame,
    oversized_message,
)
from shim.ttrpc._messages import KeyValue, Request, Response
from shim.ttrpc._wire import parse_strict

log = logging.getLogger("keel.shim.ttrpc")

R = TypeVar("R", bound=betterproto.Message)

CLOSED = "ttrpc: closed"


@dataclasses.dataclass(frozen=True, slots=True)
class ClientStatistics:
    inflight: int
    #: Responses whose stream id had no waiting call (late, duplicate or bogus).
    unmatched_responses: int


class _ClientProtocol(asyncio.Protocol):
    """Reads Response frames into the futures of the waiting calls."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: dict[int, asyncio.Future[bytes]] = {}
        self.unmatched = 0
        self.closed = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self._decoder = FrameDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        while (event := self._decoder.next_event()) is not None:
            header = event.header
            if header.type != FrameType.RESPONSE and not isinstance(event, Oversized):
                continue
            waiter = self.waiters.pop(header.stream_id, None)
            if waiter is None or waiter.done():
                self.unmatched += 1
                log.debug("ttrpc client: dropped response for unknown stream %d", header.stream_id)
            elif isinstance(event, Oversized):
                waiter.set_exception(ResourceExhausted(oversized_message(header.length)))
            else:
                waiter.set_result(event.body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.writable.set()  # wake writers; they see `closed`
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(Unavailable(CLOSED))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class TtrpcClient:
    """One ttrpc connection.  Make it with :meth:`connect` or :meth:`from_socket`."""

    def __init__(self, protocol: _ClientProtocol) -> None:
        self._proto = protocol
        self._next_id = 1

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> TtrpcClient:
        """Dial a unix socket path (a ``unix://`` prefix is accepted)."""
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_unix_connection(_ClientProtocol, os.fspath(path).removeprefix("unix://"))
        return cls(proto)

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> TtrpcClient:
        """Use an already connected stream socket (taking ownership of it)."""
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_unix_connection(_ClientProtocol, sock=sock)
        return cls(proto)

    @property
    def closed(self) -> bool:
        return self._proto.closed.is_set()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(len(self._proto.waiters), self._proto.unmatched)

    async def call(self, service: str, method: str, request: betterproto.Message,
                   response_cls: type[R],
                   timeout: float | None = None,  # noqa: ASYNC109 -- sent on the wire as timeout_nano
                   metadata: Iterable[tuple[str, str]] = ()) -> R:
        """Call ``service/method`` and return the parsed response.

        Raises the KeelError class of a non-OK status
        (``keel.errors.from_code``), DeadlineExceeded when *timeout*
        (seconds, also sent as timeout_nano) passes, Unavailable("ttrpc:
        closed") if the connection is or gets closed, ResourceExhausted for
        a request over 4 MiB, and Internal for an undecodable response.
        """
        body = bytes(Request(
            service=service, method=method, payload=bytes(request),
            timeout_nano=int(timeout * 1e9) if timeout is not None and timeout > 0 else 0,
            metadata=[KeyValue(key=k, value=v) for k, v in metadata],
        ))
        if len(body) > MAX_BODY:
            raise ResourceExhausted(oversized_message(len(body)))
        try:
            async with asyncio.timeout(timeout):
                raw = await self._roundtrip(body)
        except TimeoutError:
            raise DeadlineExceeded("context deadline exceeded") from None
        return _decode(raw, response_cls)

    async def _roundtrip(self, body: bytes) -> bytes:
        proto = self._proto
        while not proto.writable.is_set():  # back-pressure from the transport
            await proto.writable.wait()
        if proto.closed.is_set() or proto.transport is None:
            raise Unavailable(CLOSED)
        stream_id = self._next_id
        self._next_id = (self._next_id + 2) & STREAM_ID_MAX  # stays odd; wraps like Go's uint32
        waiter = asyncio.get_running_loop().create_future()
        proto.waiters[stream_id] = waiter
        try:
            proto.transport.write(encode_frame(stream_id, FrameType.REQUEST, body))
            return await waiter
        finally:
            if proto.waiters.get(stream_id) is waiter:
                del proto.waiters[stream_id]

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with Unavailable."""
        if self._proto.transport is not None:
            self._proto.transport.close()
            await self._proto.closed.wait()


def _decode(raw: bytes, response_cls: type[R]) -> R:
    try:
        response = parse_strict(Response, raw)
    except ValueError as exc:
        raise Internal(f"ttrpc: error unmarshalling response: {exc}") from exc
    if response.status.code != 0:
        raise from_code(response.status.code, response.status.message)
    try:
        return parse_strict(response_cls, response.payload)
    except ValueError as exc:
        raise Internal(f"ttrpc: error unmarshalling payload: {exc}") from exc
