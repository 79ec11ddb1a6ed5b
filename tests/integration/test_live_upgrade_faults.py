"""Live upgrade under fault injection, wrapping the real releases: the new
shim killed at every handoff phase (``<sandbox>/handoff-failpoint``,
upgrade/PROTOCOL.md), a release whose shim cannot even be imported, one
whose agent crashes while resuming, one whose shim finds the handed-over
state corrupt, one that speaks another handoff protocol, and paths and
versions that are no release.  Each has a stated outcome; before commit it
is always "the old shim keeps serving and containerd notices nothing".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpclib.const import Status

from agent.api import ops_pb
from shim.state import SCHEMA_VERSION
from tests.containerd import Containerd, wait_for
from tests.integration.live_upgrade import (
    FAR,
    REPO,
    A,
    B,
    assert_serving,
    make_release,
    opsctl,
    opsd,
    refused,
    shim_ops,
    status,
    task_of,
    upgrade_agent,
    upgrade_shim,
    workload,
)
from tests.workloads import CtrCounter, disconnects
from upgrade.releases import ReleaseStore

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]


#: Broken releases: version -> (module, code appended to it).
BAD = {
    # The new shim dies at import, before it can say hello.
    "0.1.5": ("shim/__init__.py",
              "raise ImportError('simulated: this release of the shim cannot be imported')\n"),
    # The agent passes its preflight, then crashes while resuming (after its exec).
    "0.1.6": ("agent/_resume.py",
              "_real_load = load\n"
              "def load(config, fds):\n"
              "    _real_load(config, fds)\n"
              "    raise RuntimeError('simulated crash while resuming')\n"),
    # The new shim finds the sandbox state it was handed corrupt.
    "0.1.7": ("shim/state.py",
              "def decode(doc):\n"
              "    raise ValueError('simulated: unreadable sandbox state')\n"),
    # The new shim speaks another handoff protocol.
    "0.1.8": ("upgrade/handoff.py", "PROTOCOL_VERSION = 99\n"),
}


@pytest.fixture(scope="session")
def bad_releases() -> Iterator[ReleaseStore]:
    with tempfile.TemporaryDirectory(prefix="keel-bad-releases-") as tmp:
        store = ReleaseStore(Path(tmp))
        for version, patch in BAD.items():
            make_release(store.root, version, REPO, patch)
        yield store


@pytest.fixture
def w(containerd: Containerd, busybox: str, container_ids: Callable[[], str],
      releases: ReleaseStore) -> Iterator[CtrCounter]:
    """The counter running on release A (killed at the end if still running)."""
    with workload(containerd, container_ids(), releases.get(A), busybox) as running:
        yield running


def test_new_shim_killed_before_commit_leaves_the_old_one_serving(
        w: CtrCounter, releases: ReleaseStore) -> None:
    """A new shim SIGKILLed at any phase before commit: the old one thaws and serves on."""
    pid = status(w).shim_pid
    failpoint = w.sandbox.root / "handoff-failpoint"
    for phase in ("before-hello", "after-state", "after-restore"):
        failpoint.write_text(phase)
        err = refused(w, lambda: upgrade_shim(w, releases.get(B).shim_path))
        assert err.status is Status.FAILED_PRECONDITION, (phase, err)
        assert not failpoint.exists(), f"the new shim never reached {phase}"
        assert_serving(w, A, A, pid)
        w.untouched()
    # The thawed shim is whole: a real upgrade goes through afterwards.
    r = upgrade_shim(w, releases.get(B).shim_path)
    assert_serving(w, B, A, r.new_shim_pid)
    w.untouched()
    w.finish_in_order()


def test_new_shim_dying_after_commit_is_a_crash_containerd_cleans_up(
        containerd: Containerd, w: CtrCounter, releases: ReleaseStore) -> None:
    """Past commit the old shim has let go: the new one dying is a shim crash like
    any other.  The caller is told, and containerd's cleanup leaves nothing behind
    (the container_ids fixture checks for leftover processes, mounts, sockets)."""
    (w.sandbox.root / "handoff-failpoint").write_text("after-commit")
    err = refused(w, lambda: upgrade_shim(w, releases.get(B).shim_path))
    assert err.status is Status.UNAVAILABLE and "died after taking over" in str(err.message)
    rc = w.proc.wait(30)
    assert rc != 0 and rc != 7
    wait_for(lambda: disconnects(containerd, w.cid), 30, "containerd to see the crash")
    wait_for(lambda: task_of(containerd, w.cid) is None, 30, "the task to go away")


def test_broken_shim_releases_change_nothing(w: CtrCounter, releases: ReleaseStore,
                                             bad_releases: ReleaseStore) -> None:
    pid = status(w).shim_pid
    state = w.sandbox.state.read_bytes()
    assert json.loads(state)["schema_version"] == SCHEMA_VERSION

    def refuses(path: Path | str, code: Status, *words: str) -> None:
        err = refused(w, lambda: upgrade_shim(w, path))
        assert err.status is code and all(x in str(err.message) for x in words), err
        assert_serving(w, A, A, pid)
        w.untouched()

    # Crashes at import: the error carries what it printed.
    refuses(bad_releases.get("0.1.5").shim_path, Status.FAILED_PRECONDITION,
            "exited with status 1 before saying hello", "simulated")
    # Finds the state it was handed corrupt: it says so, the old shim goes on.
    refuses(bad_releases.get("0.1.7").shim_path, Status.FAILED_PRECONDITION,
            "unreadable sandbox state")
    # Speaks another handoff protocol: refused before anything froze.
    refuses(bad_releases.get("0.1.8").shim_path, Status.FAILED_PRECONDITION,
            "handoff protocol 99")
    # Not a shim at all.
    refuses(w.sandbox.root / "no-such-shim", Status.FAILED_PRECONDITION, "not an executable")
    refuses("", Status.INVALID_ARGUMENT, "shim_path")
    # Nothing was deleted: the state (rewritten by each freeze, with the
    # pumps' offsets) still describes the same sandbox.
    after = json.loads(w.sandbox.state.read_bytes())
    assert [(c["id"], c["init"]["pid"]) for c in after["containers"]] == [
        (c["id"], c["init"]["pid"]) for c in json.loads(state)["containers"]]
    # A state *file* damaged on disk does not stop a handoff: the shim's
    # memory is the truth, the freeze writes it again, the new shim reads it.
    w.sandbox.state.write_text("{damaged")
    r = upgrade_shim(w, releases.get(B).shim_path)
    assert_serving(w, B, A, r.new_shim_pid)
    assert json.loads(w.sandbox.state.read_text())["schema_version"] == SCHEMA_VERSION
    w.untouched()
    w.finish_in_order()


def test_agent_that_crashes_while_resuming_rolls_back(w: CtrCounter, releases: ReleaseStore,
                                                      bad_releases: ReleaseStore) -> None:
    pid = status(w).shim_pid
    a = upgrade_agent(w, bad_releases.get("0.1.6"))
    assert (a.from_version, a.to_version, a.rolled_back) == (A, "0.1.6", True), a
    assert A in a.message
    assert_serving(w, A, A, pid)
    w.untouched()
    # A good release still goes through afterwards.
    a = upgrade_agent(w, releases.get(B))
    assert (a.to_version, a.rolled_back) == (B, False)
    assert_serving(w, A, B, pid)
    w.untouched()
    w.finish_in_order()


def test_unknown_and_incompatible_versions_are_refused(containerd: Containerd, w: CtrCounter,
                                                       releases: ReleaseStore) -> None:
    pid = status(w).shim_pid
    # The agent checks the version the release really is.
    err = refused(w, lambda: shim_ops(w, lambda s: s.upgrade_agent(ops_pb.UpgradeAgentRequest(
        agent_path=str(releases.get(B).agent_path), to_version="0.1.3"), timeout=60)))
    assert err.status is Status.FAILED_PRECONDITION and f"is release {B}" in str(err.message)
    with opsd(containerd, releases) as ctl:
        res = opsctl(ctl, "upgrade", "--to", "0.1.3", "--sandbox", w.cid)
        assert res.returncode == 1 and "release 0.1.3 is not installed" in res.stderr, res
        res = opsctl(ctl, "upgrade", "--to", "not-a-version", "--sandbox", w.cid)
        assert res.returncode == 1 and "is not a Keel version" in res.stderr, res
        res = opsctl(ctl, "upgrade", "--to", FAR, "--sandbox", w.cid)
        assert res.returncode == 1 and "skips a minor release" in res.stderr, res
        assert "no sandbox touched" in res.stderr, res
    assert_serving(w, A, A, pid)
    w.untouched()
    w.finish_in_order()


_STATUS_AS_NOBODY = """
import asyncio, os, sys
from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from agent.api import ops_pb
os.setgroups([]); os.setgid(65534); os.setuid(65534)

