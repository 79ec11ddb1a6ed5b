"""ttrpc v1.1 (containerd 1.6's flavour) on asyncio: client, server, framing.

Wire format: :mod:`shim.ttrpc._frames`.  Server errors and hand-off:
:mod:`shim.ttrpc.server`.  Untrusted protobuf bytes: :func:`parse_strict`.
"""

from shim.ttrpc._connection import (
    CallContext,
    FrozenConnection,
    PeerCred,
    PendingRequest,
    Phase,
    ServerConnection,
)
from shim.ttrpc._frames import MAX_BODY
from shim.ttrpc._messages import Request
from shim.ttrpc._wire import check_message, parse_strict
from shim.ttrpc.client import ClientStatistics, TtrpcClient
from shim.ttrpc.server import Method, ServerStatistics, TtrpcServer, error_status, same_user

__all__ = [
    "MAX_BODY",
    "CallContext",
    "ClientStatistics",
    "FrozenConnection",
    "Method",
    "PeerCred",
    "PendingRequest",
    "Phase",
    "Request",
    "ServerConnection",
    "ServerStatistics",
    "TtrpcClient",
    "TtrpcServer",
    "check_message",
    "error_status",
    "parse_strict",
    "same_user",
]
