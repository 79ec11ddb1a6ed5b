"""Offset logic of the agent's stdio: OutputBuffer, OutputPump backpressure, stdin offsets.

Pure logic plus real pipes; no containers.  pytest has no asyncio plugin
here, so async cases run under asyncio.run().
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent._fds import FdTable
from agent._output import OutputBuffer, OutputPump
from agent._reaper import exit_status
from agent._stdin import StdinLedger, StdinWriter
from keel.errors import FailedPrecondition, InvalidArgument
from upgrade.aio import wait_readable

#: A bound for failures only: never waited out when things work.
DEADLINE_S = 10.0


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll *condition* on every loop turn until it holds; fail after DEADLINE_S."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while not condition():  # noqa: ASYNC110 -- the pump has no event to wait on
                await asyncio.sleep(0)
    except TimeoutError:
        raise AssertionError(f"timed out after {DEADLINE_S}s waiting for {what}") from None


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe behind *fd* (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_reads_are_offset_addressed_and_ack_what_is_below() -> None:
    buf = OutputBuffer(limit=100)
    buf.append(b"hello ")
    buf.append(b"world")
    assert buf.read_nowait(0, 5) == (b"hello", False)
    assert buf.read_nowait(0, 100) == (b"hello world", False)  # a retry re-reads
    assert buf.read_nowait(6, 100) == (b"world", False)  # acks 0..6
    assert buf.base == 6 and buf.end == 11
    with pytest.raises(InvalidArgument, match="already acknowledged"):
        buf.read_nowait(0, 10)
    with pytest.raises(InvalidArgument, match="beyond the end"):
        buf.read_nowait(12, 10)


def test_eof_only_once_everything_was_returned() -> None:
    buf = OutputBuffer(limit=100)
    buf.append(b"abc")
    buf.close()
    assert buf.read_nowait(0, 2) == (b"ab", False)
    assert buf.read_nowait(2, 2) == (b"c", True)
    assert buf.read_nowait(3, 2) == (b"", True)
    with pytest.raises(RuntimeError):
        buf.append(b"late")


def test_space_is_reported_when_a_read_frees_a_full_buffer() -> None:
    calls: list[int] = []
    buf = OutputBuffer(limit=4)
    buf.on_space = lambda: calls.append(buf.space())
    buf.append(b"abcd")
    assert buf.space() == 0
    buf.read_nowait(0, 10)  # acks nothing
    assert calls == []
    buf.read_nowait(3, 10)
    assert calls == [3]


def test_long_poll_wakes_on_data_and_times_out_empty() -> None:
    async def scenario() -> None:
        buf = OutputBuffer(limit=100)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, buf.append, b"late")
        t0 = loop.time()
        assert await buf.read(0, 10, wait_s=5) == (b"late", False)
        assert loop.time() - t0 < 2
        assert await buf.read(4, 10, wait_s=0.05) == (b"", False)
        loop.call_later(0.05, buf.close)
        assert await buf.read(4, 10, wait_s=5) == (b"", True)

    asyncio.run(scenario())


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=50), max_size=30),
       reads=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=60))
def test_any_interleaving_delivers_each_byte_once_in_order(chunks: list[bytes],
                                                          reads: list[int]) -> None:
    buf = OutputBuffer(limit=1 << 20)
    got = bytearray()
    pending = list(chunks)
    for size in reads:
        if pending:
            buf.append(pending.pop(0))
        data, _ = buf.read_nowait(len(got), size)
        got += data
    for chunk in pending:
        buf.append(chunk)
    buf.close()
    while True:
        data, eof = buf.read_nowait(len(got), 64)
        got += data
        if eof:
            break
    assert bytes(got) == b"".join(chunks)


def test_pump_stops_reading_when_full_and_loses_nothing() -> None:
    async def scenario() -> None:
        fds = FdTable()
        r, w = os.pipe()
        fds.add(r, "stdout:test")
        buf = OutputBuffer(limit=4096)
        OutputPump(r, buf, fds.close, "test")
        payload = bytes(range(256)) * 64  # 16 KiB: more than the buffer holds
        os.set_blocking(w, False)
        written = os.write(w, payload)
        assert written == len(payload)
        os.close(w)
        await _until(lambda: buf.end >= 4096, "the pump to fill the buffer")
        assert buf.end == 4096  # full: the pump paused, the rest waits in the pipe
        assert _unread(r) == len(payload) - 4096
        got = bytearray()
        while True:
            data, eof = await buf.read(len(got), 1000, wait_s=2)
            got += data
            if eof:
                break
        assert bytes(got) == payload
        assert len(fds) == 0  # the pump closed its fd at EOF

    asyncio.run(scenario())


def test_stdin_ledger_skips_retries_and_rejects_gaps() -> None:
    ledger = StdinLedger()
    assert ledger.accept(0, b"hello") == b"hello"
    assert ledger.accept(0, b"hello") == b""  # retried
    assert ledger.accept(3, b"lo world") == b" world"  # overlapping retry
    assert ledger.accepted == 11
    with pytest.raises(InvalidArgument, match="gap"):
        ledger.accept(12, b"x")


def test_stdin_writer_buffers_drains_and_closes() -> None:
    async def scenario() -> None:
        fds = FdTable()
        r, w = os.pipe()
        fds.add(w, "stdin:test")
        writer = StdinWriter(w, 1 << 20, fds.close, "test")
        big = b"x" * 300_000  # more than the pipe holds: the rest drains later
        assert await writer.write(0, big) == len(big)
        assert await writer.write(0, big) == len(big)
        writer.close_at(len(big))
        got = bytearray()
        os.set_blocking(r, False)
        async with asyncio.timeout(DEADLINE_S):
            while True:
                try:
                    data = os.read(r, 65536)
                except BlockingIOError:
                    await wait_readable(r)
                    continue
                if not data:
                    break
                got += data
        os.close(r)
        assert bytes(got) == big  # written once, then EOF
        assert len(fds) == 0
        with pytest.raises(FailedPrecondition, match="closed"):
            await writer.write(len(big), b"more")

    asyncio.run(scenario())


def test_stdin_writer_waits_when_full_and_fails_when_reader_goes() -> None:
    async def scenario() -> None:
        fds = FdTable()
        r, w = os.pipe()
        fds.add(w, "stdin:test")
        writer = StdinWriter(w, 4096, fds.close, "test")
        offset = 0
        while len(writer.pending()) < 4096:  # fill the pipe and then the agent's buffer
            offset = await writer.write(offset, b"y" * 4096)
        waiting = asyncio.ensure_future(writer.write(offset, b"z"))
        await asyncio.sleep(0)  # one loop turn: the write has run up to its wait
        assert not waiting.done()  # full: it waits for room
        os.close(r)  # the process went away: pending bytes cannot be written
        with pytest.raises(FailedPrecondition, match="closed its stdin"):
            await waiting

    asyncio.run(scenario())


@pytest.mark.parametrize(("status", "expected"), [(3 << 8, 3), (0, 0), (9, 137), (15, 143)])
def test_exit_status_is_shell_style(status: int, expected: int) -> None:
    assert exit_status(status) == expected
