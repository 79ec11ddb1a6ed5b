"""The shim's connection to the agent: gRPC over a sandbox channel.

One grpclib Channel per sandbox channel, over sockets from the backend's
dialer (called again after every connection loss).  Every agent call is
idempotent or keyed (agent/PROTOCOL.md), so a call that fails because the
connection dropped (agent upgrade, shim handoff) is retried with bounded
backoff; every new connection starts with Hello, which negotiates the API
version.  gRPC errors come back as our error classes.

Every call has a deadline (the config's ``agent_call_timeout_s``, 90 s,
unless the caller names one; only the long waits, WaitProcess and a stdin
write held back by a full pipe, have none).  A call unanswered for one
*attempt* (the connection's timeout) drops the connection and is sent again
on a new one: a virtio-serial stream can stall without ever closing
(agent/_serial.py), and a resent call joins the agent's first one
(agent/PROTOCOL.md).  Calls that
must not be sent twice (a signal, pause, an upgrade) say ``resend=False``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from h2.settings import SettingCodes

from agent.api import API_VERSION, MIN_API_VERSION, ops_pb, pb, present_session_key
from keel import retry
from keel.errors import DeadlineExceeded, FailedPrecondition, Unavailable, from_code
from keel.grpc import NO_STATUS_DETAILS, guest_text, limit_messages, quiet_h2_frames
from observability.grpc import propagate
from shim.vmm.api import Dialer

log = logging.getLogger("keel.shim.agent")
T = TypeVar("T")

#: Largest DATA frame the agent may send us (h2 allows 16 KiB to 16 MiB - 1).
MAX_FRAME_BYTES = 1 << 20

#: Errors that mean "the connection is gone", never "the call failed".
_TRANSIENT = (OSError, StreamTerminatedError, ProtocolError, ConnectionError, EOFError)

#: Seconds an agent call may take in all, resends included: above the
#: agent's own deadline on the OCI runtime (agent/config.py,
#: runtime_timeout_s 60), below kubelet's runtime request timeout (2 min).
CALL_DEADLINE_S = 90.0
#: Characters kept of what the guest says (versions, error messages).
MAX_VERSION_CHARS = 64
MAX_ERROR_CHARS = 1000


class _Default:
    """The default of a keyword whose None means something else."""


DEFAULT: Any = _Default()


class _Unanswered(Exception):
    """One attempt got no answer in time (not an OSError: never retried as a dial failure)."""


class DialChannel(Channel):
    """A grpclib Channel whose connections come from a Dialer.

    grpclib has no public API for a caller-supplied socket; overriding the
    small private ``_create_connection`` is the narrowest seam (it is
    called under the connect lock on first use and after every loss).
    """

    def __init__(self, dialer: Dialer, session_key: str = "") -> None:
        quiet_h2_frames()
        limit_messages()
        super().__init__(path="<keel-channel>", status_details_codec=NO_STATUS_DETAILS)
        self._dialer = dialer
        self.generation = 0
        if session_key:  # every call carries the sandbox's session key
            present_session_key(self, session_key)
        propagate(self)  # and the current span's traceparent, when one is sampled

    async def _create_connection(self) -> H2Protocol:
        sock = await self._dialer()
        _, protocol = await self._loop.create_connection(self._protocol_factory, sock=sock)
        # Let the agent send DATA frames of up to MAX_FRAME_BYTES (h2's default
        # is 16 KiB): a large ReadOutput answer then costs a few frames, not 64
        # per MiB, on both ends.
        protocol.connection._connection.update_settings(
            {SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_BYTES})
        protocol.connection.flush()
        self.generation += 1
        return protocol


class AgentConnection:
    """Calls on the agent API with reconnect, Hello and error mapping."""

    def __init__(self, dialer: Dialer, *, client_version: str, session: str, timeout: float,
                 deadline: float = CALL_DEADLINE_S, session_key: str = "") -> None:
        self._channel = DialChannel(dialer, session_key)
        self.stub = pb.AgentServiceStub(self._channel)
        self._client_version = client_version
        self._session = session
        self._timeout = timeout
        self._deadline = deadline
        self._hello_generation = -1
        self._hello_lock = asyncio.Lock()
        self.hello: pb.HelloResponse | None = None
        self._version_hint = ""
        #: Told (container id, exec id, what) when the agent broke the protocol.
        self.on_violation: Callable[[str, str, str], None] | None = None

    def violation(self, cid: str, eid: str, detail: str) -> None:
        """The agent answered what no correct agent would (the caller stops using it)."""
        if self.on_violation is not None:
            self.on_violation(cid, eid, detail)

    @property
    def agent_version(self) -> str:
        """The agent's version from its last Hello; before any, what the ops
        channel said (:meth:`note_version`), else ""."""
        return self.hello.agent_version if self.hello else self._version_hint

    def note_version(self, version: str) -> None:
        """The agent's version as its ops channel reported it (a handoff checks
        the agent there, then dials this connection after commit)."""
        self._version_hint = guest_text(version, MAX_VERSION_CHARS)

    async def _ensure_hello(self, timeout: float | None = None) -> None:
        """Say Hello on a new connection; *timeout* caps the call (default: the connection's)."""
        async with self._hello_lock:
            if self._hello_generation == self._channel.generation and self.hello:
                return
            req = pb.HelloRequest(api_version=API_VERSION, client_version=self._client_version,
                                  session=self._session)
            resp = await self.stub.hello(req, timeout=self._timeout if timeout is None else timeout)
            # The guest's words: capped and escaped before logs, opsctl and releases see them.
            resp.agent_version = guest_text(resp.agent_version, MAX_VERSION_CHARS)
            if not MIN_API_VERSION <= resp.api_version <= API_VERSION:
                raise FailedPrecondition(
                    f"agent {resp.agent_version} speaks API {resp.min_api_version}-"
                    f"{resp.max_api_version}; this shim speaks {MIN_API_VERSION}-{API_VERSION}"
                )
            if self.hello and self.hello.agent_version != resp.agent_version:
                log.info("agent is now %s (was %s)", resp.agent_version, self.hello.agent_version)
            self.hello = resp
            self._hello_generation = self._channel.generation

    async def ready(self) -> None:
        """Say Hello on the current connection if it has not (before a streaming call)."""
        await self._ensure_hello()

    async def call(self, fn: Callable[..., Awaitable[T]], request: Any, *,
                   timeout: float | None = DEFAULT, attempt_s: float | None = DEFAULT,
                   retry_for: float | None = None, resend: bool = True) -> T:
        """``await fn(request)`` on the stub, reconnecting for up to *retry_for* s.

        *timeout* bounds the whole call (default: the connection's deadline,
        the config's ``agent_call_timeout_s``;
        None: no deadline).  An attempt unanswered for *attempt_s* (default:
        the connection's timeout; None: no bound) drops the connection and,
        with *resend*, sends the call again until *timeout*.  Raises our
        error classes for gRPC errors, Unavailable when the agent stays
        unreachable, DeadlineExceeded when it does not answer in time.
        """
        loop = asyncio.get_running_loop()
        total = self._deadline if timeout is DEFAULT else timeout
        attempt_cap = self._timeout if attempt_s is DEFAULT else attempt_s
        end = None if total is None else loop.time() + total
        sent = 0
        while True:
            bounds = [b for b in (attempt_cap, None if end is None else end - loop.time())
                      if b is not None]
            bound = max(min(bounds), 0.001) if bounds else None
            try:
                sent += 1
                return await self._attempt(fn, request, bound, retry_for)
            except _Unanswered:
                self._channel.close()  # whatever stalled, the next attempt dials anew
                name = _method(fn)
                if not resend:
                    raise DeadlineExceeded(f"agent did not answer {name} within {bound:g}s") from None
                if end is not None and loop.time() >= end - 0.001:
                    raise DeadlineExceeded(
                        f"agent did not answer {name} within {total:g}s"
                        f" ({sent} attempt{'s' if sent > 1 else ''})") from None
                log.warning("agent call %s unanswered after %.0fs: redialing and sending it again",
                            name, bound)

    async def _attempt(self, fn: Callable[..., Awaitable[T]], request: Any,
                       bound: float | None, retry_for: float | None) -> T:
        retrying = retry.retrying(first=0.01, cap=0.25, on=_TRANSIENT,
                                  within=self._timeout if retry_for is None else retry_for)
        try:
            async with asyncio.timeout(bound):
                async for attempt in retrying:
                    with attempt:
                        await self._ensure_hello()
                        return await fn(request)
        except TimeoutError:
            raise _Unanswered from None
        except GRPCError as exc:
            raise _guest_error(exc) from exc
        except _TRANSIENT as exc:
            raise Unavailable(f"agent unreachable: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def wait_ready(self, deadline_s: float, alive: Callable[[], bool],
                         attempt_s: float | None = None) -> pb.HelloResponse:
        """Wait until the agent answers a fresh Hello; fail early if *alive* turns False.

        With *attempt_s*, a Hello unanswered for that long drops the connection
        and dials again (a serial port's stream can stall where a socket would
        have closed: agent/_serial.py).
        """
        self._hello_generation = -1
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s

        def redial(exc: BaseException) -> None:
            if isinstance(exc, TimeoutError) and attempt_s is not None:
                self._channel.close()  # the next attempt dials a new connection

        # A start-up wait: each poll is a failed dial, so the backoff stays short.
        retrying = retry.retrying(first=0.005, cap=0.025, on=_TRANSIENT, within=deadline_s,
                                  give_up=lambda: not alive(), before_sleep=redial)
        try:
            async for attempt in retrying:
                with attempt:
                    # A Hello sent before the guest opened its port waits
                    # unanswered: never past the deadline.
                    left = max(end - loop.time(), 0.01)
                    await self._ensure_hello(left if attempt_s is None else min(left, attempt_s))
        except GRPCError as exc:
            raise _guest_error(exc) from exc
        except _TRANSIENT as exc:
            if not alive():
                raise Unavailable("sandbox exited before its agent answered") from exc
            raise Unavailable(f"agent did not answer within {deadline_s}s: {exc!r}") from exc
        assert self.hello is not None
        return self.hello

    def close(self) -> None:
        self._channel.close()


async def ops_call(dialer: Dialer | DialChannel,
                   call: Callable[[ops_pb.OpsServiceStub], Awaitable[T]], timeout: float,
                   session_key: str = "") -> T:
    """One OpsService call, within *timeout* s, on a connection of its own
    presenting *session_key* (or on *dialer* itself when it is a connected
    channel, which stays open and presents its own).

    The ops channel needs no session (no Hello), so unlike
    :meth:`AgentConnection.call` this never dials the agent channel.
    Raises DeadlineExceeded, Unavailable, or the agent's error as ours."""
    channel = dialer if isinstance(dialer, DialChannel) else DialChannel(dialer, session_key)
    own = channel is not dialer
    try:
        async with asyncio.timeout(timeout):
            return await call(ops_pb.OpsServiceStub(channel))
    except TimeoutError:
        raise DeadlineExceeded(f"agent did not answer on the ops channel within {timeout:g}s"
                               ) from None
    except GRPCError as exc:
        raise _guest_error(exc) from exc
    except _TRANSIENT as exc:
        raise Unavailable(f"agent unreachable on the ops channel: {exc!r}") from exc
    finally:
        if own:
            channel.close()


def _guest_error(exc: GRPCError) -> Exception:
    """Our error class for the agent's gRPC error, its message capped and escaped."""
    return from_code(exc.status.value, guest_text(exc.message or exc.status.name, MAX_ERROR_CHARS))


def _method(fn: Callable[..., Any]) -> str:
    """A stub method's RPC name for messages (``create_container`` -> CreateContainer)."""
    name = getattr(fn, "__name__", "call")
    return "".join(part.title() for part in name.split("_"))
