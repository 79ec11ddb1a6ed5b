"""A TtrpcServer to test against real sockets: handlers with gates, a raw peer
that writes frames by hand, two servers that hand a connection over, and the
loop runner with its deadline (shared by the test_ttrpc_server*.py modules)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from betterproto.lib.google.protobuf import BytesValue, Empty, Int64Value, StringValue

from keel import errors
from shim.ttrpc import CallContext, FrozenConnection, Method, TtrpcServer
from shim.ttrpc._frames import (
    HEADER_SIZE,
    Header,
    decode_header,
    encode_frame,
)
from shim.ttrpc._messages import Request, Response
from shim.ttrpc._wire import parse_strict

SVC = "test.v1.Svc"
DEADLINE_S = 30.0


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(DEADLINE_S):
            await main()

    asyncio.run(bounded())


class Service:
    """Handlers for the tests; ``gates`` let one request wait for another."""

    def __init__(self, name: str = "S") -> None:
        self.name = name
        self.gates: dict[str, asyncio.Event] = {}
        self.cancelled: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.contexts: list[CallContext] = []
        self.echoes = 0
        self.on_echo: Callable[[int], None] = lambda n: None
        self.stall_after = 2**31  # echoes past this many wait on gate "stall"

    def gate(self, key: str) -> asyncio.Event:
        return self.gates.setdefault(key, asyncio.Event())

    def was_cancelled(self, key: str) -> asyncio.Event:
        return self.cancelled.setdefault(key, asyncio.Event())

    def has_started(self, key: str) -> asyncio.Event:
        return self.started.setdefault(key, asyncio.Event())

    def has_finished(self, key: str) -> asyncio.Event:
        return self.finished.setdefault(key, asyncio.Event())

    async def echo(self, req: StringValue, ctx: CallContext) -> StringValue:
        self.echoes += 1
        self.on_echo(self.echoes)
        if self.echoes > self.stall_after:
            await self.gate("stall").wait()
        return StringValue(value=f"{self.name}:{req.value}")

    async def empty(self, req: Empty, ctx: CallContext) -> Empty:
        self.contexts.append(ctx)
        return Empty()

    async def block(self, req: StringValue, ctx: CallContext) -> StringValue:
        self.has_started(req.value).set()
        try:
            await self.gate(req.value).wait()
        except asyncio.CancelledError:
            self.was_cancelled(req.value).set()
            raise
        self.has_finished(req.value).set()
        return StringValue(value=f"{self.name}:released {req.value}")

    async def release(self, req: StringValue, ctx: CallContext) -> Empty:
        self.gate(req.value).set()
        return Empty()

    async def fail(self, req: StringValue, ctx: CallContext) -> Empty:
        if req.value == "plain":
            raise RuntimeError("disk on fire")
        raise getattr(errors, req.value)(f"{req.value} happened")

    async def size(self, req: BytesValue, ctx: CallContext) -> Int64Value:
        return Int64Value(value=len(req.value))

    async def bad(self, req: Empty, ctx: CallContext) -> Empty:
        return "not a message"  # type: ignore[return-value]

    def methods(self) -> dict[str, Method]:
        return {
            "Echo": Method(StringValue, self.echo),
            "Empty": Method(Empty, self.empty),
            "Block": Method(StringValue, self.block),
            "Release": Method(StringValue, self.release),
            "Fail": Method(StringValue, self.fail),
            "Size": Method(BytesValue, self.size),
            "Bad": Method(Empty, self.bad),
        }


def make_server(service: Service, **kwargs: object) -> TtrpcServer:
    server = TtrpcServer(**kwargs)  # type: ignore[arg-type]
    server.register(SVC, service.methods())
    return server


@contextlib.asynccontextmanager
async def serving(server: TtrpcServer, listener: socket.socket | None = None) -> AsyncIterator[None]:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve(listener), name="test server")
        try:
            yield
        finally:
            await server.aclose()


def request_body(method: str, payload: bytes = b"", service: str = SVC, **kw: object) -> bytes:
    return bytes(Request(service=service, method=method, payload=payload, **kw))  # type: ignore[arg-type]


class RawPeer:
    """The client end of a connection, frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def attach(cls, server: TtrpcServer) -> RawPeer:
        mine, theirs = socket.socketpair()
        server.adopt_connection(theirs)
        return cls(*await asyncio.open_unix_connection(sock=mine))

    def send(self, stream_id: int, body: bytes, frame_type: int = 1, flags: int = 0) -> None:
        self.writer.write(encode_frame(stream_id, frame_type, body, flags))

    async def recv(self) -> tuple[Header, Response]:
        header = decode_header(await self.reader.readexactly(HEADER_SIZE))
        body = await self.reader.readexactly(header.length)
        assert header.type == 2 and header.flags == 0
        return header, parse_strict(Response, body)

    async def call(self, stream_id: int, body: bytes) -> Response:
        self.send(stream_id, body)
        header, response = await self.recv()
        assert header.stream_id == stream_id
        return response

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Check = Callable[[RawPeer, Service, TtrpcServer], Awaitable[None]]


def oneshot(check: Check, **server_kw: object) -> None:
    async def main() -> None:
        service = Service()
        server = make_server(service, **server_kw)
        async with serving(server):
            peer = await RawPeer.attach(server)
            await check(peer, service, server)
            await peer.close()

    run(main)


class Handover:
    """Servers ``a`` and ``b`` (services "A" and "B"); once A has answered
    *at* echoes its echo handlers stall (like Waits), and :meth:`hand_off`
    then moves A's one connection to B: freeze, adopt, release.  What the
    freeze gave is kept in ``records``."""

    def __init__(self, at: int = 500) -> None:
        self.a_service, self.b_service = Service("A"), Service("B")
        self.a_service.stall_after = at
        self._reached = asyncio.Event()
        self.a_service.on_echo = lambda n: self._reached.set() if n == at else None
        self.a, self.b = make_server(self.a_service), make_server(self.b_service)
        self.records: list[FrozenConnection] = []

    async def hand_off(self) -> None:
        await self._reached.wait()
        (frozen,) = await self.a.freeze_all()
        self.records.append(frozen)
        self.b.adopt_connection(socket.socket(fileno=frozen.fd), frozen.unparsed, frozen.pending)
        self.a.release_all()


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll *condition* on every loop turn (bounded by the test's deadline)."""
    while not condition():  # noqa: ASYNC110 -- a poll bounded by DEADLINE_S, not a timed wait
        await asyncio.sleep(0)
