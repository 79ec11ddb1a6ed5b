"""Live upgrade under a real containerd: releases side by side, the counter
workload, the sandbox's ShimOps endpoint and opsd, shared by the
test_live_upgrade*.py modules (and by tests/vm/test_upgrade_vm.py).

Releases are ``<root>/<version>/`` with ``bin/containerd-shim-keel-v2`` and
``bin/keel-agent`` (the layout of upgrade/releases.py), each running its own
copy of the code on this interpreter (whose site-packages provide the
dependencies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from agent.api import ops_pb
from shim.dirs import SandboxDir
from shim.state import SCHEMA_VERSION
from tests.containerd import Containerd, wait_for
from tests.workloads import STOPPER, counter
from upgrade.releases import Release, ReleaseStore

REPO = Path(__file__).resolve().parents[2]
A, B = "0.1.1", "0.1.2"
#: Installed, but two minor releases away from A and B: opsd must refuse it.
FAR = "0.3.0"
#: The packages a release carries (those of them its tree has).
PACKAGES = ("keel", "shim", "agent", "upgrade", "opsd", "observability")
#: Shim and agent each switch this many times in the back-and-forth test.
SWITCHES = 20
#: Prints 0, 1, 2... every ~2 ms until STOPPER runs, then "end"; exits 7.
COUNTER = counter(2000)
#: Reads one line from its stdin (kept pending across the upgrades) and answers it.
READER = "read line; echo got:$line; exit 3"
T = TypeVar("T")


# --- releases ---------------------------------------------------------------

def make_release(root: Path, version: str, tree: Path,
                 patch: tuple[str, str] | None = None) -> Release:
    """``<root>/<version>/``: a copy of *tree*'s packages plus launchers.

    ``lib/`` holds the packages and ``keel-<version>.dist-info`` (so both
    processes report *version*); *patch* appends code to one module.  The
    shim launcher is a shell script (containerd runs it with the bundle as
    cwd; ``-P`` keeps that off sys.path).  The agent launcher is Python, as
    in tests/agent_harness.py: a shell that runs anything before its exec
    may reap the agent's children.
    """
    rel = root / version
    lib = rel / "lib"
    for pkg in PACKAGES:
        if (tree / pkg).is_dir():
            shutil.copytree(tree / pkg, lib / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    meta = lib / f"keel-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: keel\nVersion: {version}\n")
    if patch is not None:
        with open(lib / patch[0], "a") as f:
            f.write("\n" + patch[1])
    (rel / "bin").mkdir()
    shim = rel / "bin" / "containerd-shim-keel-v2"
    shim.write_text(f"#!/bin/sh\nexport PYTHONPATH={shlex.quote(str(lib))}\n"
                    f'exec {shlex.quote(sys.executable)} -P -m shim "$@"\n')
    agent = rel / "bin" / "keel-agent"
    agent.write_text(
        f"#!{sys.executable} -I\n"
        "import os, sys\n"
        f"os.environ['PYTHONPATH'] = {str(lib)!r}\n"
        "os.execv(sys.executable, [sys.executable, '-P', '-m', 'agent', *sys.argv[1:]])\n")
    for launcher in (shim, agent):
        launcher.chmod(0o755)
    return ReleaseStore(root).get(version)


# --- the workload -------------------------------------------------------------

class Workload:
    """``ctr run --rm`` of the counter in the foreground, its stdout read by a thread."""

    def __init__(self, ctd: Containerd, cid: str, release: Release, image: str) -> None:
        self.ctd, self.cid = ctd, cid
        self.state_root = ctd.paths.tmp_root / "keel"
        self.proc = subprocess.Popen(
            [*ctd.ctr_prefix(), "run", "--rm", "--runtime", str(release.shim_path), image, cid,
             "sh", "-c", COUNTER],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = bytearray()
        self._readers = [threading.Thread(target=drain, args=(f, buf), daemon=True)
                         for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()
        self.pid = 0

    @property
    def sandbox(self) -> SandboxDir:
        return SandboxDir.of(self.state_root, self.cid)

    def lines(self) -> int:
        return self.out.count(b"\n")

    def running(self) -> int:
        """Wait for the task to run and for output; its pid."""
        def run() -> tuple[int, str] | None:
            self._ended()
            task = task_of(self.ctd, self.cid)
            return task if task is not None and task[1] == "RUNNING" else None

        task = wait_for(run, 60, f"task {self.cid} to run")
        assert task is not None
        self.pid = task[0]
        self.flows()
        return self.pid

    def _ended(self) -> bool:
        """False while ctr runs; raises once it exited (nothing left to wait for)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"ctr run exited with {self.proc.returncode}: {self.err.decode()}")
        return False

    def flows(self, more: int = 20) -> None:
        """The counter goes on printing through whoever serves now."""
        target = self.lines() + more
        wait_for(lambda: self._ended() or self.lines() >= target, 30,
                 f"{more} more lines from {self.cid} (at {self.lines()})")

    def untouched(self) -> None:
        """Still running with the same pid, output flowing, containerd noticed nothing."""
        assert task_of(self.ctd, self.cid) == (self.pid, "RUNNING")
        self.flows()
        assert not disconnects(self.ctd, self.cid), disconnects(self.ctd, self.cid)

    def finish(self) -> int:
        """Stop the counter (an exec runs STOPPER); ctr's exit code."""
        res = self.ctd.ctr("tasks", "exec", "--exec-id", "stop", self.cid, *STOPPER)
        assert res.returncode == 0, res
        rc = self.proc.wait(60)
        for t in self._readers:
            t.join(10)
        return rc

    def assert_sequence(self) -> None:
        """Every number exactly once, in order, then "end"."""
        lines = self.out.decode().split("\n")
        assert lines[-2:] == ["end", ""], lines[-5:]
        numbers = lines[:-2]
        bad = next((i for i, n in enumerate(numbers) if n != str(i)), None)
        assert bad is None, f"line {bad} is {numbers[bad]!r}, around: {numbers[max(bad - 3, 0):bad + 3]}"
        assert len(numbers) > 100

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.ctd.ctr("tasks", "kill", "-s", "SIGKILL", self.cid)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drain(f: Any, into: bytearray) -> None:
    while chunk := f.read1(65536):
        into += chunk


