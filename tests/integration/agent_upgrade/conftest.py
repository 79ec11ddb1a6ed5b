"""Fixtures of the agent-upgrade tests: releases A and B of this checkout
side by side, and an agent started from release A that must stop cleanly
and leave no container behind (runc and the busybox rootfs come from
tests/integration/conftest.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_harness import AgentProcess, make_release
from tests.integration.agent_upgrade.scenario import A, B, launcher


@pytest.fixture(scope="module")
def releases() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="keel-rel-") as tmp:
        root = Path(tmp)
        make_release(root, "a", A)
        make_release(root, "b", B)
        yield root


@pytest.fixture
def agent(runc: str, releases: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(runc, command=[launcher(releases, "a")])
    try:
        yield proc
        assert proc.proc.poll() is None, f"agent died:\n{proc.log()}"
        if os.environ.get("KEEL_TEST_KEEP_LOG"):
            Path(os.environ["KEEL_TEST_KEEP_LOG"]).write_text(proc.log())
    finally:
        leftovers = proc.cleanup()
    assert proc.proc.returncode == 0, "agent did not stop cleanly on SIGTERM"
    assert leftovers == [], f"runc containers left behind: {leftovers}"
