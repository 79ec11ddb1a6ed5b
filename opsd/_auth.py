"""Who may call opsd: peer credentials (SO_PEERCRED) on every call.

The socket file is 0600 root, which already keeps others out; the
credential check is the second wall (a socket whose mode was loosened, a
descriptor passed to another process).  Each call's peer uid must be in
the allowed set (default: root only; tests add theirs); others get
PERMISSION_DENIED with a message that says why, and a log line.

grpclib hands the listener only a ``Peer``; its socket is reached through
``Peer._transport`` (private, but stable since grpclib 0.3), with the
public ``get_extra_info("socket")`` of asyncio transports.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Collection

from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from keel import peercred
from keel.peercred import PeerCred

log = logging.getLogger("opsd.auth")
def _cred_of(event: RecvRequest) -> PeerCred | None:
    transport = getattr(event.peer, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    return peercred.of(sock)


def require_uids(server: Server, allowed: Collection[int]) -> None:
    """Refuse every call on *server* whose peer uid is not in *allowed*."""
    allowed = frozenset(allowed)

    async def check(event: RecvRequest) -> None:
        cred = _cred_of(event)
        if cred is None:
            log.warning("refused %s: peer credentials unavailable", event.method_name)
            raise GRPCError(Status.PERMISSION_DENIED, "opsd: cannot verify the caller")
        if cred.uid not in allowed:
            log.warning("refused %s from uid %d (pid %d): not allowed", event.method_name,
                        cred.uid, cred.pid)
            raise GRPCError(Status.PERMISSION_DENIED,
                            f"opsd refuses uid {cred.uid}: only root may use it")

    listen(server, RecvRequest, check)
