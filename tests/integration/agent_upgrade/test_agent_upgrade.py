"""In-place agent upgrade (OpsService.UpgradeAgent) with real processes and real runc.

Two "releases" of this checkout sit side by side (tests.agent_harness.make_release:
each a directory with its own ``keel-<version>.dist-info`` and a launcher
that execs ``python -m agent``); broken releases are copies of the code
with a bug appended, or launchers that misbehave (fault injection around
the real agent, no mocks).
The agent starts from release A; a container prints a sequence number every
couple of milliseconds while a reader long-polls ReadOutput the way the shim
does (retrying at its offset when an upgrade drops the connection).  Then
the agent is exec'd in place, back and forth, and every test checks what
matters: the same PID throughout, every output byte exactly once and in
order, stdin exactly once, exit statuses (also of a process that died while
the agent image was being replaced), and that a bad release never takes the
sandbox down.  Those need root and runc and skip loudly otherwise.

Here: upgrades that go through (to a release directory, and back and forth
under load).  Refused and failed attempts are in
test_agent_upgrade_refusals.py, releases that crash or find their state
damaged in test_agent_upgrade_rollback.py, the pure parts (state migration,
command-line round trip) in test_agent_upgrade_state.py; the fixtures in
conftest.py, the shared scenario in scenario.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
from grpclib.const import Status

from agent.api import pb
from tests.agent_harness import (
    AgentProcess,
    Client,
    expect_error,
    make_release,
    read_all,
    retrying,
    upgrade_gaps_ms,
)
from tests.integration.agent_upgrade.scenario import (
    A,
    B,
    Counter,
    agent_health,
    exec_process,
    launcher,
    run,
    upgrade,
    wait_process,
)


@pytest.mark.requires_root
def test_upgrade_to_a_release_directory(agent: AgentProcess, rootfs: str, tmp_path: Path,
                                        releases: Path) -> None:
    """A release given as a directory (how a VM image installs them) runs on the
    same interpreter with that tree in place of the running one on PYTHONPATH."""
    c_dir = tmp_path / "c"
    make_release(tmp_path, "c", "9.3.0", copy_code=True)  # its own agent/ and upgrade/ trees

    async def scenario(c: Client) -> None:
        before = await agent_health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        await expect_error(upgrade(c, str(tmp_path)), Status.FAILED_PRECONDITION,
                           "without an agent package")
        resp = await upgrade(c, str(c_dir), "9.3.0")
        assert (resp.from_version, resp.to_version) == (A, "9.3.0"), resp
        health = await agent_health(c)
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            "9.3.0", agent.pid, before.boot_id)
        await counter.seen(40)
        await upgrade(c, launcher(releases, "a"), A)  # and back to a launcher file
        assert (await agent_health(c)).agent_version == A
        assert await counter.finish() > 20
        await retrying(lambda: c.agent.remove_process(
            pb.RemoveProcessRequest(container_id="seq", exec_id="stop")))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))

    run(agent, scenario)
    assert f"exec {c_dir}" in agent.log()
    assert "Traceback" not in agent.log(), agent.log()


@pytest.mark.requires_root
@pytest.mark.slow
def test_upgrade_back_and_forth_loses_nothing(agent: AgentProcess, rootfs: str,
                                              releases: Path, tmp_path: Path) -> None:
    rounds = 12

    async def scenario(c: Client) -> None:
        before = await agent_health(c)
        assert before.agent_version == A and before.agent_pid == agent.pid
        counter = Counter(c)
        await counter.start(rootfs)
        # cat, an exec reading stdin, echoes everything written to it.
        await exec_process(c, "seq", "cat", ["cat"], stdin=True, stderr=False)
        cat_out = asyncio.ensure_future(read_all(c.agent, "seq", "cat"))
        sleeper = await exec_process(c, "seq", "sleeper", ["sleep", "1000"], stdout=False, stderr=False)
        sleeper_exit = asyncio.ensure_future(wait_process(c, "seq", "sleeper"))
        # A "B" whose launcher SIGKILLs the sleeper: it dies while no agent image runs,
        # after the old image stopped reaping and before the new one started.
        killer = make_release(tmp_path, "b-killer", B, before_exec=(
            f"if '--resume' in sys.argv: os.kill({sleeper}, {int(signal.SIGKILL)})"))
        sent = bytearray()

        async def write(data: bytes) -> None:
            offset = len(sent)
            req = pb.WriteStdinRequest(container_id="seq", exec_id="cat", offset=offset, data=data)
            resp = await retrying(lambda: c.agent.write_stdin(req))
            sent.extend(data)
            assert resp.offset == len(sent)

        # burst: more output than the agent buffers (1 MiB), not read during the upgrades:
        # each hand-over carries a full buffer, offsets starting past what was acked.
        await exec_process(c, "seq", "burst", ["seq", "1", "200000"], stderr=False)
        burst = b"".join(b"%d\n" % i for i in range(1, 200001))
        head = await c.agent.read_output(pb.ReadOutputRequest(
            container_id="seq", exec_id="burst", stream=pb.OutputStream.STDOUT, max_bytes=100_000))
        assert head.data == burst[:100_000]
        # tty: a terminal exec (pty master and its dup for output) that answers after them.
        await exec_process(c, "seq", "tty", ["sh", "-c", "read line; echo got-$line"], terminal=True,
                    stdin=True)
        await write(b"before the upgrades\n")
        await counter.seen(50)
        version = A
        racers = []
        for n in range(rounds):
            target, path = (B, launcher(releases, "b")) if version == A else (A, launcher(releases, "a"))
            if n == 2:  # A -> B
                path = str(killer)
            if n == 5:  # a lifecycle call racing the upgrade: drained, or retried on the new image
                racers.append(asyncio.ensure_future(exec_process(c, "seq", "racer", ["true"])))
            resp = await upgrade(c, path, target)
            assert (resp.from_version, resp.to_version, resp.message) == (version, target, "exec")
            await write(f"line {n} written while the agent may be exec'ing\n".encode())
            health = await agent_health(c)
            assert (health.agent_version, health.agent_pid, health.boot_id) == (
                target, agent.pid, before.boot_id), f"round {n}"
            assert health.uptime_s >= before.uptime_s
            version = target
            await counter.seen(50 * (n + 2))
        await write(b"after the upgrades\n")
        await retrying(lambda: c.agent.close_stdin(pb.CloseStdinRequest(
            container_id="seq", exec_id="cat", offset=len(sent))))
        assert await cat_out == bytes(sent)  # stdin exactly once, through every image
        assert await wait_process(c, "seq", "cat") == 0
        assert await sleeper_exit == 128 + signal.SIGKILL
        assert (await asyncio.gather(*racers))[0] > 0 and await wait_process(c, "seq", "racer") == 0
        assert await read_all(c.agent, "seq", "burst", offset=100_000) == burst[100_000:]
        assert await wait_process(c, "seq", "burst") == 0
        await retrying(lambda: c.agent.write_stdin(pb.WriteStdinRequest(
            container_id="seq", exec_id="tty", data=b"hi\n")))
        assert b"got-hi" in await read_all(c.agent, "seq", "tty")
        assert await wait_process(c, "seq", "tty") == 0
        numbers = await counter.finish()
        assert numbers > 100
        hello = await c.agent.hello(pb.HelloRequest(api_version=1, client_version="t", session="t"))
        assert hello.agent_pid == agent.pid and hello.boot_id == before.boot_id
        for eid in ("cat", "sleeper", "stop", "racer", "burst", "tty"):
            await retrying(lambda eid=eid: c.agent.remove_process(
                pb.RemoveProcessRequest(container_id="seq", exec_id=eid)))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))
        print(f"\n{numbers} numbers exactly once across {rounds} upgrades")

    run(agent, scenario)
    log = agent.log()
    gaps = upgrade_gaps_ms(log)
    print(f"upgrade gaps (ms): {gaps}")
    assert len(gaps) == rounds, log[-4000:]
    assert max(gaps) < 5000
    assert "Traceback" not in log, log
    saved = json.loads((agent.state_dir / "state.json").read_text())
    assert saved["handover"] is None and saved["last_upgrade"]["gap_s"] > 0
    assert not (agent.state_dir / "upgrade.json").exists()
    assert not list(agent.state_dir.glob("handover-*"))
