"""The shim's connection to the agent: gRPC over a sandbox channel.

One grpclib Channel per sandbox channel, over sockets from the backend's
dialer (called again after every connection loss).  Every agent call is
idempotent or keyed (agent/PROTOCOL.md), so a call that fails because the
connection dropped (agent upgrade, shim handoff) is retried with bounded
backoff; every new connection starts with Hello, which negotiates the API
version.  gRPC errors come back as our error classes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tenacity
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from agent.api import API_VERSION, MIN_API_VERSION, FailedPrecondition, Unavailable, from_code, pb
from shim.vmm.api import Dialer

log = logging.getLogger("keel.shim.agent")
T = TypeVar("T")

#: Errors that mean "the connection is gone", never "the call failed".
_TRANSIENT = (OSError, StreamTerminatedError, ProtocolError, ConnectionError, EOFError)


class _DialChannel(Channel):
    """A grpclib Channel whose connections come from a Dialer.

    grpclib has no public API for a caller-supplied socket; overriding the
    small private ``_create_connection`` is the narrowest seam (it is
    called under the connect lock on first use and after every loss).
    """

    def __init__(self, dialer: Dialer) -> None:
        super().__init__(path="<keel-channel>")
        self._dialer = dialer
        self.generation = 0

    async def _create_connection(self) -> H2Protocol:
        sock = await self._dialer()
        _, protocol = await self._loop.create_connection(self._protocol_factory, sock=sock)
        self.generation += 1
        return protocol


class AgentConnection:
    """Calls on the agent API with reconnect, Hello and error mapping."""

    def __init__(self, dialer: Dialer, *, client_version: str, session: str, timeout: float) -> None:
        self._channel = _DialChannel(dialer)
        self.stub = pb.AgentServiceStub(self._channel)
        self._client_version = client_version
        self._session = session
        self._timeout = timeout
        self._hello_generation = -1
        self._hello_lock = asyncio.Lock()
        self.hello: pb.HelloResponse | None = None

    async def _ensure_hello(self) -> None:
        async with self._hello_lock:
            if self._hello_generation == self._channel.generation and self.hello:
                return
            req = pb.HelloRequest(api_version=API_VERSION, client_version=self._client_version,
                                  session=self._session)
            resp = await self.stub.hello(req, timeout=self._timeout)
            if not MIN_API_VERSION <= resp.api_version <= API_VERSION:
                raise FailedPrecondition(
                    f"agent {resp.agent_version} speaks API {resp.min_api_version}-"
                    f"{resp.max_api_version}; this shim speaks {MIN_API_VERSION}-{API_VERSION}"
                )
            if self.hello and self.hello.agent_version != resp.agent_version:
                log.info("agent is now %s (was %s)", resp.agent_version, self.hello.agent_version)
            self.hello = resp
            self._hello_generation = self._channel.generation

    async def call(self, fn: Callable[..., Awaitable[T]], request: Any, *,
                   timeout: float | None = None, retry_for: float | None = None) -> T:
        """``await fn(request)`` on the stub, reconnecting for up to *retry_for* s.

        Raises our error classes for gRPC errors, Unavailable when the agent
        stays unreachable.
        """
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(self._timeout if retry_for is None else retry_for),
            wait=tenacity.wait_exponential(multiplier=0.01, max=0.25),
            retry=tenacity.retry_if_exception_type(_TRANSIENT),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._ensure_hello()
                    return await fn(request, timeout=timeout)
        except GRPCError as exc:
            raise from_code(exc.status.value, exc.message or exc.status.name) from exc
        except _TRANSIENT as exc:
            raise Unavailable(f"agent unreachable: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def wait_ready(self, deadline_s: float, alive: Callable[[], bool]) -> pb.HelloResponse:
        """Wait until the agent answers a fresh Hello; fail early if *alive* turns False."""
        self._hello_generation = -1
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        delay = 0.005
        while True:
            try:
                await self._ensure_hello()
                assert self.hello is not None
                return self.hello
            except GRPCError as exc:
                raise from_code(exc.status.value, exc.message or exc.status.name) from exc
            except _TRANSIENT as exc:
                if not alive():
                    raise Unavailable("sandbox exited before its agent answered") from exc
                if loop.time() > end:
                    raise Unavailable(f"agent did not answer within {deadline_s}s: {exc!r}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)

    def close(self) -> None:
        self._channel.close()
