"""Fixtures of the conformance suite: one private containerd per backend.

``ctd`` is parametrized over the backends; each scenario of the suite runs
once per backend through the same ``containerd-shim-keel-v2``.  The
process backend's containerd is tests/integration's; the qemu backend's is
tests/vm's (its ``KEEL_CONFIG`` selects qemu), so the ``qemu`` variants
carry the ``vm`` marker and skip loudly where no VM can boot.
"""

from __future__ import annotations

import pytest

from tests.containerd import Containerd
from tests.integration.conftest import containerd  # noqa: F401 - the process backend's
from tests.vm.conftest import vm_containerd, vm_image  # noqa: F401 - the qemu backend's

BACKENDS = ["process", pytest.param("qemu", marks=[pytest.mark.vm, pytest.mark.slow])]


@pytest.fixture(params=BACKENDS)
def ctd(request: pytest.FixtureRequest) -> Containerd:
    """A containerd whose ``io.containerd.keel.v2`` runs sandboxes on the backend of the param."""
    fixture = "containerd" if request.param == "process" else "vm_containerd"
    ctd: Containerd = request.getfixturevalue(fixture)
    return ctd
