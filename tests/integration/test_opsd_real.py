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
``ctr run`` in the foreground of a counter printing a number every 10 ms,
read by the test from ctr's stdout, so every line crosses containerd's
stdio fifos.

What is checked is what the node shows afterwards: the versions and shim
pid each sandbox reports (``opsctl ls --json``), the plan opsd reports
(``opsctl upgrade status --json``), each container's pid in
``ctr task ls``, containerd's log (no shim disconnects), and the output:
every number exactly once, in order, then the container's own exit code.

About 70 s on a quiet 2-core machine: three release installs in parallel
(pip, with dependencies), then two tests of three pods each.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.api import SandboxDir
from tests.containerd import Containerd, leftovers, wait_for
from tests.opsd_harness import REPO, Opsd, opsctl, plan, sandboxes
from tests.workloads import STOPPER, counter
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
#: Prints 0, 1, 2... every ~10 ms until STOPPER runs, then "end"; exits 7.
COUNTER = counter(10_000)
#: Not copied into a release's source: VCS data, virtualenvs, caches, the tests.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv*", "__pycache__", "*.egg-info",
                                     "build", "dist", ".*_cache", ".hypothesis", "tests")


# --- releases -----------------------------------------------------------------

def release_source(tmp: Path, version: str, patch: tuple[str, str] | None = None) -> Path:
    """This working tree with *version* in pyproject.toml (and *patch* appended to a module)."""
    src = tmp / f"src-{version}"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    py = src / "pyproject.toml"
    py.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', py.read_text()))
    if patch is not None:
        with open(src / patch[0], "a") as f:
            f.write("\n" + patch[1])
    return src


@pytest.fixture(scope="module")
def releases(containerd: Containerd) -> Iterator[ReleaseStore]:
    """A (current), B and BROKEN installed by ``opsctl release install``, in parallel."""
    tmp = Path(tempfile.mkdtemp(prefix="keel-opsd-rel-", dir="/tmp"))
    root = tmp / "releases"
    sources = {A: release_source(tmp, A), B: release_source(tmp, B),
               BROKEN: release_source(tmp, BROKEN, BROKEN_PATCH)}

    def install(version: str) -> subprocess.CompletedProcess[str]:
        return opsctl(tmp / "no-opsd.sock", "release", "--releases", str(root), "--state-root",
                      str(containerd.paths.tmp_root / "keel"), "install", str(sources[version]),
                      "--no-build-isolation", *(["--current"] if version == A else []))

    try:
        with concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:
            done = dict(zip(sources, pool.map(install, sources), strict=True))
        for version, r in done.items():
            assert r.returncode == 0 and f"installed keel {version}" in r.stdout, r
        store = ReleaseStore(root)
        assert [(r.version, r.is_current) for r in store.list()] == [
            (A, True), (B, False), (BROKEN, False)]
        yield store
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- pods ---------------------------------------------------------------------

class Pod:
    """``ctr run --rm`` of the counter in the foreground on *release*, its output read by a thread."""

    def __init__(self, ctd: Containerd, cid: str, release: Release, image: str) -> None:
        self.ctd, self.cid = ctd, cid
        self.proc = subprocess.Popen(
            [*ctd.ctr_prefix(), "run", "--rm", "--runtime", str(release.shim_path), image, cid,
             "sh", "-c", COUNTER],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=_drain, args=(f, buf), daemon=True)
                         for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()
        self.pid = 0

    def lines(self) -> int:
        return self.out.count(b"\n")

    def _check_ctr(self) -> bool:
        """False while ctr runs; raises once it exited (nothing left to wait for)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"ctr run {self.cid} exited with {self.proc.returncode}:"
                                 f" {self.err.decode(errors='replace')}")
        return False

    def running(self) -> None:
        """Wait for the task to run and print; remember its pid."""
        def run() -> tuple[int, str] | None:
            self._check_ctr()
            task = self.ctd.task(self.cid)
            return task if task is not None and task[1] == "RUNNING" else None

        task = wait_for(run, 60, f"task {self.cid} to run")
        self.pid = task[0]
        self.flows()

    def flows(self, more: int = 10) -> None:
        """The counter goes on printing through whoever serves now."""
        target = self.lines() + more
        wait_for(lambda: self._check_ctr() or self.lines() >= target, 30,
                 f"{more} more lines from {self.cid} (at {self.lines()})")

    def untouched(self) -> None:
        """Same pid, still running, output flowing, and containerd never lost its shim."""
        assert self.ctd.task(self.cid) == (self.pid, "RUNNING")
        self.flows()
        assert not disconnects(self.ctd, self.cid), disconnects(self.ctd, self.cid)

    def finish(self) -> None:
        """Stop the counter; ctr exits with the container's 7 and every number arrived once."""
        res = self.ctd.ctr("tasks", "exec", "--exec-id", "stop", self.cid, *STOPPER)
        assert res.returncode == 0, res
        assert self.proc.wait(60) == 7, self.err.decode(errors="replace")
        for t in self._readers:
            t.join(10)
        lines = self.out.decode().split("\n")
        assert lines[-2:] == ["end", ""], lines[-5:]
        numbers = lines[:-2]
        bad = next((i for i, n in enumerate(numbers) if n != str(i)), None)
        assert bad is None, f"{self.cid}: line {bad} is {numbers[bad]!r}, around:" \
                            f" {numbers[max(bad - 3, 0):bad + 3]}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.ctd.ctr("tasks", "kill", "-s", "SIGKILL", self.cid)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _drain(f: Any, into: bytearray) -> None:
    while chunk := f.read1(65536):
        into += chunk


def disconnects(ctd: Containerd, cid: str) -> list[str]:
    """containerd's log lines that say it lost the shim of *cid*."""
    mine = re.compile(rf"\bid={re.escape(cid)}(\s|$)")
    return [line for line in ctd.log_text().splitlines()
            if "shim disconnected" in line and mine.search(line)]


@contextlib.contextmanager
def pods(ctd: Containerd, new_id: Callable[[], str], release: Release, image: str
         ) -> Iterator[list[Pod]]:
    """PODS pods on *release*, started together; killed at the end if still running."""
    started: list[Pod] = []
    try:
        for _ in range(PODS):
            started.append(Pod(ctd, new_id(), release, image))
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
    base = Path(tempfile.mkdtemp(prefix="kopsr-", dir="/tmp"))
    d = Opsd(base, releases=releases.root, state_root=containerd.paths.tmp_root / "keel",
             timeouts={"gate": 30, "settle": 30, "status": 5})
    d.start()
    try:
        yield d
    finally:
        d.close()
        found = leftovers(base)
        shutil.rmtree(base, ignore_errors=True)
        assert not found, f"left behind by opsd:\n{found}"


def reported(node: Opsd, ps: list[Pod]) -> dict[str, dict[str, Any]]:
    """What ``opsctl ls --json`` says about these pods' sandboxes (and that it lists each)."""
    listed = sandboxes(node.socket)
    assert all(p.cid in listed for p in ps), sorted(listed)
    return {p.cid: listed[p.cid] for p in ps}


def assert_at(sb: dict[str, Any], pod: Pod, version: str) -> None:
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
            p.finish()


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
            p.finish()
