"""Console sessions of a real agent (agent/_console.py, OpsService.Console*),
driven the way opsd drives them through the shim: start, long-poll reads at
offsets, writes at offsets, resize, signal, wait, remove.  Real processes,
real ptys, real runc for the container case.  Needs root and runc.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from grpclib.const import Status

from agent.api import ops_pb, pb
from tests.agent_harness import (
    AgentProcess,
    Client,
    connect,
    expect_error,
    spec_json,
    stdio,
)
from tests.containerd import wait_for

pytestmark = pytest.mark.requires_root


async def _read_until(c: Client, sid: str, needle: bytes, stream: int = 1, offset: int = 0,
                      timeout: float = 20.0) -> tuple[bytes, int]:
    """Read *sid*'s stream from *offset* until *needle* shows up; (everything read, new offset)."""
    got = bytearray()
    async with asyncio.timeout(timeout):
        while needle not in got:
            r = await c.ops.console_read(ops_pb.ConsoleReadRequest(
                session_id=sid, stream=stream, offset=offset, max_bytes=65536, wait_ms=2000))
            assert r.offset == offset
            got += r.data
            offset += len(r.data)
            if r.eof:
                break
    assert needle in got, bytes(got)
    return bytes(got), offset


async def _drain(c: Client, sid: str, stream: int) -> bytes:
    got, offset = bytearray(), 0
    while True:
        r = await c.ops.console_read(ops_pb.ConsoleReadRequest(
            session_id=sid, stream=stream, offset=offset, max_bytes=65536, wait_ms=5000))
        got += r.data
        offset += len(r.data)
        if r.eof:
            return bytes(got)


def _run(agent: AgentProcess, scenario: object) -> None:
    async def main() -> None:
        async with connect(agent) as c:
            await scenario(c)  # type: ignore[operator]
    asyncio.run(main())


def test_a_session_without_terminal_keeps_stdout_and_stderr_apart(agent: AgentProcess) -> None:
    async def scenario(c: Client) -> None:
        start = await c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="s1", argv=["sh", "-c", "echo out; echo err >&2; read x; echo got $x; "
                                              "exit 3"]))
        assert start.pid > 0
        w = await c.ops.console_write(ops_pb.ConsoleWriteRequest(session_id="s1", offset=0,
                                                                 data=b"hi\n", close=True))
        assert w.offset == 3
        # A resend of bytes the agent has is accepted once, not written twice.
        w = await c.ops.console_write(ops_pb.ConsoleWriteRequest(session_id="s1", offset=0,
                                                                 data=b"hi\n"))
        assert w.offset == 3
        out, err = await asyncio.gather(_drain(c, "s1", 1), _drain(c, "s1", 2))
        assert (out, err) == (b"out\ngot hi\n", b"err\n")
        done = await c.ops.console_wait(ops_pb.ConsoleWaitRequest(session_id="s1", wait_ms=10000))
        assert (done.exited, done.exit_status) == (True, 3)
        removed = await c.ops.console_remove(ops_pb.ConsoleRemoveRequest(session_id="s1"))
        assert (removed.exited, removed.exit_status) == (True, 3)
        await expect_error(c.ops.console_read(ops_pb.ConsoleReadRequest(session_id="s1",
                                                                        stream=1)),
                           Status.NOT_FOUND, "console session s1 not found")

    _run(agent, scenario)


