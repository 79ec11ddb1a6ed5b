"""Host-side dialers over real unix sockets (this kernel has no vsock loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from shim.vmm._dialers import ExclusiveDialer, hybrid_vsock_dialer, unix_dialer, vsock_dialer
from tests.prereq import skip_or_fail

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="keel-dial-") as d:
        path = str(Path(d) / "s")
        srv = await asyncio.start_unix_server(handler, path)
        try:
            yield path
        finally:
            srv.close()
            await srv.wait_closed()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


async def _recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while chunk := await loop.sock_recv(sock, 100):
        data += chunk
    return data


def test_unix_dialer_connects_fresh_each_time() -> None:
    async def main() -> None:
        async with server(_echo) as path:
            dial = unix_dialer(path)
            for i in range(2):
                sock = await dial()
                assert not sock.getblocking()
                await asyncio.get_running_loop().sock_sendall(sock, b"ping%d" % i)
                assert await _recv_all(sock) == b"ping%d" % i
                sock.close()

    asyncio.run(main())


def test_unix_dialer_missing_socket_is_an_oserror() -> None:
    with pytest.raises(FileNotFoundError):
        asyncio.run(unix_dialer("/nonexistent/keel.sock")())


def _hybrid(answer: bytes, *, after: bytes = b"", hold: bool = False) -> Handler:
    """A hybrid-vsock peer: reads CONNECT, answers *answer* (+ *after* in the same write)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        assert line == b"CONNECT 1024\n"
        if hold:
            await reader.read()  # never answer
        writer.write(answer + after)
        await writer.drain()
        writer.close()

    return handle


def test_hybrid_vsock_leaves_the_protocol_bytes_after_ok() -> None:
    """The guest's first HTTP/2 frame may share a segment with OK: it must not be eaten."""

    async def main() -> None:
        async with server(_hybrid(b"OK 1073741824\n", after=b"\x00\x00\x00\x04SETTINGS")) as path:
            sock = await hybrid_vsock_dialer(path, 1024)()
            assert await _recv_all(sock) == b"\x00\x00\x00\x04SETTINGS"
            sock.close()

    asyncio.run(main())


@pytest.mark.parametrize("answer,message", [
    (b"ERR no listener\n", "refused: 'ERR no listener'"),
    (b"OK", "closed during handshake"),
    (b"X" * 100, "longer than 64 bytes"),
])
def test_hybrid_vsock_bad_answers(answer: bytes, message: str) -> None:
    async def main() -> None:
        async with server(_hybrid(answer)) as path:
            with pytest.raises(ConnectionError, match=message):
                await hybrid_vsock_dialer(path, 1024)()

    asyncio.run(main())


def test_hybrid_vsock_silent_peer_times_out() -> None:
    async def main() -> None:
        async with server(_hybrid(b"", hold=True)) as path:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ConnectionError, match="no answer within 0.2s"):
                await hybrid_vsock_dialer(path, 1024, timeout=0.2)()
            assert loop.time() - started < 2.0

    asyncio.run(main())


def test_vsock_dialer_fails_cleanly_without_a_peer() -> None:
    """No vsock loopback here: a dial to an absent CID must fail, not hang."""
    if not hasattr(socket, "AF_VSOCK"):
        skip_or_fail("no AF_VSOCK in this Python")
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        skip_or_fail(f"AF_VSOCK sockets unavailable: {exc} (modprobe vsock)")
    with pytest.raises(OSError):
        asyncio.run(vsock_dialer(4_000_000, 1024, timeout=1.0)())


def test_exclusive_dialer_lets_go_of_the_previous_socket() -> None:
    """One client per port: a new dial shuts the old connection down first."""
    seen: list[bytes] = []

    async def main() -> None:
        eof = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.read())
            eof.set()
            writer.close()

        async with server(handle) as path:
            dial = ExclusiveDialer(unix_dialer(path), release_timeout=0.2)
            first = await dial()
            await asyncio.get_running_loop().sock_sendall(first, b"a")
            second = await dial()  # the owner of `first` never closes it: timeout, then go on
            assert second is not first
            async with asyncio.timeout(2):
                await eof.wait()
            assert seen == [b"a"]
            first.close()
            second.close()

    asyncio.run(main())
