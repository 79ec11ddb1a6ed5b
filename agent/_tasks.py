"""Operations that must finish even when their caller goes away.

A shim that disconnects mid-call (an upgrade, a crash) cancels the gRPC
handler, but half a ``runc create`` must not be abandoned: the runtime
would keep a container the agent does not know, and the shim's retry
would fail.  :class:`Operations` runs such operations as tasks of the
agent's TaskGroup; the caller awaits the result, and if the caller is
cancelled the operation still completes and its outcome is logged, never
lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from agent.errors import Unavailable

log = logging.getLogger("keel.agent.tasks")
T = TypeVar("T")


class Operations:
    """Runs operations in *group*; the group outlives every caller."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    async def run(self, coro: Coroutine[Any, Any, T], name: str) -> T:
        """Await *coro* in the agent's group; cancelling the caller does not cancel it."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[T] = loop.create_future()

        async def body() -> None:
            try:
                value = await coro
            except asyncio.CancelledError:  # the agent is shutting down
                if not result.done():
                    result.cancel()
                raise
            except Exception as exc:
                if result.done():
                    log.warning("%s failed after its caller left: %s", name, exc)
                else:
                    result.set_exception(exc)
                return
            if result.done():
                log.info("%s finished after its caller left", name)
            else:
                result.set_result(value)

        try:
            self._group.create_task(body(), name=name)
        except RuntimeError:  # the group is shutting down: the agent is stopping
            coro.close()
            raise Unavailable(f"{name}: the agent is stopping") from None
        return await result


class KeyedLocks:
    """One asyncio.Lock per key (a container id), dropped when nobody holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
