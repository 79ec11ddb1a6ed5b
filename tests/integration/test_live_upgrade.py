"""Live upgrade end to end: a real containerd, real ``ctr``, real releases side by side.

A container started by ``ctr run --rm`` in the foreground prints a sequence
number every ~2 ms; the test reads ctr's stdout, so every byte crosses
containerd's own stdio fifos.  While containerd's Wait on the task and an
exec (blocked reading its stdin) are pending, the shim and the agent are
upgraded back and forth between two releases through the sandbox's
ShimOps endpoint, and once through ``opsd`` + ``opsctl upgrade``.  Then
the sandbox must look as if nothing happened: containerd never logged a
disconnect, the task kept its pid, every number arrived exactly once and
in order, the exec still reads and answers, the exit code is the
container's.

Fault injection wraps the real releases: the new shim killed at every
handoff phase (``<sandbox>/handoff-failpoint``, upgrade/PROTOCOL.md), a
release whose shim cannot even be imported, one whose agent crashes while
resuming, one whose shim finds the handed-over state corrupt, one that
speaks another handoff protocol, and paths and versions that are no
release.  Each has a stated outcome; before commit it is always "the old
shim keeps serving and containerd notices nothing".

Releases are built once per session: ``<root>/<version>/`` with
``bin/containerd-shim-keel-v2`` and ``bin/keel-agent`` (the layout of
upgrade/releases.py), each running its own copy of the code on this
interpreter (whose site-packages provide the dependencies).  The last
test starts from a real earlier commit of this repository
(``KEEL_UPGRADE_FROM``, default below) and upgrades it to the working tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from agent.api import ops_pb
from shim.dirs import SandboxDir
from shim.state import SCHEMA_VERSION
from tests.containerd import Containerd, wait_for
from tests.workloads import STOPPER, counter
from upgrade.releases import Release, ReleaseStore

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
A, B = "0.1.1", "0.1.2"
#: Installed, but two minor releases away from A and B: opsd must refuse it.
FAR = "0.3.0"
#: The earlier release the last test upgrades from (a commit of this repo).
PREVIOUS = os.environ.get("KEEL_UPGRADE_FROM", "6f1665b")
PREVIOUS_VERSION = "0.0.9"
PACKAGES = ("shim", "agent", "upgrade", "opsd", "observability")
#: Shim and agent each switch this many times in the back-and-forth test.
SWITCHES = 20
#: Prints 0, 1, 2... every ~2 ms until STOPPER runs, then "end"; exits 7.
COUNTER = counter(2000)
#: Reads one line from its stdin (kept pending across the upgrades) and answers it.
READER = "read line; echo got:$line; exit 3"
T = TypeVar("T")

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
              "def _decode(doc):\n"
              "    raise ValueError('simulated: unreadable sandbox state')\n"),
    # The new shim speaks another handoff protocol.
    "0.1.8": ("upgrade/handoff.py", "PROTOCOL_VERSION = 99\n"),
}


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


@pytest.fixture(scope="session")
def releases() -> Iterator[ReleaseStore]:
    """Releases A and B of the working tree (the good ones; opsd's root)."""
    with tempfile.TemporaryDirectory(prefix="keel-releases-") as tmp:
        store = ReleaseStore(Path(tmp))
        for version in (A, B, FAR):
            make_release(store.root, version, REPO)
        yield store


@pytest.fixture(scope="session")
def bad_releases() -> Iterator[ReleaseStore]:
    with tempfile.TemporaryDirectory(prefix="keel-bad-releases-") as tmp:
        store = ReleaseStore(Path(tmp))
        for version, patch in BAD.items():
            make_release(store.root, version, REPO, patch)
        yield store


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
        self._readers = [threading.Thread(target=_drain, args=(f, buf), daemon=True)
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


def _drain(f: Any, into: bytearray) -> None:
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


def _spread(values: list[float]) -> str:
    v = sorted(values)
    return f"min {v[0]:.0f} / median {v[len(v) // 2]:.0f} / max {v[-1]:.0f}"


# --- tests --------------------------------------------------------------------

def test_upgrade_back_and_forth_under_load(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str],
                                           releases: ReleaseStore) -> None:
    cid = container_ids()
    rel = {v: releases.get(v) for v in (A, B)}
    with workload(containerd, cid, rel[A], busybox) as w:
        # A pending exec, blocked on its stdin (and containerd's Wait on it).
        reader = subprocess.Popen(
            [*containerd.ctr_prefix(), "tasks", "exec", "--exec-id", "reader", cid,
             "sh", "-c", READER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # And requests in flight at any moment: `ctr task ps` (containerd -> shim -> agent).
        stop_ps = threading.Event()
        ps_runs: list[subprocess.CompletedProcess[str]] = []
        ps = threading.Thread(target=_ps_loop, args=(containerd, cid, stop_ps, ps_runs),
                              daemon=True)
        try:
            wait_for(lambda: "reader" in status(w).containers[0].exec_ids, 30, "the exec")
            assert_serving(w, A, A)
            ps.start()
            freezes, gaps = [], []
            for i in range(SWITCHES):
                frm, to = (A, B) if i % 2 == 0 else (B, A)
                before = status(w).shim_pid
                r = upgrade_shim(w, rel[to].shim_path)
                assert (r.from_version, r.to_version) == (frm, to)
                assert r.new_shim_pid not in (0, before)
                assert_serving(w, to, frm, r.new_shim_pid)  # the new shim, the old agent
                freezes.append(r.freeze_ms)
                a = upgrade_agent(w, rel[to])
                assert (a.from_version, a.to_version, a.rolled_back) == (frm, to, False), a
                gaps.append(a.gap_s * 1000)
                assert_serving(w, to, to, r.new_shim_pid)
                w.untouched()
            stop_ps.set()
            ps.join(60)
            failed = [r for r in ps_runs if r.returncode != 0 or str(w.pid) not in r.stdout]
            assert len(ps_runs) > SWITCHES and not failed, (len(ps_runs), failed[:3])
            # The agent's own figure: its old image's last answer to the new one's first.
            inside = [float(g) for g in re.findall(r": gap ([0-9.]+) ms",
                                                   w.sandbox.agent_log.read_text())]
            assert len(inside) == SWITCHES, inside
            print(f"\n{SWITCHES} shim handoffs: freeze ms {_spread(freezes)}; agent upgrades:"
                  f" gap ms seen by the shim {_spread(gaps)}, by the agent {_spread(inside)};"
                  f" {len(ps_runs)} `ctr task ps` meanwhile, all answered")

            # Once more through the operator's path: opsd and opsctl.
            with opsd(containerd, releases) as ctl:
                res = opsctl(ctl, "upgrade", "--to", B, "--sandbox", cid)
                assert res.returncode == 0, res
                assert f"{cid}: shim {A} -> {B}" in res.stdout and "succeeded" in res.stdout, res
                listed = opsctl(ctl, "ls")
                assert re.search(rf"^{re.escape(cid)}\s+{re.escape(B)}\s+{re.escape(B)}\s",
                                 listed.stdout, re.M), listed.stdout
            assert_serving(w, B, B)
            w.untouched()

            # The exec that waited through all of it still reads and answers.
            out, err = reader.communicate(b"hello\n", timeout=30)
            assert (reader.returncode, out, err) == (3, b"got:hello\n", b"")
            assert task_of(containerd, cid) == (w.pid, "RUNNING")
            assert not disconnects(containerd, cid), disconnects(containerd, cid)
            assert w.finish() == 7, w.err.decode()
        finally:
            stop_ps.set()
            if reader.poll() is None:
                reader.kill()
                reader.communicate()
        w.assert_sequence()


def _ps_loop(ctd: Containerd, cid: str, stop: threading.Event,
             runs: list[subprocess.CompletedProcess[str]]) -> None:
    while not stop.wait(0.05):
        runs.append(ctd.ctr("tasks", "ps", cid))


def test_new_shim_killed_before_commit_leaves_the_old_one_serving(
        containerd: Containerd, busybox: str, container_ids: Callable[[], str],
        releases: ReleaseStore) -> None:
    """A new shim SIGKILLed at any phase before commit: the old one thaws and serves on."""
    cid = container_ids()
    with workload(containerd, cid, releases.get(A), busybox) as w:
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
        assert w.finish() == 7
        w.assert_sequence()


def test_new_shim_dying_after_commit_is_a_crash_containerd_cleans_up(
        containerd: Containerd, busybox: str, container_ids: Callable[[], str],
        releases: ReleaseStore) -> None:
    """Past commit the old shim has let go: the new one dying is a shim crash like
    any other.  The caller is told, and containerd's cleanup leaves nothing behind
    (the container_ids fixture checks for leftover processes, mounts, sockets)."""
    cid = container_ids()
    with workload(containerd, cid, releases.get(A), busybox) as w:
        (w.sandbox.root / "handoff-failpoint").write_text("after-commit")
        err = refused(w, lambda: upgrade_shim(w, releases.get(B).shim_path))
        assert err.status is Status.UNAVAILABLE and "died after taking over" in str(err.message)
        rc = w.proc.wait(30)
        assert rc != 0 and rc != 7
        wait_for(lambda: disconnects(containerd, cid), 30, "containerd to see the crash")
        wait_for(lambda: task_of(containerd, cid) is None, 30, "the task to go away")


def test_broken_shim_releases_change_nothing(containerd: Containerd, busybox: str,
                                             container_ids: Callable[[], str],
                                             releases: ReleaseStore,
                                             bad_releases: ReleaseStore) -> None:
    cid = container_ids()
    with workload(containerd, cid, releases.get(A), busybox) as w:
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
        assert w.finish() == 7
        w.assert_sequence()


def test_agent_that_crashes_while_resuming_rolls_back(containerd: Containerd, busybox: str,
                                                      container_ids: Callable[[], str],
                                                      releases: ReleaseStore,
                                                      bad_releases: ReleaseStore) -> None:
    cid = container_ids()
    with workload(containerd, cid, releases.get(A), busybox) as w:
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
        assert w.finish() == 7
        w.assert_sequence()


def test_unknown_and_incompatible_versions_are_refused(containerd: Containerd, busybox: str,
                                                       container_ids: Callable[[], str],
                                                       releases: ReleaseStore) -> None:
    cid = container_ids()
    with workload(containerd, cid, releases.get(A), busybox) as w:
        pid = status(w).shim_pid
        # The agent checks the version the release really is.
        err = refused(w, lambda: shim_ops(w, lambda s: s.upgrade_agent(ops_pb.UpgradeAgentRequest(
            agent_path=str(releases.get(B).agent_path), to_version="0.1.3"), timeout=60)))
        assert err.status is Status.FAILED_PRECONDITION and f"is release {B}" in str(err.message)
        with opsd(containerd, releases) as ctl:
            res = opsctl(ctl, "upgrade", "--to", "0.1.3", "--sandbox", cid)
            assert res.returncode == 1 and "release 0.1.3 is not installed" in res.stderr, res
            res = opsctl(ctl, "upgrade", "--to", "not-a-version", "--sandbox", cid)
            assert res.returncode == 1 and "is not a Keel version" in res.stderr, res
            res = opsctl(ctl, "upgrade", "--to", FAR, "--sandbox", cid)
            assert res.returncode == 1 and "skips a minor release" in res.stderr, res
            assert "no sandbox touched" in res.stderr, res
        assert_serving(w, A, A, pid)
        w.untouched()
        assert w.finish() == 7
        w.assert_sequence()


@pytest.fixture(scope="session")
def previous_release(releases: ReleaseStore) -> Iterator[Release]:
    """The earlier commit, from ``git archive`` (the checkout is not touched)."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(REPO), "cat-file", "-e",
                                      f"{PREVIOUS}^{{commit}}"],
                                     capture_output=True, check=False).returncode != 0:
        why = (f"commit {PREVIOUS} of this repository is not available (no git, or a shallow"
               f" clone: fetch it, or name another with KEEL_UPGRADE_FROM)")
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"[environment] in CI (CI=true, refusing to skip): {why}", pytrace=False)
        pytest.skip(f"SKIPPED (environment): {why}")
    with tempfile.TemporaryDirectory(prefix="keel-previous-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        archive = subprocess.run([git, "-C", str(REPO), "archive", PREVIOUS], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        yield make_release(releases.root, PREVIOUS_VERSION, tree)
        shutil.rmtree(releases.root / PREVIOUS_VERSION)


def settle(w: Workload, pid: int) -> None:
    """Wait for shim *pid* to answer on ops.sock.  Needed after a handoff *from*
    the previous release only: it answered UpgradeShim before the new shim
    served ops.sock (this tree's shims wait for that)."""
    def serves() -> bool:
        try:
            return status(w).shim_pid == pid
        except (GRPCError, StreamTerminatedError, OSError):  # the old one is exiting
            return False

    wait_for(serves, 30, f"shim {pid} to serve ops.sock")


def test_upgrade_from_the_previous_release(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str],
                                           releases: ReleaseStore,
                                           previous_release: Release) -> None:
    cid = container_ids()
    with workload(containerd, cid, previous_release, busybox) as w:
        # Shims up to that commit did not report their state schema (it reads 0).
        assert_serving(w, PREVIOUS_VERSION, PREVIOUS_VERSION, schema=None)
        new = releases.get(A)
        r = upgrade_shim(w, new.shim_path)
        assert (r.from_version, r.to_version) == (PREVIOUS_VERSION, A)
        settle(w, r.new_shim_pid)
        a = upgrade_agent(w, new)
        assert (a.to_version, a.rolled_back) == (A, False), a
        assert_serving(w, A, A, r.new_shim_pid)
        w.untouched()
        # And back (a rollback must always be possible), and forward again.
        r = upgrade_shim(w, previous_release.shim_path)
        upgrade_agent(w, previous_release)
        assert_serving(w, PREVIOUS_VERSION, PREVIOUS_VERSION, r.new_shim_pid, schema=None)
        w.untouched()
        r = upgrade_shim(w, new.shim_path)
        settle(w, r.new_shim_pid)
        upgrade_agent(w, new)
        assert_serving(w, A, A, r.new_shim_pid)
        w.untouched()
        res = containerd.ctr("tasks", "exec", "--exec-id", "probe", cid, "sh", "-c", "echo ok; exit 4")
        assert (res.returncode, res.stdout) == (4, "ok\n"), res
        assert w.finish() == 7
        w.assert_sequence()
