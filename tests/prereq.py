"""Missing prerequisites: skip loudly outside CI, fail loudly in CI.

Every test, fixture or helper that finds its environment lacking (no root,
no runc, no AF_VSOCK, an optional module not installed, a commit not in
the clone) calls :func:`skip_or_fail` with the reason, and nothing else:

* outside CI the test is skipped, the reason in the skip message (shown by
  pytest's ``-ra``, which pyproject.toml turns on);
* with ``CI=true`` (or ``1``/``yes``) it fails instead, with the same
  reason: in CI the environment is part of what is being tested, so a
  test must never pass by not running.

A module, not a conftest: conftest modules are not meant to be imported.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

#: Values of $CI that mean "this is CI" (GitHub, GitLab and most others set "true").
CI_VALUES = ("true", "1", "yes")


def in_ci() -> bool:
    """Whether a missing prerequisite must fail rather than skip ($CI is true, 1 or yes)."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def skip_or_fail(reason: str, *, what: str = "") -> NoReturn:
    """Skip the running test (or fixture) because *reason*; under CI fail it instead.

    *what* names the prerequisite group in the message (a marker such as
    ``integration`` or ``vm``), if any.  Never returns.
    """
    tag = f" [{what}]" if what else ""
    if in_ci():
        pytest.fail(f"prerequisite missing in CI{tag} (CI=true, refusing to skip): {reason}",
                    pytrace=False)
    pytest.skip(f"SKIPPED (environment){tag}: {reason}")


def require_module(name: str, install: str) -> ModuleType:
    """``import name``, or :func:`skip_or_fail` saying how to *install* it.

    The replacement for ``pytest.importorskip``, which skips even in CI.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"cannot import {name} ({exc}); {install}")
