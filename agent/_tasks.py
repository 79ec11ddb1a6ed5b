"""Operations that must finish even when their caller goes away.

A shim that disconnects mid-call (an upgrade, a crash) cancels the gRPC
handler, but half a ``runc create`` must not be abandoned: the runtime
would keep a container the agent does not know, and the shim's retry
would fail.  :class:`Operations` runs such operations as tasks of the
agent's TaskGroup; the caller awaits the result, and if the caller is
cancelled the operation still completes and its outcome is logged, never
lost.

During an in-place upgrade the agent *freezes* its operations: new ones
wait at the gate (their callers' connections vanish with the exec and
they retry on the new image) while those in flight drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from keel.errors import Unavailable

log = logging.getLogger("keel.agent.tasks")
T = TypeVar("T")


class Operations:
    """Runs operations in *group*; the group outlives every caller."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()

    @property
    def frozen(self) -> bool:
        return not self._open.is_set()

    def freeze(self) -> None:
        """From now on new operations (and :meth:`wait_open` callers) wait for :meth:`thaw`."""
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        """Return at once unless frozen; then wait until thawed (or forever: the exec)."""
        await self._open.wait()

    async def wait_idle(self) -> None:
        """Wait until no operation is in flight (freeze first, or this may never end)."""
        while self._running:
            await self._idle.wait()

    async def run(self, coro: Coroutine[Any, Any, T], name: str) -> T:
        """Await *coro* in the agent's group; cancelling the caller does not cancel it."""
        if self.frozen:
            log.info("%s waits: the agent is being upgraded", name)
            try:
                await self._open.wait()
            except BaseException:
                coro.close()
                raise
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

        async def counted() -> None:
            try:
                await body()
            finally:
                self._running -= 1
                if not self._running:
                    self._idle.set()

        task = counted()
        try:
            self._group.create_task(task, name=name)
        except RuntimeError:  # the group is shutting down: the agent is stopping
            task.close()
            coro.close()
            raise Unavailable(f"{name}: the agent is stopping") from None
        self._running += 1
        self._idle.clear()
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
