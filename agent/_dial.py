"""Dial: a TCP connection to 127.0.0.1:port in the sandbox, carried over one
gRPC stream (the shim's half of CRI PortForward is shim/_portforward.py).

The first frame from the caller names the port; every later frame carries
bytes.  Each side's end of stream is a half close (``shutdown(SHUT_WR)``
towards the server in the sandbox); the stream ends when the server has
closed its side and everything it sent went out.  What the caller sends is
checked: one port, in range, and frames of at most ``max_frame`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from agent.api import pb
from keel.errors import InvalidArgument, Unavailable

log = logging.getLogger("keel.agent.dial")

#: Bytes read from the sandbox's server per frame sent back.
READ_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0


async def dial(frames: AsyncIterator[pb.DialFrame], max_frame: int) -> AsyncIterator[pb.DialFrame]:
    """The frames that answer *frames* (an async generator: the stream handler's body)."""
    first = await anext(frames, None)
    if first is None:
        return
    port = first.port
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgument(f"port {port!r} is out of range 1-65535")
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except TimeoutError:
        raise Unavailable(f"dial 127.0.0.1:{port} in the sandbox: no answer in "
                          f"{CONNECT_TIMEOUT_S:g}s") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise Unavailable(f"dial 127.0.0.1:{port} in the sandbox: {why}") from None
    log.info("port %d: connected", port)

    async def upstream() -> None:
        try:
            frame: pb.DialFrame | None = first
            while frame is not None:
                if frame.port not in (0, port):
                    raise InvalidArgument("only the first frame may name a port")
                if not isinstance(frame.data, bytes) or len(frame.data) > max_frame:
                    raise InvalidArgument(f"a frame carries at most {max_frame} bytes")
                if frame.data:
                    writer.write(frame.data)
                    await writer.drain()
                frame = await anext(frames, None)
            if writer.can_write_eof():
                writer.write_eof()  # the caller is done sending: half close
        except (OSError, InvalidArgument) as exc:
            log.info("port %d: caller's side ended: %s", port, exc)
            writer.close()

    sending = asyncio.ensure_future(upstream())
    sent = 0
    try:
        while data := await reader.read(READ_BYTES):
            sent += len(data)
            yield pb.DialFrame(data=data)
    except OSError as exc:
        log.info("port %d: server's side ended: %s", port, exc)
    finally:
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending
        writer.close()
        log.info("port %d: closed (%d bytes back)", port, sent)
