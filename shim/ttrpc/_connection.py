"""One server-side ttrpc connection: an asyncio.Protocol that owns its bytes.

The connection owns its read buffer (a :class:`FrameDecoder`), so it can
stop at a frame boundary and hand everything it has read but not
dispatched, plus the requests still unanswered, to a new owner (a new
shim process, over SCM_RIGHTS).  Lifecycle::

    STARTING --run()--> OPEN --peer EOF / close()--> CLOSED
       |                 |
       +---freeze()------+--> frozen --thaw()--> as before
                                  \\--release()--> RELEASED

``frozen`` is a flag on STARTING/OPEN: nothing new is dispatched, reading
is paused, and answers of handlers that finish meanwhile are held back
(the request stays "pending" so the new owner answers it instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

from keel import peercred
from keel.errors import Code, FailedPrecondition, Unavailable
from keel.peercred import PeerCred
from shim.ttrpc._frames import MAX_BODY, FrameDecoder, FrameType, Oversized, encode_frame
from shim.ttrpc._frames import oversized_message as _oversized
from shim.ttrpc._messages import Request, error_body
from shim.ttrpc._wire import parse_strict

log = logging.getLogger("keel.shim.ttrpc")

EVEN_STREAM_ID = "StreamID must be odd for client initiated streams"


@dataclasses.dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call besides the request message."""

    stream_id: int
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None  # seconds, from timeout_nano; None = no deadline
    peer_cred: PeerCred | None


class PendingRequest(NamedTuple):
    """A request read but not yet answered: its stream id and raw Request body."""

    stream_id: int
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenConnection:
    """A frozen connection's hand-off record.  The caller owns (and closes) ``fd``."""

    fd: int
    unparsed: bytes
    pending: list[PendingRequest]
    peer_cred: PeerCred | None


#: Serves one decoded request; returns the Response body; never raises
#: (except CancelledError).  Implemented by TtrpcServer.
Dispatch = Callable[[Request, CallContext], Awaitable[bytes]]


class Phase(enum.Enum):
    STARTING = "starting"
    OPEN = "open"
    CLOSED = "closed"
    RELEASED = "released"


@dataclasses.dataclass(slots=True)
class _Call:
    stream_id: int
    body: bytes
    task: asyncio.Task[None] | None = None
    answer: bytes | None = None  # held back while frozen


