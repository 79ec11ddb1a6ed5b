"""TtrpcServer against real unix sockets: containerd's error table and the 4 MiB limit.

Raw frames are written by hand (``RawPeer``) so every row of containerd's
error table (research/containerd-shim.md section 1.4) is checked on the wire.
Concurrency and listeners are in test_ttrpc_server_connections.py, the
hand-off (freeze, thaw, adopt, release) in test_ttrpc_server_handoff.py.
"""

from __future__ import annotations

import logging
import os

import pytest
from betterproto.lib.google.protobuf import BytesValue, Int64Value, StringValue

from shim.ttrpc import PeerCred, TtrpcServer
from shim.ttrpc._frames import (
    HEADER_SIZE,
    MAX_BODY,
    Header,
    decode_header,
    encode_header,
)
from shim.ttrpc._messages import KeyValue, Response
from tests.unit.ttrpc_harness import (
    RawPeer,
    Service,
    oneshot,
    request_body,
)

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
