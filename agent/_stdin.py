"""Offset-addressed stdin: retried writes are not written twice.

The stdin stream of a process is numbered like its output: the shim sends
``WriteStdin(offset, data)`` and the agent answers the total it accepted.
Bytes below the accepted offset are skipped (a retry after a lost reply),
a gap is an error.  Accepted bytes go to a pending buffer that drains into
the pipe (or pty) whenever it is writable, so a process that does not read
never blocks the event loop; when the buffer is full, WriteStdin waits.

An in-place upgrade freezes the writer (:meth:`StdinWriter.freeze`) and
hands its ledger offset and pending bytes to the new image, which
continues with :meth:`StdinWriter.resumed`: nothing accepted is lost or
written twice.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

from keel.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("keel.agent.stdin")

WRITE_CHUNK = 64 * 1024


class StdinLedger:
    """The pure offset rule of one stdin stream."""

    def __init__(self, accepted: int = 0) -> None:
        #: Total bytes accepted: the next offset the shim should write at.
        self.accepted = accepted

    def new_part(self, offset: int, data: bytes) -> bytes:
        """The part of *data* (starting at *offset*) not accepted yet.

        Raises InvalidArgument when *offset* leaves a gap after ``accepted``.
        """
        if offset > self.accepted:
            raise InvalidArgument(
                f"stdin offset {offset} leaves a gap: only {self.accepted} bytes were accepted"
            )
        return data[self.accepted - offset :]

    def accept(self, offset: int, data: bytes) -> bytes:
        """Account for *data* at *offset*; return the bytes to actually write."""
        new = self.new_part(offset, data)
        self.accepted += len(new)
        return new


class StdinWriter:
    """Drains accepted stdin into a non-blocking fd from the event loop.

    *close_fd* closes through the agent's fd table.  With *keep_open* (a
    pty, whose fd also serves resizes) closing stdin stops writes but
    leaves the fd to its owner.
    """

    def __init__(self, fd: int, limit: int, close_fd: Callable[[int], None], name: str,
                 *, accepted: int = 0, keep_open: bool = False) -> None:
        self.ledger = StdinLedger(accepted)
        self._fd = fd
        self._limit = limit
        self._close_fd = close_fd
        self._name = name
        self._keep_open = keep_open
        self._pending = bytearray()
        self._close_requested = False
        self._broken: str | None = None
        self._writing = False
        self._drained = asyncio.Event()
        self._frozen = False
        self._loop = asyncio.get_running_loop()
        if fd >= 0:
            os.set_blocking(fd, False)

    @classmethod
    def resumed(cls, fd: int, limit: int, close_fd: Callable[[int], None], name: str, *,
                accepted: int, pending: bytes, close_requested: bool, broken: str,
                keep_open: bool = False) -> StdinWriter:
        """The writer an upgrade handed over: *fd* (-1 once released), the ledger at
        *accepted*, *pending* bytes not written yet.  Call :meth:`thaw` to start writing."""
        writer = cls(fd, limit, close_fd, name, accepted=accepted, keep_open=keep_open)
        writer._pending += pending
        writer._close_requested = close_requested
        writer._broken = broken or None
        writer._frozen = True
        return writer

    @property
    def closed(self) -> bool:
        """True once CloseStdin was asked (or the reader went away)."""
        return self._close_requested or self._broken is not None

    @property
    def fd(self) -> int:
        """The fd written to; -1 once released."""
        return self._fd

    @property
    def close_requested(self) -> bool:
        return self._close_requested

    @property
    def broken(self) -> str:
        """Why the stdin fd went away ("" if it did not)."""
        return self._broken or ""

    def pending(self) -> bytes:
        """Accepted bytes not written to the process yet (``accepted - len`` is their offset)."""
        return bytes(self._pending)

    def freeze(self) -> None:
        """Stop writing to the fd (the upgrade's freeze); accepting continues into pending."""
        self._frozen = True
        self._set_writing(False)

    def thaw(self) -> None:
        self._frozen = False
        self._flush()

    async def write(self, offset: int, data: bytes) -> int:
        """Accept *data* at *offset*; return the new accepted offset.

        Waits while the pending buffer is full.  Raises InvalidArgument for a
        gap, FailedPrecondition when stdin is closed and *data* is new.
        """
        while True:
            if not self.ledger.new_part(offset, data):
                return self.ledger.accepted  # a retry of bytes we already have
            if self._broken is not None:
                raise FailedPrecondition(f"{self._name}: {self._broken}")
            if self._close_requested:
                raise FailedPrecondition(f"{self._name}: stdin was closed at {self.ledger.accepted}")
            if len(self._pending) < self._limit:
                break
            await self._drained.wait()
        self._pending += self.ledger.accept(offset, data)
        self._flush()
        return self.ledger.accepted

    def close_at(self, offset: int) -> None:
        """Close once every byte below *offset* was written (idempotent)."""
        if offset > self.ledger.accepted:
            raise InvalidArgument(
                f"{self._name}: close at {offset} but only {self.ledger.accepted} bytes were accepted"
            )
        self._close_requested = True
        self._flush()

    def abort(self) -> None:
        """Drop pending bytes and close now (the process is being removed)."""
        self._fail("stdin was discarded")

    def _flush(self) -> None:
        if self._frozen:
            return
        while self._pending and self._fd >= 0:
            try:
                n = os.write(self._fd, self._pending[:WRITE_CHUNK])
            except BlockingIOError:
                break
            except OSError as exc:
                reason = "the process closed its stdin" if exc.errno == errno.EPIPE else str(exc)
                self._fail(reason)
                return
            del self._pending[:n]
        self._set_writing(bool(self._pending))
        if len(self._pending) < self._limit:
            self._wake()
        if not self._pending and self._close_requested:
            self._release_fd()

    def _set_writing(self, on: bool) -> None:
        if on and not self._writing and self._fd >= 0:
            self._loop.add_writer(self._fd, self._flush)
        elif not on and self._writing:
            self._loop.remove_writer(self._fd)
        self._writing = on and self._fd >= 0

    def _fail(self, reason: str) -> None:
        if self._pending:
            log.info("%s: %s; %d pending bytes dropped", self._name, reason, len(self._pending))
        self._broken = self._broken or reason
        self._pending.clear()
        self._release_fd()
        self._wake()

    def _wake(self) -> None:
        self._drained.set()
        self._drained = asyncio.Event()

    def _release_fd(self) -> None:
        self._set_writing(False)
        if self._fd >= 0 and not self._keep_open:
            self._close_fd(self._fd)
        self._fd = -1
