"""Strict protobuf wire-format validation for betterproto messages.

betterproto 2.0.0b7 does not validate what it parses: a length running
past the end is cut short silently, and a varint where bytes are expected
is stored as an ``int`` that explodes much later.  Bytes from a peer go
through :func:`check_message` (or :func:`parse_strict`) first.

The rules, for any betterproto message class (read from the dataclass
field metadata betterproto attaches, ``FieldMetadata``):

* every tag, varint and length must be complete; varints are at most 10
  bytes and fit in 64 bits; field number 0 and numbers above 2**29-1 are
  errors;
* wire types 3 and 4 (proto2 groups) and 6, 7 are errors, even on unknown
  fields, because betterproto cannot skip them;
* a known field's wire type must suit its declared type; a repeated
  scalar field may also be packed (length-delimited, whole elements);
* strings are valid UTF-8; nested messages and map entries are checked
  recursively (at most ``MAX_DEPTH`` levels);
* unknown fields are skipped (betterproto keeps them for re-encoding).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from typing import TypeVar, cast

import betterproto
from betterproto.lib.google import protobuf as wkt

M = TypeVar("M", bound=betterproto.Message)

MAX_DEPTH = 100
FIELD_NUMBER_MAX = (1 << 29) - 1

WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_FIXED32 = 0, 1, 2, 5

_VARINT_TYPES = frozenset(betterproto.WIRE_VARINT_TYPES)
_FIXED32_TYPES = frozenset(betterproto.WIRE_FIXED_32_TYPES)
_FIXED64_TYPES = frozenset(betterproto.WIRE_FIXED_64_TYPES)
_NESTED_TYPES = frozenset({betterproto.TYPE_MESSAGE, betterproto.TYPE_MAP})

#: google.protobuf wrapper messages by the scalar type they wrap
#: (betterproto unwraps them to ``Optional[scalar]`` fields).
_WRAPPERS: dict[str, type[betterproto.Message]] = {
    betterproto.TYPE_BOOL: wkt.BoolValue,
    betterproto.TYPE_BYTES: wkt.BytesValue,
    betterproto.TYPE_DOUBLE: wkt.DoubleValue,
    betterproto.TYPE_FLOAT: wkt.FloatValue,
    betterproto.TYPE_ENUM: wkt.EnumValue,
    betterproto.TYPE_INT32: wkt.Int32Value,
    betterproto.TYPE_INT64: wkt.Int64Value,
    betterproto.TYPE_STRING: wkt.StringValue,
    betterproto.TYPE_UINT32: wkt.UInt32Value,
    betterproto.TYPE_UINT64: wkt.UInt64Value,
}


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    proto_type: str
    repeated: bool
    nested: type[betterproto.Message] | None


def check_message(data: bytes | bytearray | memoryview, schema: type[betterproto.Message]) -> None:
    """Raise ValueError unless *data* is a well-formed encoding of *schema*."""
    _check(memoryview(data).cast("B"), schema, 0)


def parse_strict(cls: type[M], data: bytes | bytearray | memoryview) -> M:
    """Validate *data* with :func:`check_message`, then parse it into a new *cls*.

    Raises ValueError for anything betterproto would misread or choke on
    (including values it cannot convert, such as an out-of-range Timestamp).
    """
    check_message(data, cls)
    try:
        return cls().parse(bytes(data))
    except Exception as exc:  # betterproto's conversions raise assorted types
        raise ValueError(f"{cls.__name__}: {exc}") from exc


def _check(buf: memoryview, schema: type[betterproto.Message], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"messages nested deeper than {MAX_DEPTH}")
    rules = _rules(schema)
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if not 0 < number <= FIELD_NUMBER_MAX:
            raise ValueError(f"{schema.__name__}: invalid field number {number}")
        start, pos = _skip(buf, pos, wire_type, number)
        if pos > end:
            raise ValueError(f"{schema.__name__}: field {number} truncated")
        rule = rules.get(number)
        if rule is not None:
            _check_field(buf[start:pos], rule, wire_type, depth)


def _skip(buf: memoryview, pos: int, wire_type: int, number: int) -> tuple[int, int]:
    """(start, end) of the value at *pos*; *end* may lie past the buffer."""
    if wire_type == WIRE_VARINT:
        return pos, _varint(buf, pos)[1]
    if wire_type == WIRE_FIXED64:
        return pos, pos + 8
    if wire_type == WIRE_FIXED32:
        return pos, pos + 4
    if wire_type == WIRE_LEN:
        length, pos = _varint(buf, pos)
        return pos, pos + length
    raise ValueError(f"field {number}: unsupported wire type {wire_type}")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Decode the varint at *pos*: (value, position after it)."""
    result = 0
    for i in range(10):
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if i == 9 and byte > 1:
                raise ValueError("varint overflows 64 bits")
            return result, pos
    raise ValueError("varint longer than 10 bytes")


