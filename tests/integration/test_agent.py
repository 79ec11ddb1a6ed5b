"""keel-agent end to end: a real agent process, real runc, real containers.

Each test starts its own agent (a child subreaper of pytest) on temp unix
sockets and drives it the way the shim does: Hello, CreateContainer with
the bundle's config.json, long-poll ReadOutput loops, WriteStdin,
WaitProcess, RemoveProcess.  Needs root and runc; skips loudly otherwise
(fails instead when CI=true).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from agent.api import API_VERSION, ops_pb, pb
from tests.agent_harness import (
    AgentProcess,
    Client,
    connect,
    expect_error,
    process_json,
    read_both,
    spec_json,
    stdio,
)

pytestmark = pytest.mark.requires_root

Scenario = Callable[[Client], Coroutine[Any, Any, None]]


def _run(agent: AgentProcess, scenario: Scenario) -> None:
    async def main() -> None:
        async with connect(agent) as client:
            await scenario(client)
    asyncio.run(main())


async def _create(c: Client, cid: str, rootfs: str, args: list[str], **kw: Any) -> int:
    terminal = kw.get("terminal", False)
    resp = await c.agent.create_container(pb.CreateContainerRequest(
        container_id=cid, spec_json=spec_json(args, cid, terminal=terminal), rootfs=rootfs,
        stdio=stdio(**kw)))
    assert resp.pid > 0
    return resp.pid


async def _wait(c: Client, cid: str, eid: str = "") -> pb.WaitProcessResponse:
    return await c.agent.wait_process(pb.WaitProcessRequest(container_id=cid, exec_id=eid))


async def _remove(c: Client, cid: str, eid: str = "") -> None:
    await c.agent.remove_process(pb.RemoveProcessRequest(container_id=cid, exec_id=eid))


async def _kill(c: Client, cid: str, sig: int, eid: str = "") -> None:
    await c.agent.signal_process(pb.SignalProcessRequest(container_id=cid, exec_id=eid, signal=sig))


def test_run_to_exit_keeps_status_until_removed(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        pid = await _create(c, "run1", rootfs, ["sh", "-c", "echo hello; echo err >&2; exit 3"])
        # The shim starts its output pumps before StartProcess: they long-poll at offset 0.
        pumps = asyncio.ensure_future(read_both(c.agent, "run1"))
        started = await c.agent.start_process(pb.StartProcessRequest(container_id="run1"))
        assert started.pid == pid
        assert await pumps == (b"hello\n", b"err\n")
        first, second = await _wait(c, "run1"), await _wait(c, "run1")
        assert first.exit_status == 3 and first.pid == pid
        assert first == second  # kept, not forgotten after the first wait
        assert abs(first.exited_at_ns - time.time_ns()) < 60e9
        state = await c.agent.get_state(pb.Empty())
        [proc] = [p for ct in state.containers for p in ct.processes]
        assert (proc.state, proc.exit_status, proc.stdout_offset, proc.stderr_offset) == (
            pb.ProcessState.STOPPED, 3, 6, 4)
        # Retrying a read at the last offset answers EOF with no data.
        again = await c.agent.read_output(pb.ReadOutputRequest(
            container_id="run1", stream=pb.OutputStream.STDOUT, offset=6, wait_ms=1000))
        assert (again.data, again.eof) == (b"", True)
        await expect_error(c.agent.read_output(pb.ReadOutputRequest(
            container_id="run1", stream=pb.OutputStream.STDOUT, offset=0)),
            Status.INVALID_ARGUMENT, "already acknowledged")
        await _remove(c, "run1")
        await expect_error(_wait(c, "run1"), Status.NOT_FOUND)
        await expect_error(_remove(c, "run1"), Status.NOT_FOUND)
        assert agent.runc_containers() == []
    _run(agent, scenario)


def test_exec_signals_and_listing(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        await _create(c, "ex1", rootfs, ["sleep", "1000"], stdout=False, stderr=False)
        await c.agent.start_process(pb.StartProcessRequest(container_id="ex1"))
        req = pb.ExecProcessRequest(container_id="ex1", exec_id="e1", stdio=stdio(),
                                    process_json=process_json(["sh", "-c", "echo exec-out; exit 5"]))
        await c.agent.exec_process(req)
        await c.agent.exec_process(req)  # an identical retry is fine
        other = pb.ExecProcessRequest(container_id="ex1", exec_id="e1", stdio=stdio(),
                                      process_json=process_json(["true"]))
        await expect_error(c.agent.exec_process(other), Status.ALREADY_EXISTS)
        pid = (await c.agent.start_process(pb.StartProcessRequest(container_id="ex1",
                                                                  exec_id="e1"))).pid
        assert await read_both(c.agent, "ex1", "e1") == (b"exec-out\n", b"")
        assert (await _wait(c, "ex1", "e1")).exit_status == 5
        again = await c.agent.start_process(pb.StartProcessRequest(container_id="ex1",
                                                                   exec_id="e1"))
        assert again.pid == pid  # starting a started process answers its pid
        await _remove(c, "ex1", "e1")

        await c.agent.exec_process(pb.ExecProcessRequest(
            container_id="ex1", exec_id="sleeper", process_json=process_json(["sleep", "1000"])))
        spid = (await c.agent.start_process(pb.StartProcessRequest(container_id="ex1",
                                                                   exec_id="sleeper"))).pid
        listed = await c.agent.list_processes(pb.ContainerRequest(container_id="ex1"))
        assert pb.ProcessEntry(pid=spid, exec_id="sleeper") in listed.processes
        assert len(listed.processes) == 2
        await expect_error(_remove(c, "ex1", "sleeper"), Status.FAILED_PRECONDITION, "running")
        await _kill(c, "ex1", signal.SIGTERM, "sleeper")
        assert (await _wait(c, "ex1", "sleeper")).exit_status == 128 + signal.SIGTERM
        await expect_error(_kill(c, "ex1", signal.SIGTERM, "sleeper"), Status.NOT_FOUND)
        await _remove(c, "ex1", "sleeper")

        await expect_error(_remove(c, "ex1"), Status.FAILED_PRECONDITION, "running")
        await _kill(c, "ex1", signal.SIGKILL)  # PID 1 of its namespace: only KILL is sure
        assert (await _wait(c, "ex1")).exit_status == 128 + signal.SIGKILL
        await expect_error(_kill(c, "ex1", signal.SIGKILL), Status.NOT_FOUND, "already exited")
        await _remove(c, "ex1")
    _run(agent, scenario)


def test_pause_resume_update_stats(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        await _create(c, "pr1", rootfs, ["sleep", "1000"], stdout=False, stderr=False)
        await c.agent.start_process(pb.StartProcessRequest(container_id="pr1"))
        ref = pb.ContainerRequest(container_id="pr1")
        await c.agent.pause_container(ref)
        await expect_error(c.agent.pause_container(ref), Status.FAILED_PRECONDITION, "paused")
        state = await c.agent.get_state(pb.Empty())
        assert state.containers[0].processes[0].state == pb.ProcessState.PAUSED
        await c.agent.resume_container(ref)
        limit = 64 << 20
        await c.agent.update_container(pb.UpdateContainerRequest(
            container_id="pr1", resources_json=json.dumps({"memory": {"limit": limit}}).encode()))
        stats = (await c.agent.stats_container(ref)).stats
        assert stats.memory_limit == limit
        assert stats.pids_current == 1 and stats.cpu_usage_ns > 0
        await _kill(c, "pr1", signal.SIGKILL)
        await _wait(c, "pr1")
        await _remove(c, "pr1")
    _run(agent, scenario)


def test_stdin_round_trip_with_retried_write(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        await _create(c, "in1", rootfs, ["cat"], stdin=True)
        await c.agent.start_process(pb.StartProcessRequest(container_id="in1"))
        pumps = asyncio.ensure_future(read_both(c.agent, "in1"))

        async def write(offset: int, data: bytes) -> int:
            resp = await c.agent.write_stdin(pb.WriteStdinRequest(
                container_id="in1", offset=offset, data=data))
            return resp.offset

        assert await write(0, b"hello ") == 6
        assert await write(0, b"hello ") == 6  # a retry after a lost reply: not written twice
        assert await write(6, b"world\n") == 12
        assert await write(6, b"world\nagain\n") == 18  # overlapping retry: only the new part
        await expect_error(write(100, b"gap"), Status.INVALID_ARGUMENT, "gap")
        await c.agent.close_stdin(pb.CloseStdinRequest(container_id="in1", offset=18))
        await c.agent.close_stdin(pb.CloseStdinRequest(container_id="in1", offset=18))
        assert await pumps == (b"hello world\nagain\n", b"")
        assert (await _wait(c, "in1")).exit_status == 0
        assert await write(0, b"hello ") == 18  # old bytes after close: still just the offset
        await expect_error(write(18, b"more"), Status.FAILED_PRECONDITION, "closed")
        state = await c.agent.get_state(pb.Empty())
        assert state.containers[0].processes[0].stdin_offset == 18
        await _remove(c, "in1")
    _run(agent, scenario)


def test_backpressure_bounds_memory_and_loses_nothing(runc: str, rootfs: str) -> None:
    limit = 256 * 1024
    total = 8_000_000
    agent = AgentProcess(runc, "--output-buffer-bytes", str(limit))

    async def scenario(c: Client) -> None:
        await _create(c, "bp1", rootfs, ["sh", "-c", f"yes | head -c {total}"], stderr=False)
        await c.agent.start_process(pb.StartProcessRequest(container_id="bp1"))
        # Nobody reads: the agent fills its buffer, then stops reading the pipe.
        deadline = time.monotonic() + 10
        while (await _offsets(c))[0] < limit:
            assert time.monotonic() < deadline, "buffer never filled"
            await asyncio.sleep(0.01)
        held, state = await _offsets(c)
        assert held == limit and state == pb.ProcessState.RUNNING  # blocked, not dropping
        rss0 = agent.rss_kib()
        offset, peak = 0, rss0
        while True:
            resp = await c.agent.read_output(pb.ReadOutputRequest(
                container_id="bp1", stream=pb.OutputStream.STDOUT, offset=offset,
                max_bytes=100_000, wait_ms=5000))
            assert resp.offset == offset
            _check_yes(resp.data, offset)
            offset += len(resp.data)
            held = (await _offsets(c))[0]
            assert held - offset <= limit, "agent buffered beyond its limit"
            peak = max(peak, agent.rss_kib())
            if resp.eof:
                break
        assert offset == total  # every byte exactly once, in order
        assert (await _wait(c, "bp1")).exit_status == 0
        assert peak - rss0 < 16 * 1024, f"agent RSS grew by {peak - rss0} KiB"
        await _remove(c, "bp1")

    try:
        _run(agent, scenario)
    finally:
        leftovers = agent.cleanup()
    assert leftovers == []


async def _offsets(c: Client) -> tuple[int, int]:
    """(stdout offset held, state) of the only container's init."""
    state = await c.agent.get_state(pb.Empty())
    proc = state.containers[0].processes[0]
    return proc.stdout_offset, proc.state


