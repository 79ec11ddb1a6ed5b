"""TtrpcServer against real unix sockets: error rows, concurrency, limits, hand-off.

Raw frames are written by hand (``RawPeer``) so every row of containerd's
error table (research/containerd-shim.md section 1.4) is checked on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from betterproto.lib.google.protobuf import BytesValue, Empty, Int64Value, StringValue

from keel import errors
from shim.ttrpc import CallContext, Method, PeerCred, Phase, TtrpcClient, TtrpcServer
from shim.ttrpc._frames import (
    HEADER_SIZE,
    MAX_BODY,
    Header,
    decode_header,
    encode_frame,
    encode_header,
)
from shim.ttrpc._messages import KeyValue, Request, Response
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


# -- containerd's error table ------------------------------------------------------------


@pytest.mark.parametrize("body, code, message", [
    (request_body("Echo", service="nope.Svc"), 12, "service nope.Svc"),
    (request_body("Nope"), 12, "method Nope"),
    (bytes.fromhex("0a05616263"), 3, "unmarshal request error: "),
    (bytes.fromhex("0801"), 3, "unmarshal request error: "),
    (request_body("Echo", bytes.fromhex("0a05ab")), 13, "ttrpc: error unmarshalling payload: "),
    (request_body("Echo", bytes.fromhex("08")), 13, "ttrpc: error unmarshalling payload: "),
    (request_body("Bad"), 13, "ttrpc: error marshaling payload: "),
])
def test_error_rows(body: bytes, code: int, message: str) -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        response = await peer.call(5, body)
        assert response.status.code == code
        assert response.status.message.startswith(message)
        assert response.payload == b""
        assert (await peer.call(7, request_body("Echo", bytes(StringValue("ok"))))).status.code == 0

    oneshot(check)


def test_even_stream_id() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        response = await peer.call(2, request_body("Empty"))
        assert (response.status.code, response.status.message) == (
            3, "StreamID must be odd for client initiated streams")
        assert service.contexts == []  # the handler never ran

    oneshot(check)


def test_success_omits_status_and_empty_is_length_zero() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        peer.send(1, request_body("Empty"))
        header = decode_header(await peer.reader.readexactly(HEADER_SIZE))
        assert header == Header(0, 1, 2, 0)
        response = await peer.call(3, request_body("Echo", bytes(StringValue("x"))))
        assert bytes(response) == bytes(Response(payload=bytes(StringValue("S:x"))))

    oneshot(check)


@pytest.mark.parametrize("name, code", [
    ("NotFound", 5), ("AlreadyExists", 6), ("InvalidArgument", 3), ("FailedPrecondition", 9),
    ("Unavailable", 14), ("Unimplemented", 12), ("Internal", 13), ("PermissionDenied", 7),
])
def test_keel_errors_map_to_their_codes(name: str, code: int) -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        response = await peer.call(1, request_body("Fail", bytes(StringValue(name))))
        assert (response.status.code, response.status.message) == (code, f"{name} happened")

    oneshot(check)


def test_foreign_exception_is_unknown_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        with caplog.at_level(logging.ERROR, logger="keel.shim.ttrpc"):
            response = await peer.call(1, request_body("Fail", bytes(StringValue("plain"))))
        assert (response.status.code, response.status.message) == (2, "disk on fire")
        assert "Traceback" not in response.status.message
        assert any(r.exc_info for r in caplog.records)  # the traceback went to the log

    oneshot(check)


def test_timeout_nano_is_a_deadline() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        body = request_body("Block", bytes(StringValue("never")), timeout_nano=20_000_000)
        response = await peer.call(1, body)
        assert (response.status.code, response.status.message) == (4, "context deadline exceeded")
        await service.was_cancelled("never").wait()

    oneshot(check)


def test_context_carries_metadata_timeout_and_peer() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        body = request_body("Empty", timeout_nano=5_000_000_000, metadata=[
            KeyValue("containerd-namespace-ttrpc", "default"), KeyValue("k", "1"), KeyValue("k", "2")])
        assert (await peer.call(9, body)).status.code == 0
        (ctx,) = service.contexts
        assert ctx.stream_id == 9 and ctx.timeout == 5.0
        assert ctx.metadata == (("containerd-namespace-ttrpc", "default"), ("k", "1"), ("k", "2"))
        assert ctx.peer_cred == PeerCred(os.getpid(), os.geteuid(), os.getegid())

    oneshot(check)


def test_other_frame_types_and_flags_are_ignored() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        for frame_type in (0, 2, 3, 255):
            peer.send(frame_type * 2 + 1, request_body("Empty"), frame_type=frame_type)
        peer.send(1001, request_body("Echo", bytes(StringValue("f"))), flags=0xFF)
        header, response = await peer.recv()  # had any been served, it would come first
        assert header.stream_id == 1001 and response.payload == bytes(StringValue("S:f"))
        assert service.contexts == []

    oneshot(check)


# -- the 4 MiB limit ---------------------------------------------------------------------


def sized_body(total: int) -> bytes:
    """A Size request whose Request envelope is exactly *total* bytes."""
    base = len(request_body("Size", bytes(BytesValue(b"x" * (total - 100)))))
    body = request_body("Size", bytes(BytesValue(b"x" * (total - 100 - (base - total)))))
    assert len(body) == total
    return body


def test_body_of_exactly_4_mib_is_served() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        response = await peer.call(1, sized_body(MAX_BODY))
        assert response.status.code == 0
        assert Int64Value().parse(response.payload).value > MAX_BODY - 100

    oneshot(check)


@pytest.mark.parametrize("pieces", [1, 7])
def test_oversized_body_is_refused_and_connection_survives(pieces: int) -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        body = sized_body(MAX_BODY + 1)
        peer.writer.write(encode_header(Header(len(body), 3, 1, 0)))
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):  # in pieces, each flushed before the next
            peer.writer.write(body[i : i + step])
            await peer.writer.drain()
        header, response = await peer.recv()
        assert header.stream_id == 3
        assert (response.status.code, response.status.message) == (
            8, "message length 4194305 exceed maximum message size of 4194304")
        assert (await peer.call(5, request_body("Echo", bytes(StringValue("after"))))).status.code == 0

    oneshot(check)


# -- concurrency -------------------------------------------------------------------------


def test_requests_are_served_concurrently() -> None:
    """Wait-before-Start: a request blocks until a later one on the same connection runs."""

    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        peer.send(1, request_body("Block", bytes(StringValue("start"))))
        peer.send(3, request_body("Release", bytes(StringValue("start"))))
        got = {}
        for _ in range(2):
            header, response = await peer.recv()
            got[header.stream_id] = response
        assert got[3].status.code == 0
        assert got[1].payload == bytes(StringValue("S:released start"))

    oneshot(check)


def test_peer_close_cancels_handlers_and_server_carries_on() -> None:
    lost: list[object] = []

    async def main() -> None:
        service = Service()
        server = make_server(service, on_connection_lost=lost.append)
        async with serving(server):
            peer = await RawPeer.attach(server)
            peer.send(1, request_body("Block", bytes(StringValue("orphan"))))
            await service.has_started("orphan").wait()
            await peer.close()
            await service.was_cancelled("orphan").wait()
            other = await RawPeer.attach(server)
            assert (await other.call(1, request_body("Empty"))).status.code == 0
            assert len(server.connections()) == 1
            await other.close()
        assert len(lost) == 1

    run(main)


# -- listener and credentials ---------------------------------------------------------------


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_serves_a_listener_and_checks_credentials(tmp_path: Path) -> None:
    async def main() -> None:
        seen: list[PeerCred] = []

        def authorize(cred: PeerCred) -> bool:
            seen.append(cred)
            return len(seen) > 1  # refuse the first peer only

        service = Service()
        server = make_server(service, authorize=authorize)
        with listen(tmp_path / "s.sock") as listener:
            async with serving(server, listener):
                reader, writer = await asyncio.open_unix_connection(tmp_path / "s.sock")
                assert await reader.read() == b""  # refused: closed at accept
                writer.close()
                client = await TtrpcClient.connect(f"unix://{tmp_path / 's.sock'}")
                assert (await client.call(SVC, "Echo", StringValue("hi"), StringValue)).value == "S:hi"
                await client.aclose()
            assert listener.fileno() != -1  # the listener stays the caller's
        assert seen[0] == PeerCred(os.getpid(), os.geteuid(), os.getegid())

    run(main)


def test_default_authorizer_is_same_user() -> None:
    from shim.ttrpc import same_user

    assert same_user(PeerCred(1, os.geteuid(), os.getegid()))
    assert not same_user(PeerCred(1, os.geteuid() + 1, os.getegid()))
    assert not same_user(PeerCred(1, os.geteuid(), os.getegid() + 1))


# -- freeze / thaw / adopt / release ----------------------------------------------------------


def test_freeze_holds_answers_and_thaw_sends_them_once() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        frame7 = encode_frame(7, 1, request_body("Empty"))
        peer.send(1, request_body("Block", bytes(StringValue("g"))))
        peer.send(3, request_body("Empty"))
        peer.writer.write(frame7[:-2])  # same write: read together with the frames above
        assert (await peer.recv())[0].stream_id == 3
        (conn,) = server.connections()
        (frozen,) = await server.freeze_all()
        os.close(frozen.fd)
        assert conn.frozen and frozen.unparsed == frame7[:-2]
        assert [p.stream_id for p in frozen.pending] == [1]
        service.gate("g").set()
        await service.has_finished("g").wait()  # its answer is held, not sent
        assert conn.inflight == 1
        peer.writer.write(frame7[-2:])
        server.thaw_all()
        got = sorted([(await peer.recv())[0].stream_id, (await peer.recv())[0].stream_id])
        assert got == [1, 7]
        assert (await peer.call(9, request_body("Empty"))).status.code == 0
        assert conn.inflight == 0

    oneshot(check)


def test_adopt_feeds_pending_then_unparsed_then_socket() -> None:
    async def main() -> None:
        service = Service("B")
        server = make_server(service)
        mine, theirs = socket.socketpair()
        unparsed = (encode_frame(5, 1, request_body("Echo", bytes(StringValue("u1"))))
                    + encode_frame(7, 1, request_body("Echo", bytes(StringValue("u2")))))
        split = encode_frame(9, 1, request_body("Echo", bytes(StringValue("u3"))))
        pending = [(1, request_body("Echo", bytes(StringValue("p1")))),
                   (3, request_body("Echo", bytes(StringValue("p2"))))]
        mine.sendall(split[6:])  # the rest of a frame whose start was already read
        conn = server.adopt_connection(theirs, unparsed + split[:6], pending)
        assert conn.phase is Phase.STARTING
        async with serving(server):
            peer = RawPeer(*await asyncio.open_unix_connection(sock=mine))
            got = [(h.stream_id, StringValue().parse(r.payload).value)
                   for h, r in [await peer.recv() for _ in range(5)]]
            assert got == [(1, "B:p1"), (3, "B:p2"), (5, "B:u1"), (7, "B:u2"), (9, "B:u3")]
            await peer.close()

    run(main)


def test_freeze_waits_for_an_oversized_body_to_end() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        frame13 = encode_frame(13, 1, request_body("Empty"))
        peer.send(1, request_body("Empty"))
        peer.writer.write(encode_header(Header(MAX_BODY + 10, 11, 1, 0)) + b"z" * 100)
        assert (await peer.recv())[0].stream_id == 1  # so the oversized start was read too
        (conn,) = server.connections()
        async with asyncio.TaskGroup() as tg:
            freezing = tg.create_task(conn.freeze())
            peer.writer.write(b"z" * (MAX_BODY + 10 - 100) + frame13)
            header, response = await peer.recv()
            assert (header.stream_id, response.status.code) == (11, 8)
        frozen = freezing.result()
        os.close(frozen.fd)
        assert frame13.startswith(frozen.unparsed)
        conn.thaw()
        header, response = await peer.recv()
        assert (header.stream_id, response.status.code) == (13, 0)

    oneshot(check)


def test_release_closes_only_its_own_fd() -> None:
    async def main() -> None:
        a_service, b_service = Service("A"), Service("B")
        a, b = make_server(a_service), make_server(b_service)
        async with serving(a), serving(b):
            peer = await RawPeer.attach(a)
            assert (await peer.call(1, request_body("Echo", bytes(StringValue("x"))))).payload == bytes(
                StringValue("A:x"))
            peer.send(3, request_body("Block", bytes(StringValue("w"))))
            await a_service.has_started("w").wait()
            (frozen,) = await a.freeze_all()
            a.release_all()
            await a_service.was_cancelled("w").wait()  # cancelled, unanswered
            assert a.connections() == []
            b.adopt_connection(socket.socket(fileno=frozen.fd), frozen.unparsed, frozen.pending)
            b_service.gate("w").set()
            header, response = await peer.recv()
            assert header.stream_id == 3 and response.payload == bytes(StringValue("B:released w"))
            assert (await peer.call(5, request_body("Echo", bytes(StringValue("y"))))).payload == bytes(
                StringValue("B:y"))
            await peer.close()

    run(main)


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll *condition* on every loop turn (bounded by the test's deadline)."""
    while not condition():  # noqa: ASYNC110 -- a poll bounded by DEADLINE_S, not a timed wait
        await asyncio.sleep(0)


