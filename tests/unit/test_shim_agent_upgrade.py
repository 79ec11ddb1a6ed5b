"""Which agent paths the shim stages into a VM (shim/_agent_upgrade.py ``_host_release``).

A path that is a file on the host is an installed release's entry point
(``<release>/bin/keel-agent``, links resolved, as ``install.sh`` links it
from ``/usr/local/bin``): its release directory's guest bundle is staged.
Anything else is a path in the guest, passed to the agent as it is.
"""

from __future__ import annotations

from pathlib import Path

from shim._agent_upgrade import _host_release


def test_an_entry_point_on_the_host_names_its_release(tmp_path: Path) -> None:
    rel = tmp_path / "releases" / "0.2.0"
    (rel / "bin").mkdir(parents=True)
    (rel / "bin" / "keel-agent").write_text("#!/bin/false\n")
    assert _host_release(str(rel / "bin" / "keel-agent")) == rel.resolve()
    link = tmp_path / "usr-local-bin-keel-agent"
    link.symlink_to(rel / "bin" / "keel-agent")
    assert _host_release(str(link)) == rel.resolve()


def test_guest_paths_and_odd_ones_are_not_host_releases(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    for path in ("/opt/keel/agent-0123456789abcdef", "relative/bin/keel-agent", "",
                 str(tmp_path / "dir"), str(tmp_path / "missing")):
        assert _host_release(path) is None, path
    top = Path("/keel-agent-test-file-that-does-not-exist")
    assert _host_release(str(top)) is None  # not a file: a guest path, no IndexError
