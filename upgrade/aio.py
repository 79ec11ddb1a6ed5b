"""Waiting for a raw fd in asyncio (pipes, fifos, pidfds, SEQPACKET sockets)."""

from __future__ import annotations

import asyncio


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_readable(fd: int) -> None:
    """Wait until *fd* is readable.  One waiter per fd: asyncio keeps one
    reader per fd, so a second waiter replaces the first, which then never
    wakes (use :class:`ExitWatch` for a pidfd that several tasks wait on)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _wake, fut)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


class ExitWatch:
    """The exit of the process behind a pidfd, for any number of waiters.

    One reader on the fd sets an event all waiters share.  :meth:`close`
    before the fd is closed: it unregisters the reader and wakes waiters.
    """

    def __init__(self, pidfd: int) -> None:
        self._fd = pidfd
        self._exited = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait(self) -> None:
        if self._loop is None and not self._exited.is_set():
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._fire)
        await self._exited.wait()

    def _fire(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._fd)
        self._exited.set()

    def close(self) -> None:
        if self._loop is not None and not self._exited.is_set():
            self._loop.remove_reader(self._fd)  # a closed loop has nothing registered
        self._exited.set()
