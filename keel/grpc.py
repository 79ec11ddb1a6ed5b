"""grpclib settings that every Keel gRPC endpoint uses (shim, agent, opsd).

Two things, both for start-up time and per-byte cost on the output path:

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
from typing import Any

from grpclib.const import Status
from grpclib.encoding.base import StatusDetailsCodecBase

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
