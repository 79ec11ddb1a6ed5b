"""Log helpers: the end of a log file for an error message, and one line
where a failure repeats (an accept loop out of file descriptors)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def tail(path: Path, limit: int = 800) -> str:
    """The last *limit* bytes of *path* as text, "(empty)" or "(none)" if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            data = f.read()
    except OSError:
        return "(none)"
    return data.decode(errors="replace").strip() or "(empty)"


class Throttle:
    """At most one log line per *every_s* for a repeating failure.

    ``throttle()`` is None while quiet, else how many occurrences went
    unlogged since the last line (for the line to say so).
    """

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self._last = -math.inf
        self._quiet = 0

    def __call__(self) -> int | None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._quiet += 1
            return None
        quiet, self._quiet, self._last = self._quiet, 0, now
        return quiet


#: asyncio's message when accept() fails for lack of resources (EMFILE,
#: ENFILE, ENOBUFS, ENOMEM); it retries a second later, and again.
_ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


def loop_error_handler(
        log: logging.Logger) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event loop exception handler: errors of fd callbacks are logged
    with their traceback; a listener out of file descriptors, which asyncio
    reports each second it retries, is one line per 30 s without one."""
    accept_failures = Throttle()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == _ACCEPT_OUT_OF_RESOURCES:
            if (quiet := accept_failures()) is not None:
                log.error("accept failed: %s; retrying each second (%d failures since the"
                          " last line)", exc, quiet)
            return
        log.error("unhandled error in event loop: %s", context.get("message"), exc_info=exc)

    return handle
