"""opsd and opsctl against real shims under a real containerd.

The private containerd of tests/integration/conftest.py runs pods on the
Keel runtime (process backend).  The releases are installed the way an
operator installs them, ``opsctl release install`` of this working tree
copied with another version (and, for the broken one, a module patched)
into a private releases root: real virtualenvs, whose shim and agent
report the version they were built as.  (Not copies of the tree run
through PYTHONPATH: a shim hands its environment to the next release's
shim, whose venv entry point would then import the previous release's
code.)  A real opsd serves the private Keel state root on a private
socket and state dir, and the real ``opsctl`` drives it.  Each pod is a
``ctr run`` in the foreground of a counter printing a number every 10 ms
(tests/workloads.py ``CtrCounter``), read by the test from ctr's stdout,
so every line crosses containerd's stdio fifos.

What is checked is what the node shows afterwards: the versions and shim
pid each sandbox reports (``opsctl ls --json``), the plan opsd reports
(``opsctl upgrade status --json``), each container's pid in
``ctr task ls``, containerd's log (no shim disconnects), and the output:
every number exactly once, in order, then the container's own exit code.

About 70 s on a quiet 2-core machine: three release installs in parallel
(pip, with dependencies), then two tests of three pods each.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.api import SandboxDir
from tests.containerd import Containerd
from tests.opsd_harness import (
    ENV,
    REPO,
    Opsd,
    install_releases,
    opsctl,
    plan,
    running_opsd,
    sandboxes,
)
from tests.workloads import CtrCounter
from upgrade.releases import Release, ReleaseStore

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

#: The release the pods start on, the one they are upgraded to, and one whose
#: agent crashes while resuming (after its exec; it execs the old one again).
A, B, BROKEN = "0.1.1", "0.2.0", "0.2.1"
BROKEN_PATCH = ("agent/_resume.py",
                "_real_load = load\n"
                "def load(config, fds):\n"
                "    _real_load(config, fds)\n"
                "    raise RuntimeError('simulated crash while resuming')\n")
PODS = 3


# --- releases -----------------------------------------------------------------

@pytest.fixture(scope="module")
def releases(containerd: Containerd) -> Iterator[ReleaseStore]:
    """A (current), B and BROKEN installed by ``opsctl release install``, in parallel."""
    tmp = Path(tempfile.mkdtemp(prefix="keel-opsd-rel-", dir="/tmp"))
    try:
        store = install_releases(tmp, tmp / "releases", containerd.paths.tmp_root / "keel",
                                 {A: None, B: None, BROKEN: BROKEN_PATCH}, current=A)
        assert [(r.version, r.is_current) for r in store.list()] == [
            (A, True), (B, False), (BROKEN, False)]
        yield store
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- pods ---------------------------------------------------------------------

@contextlib.contextmanager
def pods(ctd: Containerd, new_id: Callable[[], str], release: Release, image: str
         ) -> Iterator[list[CtrCounter]]:
    """PODS counters (a number every ~10 ms) on *release*, started together;
    killed at the end if still running."""
    started: list[CtrCounter] = []
    try:
        for _ in range(PODS):
            started.append(CtrCounter(ctd, new_id(), release.shim_path, image,
                                      interval_us=10_000, more=10))
        for p in started:
            p.running()
        yield started
    finally:
        for p in started:
            p.kill()


@pytest.fixture
def node(containerd: Containerd, container_ids: Callable[[], str],
         releases: ReleaseStore) -> Iterator[Opsd]:
    """A real opsd for the private containerd's Keel sandboxes and the releases above.

    Stopped before container_ids checks for leftovers (it depends on it);
    afterwards nothing of it may be left under its own directory."""
    with running_opsd("kopsr-", releases.root, containerd.paths.tmp_root / "keel",
                      {"gate": 30, "settle": 30, "status": 5}) as d:
        yield d


def reported(node: Opsd, ps: list[CtrCounter]) -> dict[str, dict[str, Any]]:
    """What ``opsctl ls --json`` says about these pods' sandboxes (and that it lists each)."""
    listed = sandboxes(node.socket)
    assert all(p.cid in listed for p in ps), sorted(listed)
    return {p.cid: listed[p.cid] for p in ps}


def assert_at(sb: dict[str, Any], pod: CtrCounter, version: str) -> None:
    """The sandbox's shim and agent report *version*; its one container runs with pod's pid."""
    assert (sb.get("shim_version"), sb.get("agent_version"), sb.get("backend")) == (
        version, version, "process"), sb
    assert [(c["id"], c["pid"], c["status"]) for c in sb["containers"]] == [
        (pod.cid, pod.pid, "running")], sb


# --- tests --------------------------------------------------------------------

