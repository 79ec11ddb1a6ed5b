"""The agent's serial-port bridge (agent/_serial.py), with a pty standing in for the port.

A pty has no virtio-serial reconnect semantics, so this covers the bridge's
own logic: raw bytes both ways, a session per HTTP/2 preface (a new host
session replaces the old one even without an EOF), stray bytes dropped,
clean close.  The virtio-serial behaviour itself is covered by tests/vm.
"""

from __future__ import annotations

import asyncio
import os
import pty
import socket
import tempfile
from pathlib import Path

from agent._serial import GOAWAY, PREFACE, bridges, inherited_serial_listener, serial_listener
from upgrade.aio import wait_readable


async def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        await wait_readable(fd)
        data += os.read(fd, n - len(data))
    return data


def test_bridge_sessions_over_a_pty() -> None:
    async def main() -> None:
        master, slave = pty.openpty()
        os.set_blocking(master, False)
        slave_path = os.ttyname(slave)
        os.close(slave)
        listener = serial_listener("agent", slave_path)
        sessions: list[list[bytes]] = []
        ended: list[asyncio.Event] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got: list[bytes] = []
            sessions.append(got)
            done = asyncio.Event()
            ended.append(done)
            while chunk := await reader.read(4096):
                got.append(chunk)
                writer.write(b"ack:" + chunk[-3:])
                await writer.drain()
            done.set()
            writer.close()

        server = await asyncio.start_server(handle, sock=listener)
        bridge = listener.bridge
        assert bridge is not None
        try:
            async with asyncio.timeout(10):
                os.write(master, b"stray bytes before any session")
                # A pty merges writes (a virtio-serial read never does): let the
                # bridge consume the stray bytes before the next write.  The bridge
                # has no event for that: poll, under the enclosing deadline.
                while bridge.statistics().stray_bytes < 30:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                os.write(master, PREFACE + b"one")
                assert await _read_exactly(master, 7) == b"ack:one"
                os.write(master, PREFACE + b"two")  # a new host session, no EOF before it
                assert await _read_exactly(master, 7) == b"ack:two"
                await ended[0].wait()  # the first session's connection was closed
            assert [b"".join(s) for s in sessions] == [PREFACE + b"one", PREFACE + b"two"]
            stats = bridge.statistics()
            assert stats.sessions == 2
            assert stats.stray_bytes == len(b"stray bytes before any session")
            assert stats.bytes_to_host == 14
        finally:
            server.close()
            await server.wait_closed()
            os.close(master)
        assert listener.fileno() == -1 and listener.bridge is None

    asyncio.run(main())


def test_port_handed_over_to_a_new_bridge() -> None:
    """What an in-place upgrade does: the old bridge flushes, the port fd lives on
    in a new bridge, which tells the connected host (GOAWAY) to start a new session."""

    async def main() -> None:
        master, slave = pty.openpty()
        os.set_blocking(master, False)
        slave_path = os.ttyname(slave)
        os.close(slave)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(4096):
                writer.write(b"ack:" + chunk[-3:])
                await writer.drain()
            writer.close()

        old = serial_listener("agent", slave_path)
        assert old.bridge is not None
        server = await asyncio.start_server(echo, sock=old)
        try:
            async with asyncio.timeout(10):
                os.write(master, PREFACE + b"one")
                assert await _read_exactly(master, 7) == b"ack:one"
                assert old.bridge.flush_nowait(1.0)
                assert old.bridge.quiet()
                port = os.dup(old.bridge.port_fd)  # what survives the execve
        finally:
            server.close()
            await server.wait_closed()
        assert bridges() == {}
        # What the previous image's bridge left: a directory whose socket nobody listens on.
        stale = Path(tempfile.mkdtemp(prefix="keel-agent-"))
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(stale / "s"))
        new = inherited_serial_listener("agent", port)
        assert bridges() == {"agent": new.bridge}
        assert not stale.exists() and new.workdir is not None and Path(new.workdir).is_dir()
        server = await asyncio.start_server(echo, sock=new)
        try:
            async with asyncio.timeout(10):
                assert await _read_exactly(master, len(GOAWAY)) == GOAWAY
                os.write(master, PREFACE + b"two")
                assert await _read_exactly(master, 7) == b"ack:two"
        finally:
            server.close()
            await server.wait_closed()
            os.close(master)
        assert new.bridge is None and bridges() == {}

    asyncio.run(main())
