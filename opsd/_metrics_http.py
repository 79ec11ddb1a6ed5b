"""opsd's ``GET /metrics``: a minimal HTTP/1.1 server inside opsd's event loop.

Inside the loop, not prometheus_client's own server thread, because a scrape
asks every shim over async gRPC (opsd/_metrics.py).  One request per
connection, answered with ``Connection: close``: ``GET`` (or ``HEAD``)
``/metrics`` gives the registry in Prometheus's text format, any other path
404, any other method 405.  What a client can make it hold is bounded: the
request head (:data:`MAX_REQUEST_BYTES`), the time a connection may take
(:data:`CONNECTION_S`) and the connections served at once
(:data:`MAX_CONNECTIONS`; more are answered 503).

Where it listens: ``--metrics-address HOST:PORT``, else ``[metrics] address``
of the node's config file (``$KEEL_CONFIG`` or ``/etc/keel/config.toml``),
else :data:`DEFAULT_ADDRESS`; ``none`` or an empty value turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keel.errors import FailedPrecondition, InvalidArgument
from shim.api import read_config

log = logging.getLogger("opsd.metrics")

DEFAULT_ADDRESS = "127.0.0.1:9464"
FLAG = "--metrics-address"
#: Bytes of a request's line and headers (Prometheus sends about 300).
MAX_REQUEST_BYTES = 8192
#: Seconds one connection may take, reading the request to writing the answer
#: (a scrape's own deadline is shorter: opsd._metrics.DEADLINE_S).
CONNECTION_S = 15.0
MAX_CONNECTIONS = 16
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int
    #: Where it was set, for errors: the flag, the config file or the default.
    origin: str

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, origin: str) -> Address | None:
    """*text* as ``HOST:PORT`` (``[V6]:PORT`` for IPv6); None for ``none`` or
    empty (metrics off).  InvalidArgument naming *origin* otherwise."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_v6 = _is_ip(host, 6)
    else:
        valid_v6 = ":" not in host
    if not sep or not host or not valid_v6 or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"{origin}: metrics address {text!r} is not HOST:PORT (such as"
                              f" {DEFAULT_ADDRESS} or [::1]:9464); 'none' turns metrics off")
    return Address(host, int(port), origin)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def configured_address(flag: str | None) -> Address | None:
    """The address to serve on: *flag* (the option's value) wins over the
    config file's ``[metrics] address``, which wins over the default."""
    if flag is not None:
        return parse_address(flag, FLAG)
    file, raw = read_config()
    table = raw.get("metrics", {})
    if not isinstance(table, dict) or set(table) - {"address"}:
        raise InvalidArgument(f"config file {file}: [metrics] takes one key, address ="
                              f' "HOST:PORT" or "none"')
    address = table.get("address", DEFAULT_ADDRESS)
    if not isinstance(address, str):
        raise InvalidArgument(f"config file {file}: [metrics] address must be a string")
    origin = f"[metrics] address in {file}" if "address" in table else "the default"
    return parse_address(address, origin)


class MetricsServer:
    """Serves *scrape* (the text to answer ``GET /metrics`` with) on one address."""

    def __init__(self, scrape: Callable[[], Awaitable[bytes]]) -> None:
        self._scrape = scrape
        self._server: asyncio.Server | None = None
        #: The handlers running: cancelled by :meth:`aclose` (asyncio's server
        #: starts them itself, outside any task group).
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, address: Address) -> str:
        """Listen; the address bound (its port chosen by the kernel for port 0).
        FailedPrecondition when the address is in use or cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._handle, address.host, address.port, limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            why = ("the address is already in use" if exc.errno == errno.EADDRINUSE
                   else exc.strerror or str(exc))
            raise FailedPrecondition(
                f"cannot serve metrics on {address} ({address.origin}): {why}; choose another"
                f" with {FLAG} HOST:PORT or [metrics] address, or turn metrics off with"
                f" {FLAG} none") from exc
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(Address(host, port, address.origin))

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if len(self._handlers) > MAX_CONNECTIONS:
                writer.write(_response(503, b"too many connections\n"))
            else:
                async with asyncio.timeout(CONNECTION_S):
                    writer.write(await self._answer(reader))
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # a client that stalls or goes away gets nothing more
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _response(431, b"request head too large\n")
        except asyncio.IncompleteReadError:
            return _response(400, b"incomplete request\n")
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"not an HTTP/1 request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return _response(404, b"not found; metrics are at /metrics\n")
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        try:
            body = await self._scrape()
        except Exception:  # a bug: say so to the scraper, keep serving
            log.exception("metrics scrape failed")
            return _response(500, b"scrape failed; see the opsd log\n")
        return _response(200, body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD")


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", *,
              extra: bytes = b"", head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    return head + extra + b"\r\n" + (b"" if head_only else body)
