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
sandbox down.  Those need root and runc and skip loudly otherwise; the
last two tests are pure (state migration, command-line round trip).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from grpclib.const import Status

from agent import config as agent_config
from agent import state as agent_state
from agent.api import ops_pb, pb
from tests.agent_harness import (
    AgentProcess,
    Client,
    connect,
    expect_error,
    make_release,
    make_rootfs,
    process_json,
    read_all,
    require_root_and_runc,
    retrying,
    spec_json,
    stdio,
    upgrade_gaps_ms,
)
from tests.workloads import STOPPER, counter

A, B = "9.1.0", "9.2.0"
#: Prints 0, 1, 2... every ~2 ms until STOPPER runs, then "end"; exits 7.
COUNTER = counter(2000)


@pytest.fixture(scope="module")
def runc() -> str:
    return require_root_and_runc()


@pytest.fixture(scope="module")
def rootfs(runc: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="keel-rootfs-") as tmp:
        yield str(make_rootfs(Path(tmp) / "rootfs"))


@pytest.fixture(scope="module")
def releases() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="keel-rel-") as tmp:
        root = Path(tmp)
        make_release(root, "a", A)
        make_release(root, "b", B)
        yield root


def launcher(releases: Path, name: str) -> str:
    return str(releases / name / "bin" / "keel-agent")


