"""Background jobs of a sandbox: pumps and exit watchers in its TaskGroup."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from observability.spans import detached

log = logging.getLogger("keel.shim")


async def guarded(job: Coroutine[Any, Any, None], what: str) -> None:
    """Run *job*; log its failure instead of tearing the shim's TaskGroup down.

    One process's broken stream must not end the shim's other duties
    (the other containers, the ttrpc server); cancellation passes through.
    """
    try:
        await job
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("%s failed: %s", what, exc)


async def finish(task: asyncio.Task[None] | None, *, cancel: bool = True) -> None:
    """Wait for *task* to end, cancelling it first if *cancel*.

    Its own cancellation and failure (logged by :func:`guarded`) end the
    wait; a cancellation of the caller itself propagates.
    """
    if task is None or task.done():
        return
    if cancel:
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # we were cancelled ourselves
    except Exception:
        pass


def spawn(tasks: asyncio.TaskGroup, job: Coroutine[Any, Any, None], what: str,
          name: str) -> asyncio.Task[None]:
    """``guarded(job)`` as a task of *tasks* named *name*."""
    # Not a child of the call that started it (observability.spans.detached).
    return tasks.create_task(guarded(job, what), name=name, context=detached())
