"""A ttrpc v1.1 server on asyncio, wire-compatible with containerd 1.6.

Requests are served concurrently, each as its own task in the TaskGroup
of its connection (containerd pipelines ``Wait``, which blocks until the
process exits, ahead of ``Start``'s answer); answers go out as handlers
finish, on the request's stream id.  Errors are answered as ttrpc v1.1.1
does (see ``_connection`` for the framing-level ones)::

    unknown service          12  "service X"
    unknown method           12  "method X"
    payload not decodable    13  "ttrpc: error unmarshalling payload: ..."
    deadline (timeout_nano)   4  "context deadline exceeded"
    handler raised           code_of(exc), str(exc); tracebacks go to the log only

Live hand-off: :meth:`TtrpcServer.freeze_all` stops every connection at a
frame boundary and returns their records; the new owner calls
:meth:`TtrpcServer.adopt_connection` with each; the old one then calls
:meth:`TtrpcServer.release_all` (or :meth:`TtrpcServer.thaw_all` if the
hand-off failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import betterproto

from keel.errors import AlreadyExists, Code, FailedPrecondition, KeelError, Unavailable, code_of
from keel.logs import Throttle
from shim.ttrpc._connection import (
    CallContext,
    FrozenConnection,
    PeerCred,
    Phase,
    ServerConnection,
)
from shim.ttrpc._messages import Request, Response, error_body
from shim.ttrpc._wire import parse_strict

#: How long aclose() lets connections flush before cutting them.
CLOSE_GRACE_S = 1.0
#: Back-off after accept() fails for lack of resources (EMFILE...).
ACCEPT_RETRY_S = 1.0
ACCEPT_BURST = 64

log = logging.getLogger("keel.shim.ttrpc")

Handler = Callable[[Any, CallContext], Awaitable[betterproto.Message]]
#: Called with each parsed request; the call runs inside what it returns (a span).
Observe = Callable[[Request, Any, CallContext], contextlib.AbstractContextManager[Any]]


@dataclasses.dataclass(frozen=True, slots=True)
class Method:
    """A unary method: its request class and ``async handler(request, ctx) -> response``."""

    request_cls: type[betterproto.Message]
    handler: Handler


@dataclasses.dataclass(frozen=True, slots=True)
class ServerStatistics:
    connections: int
    inflight: int
    accepting: bool


def same_user(cred: PeerCred) -> bool:
    """containerd's UnixSocketRequireSameUser: peer uid and gid are ours (effective)."""
    return cred.uid == os.geteuid() and cred.gid == os.getegid()


def error_status(exc: BaseException) -> tuple[Code, str]:
    """The one place a handler's exception becomes a ttrpc status.

    Classified by type (``keel.errors.code_of``); foreign errors are
    Unknown (2) and logged with their traceback, which never goes on the wire.
    """
    code = code_of(exc)
    message = str(exc) or type(exc).__name__
    if isinstance(exc, KeelError):
        log.debug("ttrpc handler error %s: %s", code.name, message)
    else:
        log.error("ttrpc handler raised %s", type(exc).__name__, exc_info=exc)
    return code, message


