"""Live upgrade under a real containerd: releases side by side, the counter
of tests/workloads.py started on one, the sandbox's ShimOps endpoint and
opsd, shared by the test_live_upgrade*.py modules (and ``shim_ops`` by
tests/vm/test_upgrade_vm_releases.py).

Releases are ``<root>/<version>/`` with ``bin/containerd-shim-keel-v2`` and
``bin/keel-agent`` (the layout of upgrade/releases.py), each running its own
copy of the code on this interpreter (whose site-packages provide the
dependencies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from agent.api import ops_pb
from shim.state import SCHEMA_VERSION
from tests.containerd import Containerd, wait_for
from tests.workloads import CtrCounter
from upgrade.releases import Release, ReleaseStore

REPO = Path(__file__).resolve().parents[2]
A, B = "0.1.1", "0.1.2"
#: Installed, but two minor releases away from A and B: opsd must refuse it.
FAR = "0.3.0"
#: The packages a release carries (those of them its tree has).
PACKAGES = ("keel", "shim", "agent", "upgrade", "opsd", "observability")
#: Shim and agent each switch this many times in the back-and-forth test.
SWITCHES = 20
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

task_of = Containerd.task


@contextlib.contextmanager
def workload(ctd: Containerd, cid: str, release: Release, image: str) -> Iterator[CtrCounter]:
    """The counter (every ~2 ms) on *release*, running; killed at the end if still running."""
    w = CtrCounter(ctd, cid, release.shim_path, image)
    try:
        w.running()
        yield w
    finally:
        w.kill()


# --- ShimOps ------------------------------------------------------------------

def shim_ops(w: CtrCounter, call: Callable[[ops_pb.ShimOpsStub], Awaitable[T]]) -> T:
    async def go() -> T:
        channel = Channel(path=str(w.sandbox.ops_socket))
        try:
            return await call(ops_pb.ShimOpsStub(channel))
        finally:
            channel.close()
    return asyncio.run(go())


def status(w: CtrCounter, timeout: float = 10) -> ops_pb.StatusResponse:
    return shim_ops(w, lambda s: s.status(ops_pb.StatusRequest(), timeout=timeout))


def upgrade_shim(w: CtrCounter, path: Path | str) -> ops_pb.UpgradeShimResponse:
    req = ops_pb.UpgradeShimRequest(shim_path=str(path))
    return shim_ops(w, lambda s: s.upgrade_shim(req, timeout=60))


def upgrade_agent(w: CtrCounter, release: Release) -> ops_pb.UpgradeAgentResponse:
    req = ops_pb.UpgradeAgentRequest(agent_path=str(release.agent_path), to_version=release.version)
    return shim_ops(w, lambda s: s.upgrade_agent(req, timeout=60))


def refused(w: CtrCounter, call: Callable[[], object]) -> GRPCError:
    with pytest.raises(GRPCError) as err:
        call()
    return err.value


def assert_serving(w: CtrCounter, shim: str, agent: str, shim_pid: int | None = None,
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
             str(ctd.paths.tmp_root / "keel"), "--settle-timeout", "30", "--gate-timeout", "30",
             "--metrics-address", "none"],
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