def test_handoff_under_pipelined_load() -> None:
    """2000 pipelined calls and a long Wait; A hands the connection to B midway.

    A answers 500 echoes, then its handlers stall (like Waits), so the
    freeze finds many requests pending; B must answer those, the Wait and
    the rest.  Every call gets exactly one answer with its own payload, and
    none is duplicated (the client counts answers to unknown stream ids).
    """
    async def main() -> None:
        a_service, b_service = Service("A"), Service("B")
        b_service.gate("exit").set()  # B's Wait returns at once; A's never does
        a_service.stall_after = 500
        halfway = asyncio.Event()
        a_service.on_echo = lambda n: halfway.set() if n == 500 else None
        a, b = make_server(a_service), make_server(b_service)
        records = []

        async def hand_off() -> None:
            await halfway.wait()
            (frozen,) = await a.freeze_all()
            records.append(frozen)
            b.adopt_connection(socket.socket(fileno=frozen.fd), frozen.unparsed, frozen.pending)
            a.release_all()

        mine, theirs = socket.socketpair()
        pad = "p" * 200  # 2000 frames overflow the socket buffer and asyncio's read size
        async with serving(a), serving(b), asyncio.TaskGroup() as tg:
            a.adopt_connection(theirs)
            client = await TtrpcClient.from_socket(mine)
            wait = tg.create_task(client.call(SVC, "Block", StringValue("exit"), StringValue))
            tg.create_task(hand_off())
            results = await asyncio.gather(*(
                client.call(SVC, "Echo", StringValue(f"{i}|{pad}"), StringValue) for i in range(2000)))
            assert (await wait).value == "B:released exit"
            assert [r.value for r in results] == [
                f"{'A' if i < 500 else 'B'}:{i}|{pad}" for i in range(2000)]
            assert client.statistics().unmatched_responses == 0
            (record,) = records
            assert record.pending[0].stream_id == 1 and len(record.pending) > 1
            print(f"handed over {len(record.pending)} pending, {len(record.unparsed)} unparsed bytes")
            assert a.connections() == [] and len(b.connections()) == 1
            await client.aclose()

    run(main)