class ServerConnection(asyncio.Protocol):
    """A connection of a TtrpcServer; made by the server, driven by :meth:`run`."""

    _ids = itertools.count(1)

    def __init__(self, sock: socket.socket, dispatch: Dispatch, *, unparsed: bytes = b"",
                 pending: Iterable[tuple[int, bytes]] = ()) -> None:
        self.name = f"conn-{next(self._ids)}"
        self.peer_cred = peercred.of_or_none(sock)
        self.closed_by_peer = False
        self._sock = sock
        self._dispatch = dispatch
        self._decoder = FrameDecoder(unparsed)
        self._adopted = [PendingRequest(*p) for p in pending]
        self._phase = Phase.STARTING
        self._frozen = False
        self._transport: asyncio.Transport | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._calls: dict[int, _Call] = {}
        self._seq = itertools.count()
        self._held: list[int] = []  # keys of _calls answered while frozen, in order
        self._gone = asyncio.Event()
        self._boundary = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def __repr__(self) -> str:
        return f"<ServerConnection {self.name} {self._phase.value}{' frozen' if self._frozen else ''}>"

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def inflight(self) -> int:
        """Requests dispatched and not yet answered on the wire."""
        return len(self._calls)

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the peer leaves, :meth:`close` or :meth:`release`.

        Owns the TaskGroup of this connection's handlers.  Never raises
        except CancelledError; on the way out this process's fd is closed.
        """
        try:
            if self._phase is not Phase.STARTING:
                return
            await asyncio.get_running_loop().connect_accepted_socket(lambda: self, self._sock)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._dispatch_adopted()
                self._process()
                await self._gone.wait()
                self._cancel_calls()
        except Exception:
            log.exception("ttrpc %s failed", self.name)
        finally:
            self._tg = None
            if self._phase in (Phase.STARTING, Phase.OPEN):
                self._phase = Phase.CLOSED
            if self._transport is None or not self._transport.is_closing():
                self._abort()

    async def freeze(self) -> FrozenConnection:
        """Stop at a frame boundary and return the hand-off record.

        Dispatches nothing new, pauses reading, holds back answers, and
        waits until the transport's write buffer is empty.  Raises
        FailedPrecondition if not STARTING/OPEN or already frozen, and
        Unavailable if the connection closes meanwhile.  On failure
        (cancellation included) the connection is thawed again.
        """
        if self._phase not in (Phase.STARTING, Phase.OPEN) or self._frozen:
            raise FailedPrecondition(f"ttrpc: cannot freeze a connection in state {self!r}")
        self._frozen = True
        try:
            if self._transport is not None:
                await self._wait_quiet()
            fd = os.dup(self._sock.fileno())
        except BaseException:
            self.thaw()
            raise
        pending = [PendingRequest(c.stream_id, c.body) for c in self._calls.values()]
        pending += self._adopted  # adopted but not dispatched yet
        return FrozenConnection(fd, self._decoder.unparsed(), pending, self.peer_cred)

    def thaw(self) -> None:
        """Resume after a failed hand-off: send held answers, read again."""
        if self._phase is Phase.RELEASED or not self._frozen:
            raise FailedPrecondition(f"ttrpc: cannot thaw {self!r}")
        self._frozen = False
        if self._transport is None or self._phase is not Phase.OPEN:
            return
        self._transport.set_write_buffer_limits()
        for key in self._held:
            call = self._calls.pop(key)
            assert call.answer is not None
            self._transport.write(call.answer)
        self._held.clear()
        self._transport.resume_reading()
        self._dispatch_adopted()
        self._process()

    def release(self) -> None:
        """After a successful hand-off: forget the connection without a word.

        Cancels pending handlers without answering and closes this
        process's fd only (never ``shutdown()``, which would cut the new
        owner's connection too).  Legal only while frozen.
        """
        if not self._frozen or self._phase is Phase.RELEASED:
            raise FailedPrecondition(f"ttrpc: cannot release {self!r}")
        self._phase = Phase.RELEASED
        self._cancel_calls()
        self._calls.clear()
        self._held.clear()
        self._abort()
        self._gone.set()

    def close(self) -> None:
        """Server shutdown: cancel handlers, flush what was written, close."""
        if self._phase in (Phase.STARTING, Phase.OPEN):
            self._phase = Phase.CLOSED
            self._cancel_calls()
            if self._transport is not None:
                self._transport.close()  # connection_lost() follows the flush
            else:
                self._abort()
                self._gone.set()

    def abort(self) -> None:
        """Close at once, dropping unsent answers."""
        if self._phase in (Phase.STARTING, Phase.OPEN, Phase.CLOSED):
            if self._phase is not Phase.CLOSED:
                self._phase = Phase.CLOSED
                self._cancel_calls()
            self._abort()
            if self._transport is None:
                self._gone.set()

    async def wait_closed(self) -> None:
        await self._gone.wait()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # closes our fd; a dup elsewhere stays connected
        else:
            self._sock.close()

    def _cancel_calls(self) -> None:
        for call in self._calls.values():
            if call.task is not None:
                call.task.cancel()

    async def _wait_quiet(self) -> None:
        """Frozen: reach a frame boundary, pause reading, drain the writes."""
        assert self._transport is not None
        if self._decoder.discarding:  # the oversized frame must end first
            self._boundary.clear()
            await self._boundary.wait()
        self._check_open()
        self._transport.pause_reading()
        self._transport.set_write_buffer_limits(high=0)  # resume_writing() once empty
        await self._writable.wait()
        self._check_open()

    def _check_open(self) -> None:
        if self._phase is not Phase.OPEN:
            raise Unavailable(f"ttrpc: {self.name} closed while freezing")

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._phase is Phase.STARTING:
            self._phase = Phase.OPEN
        if self._frozen:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._process()

    def eof_received(self) -> bool:
        return False  # like ttrpc: EOF closes the connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._phase is Phase.OPEN:
            self._phase = Phase.CLOSED
            self.closed_by_peer = True
            log.debug("ttrpc %s closed by peer: %s", self.name, exc)
        for event in (self._gone, self._boundary, self._writable):
            event.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- frames -----------------------------------------------------------------

    def _dispatch_adopted(self) -> None:
        """Requests handed over as pending go first, as if newly received."""
        while self._adopted and not self._frozen and self._tg is not None and self._phase is Phase.OPEN:
            self._receive(*self._adopted.pop(0))

    def _process(self) -> None:
        """Dispatch buffered frames until more bytes are needed or frozen."""
        while self._tg is not None and self._phase is Phase.OPEN and not self._adopted:
            if self._frozen and not self._decoder.discarding:
                self._boundary.set()
                return
            event = self._decoder.next_event()
            if event is None:
                return
            if isinstance(event, Oversized):  # answered whatever its type, as ttrpc does
                self._write_status(event.header.stream_id, Code.RESOURCE_EXHAUSTED,
                                   _oversized(event.header.length))
            elif event.header.type == FrameType.REQUEST:
                self._receive(event.header.stream_id, event.body)
            # other frame types: ignored, for compatibility with newer peers

    def _receive(self, stream_id: int, body: bytes) -> None:
        try:
            request = parse_strict(Request, body)
        except ValueError as exc:
            self._write_status(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        if stream_id % 2 != 1:
            self._write_status(stream_id, Code.INVALID_ARGUMENT, EVEN_STREAM_ID)
            return
        key = next(self._seq)
        call = self._calls[key] = _Call(stream_id, body)
        ctx = CallContext(
            stream_id=stream_id,
            metadata=tuple((kv.key, kv.value) for kv in request.metadata),
            timeout=request.timeout_nano / 1e9 if request.timeout_nano > 0 else None,
            peer_cred=self.peer_cred,
        )
        assert self._tg is not None
        coro = self._serve(key, call, request, ctx)
        try:
            call.task = self._tg.create_task(
                coro, name=f"ttrpc {self.name} {request.service}/{request.method} #{stream_id}")
        except RuntimeError:  # the group is shutting down: so is this connection
            coro.close()
            del self._calls[key]

    async def _serve(self, key: int, call: _Call, request: Request, ctx: CallContext) -> None:
        try:
            body = await self._dispatch(request, ctx)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # cancelled by us: no answer
            body = error_body(Code.CANCELLED, "context canceled")
        if len(body) > MAX_BODY:
            body = error_body(Code.RESOURCE_EXHAUSTED, _oversized(len(body)))
        frame = encode_frame(call.stream_id, FrameType.RESPONSE, body)
        if self._frozen:
            call.answer = frame
            self._held.append(key)
            return
        del self._calls[key]
        if self._phase is Phase.OPEN and self._transport is not None:
            self._transport.write(frame)

    def _write_status(self, stream_id: int, code: Code, message: str) -> None:
        if self._transport is not None and self._phase is Phase.OPEN:
            body = error_body(code, message)
            self._transport.write(encode_frame(stream_id, FrameType.RESPONSE, body))
