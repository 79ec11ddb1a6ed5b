"""In-place agent upgrade to releases that fail once they resume: each rolls
back to the previous release with the same PID, containers and stdin; and a
state file damaged on disk, which neither release can read, ends in a fresh
start on the inherited listeners rather than a dead sandbox (see
test_agent_upgrade.py for the setting).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from agent.api import pb
from tests.agent_harness import (
    AgentProcess,
    Client,
    make_release,
    read_all,
    retrying,
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
)

#: Each bad release passes its preflight (its bug only shows when it resumes).
BAD_RELEASES = {
    # An import-time failure: the guard in agent/__main__.py runs before any agent module.
    "import": ("agent/_resume.py",
               "import sys\n"
               "if '--resume' in sys.argv:\n"
               "    raise ImportError('simulated: a module of this release cannot be imported')\n"),
    # A crash in the middle of resuming: state loaded, fds adopted, then an exception.
    "resume": ("agent/_resume.py",
               "_real_load = load\n"
               "def load(config, fds):\n"
               "    _real_load(config, fds)\n"
               "    raise RuntimeError('simulated crash while resuming')\n"),
    # A release whose reader finds the hand-over state corrupt (the file is fine: the
    # previous release reads the very same file and resumes from it).
    "state": ("agent/state.py",
              "_real_decode = decode\n"
              "def decode(doc):\n"
              "    if doc.get('handover'):\n"
              "        raise ValueError('simulated: this release misreads hand-over states')\n"
              "    return _real_decode(doc)\n"),
}


@pytest.mark.requires_root
@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(BAD_RELEASES))
def test_bad_release_rolls_back_to_the_previous_one(
        agent: AgentProcess, rootfs: str, releases: Path, tmp_path: Path, fault: str) -> None:
    module, code = BAD_RELEASES[fault]
    bad = str(make_release(tmp_path, "bad", "9.9.0", copy_code=True, patches={module: code}))

    async def scenario(c: Client) -> None:
        before = await agent_health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await exec_process(c, "seq", "cat", ["cat"], stdin=True, stderr=False)
        cat_out = asyncio.ensure_future(read_all(c.agent, "seq", "cat"))
        await c.agent.write_stdin(pb.WriteStdinRequest(container_id="seq", exec_id="cat",
                                                       data=b"before\n"))
        await counter.seen(30)
        resp = await upgrade(c, bad)
        assert (resp.from_version, resp.to_version) == (A, "9.9.0")
        health = await agent_health(c)  # answered by whatever image resumed: the previous one
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            A, agent.pid, before.boot_id)
        resp = await retrying(lambda: c.agent.write_stdin(pb.WriteStdinRequest(
            container_id="seq", exec_id="cat", offset=7, data=b"after\n")))
        await c.agent.close_stdin(pb.CloseStdinRequest(container_id="seq", exec_id="cat",
                                                       offset=resp.offset))
        assert await cat_out == b"before\nafter\n"
        await counter.seen(60)
        # The failed attempt is over: the next upgrade goes through.
        await upgrade(c, launcher(releases, "b"))
        assert (await agent_health(c)).agent_version == B
        numbers = await counter.finish()
        for eid in ("cat", "stop"):
            await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq", exec_id=eid))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))
        print(f"\n{fault}: rolled back; {numbers} numbers exactly once")

    run(agent, scenario)
    log = agent.log()
    assert "ROLLED BACK" in log and "simulated" in log, log[-4000:]
    saved = json.loads((agent.state_dir / "state.json").read_text())
    assert saved["last_upgrade"]["to_version"] == B and not saved["last_upgrade"]["rolled_back"]


@pytest.mark.requires_root
@pytest.mark.slow
def test_damaged_state_recovers_without_killing_the_sandbox(
        runc: str, rootfs: str, releases: Path, tmp_path: Path) -> None:
    """The state file is damaged on disk between the old image's write and the new
    image's read (the launcher does it).  The new release cannot resume and goes
    back; the previous release reads the same damaged file and cannot either; the
    guard's last resort starts it fresh on the inherited listeners: same PID,
    containers still running (unmanaged now), the damaged file kept aside, a new
    boot id (so the shim knows the agent lost its state)."""
    agent = AgentProcess(runc, command=[launcher(releases, "a")])
    state_file = agent.state_dir / "state.json"
    damaging = make_release(tmp_path, "damaging", B, before_exec=(
        f"if '--resume' in sys.argv: open({str(state_file)!r}, 'w').write('{{damaged')"))

    async def scenario(c: Client) -> None:
        before = await agent_health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        await upgrade(c, str(damaging))
        health = await agent_health(c)
        assert (health.agent_version, health.agent_pid) == (A, agent.pid)
        assert health.boot_id != before.boot_id and health.containers == 0
        os.kill(counter.pid, 0)  # still running
        counter.reader.cancel()

    try:
        run(agent, scenario)
        kept = list(agent.state_dir.glob("state.json.unreadable-*"))
        assert [p.read_text() for p in kept] == ["{damaged"]
        log = agent.log()
        assert "ROLLED BACK" not in log and "--recover" in log, log[-4000:]
        assert agent.proc.poll() is None
    finally:
        if os.environ.get("KEEL_TEST_KEEP_LOG"):
            Path(os.environ["KEEL_TEST_KEEP_LOG"]).write_text(agent.log())
        leftovers = agent.cleanup()
    assert agent.proc.returncode == 0
    assert leftovers == ["seq"]  # unmanaged since the recovery; cleanup force-deleted it
