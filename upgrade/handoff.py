"""The shim handoff channel: messages and fds over a SOCK_SEQPACKET pair.

Wire format (written down in upgrade/PROTOCOL.md): a *message* is a JSON
object, UTF-8, sent as one or more *records*.  A record is
``b"KH" + flags (1 byte) + chunk``; flag bit 0 ("more") says another
record of the same message follows.  File descriptors travel as
SCM_RIGHTS on the first record of a message only.  SEQPACKET keeps record
boundaries, so a receiver never sees half a record; a truncated record or
truncated ancillary data (MSG_TRUNC / MSG_CTRUNC) is a protocol error.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from keel.errors import FailedPrecondition, InvalidArgument
from upgrade.aio import wait_readable, wait_writable
from upgrade.scm import close_all, fds_of, rights

MAGIC = b"KH"
MORE = 0x01
RECORD_MAX = 60 * 1024
MESSAGE_MAX = 64 * 1024 * 1024
FDS_MAX = 253  # SCM_MAX_FD
#: Version of this handoff wire protocol (not of Keel).
PROTOCOL_VERSION = 1


class HandoffError(FailedPrecondition):
    """The peer broke the handoff protocol, went away, or timed out."""


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected SEQPACKET pair; the second end is inheritable (for the child)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.set_inheritable(True)
    return a, b


class HandoffChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    async def _wait(self, writable: bool) -> None:
        await (wait_writable if writable else wait_readable)(self.sock.fileno())

    async def send(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message (and *fds* with its first record)."""
        if len(fds) > FDS_MAX:
            raise InvalidArgument(f"handoff: {len(fds)} fds exceed {FDS_MAX}")
        data = json.dumps(msg, separators=(",", ":")).encode()
        chunks = [data[i : i + RECORD_MAX] for i in range(0, len(data), RECORD_MAX)] or [b""]
        for i, chunk in enumerate(chunks):
            record = MAGIC + bytes([MORE if i < len(chunks) - 1 else 0]) + chunk
            anc = rights(fds) if i == 0 else []
            while True:
                try:
                    self.sock.sendmsg([record], anc)
                    break
                except BlockingIOError:
                    await self._wait(writable=True)
                except OSError as exc:
                    raise HandoffError(f"handoff peer is gone: {exc}") from exc

    async def recv(self, timeout: float) -> tuple[dict[str, Any], list[int]]:
        """Receive one message; HandoffError on EOF, garbage or timeout.

        The caller owns the returned fds (close them if it does not adopt them).
        """
        try:
            async with asyncio.timeout(timeout):
                return await self._recv()
        except TimeoutError:
            raise HandoffError(f"handoff peer did not answer within {timeout}s") from None

    async def _recv(self) -> tuple[dict[str, Any], list[int]]:
        buf = bytearray()
        fds: list[int] = []
        first = True
        try:
            while True:
                record, anc, flags = await self._recv_record()
                if first:
                    fds = fds_of(anc)
                elif anc:
                    close_all(fds_of(anc))
                    raise HandoffError("handoff: fds on a continuation record")
                first = False
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise HandoffError("handoff: truncated record or ancillary data")
                if not record:
                    raise HandoffError("handoff peer closed the channel")
                if record[:2] != MAGIC or len(record) < 3:
                    raise HandoffError("handoff: record without magic")
                buf += record[3:]
                if len(buf) > MESSAGE_MAX:
                    raise HandoffError("handoff: message too large")
                if not record[2] & MORE:
                    break
            try:
                msg = json.loads(buf)
            except (ValueError, UnicodeDecodeError) as exc:
                raise HandoffError(f"handoff: message is not JSON: {exc}") from exc
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise HandoffError("handoff: message without a type")
            return msg, fds
        except BaseException:
            close_all(fds)
            raise

    async def _recv_record(self) -> tuple[bytes, list[Any], int]:
        space = socket.CMSG_SPACE(FDS_MAX * 4)
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(RECORD_MAX + 3, space)
                return data, anc, flags
            except BlockingIOError:
                await self._wait(writable=False)
            except OSError as exc:
                raise HandoffError(f"handoff channel failed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()
