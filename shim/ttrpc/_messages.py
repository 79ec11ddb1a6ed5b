"""The ttrpc envelope messages, hand-written as betterproto dataclasses.

ttrpc declares these in Go (``types.go``) without a proto package, and
they are never wrapped in ``Any``::

    message Request  { string service = 1; string method = 2; bytes payload = 3;
                       int64 timeout_nano = 4; repeated KeyValue metadata = 5; }
    message KeyValue { string key = 1; string value = 2; }
    message Response { google.rpc.Status status = 1; bytes payload = 2; }
    // google.rpc.Status
    message Status   { int32 code = 1; string message = 2;
                       repeated google.protobuf.Any details = 3; }

betterproto leaves an unset ``status`` off the wire, which is what a
success must look like.  Parse untrusted bytes with
:func:`shim.ttrpc._wire.parse_strict`, never ``Message.parse``.
"""

from __future__ import annotations

from dataclasses import dataclass

import betterproto
from betterproto.lib.google.protobuf import Any as PbAny


@dataclass(eq=False, repr=False)
class KeyValue(betterproto.Message):
    key: str = betterproto.string_field(1)
    value: str = betterproto.string_field(2)


@dataclass(eq=False, repr=False)
class Request(betterproto.Message):
    service: str = betterproto.string_field(1)
    method: str = betterproto.string_field(2)
    payload: bytes = betterproto.bytes_field(3)
    timeout_nano: int = betterproto.int64_field(4)
    metadata: list[KeyValue] = betterproto.message_field(5)


@dataclass(eq=False, repr=False)
class Status(betterproto.Message):
    code: int = betterproto.int32_field(1)
    message: str = betterproto.string_field(2)
    details: list[PbAny] = betterproto.message_field(3)


@dataclass(eq=False, repr=False)
class Response(betterproto.Message):
    status: Status = betterproto.message_field(1)
    payload: bytes = betterproto.bytes_field(2)


def error_body(code: int, message: str) -> bytes:
    """A Response body carrying only a status (the payload stays empty)."""
    return bytes(Response(status=Status(code=int(code), message=message)))
