"""Fixtures of the CRI suite (see tests/cri/node.py and tests/cri/kubelet.py).

* `cri_node` (session): a private containerd with the CRI plugin in a
  network namespace of its own, runtimes ``runc`` and ``keel``, the pause
  and busybox images.  At the end it is stopped and everything it left
  (processes, mounts, the namespace, CNI cache entries, cgroups) is
  removed; the run fails if anything had to be.
* `kubelet` (function): plays the kubelet for one test on the handler of
  the test's ``handler`` parameter, and afterwards stops and removes the
  test's pods and fails the test if a pod, process, mount or socket of the
  node outlived them.

Each case takes ``handler`` through `handlers()` (tests/cri/kubelet.py), so
that a case runs for both runtimes and asserts one outcome for both.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.dirs import MAX_STATE_ROOT
from tests.cri import node as cri
from tests.cri.kubelet import Kubelet
from tests.prereq import skip_or_fail

IMAGE_CACHE = Path(os.environ.get("KEEL_TEST_CACHE", "/var/tmp/keel-test-cache")) / "images"


@pytest.fixture(scope="session")
def cri_node(require_env: Callable[[str], None]) -> Iterator[cri.CriNode]:
    require_env("integration")
    if reasons := cri.missing_prerequisites():
        skip_or_fail("; ".join(reasons), what="cri")
    # Short: Keel's sandbox sockets live below it (tests/cri/node.py).
    tmp = Path(tempfile.mkdtemp(prefix="k", dir="/tmp"))
    node = cri.start_node(tmp, IMAGE_CACHE)
    yield node
    if problems := cri.stop_node(node):
        pytest.fail("CRI node teardown:\n" + "\n".join(problems)
                    + f"\n--- containerd log tail ({node.containerd.paths.log}) ---\n"
                    + node.containerd.log_tail(), pytrace=False)


@pytest.fixture(scope="module")
def long_root_node(cri_node: cri.CriNode) -> Iterator[cri.CriNode]:
    """A second CRI node whose Keel state root is as long as Keel allows
    (``shim.dirs.MAX_STATE_ROOT``)."""
    tmp = Path(tempfile.mkdtemp(prefix="k", dir="/tmp"))
    root = tmp / "long-state-root-"
    root = Path(str(root) + "x" * (MAX_STATE_ROOT - len(os.fsencode(root))))
    node = cri.start_node(tmp, IMAGE_CACHE, keel_state=root)
    yield node
    if problems := cri.stop_node(node):
        pytest.fail("long-root CRI node teardown:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def vm_config(cri_node: cri.CriNode) -> Path:
    """The ``keel-vm`` handler's config, once the guest image is built."""
    from tests.vm.conftest import build_vm_image, write_keel_config

    path = cri.vm_config_path(cri_node.tmp_root)
    return write_keel_config(path, build_vm_image())  # state root: the node's KEEL_STATE_ROOT


@pytest.fixture
def kubelet(cri_node: cri.CriNode, handler: str, request: pytest.FixtureRequest
            ) -> Iterator[Kubelet]:
    if handler == "keel-vm":
        request.getfixturevalue("vm_config")
    k = Kubelet(cri_node, handler, request.node.originalname)
    yield k
    if handler == "keel-vm":
        print(k.vm_logs())  # pytest shows it only if the test failed
    problems = k.cleanup()
    assert not problems, f"{request.node.name} left behind:\n" + "\n".join(problems)