def test_handoff_of_a_burst_mid_chunk() -> None:
    """The same, with all 2000 requests in one write: A is frozen mid-chunk.

    asyncio reads 256 KiB at a time, so A's buffer then ends inside a frame
    which it must hand over as unparsed bytes; read-but-unanswered requests
    go over as pending.  A last request proves nothing arrives twice.
    """
    async def main() -> None:
        a_service, b_service = Service("A"), Service("B")
        a_service.stall_after = 500
        halfway = asyncio.Event()
        a_service.on_echo = lambda n: halfway.set() if n == 500 else None
        a, b = make_server(a_service), make_server(b_service)
        records = []

        async def hand_off() -> None:
            await halfway.wait()
            (frozen,) = await a.freeze_all()
            records.append(frozen)
            b.adopt_connection(socket.socket(fileno=frozen.fd), frozen.unparsed, frozen.pending)
            a.release_all()

        pad = "q" * 217
        ids = [2 * i + 1 for i in range(2000)]
        burst = b"".join(encode_frame(sid, 1, request_body("Echo", bytes(StringValue(f"{sid}|{pad}"))))
                         for sid in ids)
        async with serving(a), serving(b), asyncio.TaskGroup() as tg:
            peer = await RawPeer.attach(a)
            tg.create_task(hand_off())
            peer.writer.write(burst)
            answers: dict[int, str] = {}
            for _ in ids:
                header, response = await peer.recv()
                assert header.stream_id not in answers
                answers[header.stream_id] = StringValue().parse(response.payload).value
            assert answers == {sid: f"{'A' if sid <= 999 else 'B'}:{sid}|{pad}" for sid in ids}
            assert (await peer.call(9999, request_body("Empty"))).status.code == 0
            (record,) = records
            assert len(record.pending) > 1
            # Almost always part of a frame; empty only if a read ended on a frame boundary.
            print(f"handed over {len(record.pending)} pending, {len(record.unparsed)} unparsed bytes")
            assert not record.unparsed or burst.find(record.unparsed) > 0
            await peer.close()

    run(main)