task_of = Containerd.task


def disconnects(ctd: Containerd, cid: str) -> list[str]:
    """containerd's log lines that say it lost the shim of *cid* ("shim disconnected",
    "cleaning up after shim disconnected"; the "cleaning up dead shim" that follows
    names no id)."""
    mine = re.compile(rf"\bid={re.escape(cid)}(\s|$)")
    return [line for line in ctd.log_text().splitlines()
            if "shim disconnected" in line and mine.search(line)]


@contextlib.contextmanager
def workload(ctd: Containerd, cid: str, release: Release, image: str) -> Iterator[Workload]:
    w = Workload(ctd, cid, release, image)
    try:
        w.running()
        yield w
    finally:
        w.kill()


# --- ShimOps ------------------------------------------------------------------

def shim_ops(w: Workload, call: Callable[[ops_pb.ShimOpsStub], Awaitable[T]]) -> T:
    async def go() -> T:
        channel = Channel(path=str(w.sandbox.ops_socket))
        try:
            return await call(ops_pb.ShimOpsStub(channel))
        finally:
            channel.close()
    return asyncio.run(go())


def status(w: Workload) -> ops_pb.StatusResponse:
    return shim_ops(w, lambda s: s.status(ops_pb.StatusRequest(), timeout=10))


def upgrade_shim(w: Workload, path: Path | str) -> ops_pb.UpgradeShimResponse:
    req = ops_pb.UpgradeShimRequest(shim_path=str(path))
    return shim_ops(w, lambda s: s.upgrade_shim(req, timeout=60))


def upgrade_agent(w: Workload, release: Release) -> ops_pb.UpgradeAgentResponse:
    req = ops_pb.UpgradeAgentRequest(agent_path=str(release.agent_path), to_version=release.version)
    return shim_ops(w, lambda s: s.upgrade_agent(req, timeout=60))


def refused(w: Workload, call: Callable[[], object]) -> GRPCError:
    with pytest.raises(GRPCError) as err:
        call()
    return err.value


def assert_serving(w: Workload, shim: str, agent: str, shim_pid: int | None = None,
                   schema: int | None = SCHEMA_VERSION) -> None:
    """Status names these versions (and pid, and state schema unless None)."""
    st = status(w)
    assert (st.shim_version, st.agent_version) == (shim, agent), st
    if schema is not None:
        assert st.state_schema == schema, st
    if shim_pid is not None:
        assert st.shim_pid == shim_pid, st
    assert [(c.id, c.pid, c.status) for c in st.containers][:1] == [(w.cid, w.pid, "running")], st


# --- opsd ---------------------------------------------------------------------

@contextlib.contextmanager
def opsd(ctd: Containerd, releases: ReleaseStore) -> Iterator[list[str]]:
    """A real opsd for this containerd's sandboxes; yields the opsctl command prefix."""
    work = Path(tempfile.mkdtemp(prefix="keel-opsd-", dir="/tmp"))
    sock = work / "opsd.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(work / "opsd.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsd", "--socket", str(sock), "--state-dir",
             str(work / "state"), "--releases", str(releases.root), "--state-root",
             str(ctd.paths.tmp_root / "keel"), "--settle-timeout", "30", "--gate-timeout", "30"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        wait_for(lambda: proc.poll() is None and sock.exists() or proc.poll() is not None, 30,
                 "opsd to listen")
        assert proc.poll() is None, (work / "opsd.log").read_text()
        yield [sys.executable, "-m", "opsd.cli", "--socket", str(sock)]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def opsctl(prefix: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def spread(values: list[float]) -> str:
    v = sorted(values)
    return f"min {v[0]:.0f} / median {v[len(v) // 2]:.0f} / max {v[-1]:.0f}"
