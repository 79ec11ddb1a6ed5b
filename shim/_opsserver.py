"""``ops.sock``: the sandbox's management endpoint for opsd (ShimOps)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from grpclib.server import Server

from agent.api import ops_pb
from shim import version

if TYPE_CHECKING:
    from shim.sandbox import Sandbox


class ShimOps(ops_pb.ShimOpsBase):
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def status(self, status_request: ops_pb.StatusRequest) -> ops_pb.StatusResponse:
        sb = self._sb
        agent = sb.agent.hello.agent_version if sb.agent and sb.agent.hello else ""
        return ops_pb.StatusResponse(
            sandbox_id=sb.id, shim_version=version(), shim_pid=os.getpid(), agent_version=agent,
            backend=sb.config.backend, namespace=sb.namespace,
            containers=[
                ops_pb.ContainerInfo(id=c.id, pid=c.init.pid, status=c.init.state.value,
                                     exec_ids=list(c.execs))
                for c in sb.containers.values()
            ],
        )


async def serve_ops(sandbox: Sandbox) -> Server:
    """Listen on the sandbox's ops.sock (0600, root only)."""
    sandbox.dir.create()
    path = sandbox.dir.ops_socket
    path.unlink(missing_ok=True)
    server = Server([ShimOps(sandbox)])
    old = os.umask(0o177)
    try:
        await server.start(path=str(path))
    finally:
        os.umask(old)
    return server
