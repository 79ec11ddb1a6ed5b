"""ttrpc v1.1 framing, as containerd 1.6 (ttrpc v1.1.1) puts it on the wire.

A connection is a plain ``SOCK_STREAM`` unix socket: no preface, no
handshake, no keepalive.  It carries *frames*, each a 10-byte header
followed by a body::

    offset size field      notes
    0      4    length     uint32 big-endian, body bytes only (not the header)
    4      4    stream_id  uint32 big-endian; odd for client-initiated calls
    8      1    type       1 = Request, 2 = Response; other types are ignored
    9      1    flags      reserved: sent as 0, ignored on receive

The largest body is ``MAX_BODY`` = 4 MiB = 4194304 bytes, inclusive.  A
receiver that sees a larger ``length`` reads and drops the whole body and
then reports it (a server answers code 8 ResourceExhausted on that stream
id); the connection stays usable.

A Request body is the ``Request`` envelope (service, method, payload,
timeout_nano, metadata); a Response body is the ``Response`` envelope
(status, payload), where success leaves ``status`` unset, so a successful
call returning ``google.protobuf.Empty`` is a frame with length 0.  The
envelopes are in :mod:`shim.ttrpc._messages`.  A call's response reuses the
request's stream id; responses may come back in any order.

This module knows bytes only.  :class:`FrameDecoder` is an incremental
parser whose buffer is owned by one connection, so a connection can stop
between two frames and hand the bytes it read but did not parse to
somebody else (:meth:`FrameDecoder.unparsed`).
"""

from __future__ import annotations

import dataclasses
import enum
import struct

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
#: Largest accepted body, inclusive (ttrpc ``messageLengthMax = 4 << 20``).
MAX_BODY = 4 << 20
STREAM_ID_MAX = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    length: int
    stream_id: int
    type: int
    flags: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame whose body is at most ``MAX_BODY`` bytes."""

    header: Header
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Oversized:
    """A frame whose body was larger than allowed; the body has been dropped."""

    header: Header


def oversized_message(length: int) -> str:
    """The status message ttrpc v1.1 sends for an oversized body."""
    return f"message length {length} exceed maximum message size of {MAX_BODY}"


def encode_header(header: Header) -> bytes:
    return HEADER.pack(header.length, header.stream_id, header.type, header.flags)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse the first ``HEADER_SIZE`` bytes of *data*; raises ValueError if shorter."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"ttrpc header needs {HEADER_SIZE} bytes, got {len(data)}")
    return Header(*HEADER.unpack_from(data))


def encode_frame(stream_id: int, frame_type: int, body: bytes, flags: int = 0) -> bytes:
    """Header plus body.  The caller checks ``len(body) <= MAX_BODY`` first."""
    return HEADER.pack(len(body), stream_id, frame_type, flags) + body


class FrameDecoder:
    """Incremental frame parser over a buffer that it owns.

    ``feed()`` appends bytes; ``next_event()`` returns the next
    :class:`Frame` or :class:`Oversized`, or None when more bytes are
    needed.  It never looks past the frame it returns, so a caller that
    stops calling ``next_event()`` is at a frame boundary and
    ``unparsed()`` is exactly the byte stream from the next frame on --
    unless ``discarding`` is true, when part of an oversized body has
    already been dropped and the caller must feed more bytes first.
    """

    __slots__ = ("_buf", "_max_body", "_discard_header", "_discard_left")

    def __init__(self, initial: bytes = b"", max_body: int = MAX_BODY) -> None:
        self._buf = bytearray(initial)
        self._max_body = max_body
        self._discard_header: Header | None = None
        self._discard_left = 0

    @property
    def discarding(self) -> bool:
        """True while the body of an oversized frame is being dropped."""
        return self._discard_header is not None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def unparsed(self) -> bytes:
        """Bytes received but not yet returned as a frame; raises if mid-discard."""
        if self.discarding:
            raise ValueError("decoder is inside an oversized frame, not at a frame boundary")
        return bytes(self._buf)

    def next_event(self) -> Frame | Oversized | None:
        if self._discard_header is not None:
            return self._discard()
        if len(self._buf) < HEADER_SIZE:
            return None
        header = decode_header(self._buf)
        if header.length > self._max_body:
            del self._buf[:HEADER_SIZE]
            self._discard_header, self._discard_left = header, header.length
            return self._discard()
        end = HEADER_SIZE + header.length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]  # bytearray drops a prefix in amortised O(1)
        return Frame(header, body)

    def _discard(self) -> Oversized | None:
        n = min(self._discard_left, len(self._buf))
        del self._buf[:n]
        self._discard_left -= n
        if self._discard_left:
            return None
        header, self._discard_header = self._discard_header, None
        assert header is not None
        return Oversized(header)