def test_a_terminal_session_resizes_and_takes_ctrl_c(agent: AgentProcess) -> None:
    async def scenario(c: Client) -> None:
        await c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="t1", argv=["/bin/sh"], terminal=True, rows=30, cols=100,
            env={"PS1": "prompt$ "}))
        off_in = 0

        async def type_(text: bytes) -> None:
            nonlocal off_in
            r = await c.ops.console_write(ops_pb.ConsoleWriteRequest(session_id="t1",
                                                                     offset=off_in, data=text))
            off_in = r.offset

        _, off = await _read_until(c, "t1", b"prompt$ ")
        await type_(b"stty size\n")
        _, off = await _read_until(c, "t1", b"30 100", offset=off)
        await c.ops.console_control(ops_pb.ConsoleControlRequest(session_id="t1", rows=40,
                                                                 cols=120))
        await type_(b"stty size\n")
        _, off = await _read_until(c, "t1", b"40 120", offset=off)
        # Ctrl-C reaches the foreground job through the terminal, not the shell.
        await type_(b"sleep 100; echo slept\n")
        await asyncio.sleep(0.5)
        await type_(b"\x03")
        await type_(b"echo after-$?\n")
        seen, off = await _read_until(c, "t1", b"after-130", offset=off)
        assert b"\nslept" not in seen, seen  # the echo of the typed line holds it
        await type_(b"exit 7\n")
        done = await c.ops.console_wait(ops_pb.ConsoleWaitRequest(session_id="t1", wait_ms=10000))
        assert (done.exited, done.exit_status) == (True, 7)
        # stderr of a terminal session is empty and ended: one stream.
        r = await c.ops.console_read(ops_pb.ConsoleReadRequest(session_id="t1", stream=2))
        assert (r.data, r.eof) == (b"", True)
        await c.ops.console_remove(ops_pb.ConsoleRemoveRequest(session_id="t1"))

    _run(agent, scenario)


def test_a_session_in_a_container_joins_its_namespaces_and_cgroups(
        agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        created = await c.agent.create_container(pb.CreateContainerRequest(
            container_id="box", spec_json=spec_json(["sleep", "1000"], "box"), rootfs=rootfs,
            stdio=stdio(stdout=False, stderr=False)))
        await expect_error(c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="early", container_id="box")), Status.FAILED_PRECONDITION)
        await c.agent.start_process(pb.StartProcessRequest(container_id="box"))
        pid = created.pid
        await c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="in", container_id="box",
            argv=["sh", "-c", "readlink /proc/self/ns/pid /proc/self/ns/uts; cat /proc/self/cgroup"]))
        out = (await _drain(c, "in", 1)).decode()
        assert os.readlink(f"/proc/{pid}/ns/pid") in out, out
        assert os.readlink(f"/proc/{pid}/ns/uts") in out, out
        with open(f"/proc/{pid}/cgroup") as f:  # the hierarchies mounted here
            theirs = {line for line in f.read().splitlines()
                      if line.split(":")[1] or os.path.exists("/sys/fs/cgroup/cgroup.procs")}
        assert theirs, "no cgroup hierarchy to compare"
        ours = {line for line in out.splitlines() if line.count(":") >= 2 and "/" in line}
        assert theirs <= ours, (theirs, out)
        done = await c.ops.console_wait(ops_pb.ConsoleWaitRequest(session_id="in", wait_ms=10000))
        assert (done.exited, done.exit_status) == (True, 0)
        await c.ops.console_remove(ops_pb.ConsoleRemoveRequest(session_id="in"))
        await expect_error(c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="nobox", container_id="nope")), Status.NOT_FOUND)
        await c.agent.signal_process(pb.SignalProcessRequest(container_id="box",
                                                             signal=signal.SIGKILL))
        await c.agent.wait_process(pb.WaitProcessRequest(container_id="box"))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="box"))

    _run(agent, scenario)


def test_remove_kills_a_running_session_and_limits_hold(agent: AgentProcess) -> None:
    async def scenario(c: Client) -> None:
        start = await c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="k1", argv=["sleep", "1000"]))
        removed = await c.ops.console_remove(ops_pb.ConsoleRemoveRequest(session_id="k1"))
        assert not removed.exited
        # Killed (and reaped by the agent): gone, or a zombie for an instant.
        wait_for(lambda: _state(start.pid) in ("gone", "Z"), 10, "the session's process to die")
        await expect_error(c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="bad id!")), Status.INVALID_ARGUMENT, "session_id")
        await expect_error(c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="nx", argv=["/no/such/tool"])), Status.INVALID_ARGUMENT,
            "cannot run '/no/such/tool': No such file")
        for n in range(16):
            await c.ops.console_start(ops_pb.ConsoleStartRequest(session_id=f"m{n}",
                                                                 argv=["sleep", "1000"]))
        await expect_error(c.ops.console_start(ops_pb.ConsoleStartRequest(
            session_id="m16", argv=["true"])), Status.RESOURCE_EXHAUSTED, "16 console sessions")
        for n in range(16):
            await c.ops.console_remove(ops_pb.ConsoleRemoveRequest(session_id=f"m{n}"))

    _run(agent, scenario)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
