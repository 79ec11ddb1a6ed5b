"""What other packages may import from the agent: the wire API.

The generated protobuf modules of the agent and ops APIs, the API version
range this release speaks, the channel ports and how a client presents the
session key.  Errors are Keel's
(:mod:`keel.errors`); the grpclib settings both ends use are in
:mod:`keel.grpc`.  Importing this module has no side effects.
"""

from __future__ import annotations

from grpclib.client import Channel
from grpclib.events import SendRequest, listen

from agent._pb.keel.agent import v1 as pb
from agent._pb.keel.ops import v1 as ops_pb

#: Agent API versions this release speaks.  A shim and an agent agree on
#: min(their maxima) in Hello if it is within both ranges.
API_VERSION = 2
MIN_API_VERSION = 1
#: From this API version on, a shim sends its sandbox's session key as the
#: gRPC metadata SESSION_KEY_HEADER on every call (agent/_session.py); the
#: agent refuses other clients once a key is bound.
SESSION_KEY_API = 2
SESSION_KEY_HEADER = "keel-session-key"

#: Channel ports (vsock ports; names of serial ports and sockets elsewhere).
AGENT_PORT = 1024
OPS_PORT = 1025

#: Spec annotation (a JSON object, name -> value) of the ``net.*`` sysctls
#: the agent sets in its own network namespace before ``runc create``: a VM's
#: containers share the guest's, where runc refuses them (``agent/_sysctls.py``).
NET_SYSCTLS_ANNOTATION = "io.keel.agent.net-sysctls"

def present_session_key(channel: Channel, key: str) -> None:
    """Have every call on the client *channel* carry the session *key*
    (metadata SESSION_KEY_HEADER; agent/_session.py checks it)."""
    async def present(event: SendRequest) -> None:
        event.metadata[SESSION_KEY_HEADER] = key

    listen(channel, SendRequest, present)


#: OpsService.StageRelease: the most a release bundle may weigh, and the
#: most one call may carry (the agent refuses more; the shim sends no more).
STAGE_MAX_BYTES = 32 << 20
STAGE_MAX_CHUNK = 1 << 20

__all__ = ["API_VERSION", "MIN_API_VERSION", "SESSION_KEY_API", "SESSION_KEY_HEADER", "AGENT_PORT", "OPS_PORT", "NET_SYSCTLS_ANNOTATION",
           "STAGE_MAX_BYTES", "STAGE_MAX_CHUNK", "pb", "ops_pb", "present_session_key"]
