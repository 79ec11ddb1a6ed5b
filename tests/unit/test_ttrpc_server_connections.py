"""TtrpcServer against real unix sockets: requests served concurrently, a
peer going away, listening sockets and peer credentials."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from betterproto.lib.google.protobuf import StringValue

from shim.ttrpc import PeerCred, TtrpcClient, TtrpcServer
from tests.unit.ttrpc_harness import (
    SVC,
    RawPeer,
    Service,
    listen,
    make_server,
    oneshot,
    request_body,
    run,
    serving,
)

# -- concurrency -------------------------------------------------------------------------


def test_requests_are_served_concurrently() -> None:
    """Wait-before-Start: a request blocks until a later one on the same connection runs."""

    async def check(peer: RawPeer, service: Service, server: TtrpcServer) -> None:
        peer.send(1, request_body("Block", bytes(StringValue("start"))))
        peer.send(3, request_body("Release", bytes(StringValue("start"))))
        got = {}
        for _ in range(2):
            header, response = await peer.recv()
            got[header.stream_id] = response
        assert got[3].status.code == 0
        assert got[1].payload == bytes(StringValue("S:released start"))

    oneshot(check)


def test_peer_close_cancels_handlers_and_server_carries_on() -> None:
    lost: list[object] = []

    async def main() -> None:
        service = Service()
        server = make_server(service, on_connection_lost=lost.append)
        async with serving(server):
            peer = await RawPeer.attach(server)
            peer.send(1, request_body("Block", bytes(StringValue("orphan"))))
            await service.has_started("orphan").wait()
            await peer.close()
            await service.was_cancelled("orphan").wait()
            other = await RawPeer.attach(server)
            assert (await other.call(1, request_body("Empty"))).status.code == 0
            assert len(server.connections()) == 1
            await other.close()
        assert len(lost) == 1

    run(main)


# -- listener and credentials ---------------------------------------------------------------


def test_serves_a_listener_and_checks_credentials(tmp_path: Path) -> None:
    async def main() -> None:
        seen: list[PeerCred] = []

        def authorize(cred: PeerCred) -> bool:
            seen.append(cred)
            return len(seen) > 1  # refuse the first peer only

        service = Service()
        server = make_server(service, authorize=authorize)
        with listen(tmp_path / "s.sock") as listener:
            async with serving(server, listener):
                reader, writer = await asyncio.open_unix_connection(tmp_path / "s.sock")
                assert await reader.read() == b""  # refused: closed at accept
                writer.close()
                client = await TtrpcClient.connect(f"unix://{tmp_path / 's.sock'}")
                assert (await client.call(SVC, "Echo", StringValue("hi"), StringValue)).value == "S:hi"
                await client.aclose()
            assert listener.fileno() != -1  # the listener stays the caller's
        assert seen[0] == PeerCred(os.getpid(), os.geteuid(), os.getegid())

    run(main)


def test_default_authorizer_is_same_user() -> None:
    from shim.ttrpc import same_user

    assert same_user(PeerCred(1, os.geteuid(), os.getegid()))
    assert not same_user(PeerCred(1, os.geteuid() + 1, os.getegid()))
    assert not same_user(PeerCred(1, os.geteuid(), os.getegid() + 1))
