"""Offset-addressed output buffers and the pumps that fill them from pipes.

Every byte a process writes to stdout or stderr gets an absolute offset in
its stream (0 = first byte ever).  The shim reads with ``ReadOutput(offset)``
and thereby acknowledges everything below ``offset``; only acknowledged
bytes are dropped.  The buffer is bounded: when it is full the pump stops
reading the pipe (the process then blocks in write(2)) until a read frees
space.  Unread output is never dropped.

An in-place upgrade stops every pump (the bytes still in a pipe stay
there), writes each buffer's unacknowledged bytes with their offsets to
the hand-over file, and the new image rebuilds the buffers from it
(:meth:`OutputBuffer.restored`) before it starts pumping the same fds.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
from collections.abc import Callable

from keel.errors import InvalidArgument

log = logging.getLogger("keel.agent.output")

#: fcntl.F_SETPIPE_SZ (Linux; the constant is missing from older Pythons).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: Largest read from a pipe at once: a busy loop comes back to a full pipe
#: (see PIPE_BYTES), and one big read costs far less than many small ones.
READ_CHUNK = 1 << 20
#: Kernel buffer asked for the output pipes (F_SETPIPE_SZ; best effort): a
#: writer keeps writing while the loop serves a ReadOutput, and each wake-up
#: then moves more bytes.
PIPE_BYTES = 1 << 20


def enlarge_pipe(fd: int) -> None:
    """Ask for a PIPE_BYTES kernel buffer on *fd*; keeps the default when refused
    (a pty, or a limit below PIPE_BYTES: /proc/sys/fs/pipe-max-size)."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass


class OutputBuffer:
    """One stream's bytes from ``base`` (the lowest offset still held) to ``end``.

    Written by one pump (:meth:`append`, :meth:`close`), read by any number
    of ReadOutput calls.  ``on_space`` is called when a read frees space so
    a paused pump can resume.
    """

    def __init__(self, limit: int, *, start: int = 0) -> None:
        self.limit = limit
        self._data = bytearray()
        self._base = start
        self._eof = False
        self._changed = asyncio.Event()
        self.on_space: Callable[[], None] | None = None

    @classmethod
    def restored(cls, limit: int, base: int, data: bytes, eof: bool) -> OutputBuffer:
        """A buffer holding *data* at offsets ``[base, base + len(data))`` (an upgrade's
        hand-over; it may exceed *limit*: the pump then waits for reads)."""
        buffer = cls(limit, start=base)
        buffer._data += data
        buffer._eof = eof
        return buffer

    def held(self) -> bytes:
        """A copy of the unacknowledged bytes, ``[base, end)``."""
        return bytes(self._data)

    @property
    def base(self) -> int:
        return self._base

    @property
    def end(self) -> int:
        """Offset one past the last byte received: the stream's length so far."""
        return self._base + len(self._data)

    @property
    def eof(self) -> bool:
        """True once the writer closed; bytes may still be unread."""
        return self._eof

    def space(self) -> int:
        return max(0, self.limit - len(self._data))

    def append(self, data: bytes) -> None:
        if self._eof:
            raise RuntimeError("append after close")
        if data:
            self._data += data
            self._wake()

    def close(self) -> None:
        """Mark end of stream (the pipe hit EOF, or the stream was never opened)."""
        if not self._eof:
            self._eof = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def read_nowait(self, offset: int, max_bytes: int) -> tuple[bytes, bool]:
        """Bytes from *offset* (at most *max_bytes*) and whether that reaches EOF.

        Drops everything below *offset* (the caller acknowledged it).
        Raises InvalidArgument for an offset that was already dropped or
        lies beyond the end.
        """
        self._check(offset)
        self.ack(offset)
        with memoryview(self._data) as view, view[:max_bytes] as part:
            chunk = bytes(part)  # one copy; the views are gone before the next resize
        return chunk, self._eof and offset + len(chunk) == self.end

    def _check(self, offset: int) -> None:
        if offset < self._base:
            raise InvalidArgument(
                f"offset {offset} was already acknowledged; this stream holds bytes from {self._base}"
            )
        if offset > self.end:
            raise InvalidArgument(f"offset {offset} is beyond the end of the stream ({self.end})")

    def ack(self, offset: int) -> None:
        """Drop bytes below *offset* (which must be within the held range)."""
        drop = offset - self._base
        if drop <= 0:
            return
        was_full = self.space() == 0
        del self._data[:drop]
        self._base = offset
        if was_full and self.on_space is not None:
            self.on_space()

    async def read(self, offset: int, max_bytes: int, wait_s: float) -> tuple[bytes, bool]:
        """Like :meth:`read_nowait` but waits up to *wait_s* when nothing is there yet."""
        self._check(offset)
        self.ack(offset)
        if offset == self.end and not self._eof and wait_s > 0:
            changed = self._changed
            try:
                async with asyncio.timeout(wait_s):
                    await changed.wait()
            except TimeoutError:
                pass
        return self.read_nowait(offset, max_bytes)


class OutputPump:
    """Copies a non-blocking fd into an OutputBuffer from the event loop.

    Owns the fd until EOF, then closes it through *close_fd* (the agent's
    fd table).  Stops reading while the buffer is full.
    """

    def __init__(self, fd: int, buffer: OutputBuffer, close_fd: Callable[[int], None],
                 name: str) -> None:
        self._fd = fd
        self._buffer = buffer
        self._close_fd = close_fd
        self._name = name
        self._reading = False
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        buffer.on_space = self._resume
        self._resume()

    @property
    def fd(self) -> int:
        """The fd being pumped; -1 once the stream ended."""
        return self._fd

    def stop_reading(self) -> None:
        """Leave the pipe alone (the upgrade's freeze); :meth:`start_reading` undoes it."""
        self._pause()

    def start_reading(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if not self._reading and self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        space = self._buffer.space()
        if space == 0:  # backpressure: the process blocks on its pipe until the shim reads
            self._pause()
            return
        try:
            data = os.read(self._fd, min(space, READ_CHUNK))
        except BlockingIOError:
            return
        except OSError as exc:
            # A pty master reads EIO once every slave fd is closed: that is its EOF.
            if exc.errno != errno.EIO:
                log.warning("%s: read failed: %s; treating as end of stream", self._name, exc)
            data = b""
        if not data:
            self.close()
            return
        self._buffer.append(data)
        if self._buffer.space() == 0:
            self._pause()

    def close(self) -> None:
        """Stop pumping, close the fd and mark the stream ended (idempotent)."""
        if self._fd < 0:
            return
        self._pause()
        self._buffer.on_space = None
        self._close_fd(self._fd)
        self._fd = -1
        self._buffer.close()
