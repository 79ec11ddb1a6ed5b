"""Peer credentials (SO_PEERCRED) of a unix socket: who connected.

Every Keel socket that takes commands (the shim's ttrpc and ops sockets,
opsd, the launcher) is root-only by mode and checks the peer's uid as a
second wall.  The kernel records the credentials at ``connect()``.
"""

from __future__ import annotations

import dataclasses
import socket
import struct

_UCRED = struct.Struct("3i")


@dataclasses.dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def of(sock: socket.socket) -> PeerCred:
    """The peer's credentials.  Raises OSError for a closed socket.

    Linux answers an unconnected or non-unix socket with pid 0, uid and
    gid -1 rather than an error: :func:`of_or_none` maps that to None, and
    a caller that compares uids refuses it (no real uid is -1).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def of_or_none(sock: socket.socket) -> PeerCred | None:
    """As :func:`of`, None where the socket has no peer credentials."""
    try:
        cred = of(sock)
    except OSError:
        return None
    return None if cred.uid == -1 else cred
