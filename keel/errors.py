"""The error vocabulary of Keel.

A handful of classes, mapped once to google.rpc codes, which both ttrpc
(shim <-> containerd) and gRPC (shim <-> agent, opsctl <-> opsd <-> shim)
carry.  Classify errors by type, never by message text.  Every package
raises these; subclasses that only one package raises (``upgrade.errors``)
stay with it.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc.Code values used on every Keel wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class KeelError(Exception):
    """Base class: every error a Keel API returns carries a code."""

    code: Code = Code.UNKNOWN


class InvalidArgument(KeelError):
    code = Code.INVALID_ARGUMENT


class NotFound(KeelError):
    code = Code.NOT_FOUND


class AlreadyExists(KeelError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(KeelError):
    code = Code.FAILED_PRECONDITION


class PermissionDenied(KeelError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(KeelError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(KeelError):
    code = Code.UNAVAILABLE


class Unimplemented(KeelError):
    code = Code.UNIMPLEMENTED


class Internal(KeelError):
    code = Code.INTERNAL


class DeadlineExceeded(KeelError):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(KeelError):
    code = Code.CANCELLED


_BY_CODE: dict[int, type[KeelError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        Internal,
        DeadlineExceeded,
        Cancelled,
    )
}


def code_of(exc: BaseException) -> Code:
    """The wire code for *exc*: its class code, or UNKNOWN for foreign errors."""
    if isinstance(exc, KeelError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED
    if isinstance(exc, FileNotFoundError):
        return Code.NOT_FOUND
    if isinstance(exc, FileExistsError):
        return Code.ALREADY_EXISTS
    if isinstance(exc, PermissionError):
        return Code.PERMISSION_DENIED
    return Code.UNKNOWN


def from_code(code: int, message: str) -> KeelError:
    """Rebuild the error class for a code received from a peer."""
    cls = _BY_CODE.get(code, KeelError)
    err = cls(message)
    if cls is KeelError:
        err.code = Code(code) if code in Code._value2member_map_ else Code.UNKNOWN
    return err