def test_opsctl_upgrades_real_sandboxes_in_batches(containerd: Containerd, busybox: str,
                                                   container_ids: Callable[[], str],
                                                   releases: ReleaseStore, node: Opsd) -> None:
    with pods(containerd, container_ids, releases.get(A), busybox) as ps:
        ids = sorted(p.cid for p in ps)
        before = reported(node, ps)
        for p in ps:
            assert_at(before[p.cid], p, A)
        # The table an operator reads: a line per sandbox, one per container.
        ls = opsctl(node.socket, "ls")
        assert ls.returncode == 0 and f"current release: {A}" in ls.stdout, ls
        for p in ps:
            assert re.search(rf"(?m)^{re.escape(p.cid)}\s+{A}\s+{A}\s+process\s+\S+\s+1$",
                             ls.stdout), ls.stdout
            assert re.search(rf"(?m)^  container {re.escape(p.cid)}\s+pid {p.pid}\s+running$",
                             ls.stdout), ls.stdout

        r = opsctl(node.socket, "upgrade", "--to", B, "--batch", "2", "--sandbox", *ids)
        assert r.returncode == 0, r.stdout + r.stderr + node.log()
        assert r.stdout.rstrip().endswith(f"succeeded: {PODS} sandboxes at {B}"), r.stdout

        after = reported(node, ps)
        for p in ps:
            assert_at(after[p.cid], p, B)
            # A new shim serves (a new process of release B), the container is the same one.
            assert after[p.cid]["shim_pid"] != before[p.cid]["shim_pid"]
            p.untouched()
        done = plan(node.socket)
        assert (done["state"], done["to_version"], done["batches"]) == ("succeeded", B, 2), done
        assert sorted((t["sandbox_id"], t["batch"], t["from_shim"], t["from_agent"], t["state"])
                      for t in done["targets"]) == [
            (cid, i // 2, A, A, "healthy") for i, cid in enumerate(sorted(ids))]
        st = opsctl(node.socket, "upgrade", "status")
        assert st.returncode == 0 and "state succeeded" in st.stdout, st
        assert st.stdout.count(" healthy") == PODS, st.stdout
        for p in ps:
            p.finish_in_order(at_least=0)


def test_a_release_that_fails_is_rolled_back_on_real_sandboxes(
        containerd: Containerd, busybox: str, container_ids: Callable[[], str],
        releases: ReleaseStore, node: Opsd) -> None:
    """BROKEN's agent crashes while resuming: the first batch's sandboxes, whose
    shims had switched already, go back to A; the second batch is never touched."""
    with pods(containerd, container_ids, releases.get(A), busybox) as ps:
        ids = sorted(p.cid for p in ps)
        before = reported(node, ps)
        r = opsctl(node.socket, "upgrade", "--to", BROKEN, "--batch", "2", "--sandbox", *ids)
        assert r.returncode == 3, r.stdout + r.stderr + node.log()
        assert f"to {BROKEN}: rolled-back" in r.stdout, r.stdout

        done = plan(node.socket)
        assert done["state"] == "rolled-back", done
        states = {t["sandbox_id"]: t["state"] for t in done["targets"]}
        assert states == {ids[0]: "rolled-back", ids[1]: "rolled-back", ids[2]: "pending"}, done
        why = [f"agent {BROKEN} failed and went back to {A}" in t.get("message", "")
               for t in sorted(done["targets"], key=lambda t: t["sandbox_id"])]
        assert why == [True, True, False], done
        after = reported(node, ps)
        for p in ps:
            assert_at(after[p.cid], p, A)
            p.untouched()
        # The first batch's shims went to BROKEN and back: new shims.  The last
        # sandbox kept its shim process.
        assert [after[c]["shim_pid"] != before[c]["shim_pid"] for c in ids] == [True, True, False]
        st = opsctl(node.socket, "upgrade", "status")
        assert st.returncode == 0 and "state rolled-back" in st.stdout, st
        # It was the release's own code that failed, inside each first-batch sandbox.
        crashed = [c for c in ids if "simulated crash while resuming" in SandboxDir.of(
            node.state_root, c).agent_log.read_text(errors="replace")]
        assert crashed == ids[:2], crashed
        for p in ps:
            p.finish_in_order(at_least=0)


def _console(node: Opsd, cid: str, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "opsd.cli", "--socket", str(node.socket),
                             "console", cid, "--", "sh", "-c", script],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)


def test_a_console_session_goes_on_through_shim_and_agent_upgrades(
        containerd: Containerd, busybox: str, container_ids: Callable[[], str],
        releases: ReleaseStore, node: Opsd) -> None:
    """opsd holds the session's offsets: while the shim changes hands its calls
    pause and resume; across the agent's exec the session's process and its
    buffered bytes are handed over like a container's.  Every line of the
    session's output arrives once, in order, and the same shell prints last."""
    p = CtrCounter(containerd, container_ids(), releases.get(A).shim_path, busybox,
                   interval_us=10_000, more=10)
    try:
        p.running()
        assert opsctl(node.socket, "console", "enable", p.cid).returncode == 0
        n = 500
        con = _console(node, p.cid, f"echo pid $$; i=0; while [ $i -lt {n} ]; do echo $i;"
                                    f" i=$((i+1)); sleep 0.02; done; echo pid $$")
        time.sleep(1.5)  # the session runs and prints
        for component in ("shim", "agent"):
            r = opsctl(node.socket, "upgrade", "--to", B, "--components", component,
                       "--sandbox", p.cid)
            assert r.returncode == 0, r.stdout + r.stderr + node.log()[-3000:]
            assert con.poll() is None, "the session ended during the upgrade"
        out, err = con.communicate(timeout=120)
        assert con.returncode == 0, (out[-500:], err)
        lines = out.splitlines()
        assert lines[0].startswith("pid ") and lines[-1] == lines[0], (lines[:2], lines[-2:])
        assert lines[1:-1] == [str(i) for i in range(n)], out[-500:]
        assert reported(node, [p])[p.cid]["shim_version"] == B
        assert reported(node, [p])[p.cid]["agent_version"] == B
        # The switch was kept by the new shim, and it relays new sessions.
        r = opsctl(node.socket, "console", p.cid, "--", "echo", "still-on")
        assert (r.returncode, r.stdout) == (0, "still-on\n"), r
        p.untouched()
        p.finish_in_order(at_least=0)
    finally:
        p.kill()
