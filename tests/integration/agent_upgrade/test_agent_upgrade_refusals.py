"""In-place agent upgrade, refused or failed before the new image serves: bad
requests and releases that cannot start are refused before anything freezes,
and a release that vanishes between its preflight and the exec leaves the old
image thawed and serving.  Nothing is lost either way (see
test_agent_upgrade.py for the setting).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from grpclib.const import Status

from agent.api import pb
from tests.agent_harness import (
    AgentProcess,
    Client,
    expect_error,
    make_release,
)
from tests.integration.agent_upgrade.scenario import (
    A,
    B,
    Counter,
    agent_health,
    launcher,
    run,
    upgrade,
)


@pytest.mark.requires_root
@pytest.mark.slow
def test_bad_requests_and_unstartable_releases_change_nothing(
        agent: AgentProcess, rootfs: str, releases: Path, tmp_path: Path) -> None:
    """Refused before anything freezes: the old image answers the error and keeps serving."""
    not_executable = tmp_path / "keel-agent"
    not_executable.write_text("#!/bin/sh\n")
    # The launcher itself dies at once (like python -c 'raise SystemExit(3)'): the preflight
    # catches it, so the agent never execs a release that cannot even start.
    dies = make_release(tmp_path, "dies", "9.3.0", before_exec="raise SystemExit(3)")

    async def scenario(c: Client) -> None:
        before = await agent_health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        await expect_error(upgrade(c, "/nonexistent/keel-agent"), Status.FAILED_PRECONDITION,
                           "/nonexistent/keel-agent", "does not exist")
        await expect_error(upgrade(c, str(not_executable)), Status.FAILED_PRECONDITION,
                           "not executable")
        await expect_error(upgrade(c, "relative/keel-agent"), Status.FAILED_PRECONDITION,
                           "absolute")
        await expect_error(upgrade(c, ""), Status.INVALID_ARGUMENT, "agent_path")
        await expect_error(upgrade(c, str(dies)), Status.FAILED_PRECONDITION,
                           "failed its preflight (exit status 3)")
        await expect_error(upgrade(c, launcher(releases, "b"), "8.0.0"),
                           Status.FAILED_PRECONDITION, "is release 9.2.0, not 8.0.0")
        health = await agent_health(c)
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            A, agent.pid, before.boot_id)
        await counter.seen(40)
        # Two at once: one goes ahead, the other is refused while it runs.
        results = await asyncio.gather(upgrade(c, launcher(releases, "b")),
                                       upgrade(c, launcher(releases, "b")),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["GRPCError", "UpgradeAgentResponse"]
        refused = next(r for r in results if isinstance(r, Exception))
        assert "already running" in str(refused)
        health = await agent_health(c)
        assert (health.agent_version, health.agent_pid) == (B, agent.pid)
        await counter.finish()
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq", exec_id="stop"))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))

    run(agent, scenario)
    assert len(re.findall(r"upgrade \w+: exec /", agent.log())) == 1  # the one that went ahead


#: Each bad release passes its preflight (its bug only shows when it resumes).


@pytest.mark.requires_root
@pytest.mark.slow
def test_failed_exec_thaws_the_old_image(agent: AgentProcess, rootfs: str,
                                         tmp_path: Path) -> None:
    """The release vanishes between its preflight and the exec (its preflight deletes
    its own launcher): execve fails with ENOENT after the answer went out, so the
    old image undoes the freeze and keeps serving; nothing is lost."""
    vanishing = make_release(tmp_path, "vanishing", B, before_exec=(
        "if '--preflight' in sys.argv: os.unlink(sys.argv[0])"))

    async def scenario(c: Client) -> None:
        before = await agent_health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        resp = await upgrade(c, str(vanishing))
        assert (resp.to_version, resp.message) == (B, "exec")
        health = await agent_health(c)  # held during the freeze, answered by the thawed image
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            A, agent.pid, before.boot_id)
        await counter.seen(60)
        await counter.finish()
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq", exec_id="stop"))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))

    run(agent, scenario)
    log = agent.log()
    assert "abandoned: cannot exec" in log and "No such file" in log, log[-3000:]
    saved = json.loads((agent.state_dir / "state.json").read_text())
    assert saved["handover"] is None and saved["last_upgrade"]["running_version"] == A
    assert not (agent.state_dir / "upgrade.json").exists()
    assert not list(agent.state_dir.glob("handover-*"))