class TtrpcServer:
    """Serves registered services on a listener and on adopted connections.

    *authorize* is applied to the SO_PEERCRED of every accepted peer (None
    disables it); a refused peer is closed at once.  *on_connection_lost*
    is called with a connection its peer closed (not for ones this server
    closed or released).  The listener stays the caller's: never closed here.
    """

    def __init__(self, *, authorize: Callable[[PeerCred], bool] | None = same_user,
                 on_connection_lost: Callable[[ServerConnection], None] | None = None,
                 observe: Observe | None = None) -> None:
        self._authorize = authorize
        self._observe = observe
        self._on_connection_lost = on_connection_lost
        self._services: dict[str, dict[str, Method]] = {}
        self._conns: set[ServerConnection] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._stop: asyncio.Event | None = None
        self._served = asyncio.Event()
        self._listener: socket.socket | None = None
        self._accepting = False
        self._accept_failures = Throttle()
        self._retry: asyncio.TimerHandle | None = None
        self._frozen = False
        self._closed = False

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        """Add *service* (fully qualified, e.g. ``containerd.task.v2.Task``)."""
        if service in self._services:
            raise AlreadyExists(f"ttrpc service {service} already registered")
        self._services[service] = dict(methods)

    def connections(self) -> list[ServerConnection]:
        """Live connections, started or not yet."""
        return [c for c in self._conns if c.phase in (Phase.STARTING, Phase.OPEN)]

    def statistics(self) -> ServerStatistics:
        conns = self.connections()
        return ServerStatistics(len(conns), sum(c.inflight for c in conns), self._accepting)

    # -- serving ----------------------------------------------------------------

    async def serve(self, listener: socket.socket | None = None) -> None:
        """Run the server until :meth:`aclose` (or cancellation).

        Accepts on *listener* if given, and runs every connection
        (accepted or adopted) in this call's TaskGroup.  Only one serve()
        at a time.
        """
        if self._tg is not None or self._closed:
            raise FailedPrecondition("ttrpc server is already serving or closed")
        self._stop = asyncio.Event()
        self._served.clear()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for conn in [c for c in self._conns if c.phase is Phase.STARTING]:
                    self._launch(conn)
                if listener is not None:
                    listener.setblocking(False)
                    self._listener = listener
                    self._accept_on()
                await self._stop.wait()
                self._accept_off()
                await self._close_connections()
        finally:
            self._accept_off()
            self._listener = None
            self._tg = None
            self._served.set()

    def adopt_connection(self, sock: socket.socket, unparsed: bytes = b"",
                         pending: Iterable[tuple[int, bytes]] = ()) -> ServerConnection:
        """Serve a connection handed over by a frozen server.

        *unparsed* is fed before any new byte from *sock*, and each pending
        ``(stream_id, request body)`` is dispatched first, as if newly
        received (handlers must be idempotent).  Takes ownership of *sock*.
        Starts at once if serve() runs, else when it starts.
        """
        if self._closed:
            raise FailedPrecondition("ttrpc server is closed")
        sock.setblocking(False)
        conn = ServerConnection(sock, self._dispatch, unparsed=unparsed, pending=pending)
        self._conns.add(conn)
        if self._tg is not None:
            self._launch(conn)
        return conn

    async def aclose(self) -> None:
        """Stop accepting, close every connection (flushing briefly), end serve().

        Call it from outside the server's own tasks (not from a handler).
        """
        self._closed = True
        if self._stop is not None and self._tg is not None:
            self._stop.set()
            await self._served.wait()
        for conn in list(self._conns):  # never started
            conn.close()
        self._conns.clear()

    # -- hand-off -----------------------------------------------------------------

    async def freeze_all(self) -> list[FrozenConnection]:
        """Stop accepting and freeze every live connection; see ServerConnection.freeze.

        Connections that close meanwhile are left out.  On failure, everything
        is thawed again and the dup'ed fds closed.
        """
        if self._frozen:
            raise FailedPrecondition("ttrpc server is already frozen")
        self._frozen = True
        self._accept_off()
        frozen: list[FrozenConnection] = []
        try:
            for conn in self.connections():
                try:
                    frozen.append(await conn.freeze())
                except Unavailable:
                    continue
        except BaseException:
            for record in frozen:
                os.close(record.fd)
            self.thaw_all()
            raise
        return frozen

    def thaw_all(self) -> None:
        """Undo freeze_all(): serve and accept again."""
        self._frozen = False
        for conn in self.connections():
            if conn.frozen:
                conn.thaw()
        if self._listener is not None and not self._closed:
            self._accept_on()

    def release_all(self) -> None:
        """After a successful hand-off: drop every frozen connection silently,
        and close this process's copy of the listener.

        The new shim holds the listener now.  A copy kept open until this
        process exits would keep accepting into the backlog, so containerd's
        ``delete`` would take the socket of a new shim that died after the
        commit for a live one and leave it behind.  The server stays frozen
        (accepts nothing) until aclose().
        """
        for conn in self.connections():
            if conn.frozen:
                conn.release()
        if self._listener is not None and self._frozen:
            self._listener.close()

    # -- internals ------------------------------------------------------------------

    def _launch(self, conn: ServerConnection) -> None:
        assert self._tg is not None
        self._tg.create_task(self._run(conn), name=f"ttrpc {conn.name}")

    async def _run(self, conn: ServerConnection) -> None:
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            if conn.closed_by_peer and self._on_connection_lost is not None:
                try:
                    self._on_connection_lost(conn)
                except Exception:
                    log.exception("ttrpc on_connection_lost callback failed")

    async def _close_connections(self) -> None:
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                for conn in conns:
                    await conn.wait_closed()
        except TimeoutError:
            for conn in conns:
                conn.abort()

    async def _dispatch(self, request: Request, ctx: CallContext) -> bytes:
        """Serve one request; returns the Response body (never raises but CancelledError)."""
        method = self._services.get(request.service, {}).get(request.method)
        if method is None:
            if request.service not in self._services:
                return error_body(Code.UNIMPLEMENTED, f"service {request.service}")
            return error_body(Code.UNIMPLEMENTED, f"method {request.method}")
        try:
            message = parse_strict(method.request_cls, request.payload)
        except ValueError as exc:
            return error_body(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}")
        deadline = asyncio.timeout(ctx.timeout)
        observed = (self._observe(request, message, ctx) if self._observe is not None
                    else contextlib.nullcontext())
        try:
            with observed:
                async with deadline:
                    result = await method.handler(message, ctx)
        except Exception as exc:
            if deadline.expired():
                return error_body(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            return error_body(*error_status(exc))
        try:
            if not isinstance(result, betterproto.Message):
                raise TypeError(f"{type(result).__name__} is not a protobuf message")
            return bytes(Response(payload=bytes(result)))
        except Exception as exc:
            log.error("ttrpc %s/%s returned a bad response", request.service, request.method,
                      exc_info=exc)
            return error_body(Code.INTERNAL, f"ttrpc: error marshaling payload: {exc}")

    # -- accepting ------------------------------------------------------------------

    def _accept_on(self) -> None:
        if self._listener is None or self._accepting or self._frozen or self._closed:
            return
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)
        self._accepting = True

    def _accept_off(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._accepting and self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
        self._accepting = False

    def _accept_ready(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS...: back off instead of spinning
                if (quiet := self._accept_failures()) is not None:
                    log.error("ttrpc accept failed, retrying each %.0fs: %s (%d failures since"
                              " the last line)", ACCEPT_RETRY_S, exc, quiet)
                self._accept_off()
                self._retry = asyncio.get_running_loop().call_later(ACCEPT_RETRY_S, self._accept_on)
                return
            self._accepted(sock)

    def _accepted(self, sock: socket.socket) -> None:
        conn = ServerConnection(sock, self._dispatch)
        if self._authorize is not None:
            cred = conn.peer_cred
            if cred is None or not self._authorize(cred):
                log.warning("ttrpc: refused peer %s", cred)
                sock.close()
                return
        sock.setblocking(False)
        self._conns.add(conn)
        self._launch(conn)
