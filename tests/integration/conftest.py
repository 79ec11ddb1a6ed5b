"""Fixtures for tests that drive a real, private containerd (see tests/containerd/).

* `containerd` (session): one private containerd for the whole run, with the
  busybox image (`busybox` fixture / `BUSYBOX_REF`) already imported and a
  `containerd-shim-keel-v2` wrapper in its PATH that runs this interpreter's
  `-m shim` with the repo on PYTHONPATH; `KEEL_STATE_ROOT=<tmp>/keel`.  At the end every task and
  container in the namespace is removed, containerd is stopped, and the run
  fails if any process, mount or socket of it is left (those are then
  killed/unmounted, so the host stays clean either way).
* `container_ids` (function): hands out unique container ids and, after the
  test, force-removes whatever of them is left and checks that nothing but
  containerd itself remains (so it does not suit tests that share a
  long-lived container across tests).
* `releases` (session): releases A, B and FAR of the working tree side by
  side (tests/integration/live_upgrade.py), for the live-upgrade tests.
* `agent` (function): a real agent for one test, checked afterwards.
* `runc`, `rootfs` (module): for the tests that drive the agent without
  containerd (test_agent.py, agent_upgrade/): runc's path (skipped loudly
  without root or runc, failed in CI) and a busybox root filesystem.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.containerd import Containerd, force_cleanup, install_shim_wrapper, remove_root
from tests.images.busybox import BUSYBOX_REF, build_image, import_image

if TYPE_CHECKING:
    from tests.agent_harness import AgentProcess
    from upgrade.releases import ReleaseStore

REPO = Path(__file__).resolve().parents[2]
IMAGE_CACHE = Path(os.environ.get("KEEL_TEST_CACHE", "/var/tmp/keel-test-cache")) / "images"


@pytest.fixture(scope="session")
def containerd(require_env: Callable[[str], None]) -> Iterator[Containerd]:
    require_env("integration")
    tmp = Path(tempfile.mkdtemp(prefix="keel-ctd-", dir="/tmp"))
    # Keel's sandbox state under the temp root too, so leftovers() sees it.
    ctd = Containerd(tmp, env={"KEEL_STATE_ROOT": str(tmp / "keel")})
    install_shim_wrapper(ctd.paths.bin_dir, sys.executable, env={"PYTHONPATH": str(REPO)})
    ctd.start()
    try:
        import_image(ctd.ctr_prefix(), build_image(IMAGE_CACHE))
        yield ctd
    finally:
        _teardown(ctd)


def _teardown(ctd: Containerd) -> None:
    problems = []
    if ctd.pid is not None:
        try:
            ctd.remove_all()
        except Exception as exc:  # report, but still stop and clean up
            problems.append(f"remove_all: {exc}")
    found = ctd.stop()
    if found:
        problems.append(f"left behind after containerd stopped:\n{found}")
        force_cleanup(found)
    remove_root(ctd.paths.tmp_root, problems)
    if problems:
        pytest.fail("private containerd teardown:\n" + "\n".join(problems)
                    + f"\n--- containerd log tail ({ctd.paths.log}) ---\n{ctd.log_tail()}",
                    pytrace=False)


@pytest.fixture(scope="module")
def long_root_containerd(require_env: Callable[[str], None]) -> Iterator[tuple[Containerd, Path]]:
    """A private containerd whose Keel state root is as long as Keel allows
    (``MAX_STATE_ROOT`` bytes): a 64-character pod id's sockets do not fit
    under its sandbox directory.  Torn down and checked like `containerd`."""
    from shim.dirs import MAX_STATE_ROOT

    require_env("integration")
    tmp = Path(tempfile.mkdtemp(prefix="keel-long-", dir="/tmp"))
    root = tmp / ("k" * (MAX_STATE_ROOT - len(str(tmp)) - 1))
    ctd = Containerd(tmp, env={"KEEL_STATE_ROOT": str(root)})
    install_shim_wrapper(ctd.paths.bin_dir, sys.executable, env={"PYTHONPATH": str(REPO)})
    ctd.start()
    try:
        import_image(ctd.ctr_prefix(), build_image(IMAGE_CACHE))
        yield ctd, root
    finally:
        _teardown(ctd)


@pytest.fixture(scope="session")
def busybox(containerd: Containerd) -> str:
    """The ref of the busybox image imported into `containerd`."""
    return BUSYBOX_REF


@pytest.fixture
def container_ids(containerd: Containerd, request: pytest.FixtureRequest
                  ) -> Iterator[Callable[[], str]]:
    """A factory of fresh container ids; cleans them up and checks for leftovers after the test."""
    base = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-40:].strip("-")
    counter = itertools.count(1)
    issued: list[str] = []

    def new_id() -> str:
        cid = f"{base}-{os.getpid()}-{next(counter)}"
        issued.append(cid)
        return cid

    yield new_id
    stale = []
    for cid in issued:
        if containerd.ctr("tasks", "ls", "-q").stdout.split().count(cid):
            stale.append(f"task {cid}")
            containerd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid)
            containerd.ctr("tasks", "rm", "-f", cid)
        if containerd.ctr("containers", "ls", "-q").stdout.split().count(cid):
            stale.append(f"container {cid}")
            containerd.ctr("containers", "rm", cid)
    found = containerd.leftovers(grace=5.0)
    assert not found, f"left behind by {request.node.name}:\n{found}"
    assert not stale, f"{request.node.name} did not clean up: {stale}"


@pytest.fixture(scope="module")
def runc() -> str:
    """runc's path; skips loudly (fails in CI) without root, runc or busybox."""
    # Imported here: the tests that drive containerd need none of the agent's modules.
    from tests.agent_harness import require_root_and_runc

    return require_root_and_runc()


@pytest.fixture
def agent(runc: str) -> Iterator[AgentProcess]:
    """A real agent for one test (tests/agent_harness.py).  Afterwards it must
    still run and have logged no traceback; SIGTERM must stop it cleanly,
    and no runc container of it may be left."""
    from tests.agent_harness import AgentProcess

    proc = AgentProcess(runc)
    try:
        yield proc
        assert proc.proc.poll() is None, f"agent died:\n{proc.log()}"
        assert "Traceback" not in proc.log(), proc.log()
    finally:
        leftovers = proc.cleanup()
    assert proc.proc.returncode == 0, "agent did not stop cleanly on SIGTERM"
    assert leftovers == [], f"runc containers left behind: {leftovers}"


@pytest.fixture(scope="module")
def rootfs(runc: str) -> Iterator[str]:
    """A busybox root filesystem, for the module's containers."""
    from tests.agent_harness import make_rootfs

    with tempfile.TemporaryDirectory(prefix="keel-rootfs-") as tmp:
        yield str(make_rootfs(Path(tmp) / "rootfs"))


@pytest.fixture(scope="session")
def releases() -> Iterator[ReleaseStore]:
    """Releases A and B of the working tree (the good ones; opsd's root)."""
    # Imported here: the other integration tests need none of the shim's modules.
    from tests.integration.live_upgrade import FAR, A, B, make_release
    from upgrade.releases import ReleaseStore

    with tempfile.TemporaryDirectory(prefix="keel-releases-") as tmp:
        store = ReleaseStore(Path(tmp))
        for version in (A, B, FAR):
            make_release(store.root, version, REPO)
        yield store
