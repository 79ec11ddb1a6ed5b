"""What other packages may import from the agent: the wire API.

The generated protobuf modules of the agent and ops APIs, the API version
range this release speaks, the channel ports, and the error vocabulary.
"""

from __future__ import annotations

from typing import Any

from grpclib.const import Status
from grpclib.encoding.base import StatusDetailsCodecBase

from agent import _h2frames
from agent._pb.keel.agent import v1 as pb
from agent._pb.keel.ops import v1 as ops_pb
from agent.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KeelError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    code_of,
    from_code,
)

# Every user of the API speaks it over h2: keep h2's per-frame trace cheap.
_h2frames.install()


class NoStatusDetails(StatusDetailsCodecBase):
    """The status details codec of peers that send none (Keel's errors are
    a code and a message).  Given to every grpclib Server and Channel of the
    shim and the agent: without one grpclib imports google.protobuf and
    googleapis' status_pb2 to look for its default, which cost each shim and
    agent ~25 ms at start-up and a few MiB for good."""

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        raise TypeError("Keel sends no gRPC status details")

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        return None  # a peer's details are dropped; the code and message stand


NO_STATUS_DETAILS = NoStatusDetails()

#: Agent API versions this release speaks.  A shim and an agent agree on
#: min(their maxima) in Hello if it is within both ranges.
API_VERSION = 1
MIN_API_VERSION = 1

#: Channel ports (vsock ports; names of serial ports and sockets elsewhere).
AGENT_PORT = 1024
OPS_PORT = 1025

__all__ = [
    "API_VERSION",
    "MIN_API_VERSION",
    "AGENT_PORT",
    "OPS_PORT",
    "pb",
    "ops_pb",
    "AlreadyExists",
    "Code",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "KeelError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "Unimplemented",
    "code_of",
    "from_code",
]
