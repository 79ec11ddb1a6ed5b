"""Live upgrade from an earlier release of this repository to the working
tree, back, and forward again, under a real containerd (see
``previous_release`` for where the earlier release comes from).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpclib.exceptions import GRPCError, StreamTerminatedError

from tests.containerd import Containerd, wait_for
from tests.integration.live_upgrade import (
    REPO,
    A,
    assert_serving,
    make_release,
    status,
    upgrade_agent,
    upgrade_shim,
    workload,
)
from tests.prereq import skip_or_fail
from tests.workloads import CtrCounter
from upgrade.releases import Release, ReleaseStore

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]


#: The earlier release: a commit of this repository.  KEEL_UPGRADE_FROM names
#: another, which must then be in the clone.
UPGRADE_FROM = os.environ.get("KEEL_UPGRADE_FROM", "").strip()
PREVIOUS = UPGRADE_FROM or "6f1665b"
#: The version the earlier release reports (below A's, so the upgrade goes forward).
PREVIOUS_VERSION = "0.0.9"


def extract_commit(commit: str, dest: Path) -> str:
    """Write *commit*'s tree into *dest* with ``git archive`` (the checkout is
    not touched); the reason it could not be done, or "" when it was."""
    git = shutil.which("git")
    if git is None:
        return "git is not installed"
    probe = subprocess.run([git, "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return (f"commit {commit} is not in this clone (a shallow clone or another history?"
                f" {probe.stderr.strip() or 'git cat-file found nothing'})")
    archive = subprocess.run([git, "-C", str(REPO), "archive", commit], capture_output=True,
                             check=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return ""


@pytest.fixture(scope="session")
def previous_release(releases: ReleaseStore) -> Iterator[Release]:
    """Release PREVIOUS_VERSION, which the test upgrades from and back to.

    It is commit PREVIOUS of this repository whenever the clone has it: a
    real earlier release, older code on both sides of every handoff.
    Without it (a shallow clone, an export) the earlier release is built
    from the working tree and labelled PREVIOUS_VERSION: still a release
    of its own (its version, its copy of the code, its launcher) that the
    shim and agent hand over from and back to, but not older code -- a
    warning in the run's summary says so.  A commit named with
    KEEL_UPGRADE_FROM is not replaced: without it the test skips (fails
    in CI).
    """
    with tempfile.TemporaryDirectory(prefix="keel-previous-") as tmp:
        tree = Path(tmp) / "tree"
        if why := extract_commit(PREVIOUS, tree):
            if UPGRADE_FROM:
                skip_or_fail(f"KEEL_UPGRADE_FROM={UPGRADE_FROM}: {why}")
            tree = REPO
            warnings.warn(f"upgrade baseline: the working tree labelled {PREVIOUS_VERSION}, not"
                          f" an earlier release, since {why}; fetch {PREVIOUS} (git fetch"
                          f" --unshallow) to test an upgrade from older code", stacklevel=1)
        print(f"\nupgrade baseline {PREVIOUS_VERSION}: "
              f"{'the working tree' if tree == REPO else f'commit {PREVIOUS}'}")
        yield make_release(releases.root, PREVIOUS_VERSION, tree)
        shutil.rmtree(releases.root / PREVIOUS_VERSION)


def settle(w: CtrCounter, pid: int) -> None:
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
        w.finish_in_order()
