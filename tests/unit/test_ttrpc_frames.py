"""ttrpc framing, envelope messages and the strict protobuf validator."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import betterproto
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.ttrpc._frames import (
    HEADER_SIZE,
    MAX_BODY,
    Frame,
    FrameDecoder,
    FrameType,
    Header,
    Oversized,
    decode_header,
    encode_frame,
    encode_header,
    oversized_message,
)
from shim.ttrpc._messages import KeyValue, Request, Response, Status, error_body
from shim.ttrpc._wire import check_message, parse_strict

u32 = st.integers(0, 2**32 - 1)
u8 = st.integers(0, 255)

# -- framing -------------------------------------------------------------------------


@given(u32, u32, u8, u8)
def test_header_round_trip(length: int, stream_id: int, type_: int, flags: int) -> None:
    header = Header(length, stream_id, type_, flags)
    raw = encode_header(header)
    assert len(raw) == HEADER_SIZE == 10
    assert decode_header(raw) == header


def test_header_is_big_endian() -> None:
    assert encode_frame(3, FrameType.REQUEST, b"ab") == bytes.fromhex("00000002 00000003 01 00") + b"ab"


def test_short_header_is_an_error() -> None:
    with pytest.raises(ValueError):
        decode_header(b"\x00" * 9)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


frame_specs = st.lists(st.tuples(u32, u8, st.binary(max_size=300)), max_size=8)


@given(frame_specs, st.lists(st.integers(0, 3000), max_size=20), st.binary(max_size=HEADER_SIZE + 5))
def test_decoder_yields_frames_whatever_the_chunking(
    specs: list[tuple[int, int, bytes]], cuts: list[int], tail: bytes
) -> None:
    """Any split of the stream gives the same frames; the rest stays unparsed."""
    frames = [encode_frame(sid, t, body) for sid, t, body in specs]
    partial = encode_frame(1, 1, tail)[: HEADER_SIZE + len(tail) - 1]  # one byte short
    decoder = FrameDecoder()
    got: list[Frame | Oversized] = []
    for chunk in _chunks(b"".join(frames) + partial, cuts):
        decoder.feed(chunk)
        while (event := decoder.next_event()) is not None:
            got.append(event)
    assert got == [Frame(Header(len(b), sid, t, 0), b) for sid, t, b in specs]
    assert decoder.unparsed() == partial


@given(st.lists(st.integers(1, 600_000), min_size=1, max_size=12))
def test_oversized_body_is_dropped_in_pieces(pieces: list[int]) -> None:
    """A body of MAX_BODY + 1 is discarded however it arrives; the next frame parses."""
    length = MAX_BODY + 1
    decoder = FrameDecoder()
    decoder.feed(encode_header(Header(length, 7, FrameType.REQUEST)))
    assert decoder.next_event() is None and decoder.discarding
    with pytest.raises(ValueError):
        decoder.unparsed()
    sent, events = 0, []
    for size in [*pieces, length]:
        n = min(size, length - sent)
        decoder.feed(b"\xab" * n)
        sent += n
        while (event := decoder.next_event()) is not None:
            events.append(event)
        if sent == length:
            break
    decoder.feed(encode_frame(9, FrameType.REQUEST, b"next"))
    events.append(decoder.next_event())
    assert events == [Oversized(Header(length, 7, 1, 0)), Frame(Header(4, 9, 1, 0), b"next")]
    assert decoder.unparsed() == b"" and decoder.buffered == 0


def test_max_body_is_inclusive() -> None:
    decoder = FrameDecoder(encode_frame(1, 1, b"x" * MAX_BODY))
    event = decoder.next_event()
    assert isinstance(event, Frame) and len(event.body) == MAX_BODY == 4194304
    assert oversized_message(4194305) == "message length 4194305 exceed maximum message size of 4194304"


def test_decoder_takes_initial_bytes_first() -> None:
    decoder = FrameDecoder(encode_frame(1, 1, b"a")[:5])
    decoder.feed(encode_frame(1, 1, b"a")[5:])
    assert decoder.next_event() == Frame(Header(1, 1, 1, 0), b"a")


# -- envelopes -----------------------------------------------------------------------


def test_success_response_has_no_status() -> None:
    assert bytes(Response()) == b""  # an Empty result is a length-0 frame
    assert bytes(Response(payload=b"\x08\x01")) == b"\x12\x02\x08\x01"


def test_error_response_encoding() -> None:
    body = error_body(12, "method Nope")
    assert body == b"\x0a\x0f\x08\x0c\x12\x0bmethod Nope"
    assert parse_strict(Response, body).status.code == 12


def test_captured_connect_response_parses() -> None:
    """research: a Connect response from containerd-shim-runc-v2, minus its header."""
    response = parse_strict(Response, bytes.fromhex("120608a95f10c05f"))
    assert response.status.code == 0
    assert response.payload == bytes.fromhex("08a95f10c05f")


def test_request_round_trip() -> None:
    request = Request(service="containerd.task.v2.Task", method="Wait", payload=b"\x0a\x01x",
                      timeout_nano=-1, metadata=[KeyValue("k", "v"), KeyValue("k", "w")])
    again = parse_strict(Request, bytes(request))
    assert again.to_dict() == request.to_dict()


# -- strict validation ---------------------------------------------------------------


class Color(betterproto.Enum):
    RED = 0
    BLUE = 1


@dataclass(eq=False, repr=False)
class Inner(betterproto.Message):
    name: str = betterproto.string_field(1)
    n: int = betterproto.sint64_field(2)


@dataclass(eq=False, repr=False)
class Everything(betterproto.Message):
    i32: int = betterproto.int32_field(1)
    u64: int = betterproto.uint64_field(2)
    s32: int = betterproto.sint32_field(3)
    flag: bool = betterproto.bool_field(4)
    f32: float = betterproto.float_field(5)
    f64: float = betterproto.double_field(6)
    fx32: int = betterproto.fixed32_field(7)
    sfx64: int = betterproto.sfixed64_field(8)
    text: str = betterproto.string_field(9)
    raw: bytes = betterproto.bytes_field(10)
    inner: Inner = betterproto.message_field(11)
    inners: list[Inner] = betterproto.message_field(12)
    nums: list[int] = betterproto.int64_field(13)
    doubles: list[float] = betterproto.double_field(14)
    table: dict[str, Inner] = betterproto.map_field(15, betterproto.TYPE_STRING, betterproto.TYPE_MESSAGE)
    when: datetime.datetime = betterproto.message_field(16)
    maybe: int | None = betterproto.message_field(17, wraps=betterproto.TYPE_INT32)
    color: Color = betterproto.enum_field(18)
    status: Status = betterproto.message_field(19)


inners = st.builds(Inner, name=st.text(max_size=10), n=st.integers(-(2**63), 2**63 - 1))
everything = st.builds(
    Everything,
    i32=st.integers(-(2**31), 2**31 - 1),
    u64=st.integers(0, 2**64 - 1),
    s32=st.integers(-(2**31), 2**31 - 1),
    flag=st.booleans(),
    f32=st.just(1.5),
    f64=st.floats(allow_nan=False),
    fx32=st.integers(0, 2**32 - 1),
    sfx64=st.integers(-(2**63), 2**63 - 1),
    text=st.text(max_size=20),
    raw=st.binary(max_size=20),
    inner=inners,
    inners=st.lists(inners, max_size=3),
    nums=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    doubles=st.lists(st.floats(allow_nan=False), max_size=3),
    table=st.dictionaries(st.text(max_size=5), inners, max_size=3),
    when=st.datetimes(min_value=datetime.datetime(1971, 1, 1), timezones=st.just(datetime.UTC)),
    maybe=st.none() | st.integers(-(2**31), 2**31 - 1),
    color=st.sampled_from([Color.RED, Color.BLUE]),
)


@given(everything)
def test_valid_encodings_pass_and_round_trip(msg: Everything) -> None:
    data = bytes(msg)
    check_message(data, Everything)
    assert bytes(parse_strict(Everything, data)) == data


@given(everything, st.data())
def test_cut_inside_the_last_field_is_rejected(msg: Everything, data: st.DataObject) -> None:
    last = bytes(Everything(color=Color.BLUE))  # "900101"; a repeated scalar is legal
    full = bytes(msg) + last
    cut = data.draw(st.integers(len(full) - len(last) + 1, len(full) - 1))
    with pytest.raises(ValueError):
        check_message(full[:cut], Everything)


@pytest.mark.parametrize("data, why", [
    ("0a05616263", "length past the end"),
    ("1a80", "truncated length varint"),
    ("08" + "ff" * 10 + "01", "varint longer than 10 bytes"),
    ("08" + "ff" * 9 + "02", "varint over 64 bits"),
    ("0001", "field number 0"),
    ("808080801001", "field number 2**29, one past the largest"),
    ("a306a406", "group wire types, even on an unknown field"),
    ("0f", "wire type 7"),
    ("0a0101", "length-delimited where an int32 goes"),
    ("4801", "varint where a string goes"),
    ("4a01ff", "invalid UTF-8"),
    ("5a020a05", "nested message cut short"),
    ("62020801", "nested: varint in a string field"),
    ("6a020180", "packed varints cut short"),
    ("720401020304", "packed doubles not a multiple of 8 bytes"),
    ("7a021001", "map entry value (a message) as a varint"),
    ("82010110", "Timestamp.nanos without its varint"),
    ("8a0102", "wrapper cut short"),
    ("2d0000", "fixed32 cut short"),
    ("9a01021001", "Status.message as a varint"),
    ("9001ff", "enum: varint cut short"),
])
def test_malformed_is_rejected(data: str, why: str) -> None:
    with pytest.raises(ValueError):
        check_message(bytes.fromhex(data), Everything)


def test_unknown_fields_are_skipped_and_kept() -> None:
    unknown = bytes.fromhex("a806 05 b10601020304050607 08 b506aabbccdd ba0603616263")
    data = bytes(Everything(i32=5)) + unknown
    parsed = parse_strict(Everything, data)
    assert parsed.i32 == 5 and bytes(parsed) == data


def test_unpacked_and_packed_repeated_both_accepted() -> None:
    packed = bytes(Everything(nums=[1, 2, 300]))
    unpacked = bytes.fromhex("6801 6802 68ac02")
    assert parse_strict(Everything, packed).nums == parse_strict(Everything, unpacked).nums == [1, 2, 300]


def test_betterproto_alone_would_accept_garbage() -> None:
    """Why _wire exists: the silent acceptance the research found."""
    assert Request().parse(bytes.fromhex("0a05616263")).service == "abc"
    with pytest.raises(ValueError):
        parse_strict(Request, bytes.fromhex("0a05616263"))


def test_parse_strict_wraps_conversion_errors() -> None:
    huge = bytes.fromhex("8201 0a 08ffffffffffffff7f")  # Timestamp.seconds beyond datetime
    with pytest.raises(ValueError):
        parse_strict(Everything, huge)


def test_request_with_wrong_wire_types() -> None:
    for data in ("0801", "1a", "2001ff", "220100", "2a020801", "2a03120161ff"):
        with pytest.raises(ValueError):
            check_message(bytes.fromhex(data), Request)
