"""TtrpcClient against a hand-written peer (frames by hand) and a real TtrpcServer."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from betterproto.lib.google.protobuf import Any as PbAny
from betterproto.lib.google.protobuf import Empty, StringValue

from keel import errors
from keel.errors import Code
from shim.ttrpc import CallContext, Method, TtrpcClient, TtrpcServer
from shim.ttrpc._frames import HEADER_SIZE, MAX_BODY, Header, decode_header, encode_frame
from shim.ttrpc._messages import Request, Response, Status, error_body
from shim.ttrpc._wire import parse_strict

DEADLINE_S = 30.0
T = TypeVar("T")


class RawServer:
    """The server end of a connection, frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def recv(self) -> tuple[Header, Request]:
        header = decode_header(await self.reader.readexactly(HEADER_SIZE))
        body = await self.reader.readexactly(header.length)
        assert header.type == 1 and header.flags == 0
        return header, parse_strict(Request, body)

    def reply(self, stream_id: int, body: bytes, frame_type: int = 2) -> None:
        self.writer.write(encode_frame(stream_id, frame_type, body))

    def ok(self, stream_id: int, message: StringValue | Empty) -> None:
        self.reply(stream_id, bytes(Response(payload=bytes(message))))


def with_peer(check: Callable[[TtrpcClient, RawServer], Awaitable[None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(DEADLINE_S):
            mine, theirs = socket.socketpair()
            client = await TtrpcClient.from_socket(mine)
            server = RawServer(*await asyncio.open_unix_connection(sock=theirs))
            try:
                await check(client, server)
            finally:
                await client.aclose()
                server.writer.close()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def calling(coro: Awaitable[T]) -> AsyncIterator[asyncio.Future[T]]:
    """Run a call alongside the block; its error, if any, is raised when the block ends."""
    task = asyncio.ensure_future(coro)
    try:
        yield task
    except BaseException:
        task.cancel()
        raise
    await task


def test_stream_ids_and_request_fields() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        for expected_id in (1, 3, 5):
            async with calling(client.call("a.B", "M", StringValue("x"), StringValue, timeout=2.0,
                                           metadata=[("k", "v"), ("k", "w")])) as call:
                header, request = await server.recv()
                server.ok(header.stream_id, StringValue("y"))
            assert header.stream_id == expected_id
            assert (request.service, request.method) == ("a.B", "M")
            assert request.payload == bytes(StringValue("x"))
            assert 1.5e9 < request.timeout_nano <= 2e9
            assert [(kv.key, kv.value) for kv in request.metadata] == [("k", "v"), ("k", "w")]
            assert call.result() == StringValue("y")

    with_peer(check)


def test_no_timeout_sends_zero() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        async with calling(client.call("a.B", "M", Empty(), Empty)) as call:
            header, request = await server.recv()
            server.reply(header.stream_id, b"")  # success with Empty: a 0-length body
        assert request.timeout_nano == 0 and request.metadata == []
        assert call.result() == Empty()

    with_peer(check)


def test_concurrent_calls_are_multiplexed() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        async with asyncio.TaskGroup() as tg:
            calls = [tg.create_task(client.call("a.B", "M", StringValue(str(i)), StringValue))
                     for i in range(5)]
            received = [await server.recv() for _ in calls]
            for header, request in reversed(received):  # answer in reverse order
                value = StringValue().parse(request.payload).value
                server.ok(header.stream_id, StringValue(f"re:{value}"))
        assert [c.result().value for c in calls] == [f"re:{i}" for i in range(5)]
        assert sorted(h.stream_id for h, _ in received) == [1, 3, 5, 7, 9]

    with_peer(check)


@pytest.mark.parametrize("code, cls", [
    (3, errors.InvalidArgument), (5, errors.NotFound), (6, errors.AlreadyExists),
    (9, errors.FailedPrecondition), (14, errors.Unavailable), (12, errors.Unimplemented),
    (13, errors.Internal), (4, errors.DeadlineExceeded), (1, errors.Cancelled),
    (7, errors.PermissionDenied), (8, errors.ResourceExhausted),
])
def test_status_becomes_keel_error(code: int, cls: type[errors.KeelError]) -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        with pytest.raises(cls, match="^it went wrong$") as info:
            async with calling(client.call("a.B", "M", Empty(), Empty)):
                header, _ = await server.recv()
                server.reply(header.stream_id, error_body(code, "it went wrong"))
        assert info.value.code == code

    with_peer(check)


@pytest.mark.parametrize("code, expected", [(10, Code.ABORTED), (2, Code.UNKNOWN), (99, Code.UNKNOWN)])
def test_other_codes_are_plain_keel_errors(code: int, expected: Code) -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        with pytest.raises(errors.KeelError) as info:
            async with calling(client.call("a.B", "M", Empty(), Empty)):
                header, _ = await server.recv()
                server.reply(header.stream_id, error_body(code, "odd"))
        assert type(info.value) is errors.KeelError and info.value.code == expected

    with_peer(check)


def test_explicit_ok_status_is_success() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        async with calling(client.call("a.B", "M", Empty(), StringValue)) as call:
            header, _ = await server.recv()
            server.reply(header.stream_id, bytes(Response(status=Status(code=0), payload=b"\x0a\x01z")))
        assert call.result() == StringValue("z")

    with_peer(check)


def test_unknown_stream_ids_and_other_types_are_ignored() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        async with calling(client.call("a.B", "M", Empty(), StringValue)) as call:
            header, _ = await server.recv()
            server.ok(77, StringValue("stray"))
            server.reply(header.stream_id, b"\x12\x03\x0a\x01n", frame_type=1)  # not a response
            server.reply(header.stream_id, b"\x12\x03\x0a\x01n", frame_type=3)
            server.ok(header.stream_id, StringValue("mine"))
        assert call.result() == StringValue("mine")
        assert client.statistics().unmatched_responses == 1

    with_peer(check)


@pytest.mark.parametrize("body, message", [
    (b"\x0a\x05ab", "ttrpc: error unmarshalling response: "),
    (b"\x12\x02\x0a\x05", "ttrpc: error unmarshalling payload: "),
])
def test_undecodable_response_is_internal(body: bytes, message: str) -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        with pytest.raises(errors.Internal, match=f"^{message}"):
            async with calling(client.call("a.B", "M", Empty(), StringValue)):
                header, _ = await server.recv()
                server.reply(header.stream_id, body)
        async with calling(client.call("a.B", "M", Empty(), StringValue)) as call:
            header, _ = await server.recv()
            server.ok(header.stream_id, StringValue("fine"))
        assert call.result() == StringValue("fine")

    with_peer(check)


def test_oversized_response_fails_only_that_call() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        with pytest.raises(errors.ResourceExhausted, match="message length 4194305 exceed"):
            async with calling(client.call("a.B", "M", Empty(), Empty)):
                header, _ = await server.recv()
                server.reply(header.stream_id, b"\x00" * (MAX_BODY + 1))
        async with calling(client.call("a.B", "M", Empty(), Empty)) as call:
            header, _ = await server.recv()
            server.reply(header.stream_id, b"")
        assert call.result() == Empty()

    with_peer(check)


def test_connection_loss_fails_pending_calls() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        first = asyncio.ensure_future(client.call("a.B", "M", Empty(), Empty))
        second = asyncio.ensure_future(client.call("a.B", "M", Empty(), Empty))
        await server.recv()
        await server.recv()
        server.writer.close()
        for call in (first, second):
            with pytest.raises(errors.Unavailable, match="^ttrpc: closed$"):
                await call
        assert client.closed
        with pytest.raises(errors.Unavailable, match="^ttrpc: closed$"):
            await client.call("a.B", "M", Empty(), Empty)

    with_peer(check)


def test_timeout_is_deadline_exceeded_and_late_answer_dropped() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        with pytest.raises(errors.DeadlineExceeded):
            await client.call("a.B", "M", Empty(), Empty, timeout=0.02)
        header, request = await server.recv()
        assert 0 < request.timeout_nano <= 20_000_000
        assert client.statistics().inflight == 0
        server.reply(header.stream_id, b"")  # too late
        async with calling(client.call("a.B", "M", Empty(), Empty)) as call:
            header2, _ = await server.recv()
            server.reply(header2.stream_id, b"")
        assert call.result() == Empty() and header2.stream_id == 3
        assert client.statistics().unmatched_responses == 1

    with_peer(check)


def test_oversized_request_is_refused_before_sending() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        with pytest.raises(errors.ResourceExhausted):
            await client.call("a.B", "M", StringValue("x" * MAX_BODY), Empty)
        async with calling(client.call("a.B", "M", Empty(), Empty)) as call:
            header, _ = await server.recv()  # the first thing on the wire
            server.reply(header.stream_id, b"")
        assert header.stream_id == 1 and call.result() == Empty()

    with_peer(check)


def test_aclose_fails_pending_calls() -> None:
    async def check(client: TtrpcClient, server: RawServer) -> None:
        pending = asyncio.ensure_future(client.call("a.B", "M", Empty(), Empty))
        await server.recv()
        await client.aclose()
        with pytest.raises(errors.Unavailable):
            await pending

    with_peer(check)


def test_forward_to_a_real_server_over_a_path(tmp_path: Path) -> None:
    """The shim's event path: Events/Forward with namespace metadata, Empty back."""
    from shim._pb.containerd.services.events.ttrpc import v1 as events_pb

    service = "containerd.services.events.ttrpc.v1.Events"
    forwarded: list[tuple[events_pb.ForwardRequest, CallContext]] = []

    async def forward(req: events_pb.ForwardRequest, ctx: CallContext) -> Empty:
        forwarded.append((req, ctx))
        if not req.envelope.topic.startswith("/"):
            raise errors.InvalidArgument(f"envelope topic {req.envelope.topic!r}: must start with '/'")
        return Empty()

    async def main() -> None:
        server = TtrpcServer()
        server.register(service, {"Forward": Method(events_pb.ForwardRequest, forward)})
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(tmp_path / "ctd.sock"))
            listener.listen()
            async with asyncio.timeout(DEADLINE_S), asyncio.TaskGroup() as tg:
                tg.create_task(server.serve(listener))
                client = await TtrpcClient.connect(f"unix://{tmp_path / 'ctd.sock'}")
                envelope = events_pb.Envelope(
                    timestamp=datetime.datetime.now(datetime.UTC), namespace="default",
                    topic="/tasks/oom", event=PbAny(type_url="containerd.events.TaskOOM", value=b"\x0a\x01c"))
                md = (("containerd-namespace-ttrpc", "default"),)
                await client.call(service, "Forward", events_pb.ForwardRequest(envelope), Empty,
                                  timeout=5.0, metadata=md)
                envelope.topic = "tasks/oom"
                with pytest.raises(errors.InvalidArgument, match="must start with"):
                    await client.call(service, "Forward", events_pb.ForwardRequest(envelope), Empty)
                with pytest.raises(errors.Unimplemented, match="^method Publish$"):
                    await client.call(service, "Publish", Empty(), Empty)
                await client.aclose()
                await server.aclose()
        req, ctx = forwarded[0]
        assert req.envelope.event.type_url == "containerd.events.TaskOOM"
        assert ctx.metadata == md and ctx.timeout == 5.0

    asyncio.run(main())
