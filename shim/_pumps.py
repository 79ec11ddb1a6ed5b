"""Pumps: copy a process's stdio between containerd's endpoints and the agent.

Output pumps long-poll ``ReadOutput`` from their offset (which acks
everything below it to the agent) and write to the sink; input pumps read
the stdin fifo and ``WriteStdin`` at their offset.  Offsets are the only
state: a pump stopped at a known offset (``stop()``) can be resumed by a
new pump, in this process or another, without losing or duplicating a
byte.  ``stop()`` cancels a pump only while it waits for data; a chunk
being delivered is delivered first.

The agent is not trusted: an answer at another offset than asked, or
larger than asked, is a protocol violation that ends the pump (logged once,
reported to the sandbox, which publishes a ``/keel/protocol-violation``
event; nothing of it delivered).  An agent that is unreachable for a while (an
upgrade, a stalled connection) is retried with backoff until it answers or
the process is deleted: a pump never dies of a transient error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from agent.api import pb
from keel.errors import DeadlineExceeded, Internal, Unavailable
from keel.lifecycle import State
from shim._agentconn import AgentConnection
from shim._background import finish, spawn
from shim._stdio import Sink, Source
from shim.state import Offsets, Stdio

if TYPE_CHECKING:
    from shim._process import Process

log = logging.getLogger("keel.shim.pumps")
T = TypeVar("T")
#: fcntl.F_SETPIPE_SZ (Linux; the constant is missing from older Pythons).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: ReadOutput size: the agent's whole default output buffer (1 MiB), so one
#: round trip moves everything it holds.
CHUNK = 1 << 20
POLL_MS = 10_000
#: A read unanswered this long (the poll and then some) is taken as a stalled connection.
READ_ATTEMPT_S = POLL_MS / 1000 + 30
#: Kernel buffer asked for an output fifo (best effort), so a chunk goes to
#: containerd's reader in a few writes rather than one per 64 KiB.
FIFO_BYTES = 1 << 20


#: Backoff between attempts while the agent is unreachable.
RETRY_FIRST_S, RETRY_CAP_S = 0.5, 5.0


class ProtocolViolation(Internal):
    """The agent answered what no correct agent would: the pump stops."""


class _Pump:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self._busy = False  # delivering: must not be cancelled
        self._stopping = False

    async def _until_answered(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, again with backoff while the agent is unreachable."""
        wait = RETRY_FIRST_S
        failing = False
        while True:
            try:
                result = await call()
            except (Unavailable, DeadlineExceeded) as exc:
                if not failing:
                    log.warning("%s: %s; retrying until it answers", what, exc)
                    failing = True
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_CAP_S)
                continue
            if failing:
                log.info("%s: the agent answers again", what)
            return result

    async def stop(self) -> None:
        """Stop at a chunk boundary; the offset is final afterwards."""
        self._stopping = True
        await finish(self.task, cancel=not self._busy)


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
        what = f"{str(self._stream.name).lower()} of {self._cid}{'/' if self._eid else ''}{self._eid}"
        while not self._stopping:
            req = pb.ReadOutputRequest(container_id=self._cid, exec_id=self._eid,
                                       stream=self._stream, offset=self.offset,
                                       max_bytes=CHUNK, wait_ms=POLL_MS)
            resp = await self._until_answered(what, functools.partial(
                self._conn.call, stub.read_output, req, timeout=None, attempt_s=READ_ATTEMPT_S,
                retry_for=30))
            if resp.offset != req.offset or len(resp.data) > req.max_bytes:
                detail = (f"answered {len(resp.data)} bytes at offset {resp.offset} to a read of "
                          f"at most {req.max_bytes} at {req.offset}")
                self._conn.violation(self._cid, self._eid, f"{what}: {detail}")
                raise ProtocolViolation(f"{what}: the agent {detail}; output stops here")
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
            # No deadline: the agent holds a write while the process's stdin is full.
            resp = await self._until_answered(f"stdin of {self._cid}/{self._eid}", functools.partial(
                self._conn.call, self._conn.stub.write_stdin, req, timeout=None, attempt_s=None,
                retry_for=30))
            if not req.offset <= resp.offset <= req.offset + len(data):
                detail = (f"stdin of {self._cid}/{self._eid}: the agent accepted up to offset "
                          f"{resp.offset} after a write of {len(data)} bytes at {req.offset}")
                self._conn.violation(self._cid, self._eid, detail)
                raise ProtocolViolation(detail)
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


@dataclasses.dataclass(slots=True)
class Endpoints:
    """A process's open stdio endpoints (containerd's fifos) before pumps own them.

    The caller closes them if the process is never created; once
    :func:`start` ran, the pumps own them.
    """

    sinks: dict[str, Sink | None]
    source: Source | None

    @classmethod
    def open(cls, stdio: Stdio) -> Endpoints:
        """Open every endpoint *stdio* names (stderr is unused with a terminal)."""
        return cls({"stdout": Sink.open(stdio.stdout),
                    "stderr": None if stdio.terminal else Sink.open(stdio.stderr)},
                   Source.open(stdio.stdin))

    @classmethod
    def reopen(cls, stdio: Stdio, done: Offsets) -> Endpoints:
        """Open them again in a new shim, skipping streams that finished."""
        return cls({"stdout": None if done.stdout_eof else Sink.open(stdio.stdout),
                    "stderr": None if done.stderr_eof or stdio.terminal
                    else Sink.open(stdio.stderr)},
                   None if done.stdin_closed else Source.open(stdio.stdin))

    @classmethod
    def take_from(cls, proc: Process) -> Endpoints:
        """Take the endpoints of *proc*'s stopped pumps (a thaw restarts them)."""
        ends = cls({n: o.sink for n, o in proc.outputs.items() if not o.eof.is_set()},
                   proc.input.source if proc.input and not proc.input.closed else None)
        proc.outputs, proc.input = {}, None
        return ends

    def wire(self, terminal: bool) -> pb.Stdio:
        """Which streams the agent must keep for the process."""
        return pb.Stdio(terminal=terminal, stdin=self.source is not None,
                        stdout=self.sinks.get("stdout") is not None,
                        stderr=self.sinks.get("stderr") is not None and not terminal)

    def close(self) -> None:
        for sink in self.sinks.values():
            if sink:
                sink.close()
        if self.source:
            self.source.close()


_STREAMS = {"stdout": pb.OutputStream(1), "stderr": pb.OutputStream(2)}


def start(proc: Process, conn: AgentConnection, ends: Endpoints,
          tasks: asyncio.TaskGroup) -> None:
    """Start (or resume, from ``proc.resume_from``) the pumps of *proc* in *tasks*."""
    at = proc.resume_from
    for name, sink in ends.sinks.items():
        if sink is None:
            continue
        pump = OutputPump(conn, proc.cid, proc.eid, _STREAMS[name], sink, getattr(at, name))
        proc.outputs[name] = pump
        pump.task = spawn(tasks, pump.run(), f"{name} pump of {proc.name}", f"{name}-{proc.name}")
    if ends.source is not None:
        # An exec takes stdin only once started (InputPump).
        started = not proc.eid or proc.state is not State.CREATED
        proc.input = InputPump(conn, proc.cid, proc.eid, ends.source, at.stdin, started=started)
        proc.input.task = spawn(tasks, proc.input.run(), f"stdin pump of {proc.name}",
                                f"stdin-{proc.name}")


async def stop(proc: Process) -> None:
    """Stop *proc*'s pumps at chunk boundaries; their offsets are final after."""
    for pump in (*proc.outputs.values(), *([proc.input] if proc.input else [])):
        await pump.stop()
