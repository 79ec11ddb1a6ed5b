"""A CRI v1 client: containerd's RuntimeService and ImageService over grpclib.

The stubs are betterproto's, generated from ``proto/cri/runtime/v1/api.proto``
into ``tests/cri/_pb`` by ``scripts/gen-proto``.  Tests are synchronous, so
`CriClient` owns an event loop (``asyncio.Runner``) and a channel on
containerd's gRPC socket, and `CriClient.call` runs one stub call to the
end::

    cri.call(cri.runtime.run_pod_sandbox(pb.RunPodSandboxRequest(...)))

CRI errors arrive as ``grpclib.exceptions.GRPCError`` (``.status``,
``.message``); `error_of` returns one for the assertions that expect it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from tests.cri._pb.runtime import v1 as pb

T = TypeVar("T")

#: Seconds a call may take unless the caller says otherwise (RunPodSandbox
#: runs CNI and starts a shim; the rest are quicker).
CALL_TIMEOUT_S = 60.0

__all__ = ["CALL_TIMEOUT_S", "CriClient", "GRPCError", "error_of", "pb"]


class CriClient:
    """Both CRI services of one containerd socket; `close()` when done."""

    def __init__(self, socket: Path | str, timeout: float = CALL_TIMEOUT_S) -> None:
        self._runner = asyncio.Runner()
        self._channel = self._runner.run(_open(str(socket)))
        self.runtime = pb.RuntimeServiceStub(self._channel, timeout=timeout)
        self.images = pb.ImageServiceStub(self._channel, timeout=timeout)

    def call(self, pending: Awaitable[T]) -> T:
        """Run one stub call (a coroutine) on the client's loop and return its answer."""
        async def wrapped() -> T:
            return await pending

        return self._runner.run(wrapped())

    def close(self) -> None:
        self._channel.close()
        self._runner.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_of(call: Callable[[], object]) -> GRPCError:
    """The GRPCError `call()` raises; AssertionError (with the answer) if it succeeds."""
    try:
        answer = call()
    except GRPCError as exc:
        return exc
    raise AssertionError(f"expected a gRPC error, got {answer!r}")


async def _open(path: str) -> Channel:
    # Made on the runner's loop, which the channel binds to.
    return Channel(path=path)
