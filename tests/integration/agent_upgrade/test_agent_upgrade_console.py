"""Console sessions across an in-place agent upgrade (agent/_console.py,
agent/_handover.py): the session's process, its terminal and its pipes stay;
the new image answers at the same offsets, so output printed before, during
and after the exec arrives once and in order, and stdin goes on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.api import ops_pb
from tests.agent_harness import AgentProcess, Client, retrying
from tests.integration.agent_upgrade.scenario import A, B, agent_health, launcher, run, upgrade


async def _read(c: Client, sid: str, stream: int, offset: int) -> ops_pb.ConsoleReadResponse:
    return await retrying(lambda: c.ops.console_read(ops_pb.ConsoleReadRequest(
        session_id=sid, stream=stream, offset=offset, max_bytes=65536, wait_ms=1000)))


async def _drain(c: Client, sid: str, stream: int, until: bytes = b"") -> tuple[bytes, int]:
    got = bytearray()
    while True:
        r = await _read(c, sid, stream, len(got))
        got += r.data
        if r.eof or (until and until in got):
            return bytes(got), len(got)


@pytest.mark.requires_root
def test_console_sessions_cross_an_agent_upgrade(agent: AgentProcess, releases: Path) -> None:
    async def scenario(c: Client) -> None:
        # A counter on pipes (stdout and stderr apart) and a shell on a terminal.
        n = 400
        counter = await c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="count", argv=["sh", "-c", f"i=0; while [ $i -lt {n} ]; do echo $i; "
                                                  f"echo e$i >&2; i=$((i+1)); sleep 0.005; done;"
                                                  f" read x; echo got-$x; exit 6"]))
        shell = await c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="tty", argv=["/bin/sh"], terminal=True, rows=25, cols=90,
            env={"PS1": "$ "}))
        out_task = asyncio.ensure_future(_drain(c, "count", 1))
        err_task = asyncio.ensure_future(_drain(c, "count", 2))
        await _drain(c, "tty", 1, b"$ ")
        await c.ops.console_write(ops_pb.ConsoleWriteRequest(session_id="tty", offset=0,
                                                             data=b"echo $$ before\n"))
        await asyncio.sleep(0.5)  # the counter is running when the image is replaced
        resp = await upgrade(c, launcher(releases, "b"), B)
        assert (resp.from_version, resp.to_version) == (A, B)
        assert (await agent_health(c)).agent_version == B
        # The shell is the same process, on the same terminal, at the same offsets.
        w = await retrying(lambda: c.ops.console_write(ops_pb.ConsoleWriteRequest(
            session_id="tty", offset=len(b"echo $$ before\n"), data=b"echo $$ after; stty size\n")))
        assert w.offset == len(b"echo $$ before\necho $$ after; stty size\n")
        seen, _ = await _drain(c, "tty", 1, b"25 90")
        assert f"{shell.pid} before".encode() in seen and f"{shell.pid} after".encode() in seen
        # The counter's stdin, written after the exec, reaches it.
        await retrying(lambda: c.ops.console_write(ops_pb.ConsoleWriteRequest(
            session_id="count", offset=0, data=b"x\n", close=True)))
        (out, _), (err, _) = await out_task, await err_task
        assert out.decode().split() == [*map(str, range(n)), "got-x"]
        assert err.decode().split() == [f"e{i}" for i in range(n)]
        done = await retrying(lambda: c.ops.console_wait(ops_pb.ConsoleWaitRequest(
            session_id="count", wait_ms=10000)))
        assert (done.exited, done.exit_status) == (True, 6)
        for sid in ("count", "tty"):
            await c.ops.console_remove(ops_pb.ConsoleRemoveRequest(session_id=sid))
        assert counter.pid > 0

    run(agent, scenario)
    log = agent.log()
    assert "console session count (pid" in log and "resumed" in log, log[-3000:]
    assert "Traceback" not in log, log
