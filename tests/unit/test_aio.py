"""upgrade.aio: waiting on raw fds; several waiters on one pidfd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from upgrade.aio import ExitWatch, wait_readable

Waiter = Callable[[int], Coroutine[Any, Any, None]]


@contextlib.contextmanager
def _sleeper() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A child to wait for, and its pidfd."""
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        yield child, pidfd
    finally:
        child.kill()
        child.wait()
        os.close(pidfd)


def _two_waiters(wait_a: Waiter, wait_b: Waiter) -> tuple[bool, bool]:
    """Start two waiters on one pidfd, kill the child, and say which woke within 2 s."""
    async def main(child: subprocess.Popen[bytes], pidfd: int) -> tuple[bool, bool]:
        a = asyncio.create_task(wait_a(pidfd))
        b = asyncio.create_task(wait_b(pidfd))
        await asyncio.sleep(0.05)  # both registered
        child.kill()
        done, pending = await asyncio.wait({a, b}, timeout=2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return a in done, b in done

    with _sleeper() as (child, pidfd):
        return asyncio.run(main(child, pidfd))


def test_a_second_wait_readable_on_one_fd_strands_the_first() -> None:
    """The trap ExitWatch exists for: asyncio keeps one reader per fd."""
    assert _two_waiters(wait_readable, wait_readable) == (False, True)


def test_exit_watch_wakes_every_waiter() -> None:
    """The sandbox watch and stop() wait on one VM's pidfd: both wake."""
    watches: dict[int, ExitWatch] = {}

    def wait(pidfd: int) -> Coroutine[Any, Any, None]:
        return watches.setdefault(pidfd, ExitWatch(pidfd)).wait()

    assert _two_waiters(wait, wait) == (True, True)


def test_exit_watch_close_wakes_waiters_and_unregisters() -> None:
    async def main(pidfd: int) -> None:
        watch = ExitWatch(pidfd)
        waiter = asyncio.create_task(watch.wait())
        await asyncio.sleep(0.05)
        watch.close()
        await asyncio.wait_for(waiter, 1)
        # Nothing is left registered on the fd.
        assert asyncio.get_running_loop().remove_reader(pidfd) is False

    with _sleeper() as (_, pidfd):
        asyncio.run(main(pidfd))
