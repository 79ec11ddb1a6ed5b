"""Listening sockets of the agent's channels, and the gRPC servers on them.

A channel listens on a unix socket path (process backend, tests), a vsock
port (VMs with vhost-vsock), a virtio-serial port, or an inherited
listening socket or serial port (``fd``, ``serial-fd``: what an in-place
upgrade hands to the new image).  Each channel gets its own
``grpclib.server.Server`` started on that socket.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from typing import Any

from grpclib.events import RecvRequest, listen
from grpclib.server import Server

from agent._fds import FdTable
from agent.config import Listen
from keel.errors import InvalidArgument
from keel.grpc import NO_STATUS_DETAILS, limit_messages, quiet_h2_frames

log = logging.getLogger("keel.agent.channels")

BACKLOG = 16


def _unix(path: Path) -> socket.socket:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # a stale socket of an earlier agent
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # the socket is born 0600: root's shim only
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
    except OSError:
        sock.close()
        raise
    return sock


def _inherited(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise InvalidArgument(f"--listen-fd {fd}: not a socket: {exc}") from exc
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise InvalidArgument(f"--listen-fd {fd}: socket is not listening")
    os.set_inheritable(fd, False)
    return sock


def open_listener(listen: Listen) -> socket.socket:
    """A listening stream socket for *listen*; raises OSError naming it, or InvalidArgument."""
    if listen.kind == "fd":
        return _inherited(int(listen.address))
    if listen.kind == "serial":  # virtio-serial port: a bridged listener (agent/_serial.py)
        from agent._serial import serial_listener

        return serial_listener(listen.channel, listen.address, BACKLOG)
    if listen.kind == "serial-fd":  # the port an in-place upgrade handed over
        from agent._serial import inherited_serial_listener

        return inherited_serial_listener(listen.channel, int(listen.address), BACKLOG)
    try:
        if listen.kind == "unix":
            sock = _unix(Path(listen.address))
        else:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((socket.VMADDR_CID_ANY, int(listen.address)))
        sock.listen(BACKLOG)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for channel {listen.channel} on "
                                 f"{listen.kind}:{listen.address}: {exc.strerror}") from exc
    return sock


class Channels:
    """The servers of every channel.  ``start`` once, ``aclose`` once."""

    def __init__(self, fds: FdTable) -> None:
        self._fds = fds
        self._servers: list[tuple[str, Server, socket.socket]] = []

    async def start(self, listeners: dict[str, socket.socket],
                    handlers: dict[str, Collection[Any]],
                    on_request: Callable[[RecvRequest], Coroutine[Any, Any, None]] | None = None) -> None:
        """Serve *handlers* on each listener; *on_request* sees (and may refuse) every call."""
        quiet_h2_frames()
        limit_messages()
        for channel, sock in listeners.items():
            server = Server(handlers[channel], status_details_codec=NO_STATUS_DETAILS)
            if on_request is not None:
                listen(server, RecvRequest, on_request)
            await server.start(sock=sock)
            self._fds.add(sock.fileno(), f"listener:{channel}")
            self._servers.append((channel, server, sock))
            log.info("serving channel %s on %s", channel, _describe(sock))

    async def aclose(self) -> None:
        """Stop accepting, cancel running calls, wait for handlers to finish."""
        for channel, server, sock in self._servers:
            self._fds.forget(sock.fileno())  # the server closes it
            server.close()
            log.info("channel %s closed", channel)
        for _, server, _sock in self._servers:
            await server.wait_closed()
        self._servers.clear()


def _describe(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        name = "?"
    family = {socket.AF_UNIX: "unix"}.get(sock.family, str(sock.family.name).lower())
    return f"{family}:{name} (fd {sock.fileno()})"
