"""Side-by-side releases of this checkout for upgrade benchmarks.

`make_release(root, version)` writes `<root>/<version>/` in the release
layout opsd reads (upgrade/releases.py): `bin/containerd-shim-keel-v2` and
`bin/keel-agent`.  It is not a virtualenv: it holds a
`keel-<version>.dist-info` (so shim and agent report `version`) and
launchers that put it ahead of this checkout on PYTHONPATH and exec this
interpreter's `-m shim` / `-m agent`.  Two of them (the running version
and the next minor) are enough to upgrade back and forth.

The launchers are Python, not shell: a shell that does anything before
its `exec` may reap the agent's children (see agent/PROTOCOL.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from upgrade.releases import AGENT_ENTRY, SHIM_ENTRY, check_version, version_key

REPO = Path(__file__).resolve().parents[1]


def make_release(root: Path, version: str) -> Path:
    """Create `<root>/<version>` (see the module docstring) and return it."""
    rel = root / check_version(version)
    meta = rel / f"keel-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: keel\nVersion: {version}\n")
    for entry, module in ((SHIM_ENTRY, "shim"), (AGENT_ENTRY, "agent")):
        launcher = rel / entry
        launcher.parent.mkdir(exist_ok=True)
        launcher.write_text(
            f"#!{sys.executable} -I\n"
            "import os, sys\n"
            f"os.environ['PYTHONPATH'] = {f'{rel}:{REPO}'!r}\n"
            f"os.execv(sys.executable, [sys.executable, '-P', '-m', {module!r}, *sys.argv[1:]])\n")
        launcher.chmod(0o755)
    return rel


def next_minor(version: str) -> str:
    """The next minor release after `version` (N+1: what N may upgrade to)."""
    nums = version_key(check_version(version))[0]
    major, minor = nums[0], (nums[1] if len(nums) > 1 else 0)
    return f"{major}.{minor + 1}.0"
