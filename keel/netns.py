"""Run a function inside another network namespace, from a thread of its own.

A network namespace is per thread: sockets, netlink sockets and tap
devices are created in the creating thread's.  :func:`in_netns` runs the
function in a short-lived thread that enters the namespace and leaves it
before it ends, so the caller's threads (and its event loop) never change
namespace.  (pyroute2's own ``netns=`` forks a child of this process for
it, which a daemon with signal handlers and an event loop cannot afford.)
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["CLONE_NEWNET", "in_netns"]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread that entered network namespace *netns* (a path);
    its result, or its exception re-raised here."""
    result: list[Any] = []

    def work() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                result.append(fn())
            finally:
                _setns(own)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.append(exc)
        finally:
            os.close(own)

    thread = threading.Thread(target=work, name="keel-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return cast(T, result[0])
