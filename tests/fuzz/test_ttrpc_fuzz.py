"""Fuzzing the ttrpc server and the strict protobuf validator.

The server runs on its own event loop in a thread, listening on a real unix
socket; each example talks to it over plain blocking sockets.  Whatever
arrives, the server must not crash or log a failure, every frame with a
well-formed header gets the status containerd would give (or nothing, for
non-request types), and a valid request on a fresh connection is answered.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from betterproto.lib.google.protobuf import StringValue
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shim.ttrpc import CallContext, Method, TtrpcServer, check_message, parse_strict
from shim.ttrpc._frames import HEADER_SIZE, decode_header, encode_frame
from shim.ttrpc._messages import KeyValue, Request, Response, Status
from tests.prereq import require_module

SVC = "fuzz.v1.Svc"
IO_TIMEOUT_S = 10.0  # a bound for failures, never waited out when things work
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ServerThread:
    """A TtrpcServer on its own loop; records anything logged at ERROR or above."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failures: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="ttrpc-fuzz")

    async def _echo(self, req: StringValue, ctx: CallContext) -> StringValue:
        return StringValue(value=f"echo:{req.value}")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(lambda loop, ctx: self.failures.append(str(ctx)))
        self._stop = asyncio.Event()
        server = TtrpcServer()
        server.register(SVC, {"Echo": Method(StringValue, self._echo)})
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(self.path))
            listener.listen(64)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(server.serve(listener))
                self._ready.set()
                await self._stop.wait()
                await server.aclose()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(IO_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(IO_TIMEOUT_S)
        assert not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class _FailureLog(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("ttrpc") / "fuzz.sock") as thread:
        handler = _FailureLog(thread.failures)
        logging.getLogger("keel.shim.ttrpc").addHandler(handler)
        try:
            yield thread
        finally:
            logging.getLogger("keel.shim.ttrpc").removeHandler(handler)
    assert thread.failures == []


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(IO_TIMEOUT_S)
    sock.connect(str(path))
    return sock


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, Response]:
    header = decode_header(read_exactly(sock, HEADER_SIZE))
    assert header.type == 2
    return header.stream_id, parse_strict(Response, read_exactly(sock, header.length))


def echo_body(value: str) -> bytes:
    return bytes(Request(service=SVC, method="Echo", payload=bytes(StringValue(value))))


def assert_still_serving(thread: ServerThread) -> None:
    with connect(thread.path) as sock:
        sock.sendall(encode_frame(1, 1, echo_body("alive")))
        stream_id, response = read_response(sock)
    assert (stream_id, response.payload) == (1, bytes(StringValue("echo:alive")))
    assert thread.alive and thread.failures == []


# -- strategies: frames with well-formed headers and what the server must say -------------


@dataclass(frozen=True)
class Case:
    body: bytes
    frame_type: int = 1
    even: bool = False
    codes: frozenset[int] = frozenset()  # acceptable status codes; empty = no answer at all
    echo: str | None = None  # for a valid call: the expected payload


text = st.text(max_size=12)
metadata = st.lists(st.builds(KeyValue, key=text, value=text), max_size=3)


def _request(method: str, payload: bytes, service: str = SVC, **kw: object) -> bytes:
    return bytes(Request(service=service, method=method, payload=payload, **kw))  # type: ignore[arg-type]


valid = st.builds(lambda v, md: Case(_request("Echo", bytes(StringValue(v)), metadata=md),
                                     codes=frozenset({0}), echo=f"echo:{v}"), text, metadata)
unknown_service = st.builds(lambda s: Case(_request("Echo", b"", service=s), codes=frozenset({12})),
                            text.filter(lambda s: s != SVC))
unknown_method = st.builds(lambda m: Case(_request(m, b""), codes=frozenset({12})),
                           text.filter(lambda m: m != "Echo"))
bad_payload = st.builds(lambda v: Case(_request("Echo", bytes(StringValue(v))[:-1]),  # cut short
                                       codes=frozenset({13})),
                        st.text(min_size=2, max_size=12))


@st.composite
def truncated_envelope(draw: st.DrawFn) -> Case:
    """A valid envelope cut strictly inside its last field: never decodable."""
    good = _request(draw(text), draw(st.binary(max_size=20)), service=draw(text))
    last = bytes(KeyValue(key=draw(st.text(min_size=1, max_size=8))))  # a metadata entry
    full = good + b"\x2a" + bytes([len(last)]) + last
    cut = draw(st.integers(len(good) + 1, len(full) - 1))
    return Case(full[:cut], codes=frozenset({3}))