@pytest.fixture
def agent(runc: str, releases: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(runc, command=[launcher(releases, "a")])
    try:
        yield proc
        assert proc.proc.poll() is None, f"agent died:\n{proc.log()}"
        if os.environ.get("KEEL_TEST_KEEP_LOG"):
            Path(os.environ["KEEL_TEST_KEEP_LOG"]).write_text(proc.log())
    finally:
        leftovers = proc.cleanup()
    assert proc.proc.returncode == 0, "agent did not stop cleanly on SIGTERM"
    assert leftovers == [], f"runc containers left behind: {leftovers}"


def _run(agent: AgentProcess, scenario: Callable[[Client], Awaitable[None]]) -> None:
    async def main() -> None:
        async with connect(agent) as client:
            await scenario(client)
    asyncio.run(main())


async def _health(c: Client) -> ops_pb.HealthResponse:
    """Health from whichever image serves next (the old one holds it during an upgrade)."""
    return await retrying(lambda: c.ops.health(ops_pb.HealthRequest()))


async def _upgrade(c: Client, path: str, to_version: str = "") -> ops_pb.UpgradeAgentResponse:
    return await c.ops.upgrade_agent(ops_pb.UpgradeAgentRequest(agent_path=path,
                                                                to_version=to_version))


async def _start(c: Client, cid: str, eid: str = "") -> int:
    req = pb.StartProcessRequest(container_id=cid, exec_id=eid)
    return (await retrying(lambda: c.agent.start_process(req))).pid


async def _wait(c: Client, cid: str, eid: str = "") -> int:
    req = pb.WaitProcessRequest(container_id=cid, exec_id=eid)
    return (await retrying(lambda: c.agent.wait_process(req), timeout=120)).exit_status


async def _exec(c: Client, cid: str, eid: str, args: list[str], **kw: bool) -> int:
    req = pb.ExecProcessRequest(container_id=cid, exec_id=eid, process_json=process_json(args),
                                stdio=stdio(**kw))
    await retrying(lambda: c.agent.exec_process(req))
    return await _start(c, cid, eid)


class Counter:
    """The counter container and a shim-like reader of its stdout."""

    def __init__(self, c: Client, cid: str = "seq") -> None:
        self.c, self.cid = c, cid

    async def start(self, rootfs: str) -> None:
        await self.c.agent.create_container(pb.CreateContainerRequest(
            container_id=self.cid, spec_json=spec_json(["sh", "-c", COUNTER], self.cid),
            rootfs=rootfs, stdio=stdio(stderr=False)))
        self.reader = asyncio.ensure_future(read_all(self.c.agent, self.cid))
        self.pid = await _start(self.c, self.cid)

    async def seen(self, at_least: int, timeout: float = 60.0) -> None:
        """Wait until the agent holds past *at_least* numbers (the counter runs)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            assert asyncio.get_running_loop().time() < deadline, f"counter stuck below {at_least}"
            state = await retrying(lambda: self.c.agent.get_state(pb.Empty()))
            [proc] = [p for ct in state.containers if ct.container_id == self.cid
                      for p in ct.processes if not p.exec_id]
            if proc.stdout_offset > 5 * at_least:
                return
            await asyncio.sleep(0.02)

    async def finish(self) -> int:
        """Stop it; check every number came exactly once, in order; returns the count."""
        assert await _exec(self.c, self.cid, "stop", list(STOPPER)) > 0
        assert await _wait(self.c, self.cid, "stop") == 0
        out = (await self.reader).decode().splitlines()
        assert out[-1] == "end", out[-5:]
        numbers = [int(line) for line in out[:-1]]
        assert numbers == list(range(len(numbers))), "output lost, duplicated or reordered"
        assert await _wait(self.c, self.cid) == 7
        return len(numbers)


@pytest.mark.requires_root
def test_upgrade_to_a_release_directory(agent: AgentProcess, rootfs: str, tmp_path: Path,
                                        releases: Path) -> None:
    """A release given as a directory (how a VM image installs them) runs on the
    same interpreter with that tree in place of the running one on PYTHONPATH."""
    c_dir = tmp_path / "c"
    make_release(tmp_path, "c", "9.3.0", copy_code=True)  # its own agent/ and upgrade/ trees

    async def scenario(c: Client) -> None:
        before = await _health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        await expect_error(_upgrade(c, str(tmp_path)), Status.FAILED_PRECONDITION,
                           "without an agent package")
        resp = await _upgrade(c, str(c_dir), "9.3.0")
        assert (resp.from_version, resp.to_version) == (A, "9.3.0"), resp
        health = await _health(c)
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            "9.3.0", agent.pid, before.boot_id)
        await counter.seen(40)
        await _upgrade(c, launcher(releases, "a"), A)  # and back to a launcher file
        assert (await _health(c)).agent_version == A
        assert await counter.finish() > 20
        await retrying(lambda: c.agent.remove_process(
            pb.RemoveProcessRequest(container_id="seq", exec_id="stop")))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))

    _run(agent, scenario)
    assert f"exec {c_dir}" in agent.log()
    assert "Traceback" not in agent.log(), agent.log()


@pytest.mark.requires_root
@pytest.mark.slow
def test_upgrade_back_and_forth_loses_nothing(agent: AgentProcess, rootfs: str,
                                              releases: Path, tmp_path: Path) -> None:
    rounds = 12

    async def scenario(c: Client) -> None:
        before = await _health(c)
        assert before.agent_version == A and before.agent_pid == agent.pid
        counter = Counter(c)
        await counter.start(rootfs)
        # cat, an exec reading stdin, echoes everything written to it.
        await _exec(c, "seq", "cat", ["cat"], stdin=True, stderr=False)
        cat_out = asyncio.ensure_future(read_all(c.agent, "seq", "cat"))
        sleeper = await _exec(c, "seq", "sleeper", ["sleep", "1000"], stdout=False, stderr=False)
        sleeper_exit = asyncio.ensure_future(_wait(c, "seq", "sleeper"))
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
        await _exec(c, "seq", "burst", ["seq", "1", "200000"], stderr=False)
        burst = b"".join(b"%d\n" % i for i in range(1, 200001))
        head = await c.agent.read_output(pb.ReadOutputRequest(
            container_id="seq", exec_id="burst", stream=pb.OutputStream.STDOUT, max_bytes=100_000))
        assert head.data == burst[:100_000]
        # tty: a terminal exec (pty master and its dup for output) that answers after them.
        await _exec(c, "seq", "tty", ["sh", "-c", "read line; echo got-$line"], terminal=True,
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
                racers.append(asyncio.ensure_future(_exec(c, "seq", "racer", ["true"])))
            resp = await _upgrade(c, path, target)
            assert (resp.from_version, resp.to_version, resp.message) == (version, target, "exec")
            await write(f"line {n} written while the agent may be exec'ing\n".encode())
            health = await _health(c)
            assert (health.agent_version, health.agent_pid, health.boot_id) == (
                target, agent.pid, before.boot_id), f"round {n}"
            assert health.uptime_s >= before.uptime_s
            version = target
            await counter.seen(50 * (n + 2))
        await write(b"after the upgrades\n")
        await retrying(lambda: c.agent.close_stdin(pb.CloseStdinRequest(
            container_id="seq", exec_id="cat", offset=len(sent))))
        assert await cat_out == bytes(sent)  # stdin exactly once, through every image
        assert await _wait(c, "seq", "cat") == 0
        assert await sleeper_exit == 128 + signal.SIGKILL
        assert (await asyncio.gather(*racers))[0] > 0 and await _wait(c, "seq", "racer") == 0
        assert await read_all(c.agent, "seq", "burst", offset=100_000) == burst[100_000:]
        assert await _wait(c, "seq", "burst") == 0
        await retrying(lambda: c.agent.write_stdin(pb.WriteStdinRequest(
            container_id="seq", exec_id="tty", data=b"hi\n")))
        assert b"got-hi" in await read_all(c.agent, "seq", "tty")
        assert await _wait(c, "seq", "tty") == 0
        numbers = await counter.finish()
        assert numbers > 100
        hello = await c.agent.hello(pb.HelloRequest(api_version=1, client_version="t", session="t"))
        assert hello.agent_pid == agent.pid and hello.boot_id == before.boot_id
        for eid in ("cat", "sleeper", "stop", "racer", "burst", "tty"):
            await retrying(lambda eid=eid: c.agent.remove_process(
                pb.RemoveProcessRequest(container_id="seq", exec_id=eid)))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))
        print(f"\n{numbers} numbers exactly once across {rounds} upgrades")

    _run(agent, scenario)
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
        before = await _health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        await expect_error(_upgrade(c, "/nonexistent/keel-agent"), Status.FAILED_PRECONDITION,
                           "/nonexistent/keel-agent", "does not exist")
        await expect_error(_upgrade(c, str(not_executable)), Status.FAILED_PRECONDITION,
                           "not executable")
        await expect_error(_upgrade(c, "relative/keel-agent"), Status.FAILED_PRECONDITION,
                           "absolute")
        await expect_error(_upgrade(c, ""), Status.INVALID_ARGUMENT, "agent_path")
        await expect_error(_upgrade(c, str(dies)), Status.FAILED_PRECONDITION,
                           "failed its preflight (exit status 3)")
        await expect_error(_upgrade(c, launcher(releases, "b"), "8.0.0"),
                           Status.FAILED_PRECONDITION, "is release 9.2.0, not 8.0.0")
        health = await _health(c)
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            A, agent.pid, before.boot_id)
        await counter.seen(40)
        # Two at once: one goes ahead, the other is refused while it runs.
        results = await asyncio.gather(_upgrade(c, launcher(releases, "b")),
                                       _upgrade(c, launcher(releases, "b")),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["GRPCError", "UpgradeAgentResponse"]
        refused = next(r for r in results if isinstance(r, Exception))
        assert "already running" in str(refused)
        health = await _health(c)
        assert (health.agent_version, health.agent_pid) == (B, agent.pid)
        await counter.finish()
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq", exec_id="stop"))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))

    _run(agent, scenario)
    assert len(re.findall(r"upgrade \w+: exec /", agent.log())) == 1  # the one that went ahead


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
        before = await _health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await _exec(c, "seq", "cat", ["cat"], stdin=True, stderr=False)
        cat_out = asyncio.ensure_future(read_all(c.agent, "seq", "cat"))
        await c.agent.write_stdin(pb.WriteStdinRequest(container_id="seq", exec_id="cat",
                                                       data=b"before\n"))
        await counter.seen(30)
        resp = await _upgrade(c, bad)
        assert (resp.from_version, resp.to_version) == (A, "9.9.0")
        health = await _health(c)  # answered by whatever image resumed: the previous one
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            A, agent.pid, before.boot_id)
        resp = await retrying(lambda: c.agent.write_stdin(pb.WriteStdinRequest(
            container_id="seq", exec_id="cat", offset=7, data=b"after\n")))
        await c.agent.close_stdin(pb.CloseStdinRequest(container_id="seq", exec_id="cat",
                                                       offset=resp.offset))
        assert await cat_out == b"before\nafter\n"
        await counter.seen(60)
        # The failed attempt is over: the next upgrade goes through.
        await _upgrade(c, launcher(releases, "b"))
        assert (await _health(c)).agent_version == B
        numbers = await counter.finish()
        for eid in ("cat", "stop"):
            await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq", exec_id=eid))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))
        print(f"\n{fault}: rolled back; {numbers} numbers exactly once")

    _run(agent, scenario)
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
        before = await _health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        await _upgrade(c, str(damaging))
        health = await _health(c)
        assert (health.agent_version, health.agent_pid) == (A, agent.pid)
        assert health.boot_id != before.boot_id and health.containers == 0
        os.kill(counter.pid, 0)  # still running
        counter.reader.cancel()

    try:
        _run(agent, scenario)
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
        before = await _health(c)
        counter = Counter(c)
        await counter.start(rootfs)
        await counter.seen(20)
        resp = await _upgrade(c, str(vanishing))
        assert (resp.to_version, resp.message) == (B, "exec")
        health = await _health(c)  # held during the freeze, answered by the thawed image
        assert (health.agent_version, health.agent_pid, health.boot_id) == (
            A, agent.pid, before.boot_id)
        await counter.seen(60)
        await counter.finish()
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq", exec_id="stop"))
        await c.agent.remove_process(pb.RemoveProcessRequest(container_id="seq"))

    _run(agent, scenario)
    log = agent.log()
    assert "abandoned: cannot exec" in log and "No such file" in log, log[-3000:]
    saved = json.loads((agent.state_dir / "state.json").read_text())
    assert saved["handover"] is None and saved["last_upgrade"]["running_version"] == A
    assert not (agent.state_dir / "upgrade.json").exists()
    assert not list(agent.state_dir.glob("handover-*"))


def test_state_schema_1_is_migrated() -> None:
    """A state file of the first release (no upgrades yet) reads as schema 2."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.json"
        path.write_text(json.dumps({"schema_version": 1, "kind": "keel-agent-state",
                                    "boot_id": "b1", "containers": [], "fds": {"listener:ops": 7}}))
        loaded = agent_state.store(Path(tmp)).load()
    assert loaded == agent_state.AgentState(boot_id="b1", fds={"listener:ops": 7})


def test_config_round_trips_through_argv() -> None:
    """What the old image passes to the new one gives the same configuration."""
    cfg = agent_config.from_args(["--state-dir", "/s", "--listen-fd", "agent=5", "--listen-fd",
                                  "ops=6", "--runtime", "crun", "--output-buffer-bytes", "8192",
                                  "--runtime-timeout", "2.5", "--log-level", "debug"])
    again = agent_config.from_args([*cfg.to_argv(), "--resume"])
    assert again == dataclasses.replace(cfg, mode="resume")
