"""Test-wide policy: environment markers skip loudly, and never skip in CI.

* `requires_root`: the test needs euid 0.
* `integration`: the test drives a real containerd with runc; needs root,
  `containerd`, `ctr`, `runc`, `containerd-shim-runc-v2` and `/bin/busybox`
  (apt: containerd runc busybox-static).  Any test that uses the
  `containerd` fixture gets both markers automatically.

When a prerequisite is missing the test is skipped with the reason in the
skip message (shown by `-ra`).  With `CI=true` (or `1`/`yes`) it fails
instead: in CI the environment is part of what is being tested, so a test
must never pass by not running.  That policy lives in one place,
`tests.prereq.skip_or_fail`; anything that finds a prerequisite missing
outside these markers calls it directly.

Shared fixture: `short_tmp`, a private directory under /tmp whose paths
stay short enough for unix sockets below it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.containerd import missing_prerequisites
from tests.images.busybox import BUSYBOX_PATH
from tests.prereq import skip_or_fail


def _root() -> list[str]:
    return [] if os.geteuid() == 0 else [f"needs root (euid is {os.geteuid()})"]


def _integration() -> list[str]:
    reasons = missing_prerequisites()
    if not Path(BUSYBOX_PATH).exists():
        reasons.append(f"{BUSYBOX_PATH} missing (apt-get install busybox-static)")
    return reasons


# marker name -> what is missing for it (empty: nothing)
_CHECKS: dict[str, Callable[[], list[str]]] = {
    "requires_root": _root,
    "integration": _integration,
}


def require(marker: str) -> None:
    """Skip (or, in CI, fail) the current test/fixture if `marker`'s prerequisites are missing."""
    if reasons := _CHECKS[marker]():
        skip_or_fail("; ".join(reasons), what=marker)


@pytest.fixture(scope="session")
def require_env() -> Callable[[str], None]:
    """`require` for fixtures (conftest modules are not meant to be imported)."""
    return require


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private directory (unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="keel-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "containerd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.requires_root)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in _CHECKS:
        if item.get_closest_marker(marker) is not None:
            require(marker)