def _check_field(value: memoryview, rule: _Rule, wire_type: int, depth: int) -> None:
    kind = rule.proto_type
    if kind in _VARINT_TYPES and wire_type == WIRE_VARINT:
        return
    if kind in _FIXED32_TYPES and wire_type == WIRE_FIXED32:
        return
    if kind in _FIXED64_TYPES and wire_type == WIRE_FIXED64:
        return
    if wire_type != WIRE_LEN:
        raise ValueError(f"field {rule.name}: wire type {wire_type} is not valid for {kind}")
    if kind == betterproto.TYPE_BYTES:
        return
    if kind == betterproto.TYPE_STRING:
        try:
            str(value, "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"field {rule.name}: invalid UTF-8: {exc}") from None
        return
    if kind in _NESTED_TYPES:
        assert rule.nested is not None
        _check(value, rule.nested, depth + 1)
        return
    if not rule.repeated:
        raise ValueError(f"field {rule.name}: wire type 2 is not valid for {kind}")
    _check_packed(value, rule)


def _check_packed(value: memoryview, rule: _Rule) -> None:
    """A packed repeated scalar: whole elements only."""
    size = 4 if rule.proto_type in _FIXED32_TYPES else 8 if rule.proto_type in _FIXED64_TYPES else 0
    if size:
        if len(value) % size:
            raise ValueError(f"field {rule.name}: packed {rule.proto_type} of {len(value)} bytes")
        return
    pos = 0
    while pos < len(value):
        _, pos = _varint(value, pos)


@functools.cache
def _rules(schema: type[betterproto.Message]) -> dict[int, _Rule]:
    """Field rules by number, from betterproto's metadata (cached per class)."""
    meta = cast(betterproto.ProtoClassMetadata, getattr(schema, "_betterproto"))  # noqa: B009
    rules = {}
    for name, field_meta in meta.meta_by_field_name.items():
        rules[field_meta.number] = _Rule(
            name=name,
            proto_type=field_meta.proto_type,
            repeated=meta.default_gen[name] is list,
            nested=_nested_class(meta, name, field_meta),
        )
    return rules


def _nested_class(
    meta: betterproto.ProtoClassMetadata, name: str, field_meta: betterproto.FieldMetadata
) -> type[betterproto.Message] | None:
    if field_meta.proto_type == betterproto.TYPE_MAP:
        return cast(type[betterproto.Message], meta.cls_by_field[name])  # the map Entry class
    if field_meta.proto_type != betterproto.TYPE_MESSAGE:
        return None
    if field_meta.wraps:
        return _WRAPPERS[field_meta.wraps]
    cls = meta.cls_by_field[name]
    if cls is datetime.datetime:
        return wkt.Timestamp
    if cls is datetime.timedelta:
        return wkt.Duration
    if not (isinstance(cls, type) and issubclass(cls, betterproto.Message)):
        raise TypeError(f"field {name}: {cls!r} is not a betterproto message class")
    return cls
