"""grpclib settings that every Keel gRPC endpoint uses (shim, agent, opsd).

:func:`limit_messages`: grpclib reads a message of whatever size its
5-byte prefix declares, buffering it whole (a peer declaring 4 GiB grows
the reader by as much as it sends).  Every Keel process caps what it reads
at :data:`MAX_MESSAGE_BYTES` and answers a larger declaration with
RESOURCE_EXHAUSTED before reading a byte of it: the guest and the local
sockets are not trusted with the host's memory.

And two things for start-up time and per-byte cost on the output path:

- :data:`NO_STATUS_DETAILS`, the status details codec of peers that send
  none (Keel's errors are a code and a message).  Given to every grpclib
  Server and Channel: without one grpclib imports google.protobuf and
  googleapis' ``status_pb2`` to look for its default, which cost each
  shim and agent ~25 ms at start-up and a few MiB for good.
- :func:`quiet_h2_frames`: h2 (4.x) logs every received frame with
  ``logger.trace("...", repr(frame))``; the ``repr`` runs even when
  nothing is logged, and hyperframe's DATA frame ``repr`` hex-encodes the
  whole payload to keep 20 characters: three extra passes over every byte
  of output (the shim receiving ReadOutput answers, the agent receiving
  WriteStdin).  Remove once h2 stops building the message when tracing is
  off.
"""

from __future__ import annotations

import binascii
import contextvars
import logging
import socket
import struct
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from grpclib.const import Handler, Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError, ProtocolError
from grpclib.server import Server, Stream

from keel import peercred
from keel.peercred import PeerCred

log = logging.getLogger("keel.grpc")

#: Largest gRPC message a Keel endpoint reads (an output or stdin chunk is
#: at most 1 MiB, an OCI spec at most 1 MiB).
MAX_MESSAGE_BYTES = 4 << 20

#: Payload bytes a DATA frame's repr shows.
_SHOWN = 10


class NoStatusDetails(StatusDetailsCodecBase):
    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        raise TypeError("Keel sends no gRPC status details")

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        return None  # a peer's details are dropped; the code and message stand


NO_STATUS_DETAILS = NoStatusDetails()


def _body_repr(self: Any) -> str:
    data = self.data
    shown = binascii.hexlify(data[:_SHOWN]).decode("ascii")
    return f"<{len(data)} bytes, hex:{shown}{'...' if len(data) > _SHOWN else ''}>"


def quiet_h2_frames() -> None:
    """Give hyperframe's DataFrame a cheap ``repr`` (length and first bytes).

    Called by whoever opens a gRPC server or channel over which bulk data
    flows, before the first frame; idempotent; changes nothing but that
    string.
    """
    from hyperframe.frame import DataFrame

    DataFrame._body_repr = _body_repr  # type: ignore[method-assign]


def limit_messages(limit: int = MAX_MESSAGE_BYTES) -> None:
    """Make grpclib's clients and servers in this process refuse a message
    declared larger than *limit* (RESOURCE_EXHAUSTED) instead of buffering
    it; idempotent.  grpclib has no setting for it: its ``recv_message`` is
    replaced where client and server call it."""
    import grpclib.client
    import grpclib.server

    async def recv_message(stream: Any, codec: Any, message_type: Any) -> Any:
        meta = await stream.recv_data(5)
        if not meta:
            return None
        if len(meta) != 5:
            raise ProtocolError(f"truncated message prefix ({len(meta)} bytes)")
        compressed, size = struct.unpack(">?I", meta)
        if compressed:
            raise NotImplementedError("Compression not implemented")
        if size > limit:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"a message of {size} bytes is over the limit of {limit}")
        data = await stream.recv_data(size)
        if len(data) != size:
            raise ProtocolError(f"message ended after {len(data)} of {size} bytes")
        return codec.decode(data, message_type)

    grpclib.client.recv_message = recv_message  # type: ignore[assignment]
    grpclib.server.recv_message = recv_message  # type: ignore[assignment]


def guest_text(value: object, limit: int = 200) -> str:
    """A string a peer sent, fit for a log line or a CLI column: non-printable
    characters escaped, at most *limit* characters (longer ones cut, marked)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def _cred_of(event: RecvRequest) -> PeerCred | None:
    # grpclib hands listeners only a Peer; its socket is reached through
    # Peer._transport (private, stable since grpclib 0.3).
    transport = getattr(event.peer, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    return peercred.of(sock)


def serve_raw(mapping: dict[str, Any], path: str,
              handler: Callable[[Stream[Any, Any]], Coroutine[Any, Any, None]]) -> None:
    """Serve the RPC *path* of a generated service's ``__mapping__`` with
    *handler* on the raw grpclib stream (for what betterproto's generated
    handlers cannot do: send before starting work, read and write at once)."""
    generated = mapping[path]
    mapping[path] = Handler(handler, generated.cardinality, generated.request_type,
                            generated.reply_type)


#: The peer credentials of the call being handled, on servers that
#: :func:`require_uids` guards (for audit records).
_caller: contextvars.ContextVar[PeerCred | None] = contextvars.ContextVar("keel_caller",
                                                                          default=None)


def caller() -> PeerCred | None:
    """Who made the call being handled (servers guarded by :func:`require_uids`)."""
    return _caller.get()


def require_uids(server: Server, allowed: Collection[int], who: str) -> None:
    """Refuse every call on *server* whose peer uid (SO_PEERCRED) is not in
    *allowed*: PERMISSION_DENIED naming *who* refuses, and a log line.

    The second wall after a socket file's 0600 mode (a mode loosened by
    hand, a descriptor passed to another process).
    """
    allowed = frozenset(allowed)

    async def check(event: RecvRequest) -> None:
        cred = _cred_of(event)
        if cred is None:
            log.warning("%s refused %s: peer credentials unavailable", who, event.method_name)
            raise GRPCError(Status.PERMISSION_DENIED, f"{who}: cannot verify the caller")
        if cred.uid not in allowed:
            log.warning("%s refused %s from uid %d (pid %d): not allowed", who,
                        event.method_name, cred.uid, cred.pid)
            raise GRPCError(Status.PERMISSION_DENIED,
                            f"{who} refuses uid {cred.uid}: only root may use it")
        _caller.set(cred)

    listen(server, RecvRequest, check)
