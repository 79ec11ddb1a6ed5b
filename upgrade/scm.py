"""File descriptors over unix sockets (SCM_RIGHTS): what the shim handoff
channel and the launcher share.  Standard library only: ``shim start``
imports it."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any


def rights(fds: Sequence[int]) -> list[tuple[int, int, array.array[int]]]:
    """The ancillary data that sends *fds* with a message (none for no fds)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []


def fds_of(anc: Iterable[tuple[int, int, bytes]] | list[Any]) -> list[int]:
    """The fds received in *anc* (recvmsg's ancillary data); the caller owns them."""
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def close_all(fds: Iterable[int]) -> None:
    """Close every fd, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
