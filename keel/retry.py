"""How Keel waits between attempts: retry policies built on tenacity.

Every retry loop (dialling an agent that is still booting, forwarding an
event to a restarting containerd, polling a sandbox during a rollout)
backs off exponentially from *first* to *cap* seconds and stops after a
deadline or a number of attempts, whichever the caller names.  Callers
iterate::

    async for attempt in retrying(first=0.01, cap=0.25, within=10, on=OSError):
        with attempt:
            await dial()

The last error is re-raised when the policy gives up (``reraise``), so a
caller maps it to our error classes as it would a single failure.
"""

from __future__ import annotations

from collections.abc import Callable

import tenacity

Exc = type[BaseException] | tuple[type[BaseException], ...]


class _StopWhen(tenacity.stop.stop_base):
    def __init__(self, pointless: Callable[[], bool]) -> None:
        self._pointless = pointless

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._pointless()


def backoff(first: float, cap: float) -> tenacity.wait.wait_base:
    """Waits of first, 2*first, 4*first ... seconds, never more than *cap*."""
    return tenacity.wait_exponential(multiplier=first, min=first, max=cap)


def retrying(*, first: float, cap: float, within: float | None = None,
             attempts: int | None = None, on: Exc = Exception,
             give_up: Callable[[], bool] | None = None,
             before_sleep: Callable[[BaseException], None] | None = None,
             ) -> tenacity.AsyncRetrying:
    """Retry on *on* with :func:`backoff` until *within* seconds passed,
    *attempts* were made, or *give_up()* says it is pointless (checked
    after each failure).  *before_sleep* sees each failure that will be
    retried.
    """
    stop: tenacity.stop.stop_base = tenacity.stop_never
    if within is not None:
        stop = stop | tenacity.stop_after_delay(within)
    if attempts is not None:
        stop = stop | tenacity.stop_after_attempt(attempts)
    if give_up is not None:
        stop = stop | _StopWhen(give_up)
    hook = None
    if before_sleep is not None:
        see = before_sleep

        def hook(state: tenacity.RetryCallState) -> None:
            assert state.outcome is not None
            exc = state.outcome.exception()
            if exc is not None:
                see(exc)

    return tenacity.AsyncRetrying(stop=stop, wait=backoff(first, cap),
                                  retry=tenacity.retry_if_exception_type(on),
                                  before_sleep=hook, reraise=True)
