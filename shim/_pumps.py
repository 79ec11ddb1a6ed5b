"""Pumps: copy a process's stdio between containerd's endpoints and the agent.

Output pumps long-poll ``ReadOutput`` from their offset (which acks
everything below it to the agent) and write to the sink; input pumps
read the stdin fifo and ``WriteStdin`` at their offset.  Offsets are the
only state: a pump stopped at a known offset can be resumed by another
shim process without losing or duplicating a byte.
"""

from __future__ import annotations

import asyncio
import logging

from agent.api import pb
from shim._agentconn import AgentConnection
from shim._stdio import Sink, Source

log = logging.getLogger("keel.shim.pumps")

CHUNK = 256 * 1024
POLL_MS = 10_000


class OutputPump:
    def __init__(self, conn: AgentConnection, cid: str, eid: str,
                 stream: pb.OutputStream, sink: Sink, offset: int = 0) -> None:
        self._conn = conn
        self._cid, self._eid, self._stream = cid, eid, stream
        self._sink = sink
        #: Bytes delivered to the sink; owned by the pump, read by snapshots.
        self.offset = offset
        self.eof = asyncio.Event()

    async def run(self) -> None:
        """Copy until EOF; cancelling it stops at a chunk boundary."""
        stub = self._conn.stub
        try:
            while True:
                req = pb.ReadOutputRequest(container_id=self._cid, exec_id=self._eid,
                                           stream=self._stream, offset=self.offset,
                                           max_bytes=CHUNK, wait_ms=POLL_MS)
                resp = await self._conn.call(stub.read_output, req, retry_for=30)
                if resp.data:
                    await self._sink.write(resp.data)
                    self.offset += len(resp.data)
                elif resp.eof:
                    break
        finally:
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                self._sink.close()
                self.eof.set()


class InputPump:
    def __init__(self, conn: AgentConnection, cid: str, eid: str, source: Source,
                 offset: int = 0) -> None:
        self._conn = conn
        self._cid, self._eid = cid, eid
        self._source = source
        #: Bytes the agent accepted.
        self.offset = offset
        self.closed = False

    async def _send(self, data: bytes) -> None:
        req = pb.WriteStdinRequest(container_id=self._cid, exec_id=self._eid,
                                   offset=self.offset, data=data)
        resp = await self._conn.call(self._conn.stub.write_stdin, req, retry_for=30)
        self.offset = resp.offset

    async def run(self) -> None:
        while not self.closed:
            data = await self._source.read()
            if data:
                await self._send(data)

    async def close_input(self) -> None:
        """containerd's CloseIO: forward what is buffered, then close stdin."""
        if self.closed:
            return
        self.closed = True
        while (data := self._source.read_nowait()):
            await self._send(data)
        req = pb.CloseStdinRequest(container_id=self._cid, exec_id=self._eid, offset=self.offset)
        await self._conn.call(self._conn.stub.close_stdin, req)
        self._source.close()
