"""Dialers: how the shim connects a stream socket to one sandbox channel.

A :data:`~shim.vmm.api.Dialer` is called for every new connection (grpclib
calls it again after each loss), so each call returns a fresh, connected,
non-blocking socket or raises OSError (transient: the caller retries).

* :func:`unix_dialer`: a unix socket path (process backend, qemu chardevs);
* :func:`vsock_dialer`: AF_VSOCK ``CID:port`` (KVM hosts with vhost-vsock);
* :func:`hybrid_vsock_dialer`: Firecracker / Cloud Hypervisor style, a unix
  socket that takes ``CONNECT <port>\\n`` and answers ``OK <n>\\n``;
* :class:`ExclusiveDialer`: wraps one of them for a port that serves one
  client at a time (virtio-serial): it lets go of its previous socket
  before it dials again.

Every dial has a deadline: a peer that accepts but never answers the
handshake cannot hang the shim.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from shim.vmm.api import Dialer

log = logging.getLogger("keel.shim.dialers")

#: Seconds one dial (connect plus handshake) may take.
DIAL_TIMEOUT_S = 5.0
#: Longest handshake answer line a hybrid-vsock peer may send.
MAX_HANDSHAKE_LINE = 64


async def _connect(family: int, address: Any, timeout: float) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, address)
    except TimeoutError:
        sock.close()
        raise ConnectionError(f"connecting to {address!r} timed out after {timeout}s") from None
    except BaseException:
        sock.close()
        raise
    return sock


def unix_dialer(path: str, timeout: float = DIAL_TIMEOUT_S) -> Dialer:
    """Connect to the unix stream socket at *path*."""

    async def dial() -> socket.socket:
        return await _connect(socket.AF_UNIX, path, timeout)

    return dial


def vsock_dialer(cid: int, port: int, timeout: float = DIAL_TIMEOUT_S) -> Dialer:
    """Connect to AF_VSOCK *cid*:*port* (the guest's CID, a channel port)."""
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError("this Python has no AF_VSOCK")

    async def dial() -> socket.socket:
        return await _connect(socket.AF_VSOCK, (cid, port), timeout)

    return dial


async def _read_line(sock: socket.socket, limit: int) -> bytes:
    """One ``\\n``-terminated line, read byte by byte so nothing after it is consumed.

    The peer's first protocol bytes (an HTTP/2 SETTINGS frame) may follow
    ``OK`` in the same segment: they belong to the caller's protocol.
    """
    loop = asyncio.get_running_loop()
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) >= limit:
            raise ConnectionError(f"hybrid vsock: handshake line longer than {limit} bytes")
        byte = await loop.sock_recv(sock, 1)
        if not byte:
            raise ConnectionError(f"hybrid vsock: connection closed during handshake "
                                  f"(after {bytes(line)!r})")
        line += byte
    return bytes(line)


def hybrid_vsock_dialer(path: str, port: int, timeout: float = DIAL_TIMEOUT_S) -> Dialer:
    """Connect through the hybrid-vsock unix socket *path* to guest *port*.

    Raises ConnectionError when the peer refuses (anything but ``OK ``),
    closes, or does not answer within *timeout*.
    """

    async def dial() -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = await _connect(socket.AF_UNIX, path, timeout)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendall(sock, f"CONNECT {port}\n".encode())
                line = await _read_line(sock, MAX_HANDSHAKE_LINE)
        except TimeoutError:
            sock.close()
            raise ConnectionError(f"hybrid vsock {path} port {port}: no answer within "
                                  f"{timeout}s") from None
        except BaseException:
            sock.close()
            raise
        if not line.startswith(b"OK "):
            sock.close()
            raise ConnectionError(f"hybrid vsock {path} port {port}: refused: "
                                  f"{line.decode(errors='replace').strip()!r}")
        return sock

    return dial


class ExclusiveDialer:
    """A dialer for a port that serves one client at a time.

    qemu services one client per virtio-serial chardev socket; a second
    client's connect succeeds (kernel backlog) but is not serviced.  So
    before dialing again this dialer shuts down the socket it returned last
    if that is still open (its owner, a grpclib connection, then sees the
    end of its stream), and waits up to *release_timeout* for the owner to
    close it.  Use one instance per port and process.
    """

    def __init__(self, inner: Dialer, release_timeout: float = 1.0) -> None:
        self._inner = inner
        self._release_timeout = release_timeout
        self._last: socket.socket | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> socket.socket:
        async with self._lock:
            await self._release()
            self._last = await self._inner()
            return self._last

    async def _release(self) -> None:
        last, self._last = self._last, None
        if last is None or last.fileno() < 0:
            return
        log.info("dialing again: shutting down the previous connection first")
        try:
            last.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        loop = asyncio.get_running_loop()
        end = loop.time() + self._release_timeout
        delay = 0.001
        while last.fileno() >= 0 and loop.time() < end:
            await asyncio.sleep(delay)  # the owner closes it from its own callbacks
            delay = min(delay * 2, 0.05)
