"""The Keel shim under a real containerd 1.6, given bad input: a missing
binary, an invalid OCI spec, bad runtime options, a missing OCI runtime.
Each is a clear error naming the cause, and leaves no task, container or
sandbox behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.containerd import Containerd
from tests.integration.keel_ctr import KEEL, listed, sandbox_dirs

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]


# --- 10. bad input ---------------------------------------------------------------

def test_missing_binary_is_a_clear_error(containerd: Containerd, busybox: str,
                                         container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, busybox, cid, "/nonexistent")
    assert res.returncode != 0
    assert "/nonexistent" in res.stderr and "no such file" in res.stderr.lower(), res.stderr
    containerd.ctr("containers", "rm", cid)  # ctr leaves the record when create fails
    assert not listed(containerd, "tasks", cid)
    assert not listed(containerd, "containers", cid)
    assert cid not in sandbox_dirs(containerd)


def test_bad_spec_is_a_clear_error(containerd: Containerd, busybox: str,
                                   container_ids: Callable[[], str], tmp_path: Path) -> None:
    # Well-formed for ctr and containerd (so it reaches the shim), invalid
    # for the OCI runtime: a relative working directory.
    cid = container_ids()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/true"], "cwd": "relative/dir", "env": ["PATH=/bin"]},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }))
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, "--config", str(spec), cid)
    assert res.returncode != 0
    assert "failed to create shim task" in res.stderr and "absolute path" in res.stderr, res.stderr
    containerd.ctr("containers", "rm", cid)
    assert not listed(containerd, "tasks", cid)
    assert not listed(containerd, "containers", cid)
    assert cid not in sandbox_dirs(containerd)


@pytest.mark.parametrize(("config", "expect"), [
    ("", "does not exist"),  # a runtime config path that names no file
    ("bogus_option = 1\n", "unknown key 'bogus_option'"),
    ('backend = "hyperv"\n', "backend must be"),
])
def test_bad_runtime_options_are_a_clear_error(containerd: Containerd, busybox: str,
                                               container_ids: Callable[[], str],
                                               tmp_path: Path, config: str, expect: str) -> None:
    cid = container_ids()
    path = tmp_path / "keel.toml"
    if config:
        path.write_text(config)
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, "--runtime-config-path", str(path),
                         busybox, cid, "true")
    assert res.returncode != 0
    assert "failed to start shim" in res.stderr and str(path) in res.stderr, res.stderr
    assert expect in res.stderr, res.stderr
    containerd.ctr("containers", "rm", cid)
    assert not listed(containerd, "tasks", cid)
    assert not listed(containerd, "containers", cid)
    assert cid not in sandbox_dirs(containerd)


def test_missing_oci_runtime_is_a_clear_error(containerd: Containerd, busybox: str,
                                              container_ids: Callable[[], str],
                                              tmp_path: Path) -> None:
    cid = container_ids()
    missing = tmp_path / "no-such-runc"
    config = tmp_path / "keel.toml"
    config.write_text(f'runtime = "{missing}"\n')
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, "--runtime-config-path", str(config),
                         busybox, cid, "true")
    assert res.returncode != 0
    assert str(missing) in res.stderr, res.stderr
    containerd.ctr("containers", "rm", cid)
    assert not listed(containerd, "tasks", cid)
    assert not listed(containerd, "containers", cid)
    assert cid not in sandbox_dirs(containerd)
