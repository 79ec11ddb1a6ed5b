"""OpsService's console calls (agent/_console.py holds the sessions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent._rpc import as_bytes, rpc, uint
from agent.api import ops_pb
from keel import ids
from keel.errors import InvalidArgument

if TYPE_CHECKING:
    from agent._console import Consoles
    from agent._core import AgentCore

#: Largest ConsoleRead answer and ConsoleWrite payload.
MAX_IO_BYTES = 1 << 20
#: Longest ConsoleRead and ConsoleWait waits.
MAX_WAIT_MS = 60_000
#: A window size no terminal has.
MAX_SIZE = 9999


def _sid(value: object) -> str:
    return ids.check(value, "session_id")


class ConsoleRpcs:
    """Mixed into OpsService, which sets ``_core`` and ``_consoles``."""

    _core: AgentCore
    _consoles: Consoles

    @rpc
    async def console_start(self, req: ops_pb.ConsoleStartRequest) -> ops_pb.ConsoleStartResponse:
        if not all(isinstance(a, str) for a in req.argv) or not isinstance(req.env, dict):
            raise InvalidArgument("argv must be strings, env a map of strings")
        pid = self._consoles.start(
            _sid(req.session_id), list(req.argv), terminal=bool(req.terminal),
            rows=uint(req.rows, "rows", MAX_SIZE), cols=uint(req.cols, "cols", MAX_SIZE),
            container_id=ids.check(req.container_id, "container_id", optional=True),
            env=dict(req.env))
        return ops_pb.ConsoleStartResponse(pid=pid)

    @rpc
    async def console_read(self, req: ops_pb.ConsoleReadRequest) -> ops_pb.ConsoleReadResponse:
        offset = uint(req.offset, "offset")
        data, eof = await self._consoles.read(
            _sid(req.session_id), uint(req.stream, "stream", 2), offset,
            min(uint(req.max_bytes, "max_bytes"), MAX_IO_BYTES) or 64 * 1024,
            min(uint(req.wait_ms, "wait_ms"), MAX_WAIT_MS) / 1000)
        return ops_pb.ConsoleReadResponse(data=data, offset=offset, eof=eof)

    @rpc
    async def console_write(self, req: ops_pb.ConsoleWriteRequest) -> ops_pb.ConsoleWriteResponse:
        accepted = await self._consoles.write(
            _sid(req.session_id), uint(req.offset, "offset"),
            as_bytes(req.data, "data", MAX_IO_BYTES), bool(req.close))
        return ops_pb.ConsoleWriteResponse(offset=accepted)

    @rpc
    async def console_control(self, req: ops_pb.ConsoleControlRequest
                              ) -> ops_pb.ConsoleControlResponse:
        self._consoles.control(_sid(req.session_id), uint(req.rows, "rows", MAX_SIZE),
                               uint(req.cols, "cols", MAX_SIZE), uint(req.signal, "signal", 64))
        return ops_pb.ConsoleControlResponse()

    @rpc
    async def console_wait(self, req: ops_pb.ConsoleWaitRequest) -> ops_pb.ConsoleWaitResponse:
        exit = await self._consoles.wait(_sid(req.session_id),
                                         min(uint(req.wait_ms, "wait_ms"), MAX_WAIT_MS) / 1000)
        return ops_pb.ConsoleWaitResponse(exited=exit is not None,
                                          exit_status=exit.status if exit else 0)

    @rpc
    async def console_remove(self, req: ops_pb.ConsoleRemoveRequest
                             ) -> ops_pb.ConsoleRemoveResponse:
        exit = self._consoles.remove(_sid(req.session_id))
        return ops_pb.ConsoleRemoveResponse(exited=exit is not None,
                                            exit_status=exit.status if exit else 0)
