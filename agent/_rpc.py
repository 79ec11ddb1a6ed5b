"""What every agent gRPC handler shares: the error mapping and argument checks."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from keel.errors import InvalidArgument, KeelError

log = logging.getLogger("keel.agent.service")

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def to_grpc_error(exc: Exception) -> GRPCError:
    """The one mapping of our errors (and unexpected ones) to gRPC status codes."""
    if isinstance(exc, GRPCError):
        return exc
    if isinstance(exc, KeelError):
        return GRPCError(Status(int(exc.code)), str(exc))
    return GRPCError(Status.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def rpc(fn: F) -> F:
    """Wrap a handler: our errors become gRPC statuses, unexpected ones are logged."""

    @functools.wraps(fn)
    async def handler(self: Any, request: Any) -> Any:
        try:
            result = await fn(self, request)
        except KeelError as exc:
            self._core.activity.served()
            log.info("%s -> %s: %s", fn.__name__, exc.code.name, exc)
            raise to_grpc_error(exc) from exc
        except (GRPCError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise to_grpc_error(exc) from exc
        self._core.activity.served()
        return result

    return cast(F, handler)


def uint(value: object, what: str, limit: int = (1 << 64) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InvalidArgument(f"{what} must be an integer in 0..{limit}, not {value!r}")
    return value


def as_bytes(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidArgument(f"{what} must be bytes")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} bytes; at most {limit} are accepted")
    return value


