"""containerd's stdio endpoints as the shim opens them.

A path is a fifo the client already opened (ctr, CRI), ``file:///abs``
appends to a file, ``binary://`` (a logging binary) is not supported yet,
empty means none.  Output fifos are opened O_RDWR|O_NONBLOCK: the open never
blocks, and a client that goes away makes output back up (backpressure to
the agent and the container) instead of failing with EPIPE, as the runc
shim does with its extra read handle.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import urlparse

from keel.errors import InvalidArgument, Unimplemented
from upgrade.aio import wait_readable, wait_writable


def parse(uri: str) -> tuple[str, str]:
    """("fifo"|"file"|"none", path) for a stdio string from containerd."""
    if not uri:
        return "none", ""
    if uri.startswith("/"):
        return "fifo", uri
    u = urlparse(uri)
    if u.scheme == "fifo":
        return "fifo", u.path
    if u.scheme == "file":
        if not u.path.startswith("/"):
            raise InvalidArgument(f"stdio {uri!r}: file path must be absolute")
        return "file", u.path
    if u.scheme == "binary":
        raise Unimplemented(f"stdio {uri!r}: binary:// log drivers are not supported by keel yet")
    raise InvalidArgument(f"stdio {uri!r}: unknown scheme {u.scheme!r}")


class Sink:
    """Where one output stream goes; ``write`` waits while the reader is slow."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, uri: str) -> Sink | None:
        kind, path = parse(uri)
        if kind == "none":
            return None
        if kind == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return cls(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"stdio fifo {path} does not exist") from None
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(f"stdio {path} is not a fifo")
        return cls(fd)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await wait_writable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Source:
    """The stdin fifo.  We hold a write handle too, so the fifo never reads
    EOF; the end of stdin is containerd's CloseIO, as with the runc shim."""

    def __init__(self, fd: int, keeper: int) -> None:
        self.fd = fd
        self._keeper = keeper

    @classmethod
    def open(cls, uri: str) -> Source | None:
        kind, path = parse(uri)
        if kind == "none":
            return None
        if kind != "fifo":
            raise InvalidArgument(f"stdin must be a fifo, not {uri!r}")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"stdin fifo {path} does not exist") from None
        keeper = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return cls(fd, keeper)

    def read_nowait(self, n: int = 65536) -> bytes | None:
        """Bytes available now, or None when there are none."""
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            return None

    async def read(self, n: int = 65536) -> bytes:
        while True:
            data = self.read_nowait(n)
            if data is not None:
                return data
            await wait_readable(self.fd)

    def close(self) -> None:
        for fd in (self.fd, self._keeper):
            if fd >= 0:
                os.close(fd)
        self.fd = self._keeper = -1