wrong_wire_type = st.sampled_from([
    "0801",  # service as a varint
    "1001",  # method as a varint
    "1d00000000",  # payload as fixed32
    "220100",  # timeout_nano length-delimited
    "2a020801",  # metadata key as a varint
    "2a03120161ff",  # then a truncated tag
    "0a01ff",  # service not UTF-8
]).map(lambda h: Case(bytes.fromhex(h), codes=frozenset({3})))
random_body = st.binary(max_size=64).map(lambda b: Case(b, codes=frozenset({3, 12})))
other_type = st.builds(lambda t, b: Case(b, frame_type=t),
                       st.integers(0, 255).filter(lambda t: t != 1), st.binary(max_size=64))
cases = st.one_of(valid, unknown_service, unknown_method, bad_payload, truncated_envelope(),
                  wrong_wire_type, random_body, other_type)
even = st.one_of(valid, unknown_method, random_body).map(
    lambda c: Case(c.body, even=True, codes=frozenset({3})))


@FUZZ
@given(st.lists(st.one_of(cases, even), min_size=1, max_size=8), st.integers(0, 255))
def test_framed_garbage_gets_the_right_answers(server: ServerThread, batch: list[Case], flags: int) -> None:
    expected: dict[int, Case] = {}
    stream = b""
    for i, case in enumerate(batch):
        stream_id = 2 * i + (2 if case.even else 1)
        stream += encode_frame(stream_id, case.frame_type, case.body, flags)
        if case.codes:
            expected[stream_id] = case
    sentinel = 2 * len(batch) + 101
    with connect(server.path) as sock:
        sock.sendall(stream + encode_frame(sentinel, 1, echo_body("end")))
        while (got := read_response(sock))[0] != sentinel:
            stream_id, response = got
            case = expected.pop(stream_id)  # KeyError: an answer nobody should get, or a repeat
            assert response.status.code in case.codes, (case, response)
            if case.echo is not None:
                assert response.payload == bytes(StringValue(case.echo))
    assert expected == {}
    assert_still_serving(server)


@FUZZ
@given(st.binary(max_size=3000), st.booleans())
def test_random_streams_never_hurt_the_server(server: ServerThread, data: bytes, with_header: bool) -> None:
    if with_header:  # a header promising more than ever comes, then hang up
        data = struct.pack(">IIBB", len(data) + 50, 1, 1, 0) + data
    with connect(server.path) as sock:
        sock.sendall(data)
    assert_still_serving(server)


# -- the validator on its own ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([Request, Response, Status, KeyValue]))
def test_validator_rejects_or_parses_cleanly(data: bytes, schema: type) -> None:
    try:
        check_message(data, schema)
    except ValueError:
        event("rejected")
        return
    event("accepted")
    parsed = parse_strict(schema, data)
    assert bytes(type(parsed)().parse(bytes(parsed))) == bytes(parsed)  # re-encodes and re-parses


def _upb_request_class() -> type:
    """ttrpc's Request envelope for the official protobuf runtime (the oracle)."""
    descriptor_pb2 = require_module("google.protobuf.descriptor_pb2",
                                    "pip install protobuf (the oracle of these tests)")
    from google.protobuf import descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="ttrpc_fuzz.proto", package="fuzz", syntax="proto3")
    kv = proto.message_type.add(name="KeyValue")
    kv.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    kv.field.add(name="value", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    req = proto.message_type.add(name="Request")
    req.field.add(name="service", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    req.field.add(name="method", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    req.field.add(name="payload", number=3, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    req.field.add(name="timeout_nano", number=4, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    req.field.add(name="metadata", number=5, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                  type_name=".fuzz.KeyValue")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fuzz.Request"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_validator_accepts_only_what_protobuf_accepts(data: st.DataObject) -> None:
    """Ours is at most as lenient as the official runtime, and agrees on values."""
    upb_request = _upb_request_class()
    seed = bytes(Request(service=data.draw(text), method=data.draw(text),
                         payload=data.draw(st.binary(max_size=8)),
                         timeout_nano=data.draw(st.integers(-(2**63), 2**63 - 1)),
                         metadata=data.draw(metadata)))
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(0, 3))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    blob = bytes(mutated)[: data.draw(st.integers(0, len(mutated)))] + data.draw(st.binary(max_size=4))
    try:
        ours = parse_strict(Request, blob)
    except ValueError:
        event("rejected")
        return
    event("accepted")
    theirs = upb_request()
    theirs.ParseFromString(blob)  # raises DecodeError if we were too lenient
    assert (ours.service, ours.method, ours.payload, ours.timeout_nano) == (
        theirs.service, theirs.method, theirs.payload, theirs.timeout_nano)
    assert [(kv.key, kv.value) for kv in ours.metadata] == [(kv.key, kv.value) for kv in theirs.metadata]