def test_freeze_all_stops_accepting_until_thaw(tmp_path: Path) -> None:
    async def main() -> None:
        server = make_server(Service())
        with listen(tmp_path / "s.sock") as listener:
            async with serving(server, listener):
                first = await TtrpcClient.connect(tmp_path / "s.sock")
                assert (await first.call(SVC, "Echo", StringValue("a"), StringValue)).value == "S:a"
                await first.aclose()
                await wait_for(lambda: server.connections() == [])
                assert server.statistics().accepting
                assert await server.freeze_all() == []
                assert not server.statistics().accepting
                client = await TtrpcClient.connect(tmp_path / "s.sock")  # waits in the backlog
                call = asyncio.ensure_future(client.call(SVC, "Echo", StringValue("z"), StringValue))
                await wait_for(lambda: client.statistics().inflight == 1)
                assert server.connections() == []
                server.thaw_all()
                assert (await call).value == "S:z"
                await client.aclose()

    run(main)


def test_illegal_transitions_are_refused() -> None:
    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        (conn,) = server.connections()
        with pytest.raises(errors.FailedPrecondition):
            conn.thaw()
        with pytest.raises(errors.FailedPrecondition):
            conn.release()
        frozen = await conn.freeze()
        os.close(frozen.fd)
        with pytest.raises(errors.FailedPrecondition):
            await conn.freeze()
        conn.thaw()
        assert (await peer.call(1, request_body("Empty"))).status.code == 0
        with pytest.raises(errors.AlreadyExists):
            server.register(SVC, {})

    oneshot(check)
