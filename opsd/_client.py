"""opsctl's connection to opsd: one call on a fresh channel, errors in words."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from opsd._pb.keel.opsd import v1 as pb

T = TypeVar("T")


class CliError(Exception):
    """Printed as ``opsctl: <message>``; exit code 1."""


async def call(socket: Path, fn: Callable[[pb.OpsdStub], Awaitable[T]]) -> T:
    """Run *fn* with a stub on opsd's socket; connection and RPC errors become CliError."""
    channel = Channel(path=str(socket))
    try:
        return await fn(pb.OpsdStub(channel))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"cannot reach opsd at {socket}: is it running?") from exc
    except PermissionError as exc:
        raise CliError(f"permission denied on {socket}: opsctl must run as root") from exc
    except GRPCError as exc:
        raise CliError(exc.message or exc.status.name) from exc
    except StreamTerminatedError as exc:
        raise CliError(f"opsd closed the connection: {exc}") from exc
    finally:
        channel.close()