def _check_yes(data: bytes, offset: int) -> None:
    """``yes`` writes "y\\n" forever: byte n is 'y' for even n, newline for odd n."""
    if not data:
        return
    expected = (b"y\n" * (len(data) // 2 + 2))[offset % 2: offset % 2 + len(data)]
    assert data == expected, f"corrupt or misplaced output at offset {offset}"


def test_terminal_through_console_socket(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        await _create(c, "tty1", rootfs, ["sh", "-c", "tty; echo x"], terminal=True,
                      stdout=True, stderr=False)
        await c.agent.resize_pty(pb.ResizePtyRequest(container_id="tty1", width=100, height=40))
        await c.agent.start_process(pb.StartProcessRequest(container_id="tty1"))
        out, err = await read_both(c.agent, "tty1")
        assert b"/dev/pts/" in out and b"x\r\n" in out, out
        assert err == b""
        assert (await _wait(c, "tty1")).exit_status == 0
        state = await c.agent.get_state(pb.Empty())
        assert state.containers[0].processes[0].terminal
        await _remove(c, "tty1")

        # An exec with a terminal, in a running container, with stdin through the pty.
        await _create(c, "tty2", rootfs, ["sleep", "1000"], stdout=False, stderr=False)
        await c.agent.start_process(pb.StartProcessRequest(container_id="tty2"))
        await c.agent.exec_process(pb.ExecProcessRequest(
            container_id="tty2", exec_id="sh", stdio=stdio(terminal=True, stdin=True),
            process_json=process_json(["sh", "-c", "tty; read line; echo got-$line"])))
        await expect_error(c.agent.resize_pty(pb.ResizePtyRequest(
            container_id="tty2", exec_id="sh", width=80, height=24)),
            Status.FAILED_PRECONDITION, "not started")
        await c.agent.start_process(pb.StartProcessRequest(container_id="tty2", exec_id="sh"))
        await c.agent.resize_pty(pb.ResizePtyRequest(container_id="tty2", exec_id="sh",
                                                     width=80, height=24))
        await c.agent.write_stdin(pb.WriteStdinRequest(container_id="tty2", exec_id="sh",
                                                       data=b"hi\n"))
        out, _ = await read_both(c.agent, "tty2", "sh")
        assert b"/dev/pts/" in out and b"got-hi" in out, out
        assert (await _wait(c, "tty2", "sh")).exit_status == 0
        await _kill(c, "tty2", signal.SIGKILL)
        await _wait(c, "tty2")
        await _remove(c, "tty2")
    _run(agent, scenario)


def test_idempotent_create_and_start(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        req = pb.CreateContainerRequest(container_id="id1", rootfs=rootfs, stdio=stdio(),
                                        spec_json=spec_json(["sleep", "1000"], "id1"))
        first, second = await asyncio.gather(c.agent.create_container(req),
                                             c.agent.create_container(req))
        assert first.pid == second.pid
        req.spec_json = spec_json(["sleep", "999"], "id1")
        await expect_error(c.agent.create_container(req), Status.ALREADY_EXISTS)
        start = pb.StartProcessRequest(container_id="id1")
        a, b = await asyncio.gather(c.agent.start_process(start), c.agent.start_process(start))
        assert a.pid == b.pid == first.pid
        await _kill(c, "id1", signal.SIGKILL)
        await _wait(c, "id1")
        await _remove(c, "id1")

        # A caller that gives up mid-create (deadline, lost connection) does not leave
        # half a container: the create finishes in the agent and the retry gets it.
        req = pb.CreateContainerRequest(container_id="id2", rootfs=rootfs, stdio=stdio(),
                                        spec_json=spec_json(["true"], "id2"))
        with pytest.raises((GRPCError, asyncio.TimeoutError)):
            await c.agent.create_container(req, timeout=0.01)
        pid = (await c.agent.create_container(req)).pid
        state = await c.agent.get_state(pb.Empty())
        assert [(ct.container_id, ct.processes[0].pid) for ct in state.containers] == [("id2", pid)]
        await _remove(c, "id2")
    _run(agent, scenario)


def test_remove_created_container(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        await _create(c, "cr1", rootfs, ["true"])
        waiter = asyncio.ensure_future(_wait(c, "cr1"))
        await _remove(c, "cr1")  # never started: runc delete kills it
        assert (await waiter).exit_status == 128 + signal.SIGKILL
        await expect_error(_wait(c, "cr1"), Status.NOT_FOUND)
        assert agent.runc_containers() == []
    _run(agent, scenario)


def test_bad_input_is_rejected_with_the_right_code(agent: AgentProcess, rootfs: str) -> None:
    async def scenario(c: Client) -> None:
        async def create(**kw: Any) -> Any:
            args = {"container_id": "bad1", "rootfs": rootfs, "stdio": stdio(),
                    "spec_json": spec_json(["true"], "bad1"), **kw}
            return await c.agent.create_container(pb.CreateContainerRequest(**args))

        await expect_error(create(container_id="../etc"), Status.INVALID_ARGUMENT, "container_id")
        await expect_error(create(container_id=""), Status.INVALID_ARGUMENT)
        await expect_error(create(spec_json=b"not json"), Status.INVALID_ARGUMENT, "not valid JSON")
        await expect_error(create(spec_json=b"[1]"), Status.INVALID_ARGUMENT, "JSON object")
        await expect_error(create(spec_json=b"{}"), Status.INVALID_ARGUMENT, "process")
        await expect_error(create(spec_json=b" " * (2 << 20)), Status.INVALID_ARGUMENT, "at most")
        await expect_error(create(rootfs="/nonexistent/rootfs"), Status.INVALID_ARGUMENT, "rootfs")
        await expect_error(create(rootfs="relative"), Status.INVALID_ARGUMENT, "absolute")
        await expect_error(c.agent.start_process(pb.StartProcessRequest(container_id="nope")),
                           Status.NOT_FOUND, "nope")
        await expect_error(_wait(c, "nope"), Status.NOT_FOUND)
        await expect_error(c.agent.read_output(pb.ReadOutputRequest(
            container_id="nope", stream=pb.OutputStream.STDOUT)), Status.NOT_FOUND)
        await expect_error(c.agent.read_output(pb.ReadOutputRequest(container_id="nope")),
                           Status.INVALID_ARGUMENT, "stream")
        await expect_error(c.agent.stats_container(pb.ContainerRequest(container_id="nope")),
                           Status.NOT_FOUND)
        # A spec runc itself refuses: the runtime's own words come back.
        msg = await expect_error(create(spec_json=spec_json(["/no/such/binary"], "bad1")),
                                 Status.FAILED_PRECONDITION, "runc create failed")
        assert "no such file" in msg.lower() or "not found" in msg.lower(), msg
        assert (await c.agent.get_state(pb.Empty())).containers == []
    _run(agent, scenario)


def test_missing_runtime_is_a_clear_error(runc: str, rootfs: str) -> None:
    agent = AgentProcess(runc, "--runtime", "/nonexistent/runc")

    async def scenario(c: Client) -> None:
        req = pb.CreateContainerRequest(container_id="nr1", rootfs=rootfs, stdio=stdio(),
                                        spec_json=spec_json(["true"], "nr1"))
        await expect_error(c.agent.create_container(req), Status.FAILED_PRECONDITION,
                           "/nonexistent/runc", "not found")
        health = await c.ops.health(ops_pb.HealthRequest())
        assert health.ok and health.containers == 0

    try:
        _run(agent, scenario)
        assert agent.proc.poll() is None
    finally:
        agent.cleanup()
    assert agent.proc.returncode == 0


def test_hello_and_health(agent: AgentProcess) -> None:
    async def scenario(c: Client) -> None:
        hello = await c.agent.hello(pb.HelloRequest(api_version=API_VERSION + 5,
                                                    client_version="future", session="t"))
        assert hello.api_version == API_VERSION  # min(client, agent)
        assert hello.agent_pid == agent.pid and len(hello.boot_id) == 32
        assert hello.min_api_version <= hello.api_version <= hello.max_api_version
        await expect_error(c.agent.hello(pb.HelloRequest(api_version=0)),
                           Status.FAILED_PRECONDITION, "speaks")
        health = await c.ops.health(ops_pb.HealthRequest())
        assert health.ok and health.agent_pid == agent.pid and health.boot_id == hello.boot_id
        assert health.state_schema == 2 and health.uptime_s >= 0
        # Upgrades are covered by test_agent_upgrade.py; a bad request changes nothing.
        await expect_error(c.ops.upgrade_agent(ops_pb.UpgradeAgentRequest(agent_path="/x")),
                           Status.FAILED_PRECONDITION, "/x")
    _run(agent, scenario)


def test_sigterm_leaves_containers_running(runc: str, rootfs: str) -> None:
    agent = AgentProcess(runc)
    try:
        async def scenario(c: Client) -> None:
            await _create(c, "st1", rootfs, ["sleep", "1000"], stdout=False, stderr=False)
            await c.agent.start_process(pb.StartProcessRequest(container_id="st1"))
        _run(agent, scenario)
        assert agent.stop() == 0
        assert agent.runc_containers() == ["st1"]
        saved = json.loads((agent.state_dir / "state.json").read_text())
        assert saved["schema_version"] == 2 and saved["handover"] is None
        assert saved["containers"][0]["processes"][0]["state"] == "running"
    finally:
        leftovers = agent.cleanup()  # force-deletes st1
    assert leftovers == ["st1"]


def test_serves_an_inherited_listening_socket(runc: str) -> None:
    """--listen-fd: what an in-place upgrade hands to the new agent image."""
    with tempfile.TemporaryDirectory(prefix="keel-fd-") as tmp:
        path = Path(tmp) / "inherited.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(4)
        try:
            agent = AgentProcess(runc, agent_fd=listener.fileno(), agent_sock=path)
        finally:
            listener.close()  # the agent holds its own copy now
        try:
            async def scenario(c: Client) -> None:
                state = await c.agent.get_state(pb.Empty())
                assert state.containers == []
            _run(agent, scenario)
            assert f"serving channel agent on unix:{path}" in agent.log()
        finally:
            agent.cleanup()
        assert agent.proc.returncode == 0