async def main():
    channel = Channel(path=sys.argv[1])
    try:
        await ops_pb.ShimOpsStub(channel).status(ops_pb.StatusRequest(), timeout=10)
        print("answered")
    except GRPCError as exc:
        print(exc.status.name, exc.message)
    finally:
        channel.close()
asyncio.run(main())
"""


def test_ops_socket_checks_peer_credentials(w: CtrCounter) -> None:
    """ops.sock is 0600; with its mode loosened by hand, the shim still
    refuses another user (UpgradeShim would run a program as root)."""
    open_dir = Path(tempfile.mkdtemp(prefix="kops-open-", dir="/tmp"))
    try:
        open_dir.chmod(0o755)
        exposed = open_dir / "ops.sock"
        os.link(w.sandbox.ops_socket, exposed)
        exposed.chmod(0o666)
        r = subprocess.run([sys.executable, "-c", _STATUS_AS_NOBODY, str(exposed)],
                           capture_output=True, text=True, cwd=REPO, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.stdout.startswith("PERMISSION_DENIED "), (r.stdout, r.stderr)
        assert "refuses uid 65534: only root may use it" in r.stdout
        assert status(w).shim_version == A  # root still gets in
    finally:
        shutil.rmtree(open_dir)
    w.untouched()
    w.finish_in_order()


def test_ops_socket_flood_with_the_shim_out_of_fds(containerd: Containerd, w: CtrCounter) -> None:
    """The shim out of file descriptors while a client floods ops.sock:
    asyncio retries accept() each second and the shim says so in one line
    (before: a traceback each second); the counter goes on meanwhile, and
    ops.sock answers again once the flood is over."""
    pid = status(w).shim_pid
    start = len(containerd.log_text())
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 4, hard))
    flood: list[socket.socket] = []
    try:
        for _ in range(64):  # the listen backlog takes what the shim cannot accept
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            flood.append(sock)
            try:
                sock.connect(str(w.sandbox.ops_socket))
            except BlockingIOError:
                break  # backlog full
        failed = "accept failed: [Errno 24] Too many open files"
        wait_for(lambda: failed in containerd.log_text()[start:], 10, "the shim to run out of fds")
        w.flows()
        time.sleep(4)  # asyncio retries each second: four more failures
        log = containerd.log_text()[start:]
        lines = [line for line in log.splitlines() if "accept" in line and f"pid={pid}" in line]
        print(f"[flood] {len(flood)} connections, shim at its fd limit: {len(lines)} log line(s)")
        assert len(lines) == 1, lines
        assert "Traceback" not in log, log[-3000:]
    finally:
        for sock in flood:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert status(w).shim_pid == pid  # answers again
    w.untouched()
    w.finish_in_order()
