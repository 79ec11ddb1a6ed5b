"""upgrade.handoff: records, chunking, fds, and what a broken peer gets."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from upgrade.handoff import HandoffChannel, HandoffError, pair


def test_large_message_with_fds_round_trips() -> None:
    async def main() -> None:
        a, b = pair()
        ca, cb = HandoffChannel(a), HandoffChannel(b)
        r, w = os.pipe()
        blob = "x" * 300_000  # several records
        send = asyncio.create_task(ca.send({"type": "state", "blob": blob}, [r, w]))
        msg, fds = await cb.recv(timeout=5)
        await send
        assert msg == {"type": "state", "blob": blob}
        assert len(fds) == 2
        os.write(fds[1], b"through the passed fd")
        assert os.read(r, 100) == b"through the passed fd"
        for fd in (r, w, *fds):
            os.close(fd)
        ca.close()
        cb.close()

    asyncio.run(main())


@pytest.mark.parametrize("record,match", [
    (b"nope", "without magic"),
    (b"KH\x00{not json", "not JSON"),
    (b'KH\x00{"no":"type"}', "without a type"),
    (b"KH\x00[1]", "without a type"),
])
def test_garbage_is_a_clear_error(record: bytes, match: str) -> None:
    async def main() -> None:
        a, b = pair()
        a.send(record)
        with pytest.raises(HandoffError, match=match):
            await HandoffChannel(b).recv(timeout=5)
        a.close()
        b.close()

    asyncio.run(main())


def test_peer_gone_and_timeout() -> None:
    async def main() -> None:
        a, b = pair()
        with pytest.raises(HandoffError, match="did not answer"):
            await HandoffChannel(b).recv(timeout=0.05)
        a.close()
        with pytest.raises(HandoffError, match="closed"):
            await HandoffChannel(b).recv(timeout=5)
        with pytest.raises(HandoffError, match="gone"):
            await HandoffChannel(b).send({"type": "x"})
        b.close()

    asyncio.run(main())


def test_fds_on_continuation_are_refused_and_closed() -> None:
    async def main() -> None:
        a, b = pair()
        r, w = os.pipe()
        a.send(b"KH\x01{")
        a.sendmsg([b'KH\x00"type":"x"}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))])
        with pytest.raises(HandoffError, match="continuation"):
            await HandoffChannel(b).recv(timeout=5)
        os.close(r)
        os.close(w)
        a.close()
        b.close()

    asyncio.run(main())
