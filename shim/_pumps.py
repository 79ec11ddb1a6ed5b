"""Pumps: copy a process's stdio between containerd's endpoints and the agent.

Output pumps long-poll ``ReadOutput`` from their offset (which acks
everything below it to the agent) and write to the sink; input pumps read
the stdin fifo and ``WriteStdin`` at their offset.  Offsets are the only
state: a pump stopped at a known offset (``stop()``) can be resumed by a
new pump, in this process or another, without losing or duplicating a
byte.  ``stop()`` cancels a pump only while it waits for data; a chunk
being delivered is delivered first.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging

from agent.api import pb
from shim._agentconn import AgentConnection
from shim._stdio import Sink, Source

log = logging.getLogger("keel.shim.pumps")
#: fcntl.F_SETPIPE_SZ (Linux; the constant is missing from older Pythons).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: ReadOutput size: the agent's whole default output buffer (1 MiB), so one
#: round trip moves everything it holds.
CHUNK = 1 << 20
POLL_MS = 10_000
#: Kernel buffer asked for an output fifo (best effort), so a chunk goes to
#: containerd's reader in a few writes rather than one per 64 KiB.
FIFO_BYTES = 1 << 20


class _Pump:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self._busy = False  # delivering: must not be cancelled
        self._stopping = False

    async def stop(self) -> None:
        """Stop at a chunk boundary; the offset is final afterwards."""
        self._stopping = True
        task = self.task
        if task is None or task.done():
            return
        if not self._busy:
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # we were cancelled ourselves
        except Exception:
            pass  # the pump's own failure was logged by its guard


class OutputPump(_Pump):
    def __init__(self, conn: AgentConnection, cid: str, eid: str,
                 stream: pb.OutputStream, sink: Sink, offset: int = 0) -> None:
        super().__init__()
        self._conn = conn
        self._cid, self._eid, self._stream = cid, eid, stream
        self.sink = sink
        try:
            fcntl.fcntl(sink.fd, _F_SETPIPE_SZ, FIFO_BYTES)
        except OSError:
            pass  # not a pipe, or above /proc/sys/fs/pipe-max-size: keep its size
        #: Bytes delivered to the sink; owned by the pump.
        self.offset = offset
        self.eof = asyncio.Event()

    async def run(self) -> None:
        """Copy until EOF, then close the sink (containerd then sees EOF)."""
        stub = self._conn.stub
        while not self._stopping:
            req = pb.ReadOutputRequest(container_id=self._cid, exec_id=self._eid,
                                       stream=self._stream, offset=self.offset,
                                       max_bytes=CHUNK, wait_ms=POLL_MS)
            resp = await self._conn.call(stub.read_output, req, retry_for=30)
            if resp.data:
                self._busy = True
                try:
                    await self.sink.write(resp.data)
                    self.offset += len(resp.data)
                finally:
                    self._busy = False
            elif resp.eof:
                self.sink.close()
                self.eof.set()
                return


class InputPump(_Pump):
    """Copies the stdin fifo to the agent.

    The agent takes stdin only once the process runs (an exec's pipes or
    pty exist after its start), so nothing is sent before ``started`` is
    set; bytes wait in the fifo meanwhile.  A CloseIO that comes earlier
    is carried out after the start.
    """

    def __init__(self, conn: AgentConnection, cid: str, eid: str, source: Source,
                 offset: int = 0, *, started: bool = True) -> None:
        super().__init__()
        self._conn = conn
        self._cid, self._eid = cid, eid
        self.source = source
        #: Bytes the agent accepted.
        self.offset = offset
        self.closed = False
        #: Set by the owner once the agent runs the process.
        self.started = asyncio.Event()
        if started:
            self.started.set()
        self._close_pending = False

    async def _send(self, data: bytes) -> None:
        self._busy = True
        try:
            req = pb.WriteStdinRequest(container_id=self._cid, exec_id=self._eid,
                                       offset=self.offset, data=data)
            resp = await self._conn.call(self._conn.stub.write_stdin, req, retry_for=30)
            self.offset = resp.offset
        finally:
            self._busy = False

    async def run(self) -> None:
        await self.started.wait()
        if self._close_pending:
            self._busy = True  # a close in progress is finished, not cancelled
            try:
                await self._close()
            finally:
                self._busy = False
            return
        while not self._stopping and not self.closed:
            data = await self.source.read()
            if data:
                await self._send(data)

    async def close_input(self) -> None:
        """containerd's CloseIO: forward what is buffered, then close stdin."""
        if self.closed or self._close_pending:
            return
        if not self.started.is_set():
            self._close_pending = True  # the pump closes once started
            return
        await self.stop()
        await self._close()

    async def _close(self) -> None:
        self.closed = True
        while (data := self.source.read_nowait()):
            await self._send(data)
        req = pb.CloseStdinRequest(container_id=self._cid, exec_id=self._eid, offset=self.offset)
        await self._conn.call(self._conn.stub.close_stdin, req)
        self.source.close()
