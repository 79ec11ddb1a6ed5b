"""Sharing a container's host bind mounts into a VM's share (shim/vmm/qemu/_volumes.py).

Real bind mounts on a temporary share (root); the guest's moves are played
by renaming and planting files in the share, as a hostile guest could
through 9p.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keel.errors import Internal, InvalidArgument
from shim.vmm.api import is_host_bind
from shim.vmm.qemu import _mounts, _volumes
from tests.prereq import skip_or_fail


@pytest.fixture
def share(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0:
        skip_or_fail("bind mounts need root", what="requires_root")
    shared, marks = tmp_path / "shared", tmp_path / "marks"
    shared.mkdir()
    yield shared, marks
    _mounts.unshare_all(shared, marks)


def _bind(src: Path, dst: str, *opts: str) -> dict[str, Any]:
    return {"destination": dst, "type": "bind", "source": str(src), "options": ["rbind", *opts]}


@pytest.mark.parametrize(("mount", "bind"), [
    ({"type": "bind", "options": []}, True),
    ({"type": "none", "options": ["rbind", "ro"]}, True),
    ({"type": "tmpfs", "options": ["nosuid"]}, False),
    ({"type": "proc"}, False),
])
def test_what_counts_as_a_host_bind(mount: dict[str, Any], bind: bool) -> None:
    assert is_host_bind(mount) is bind


def test_a_spec_without_binds_is_returned_as_is(share: tuple[Path, Path]) -> None:
    spec = {"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}
    assert _volumes.share(*share, "c1", spec) is spec
    assert list(share[0].iterdir()) == []


def test_files_and_dirs_are_bound_read_only_where_asked(share: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    shared, marks = share
    data, conf = tmp_path / "data", tmp_path / "conf"
    data.mkdir()
    (data / "f").write_text("x")
    conf.write_text("y")
    spec = {"mounts": [_bind(data, "/data"), _bind(conf, "/etc/conf", "ro")]}
    out = _volumes.share(shared, marks, "c1", spec)
    assert [m["source"] for m in out["mounts"]] == ["/run/keel/shared/c1/mounts/0",
                                                    "/run/keel/shared/c1/mounts/1"]
    assert (shared / "c1/mounts/0/f").read_text() == "x"
    assert (shared / "c1/mounts/1").read_text() == "y"
    with pytest.raises(OSError, match="Read-only"):
        (shared / "c1/mounts/1").write_text("z")
    (shared / "c1/mounts/0/new").write_text("w")  # rw: the guest writes through
    assert (data / "new").read_text() == "w"


def test_unshare_detaches_them_after_the_guest_moved_the_directories(
        share: tuple[Path, Path], tmp_path: Path) -> None:
    shared, marks = share
    data = tmp_path / "data"
    data.mkdir()
    _volumes.share(shared, marks, "c1", {"mounts": [_bind(data, "/data")]})
    os.rename(shared / "c1", shared / "elsewhere")  # what a guest can do through 9p
    _mounts.unshare(shared, marks, "c1")
    assert _mounts.mounts_under(shared) == []


def test_a_planted_symlink_is_refused_not_followed(share: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    shared, marks = share
    outside, data = tmp_path / "outside", tmp_path / "data"
    outside.mkdir()
    data.mkdir()
    (shared / "c1").mkdir()
    (shared / "c1" / "mounts").symlink_to(outside)
    with pytest.raises(Internal, match="mounts is not a plain directory"):
        _volumes.share(shared, marks, "c1", {"mounts": [_bind(data, "/data")]})
    assert list(outside.iterdir()) == [] and _mounts.mounts_under(outside) == []


def test_a_missing_or_relative_source_is_invalid(share: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="mount /d: bind source .* does not exist"):
        _volumes.share(*share, "c1", {"mounts": [_bind(tmp_path / "gone", "/d")]})
    with pytest.raises(InvalidArgument, match="not an absolute path"):
        _volumes.share(*share, "c2", {"mounts": [_bind(Path("rel"), "/d")]})


def test_dev_shm_is_the_guests_own_shared_by_the_pod(tmp_path: Path) -> None:
    m = _volumes.guest_shm(_bind(tmp_path, "/dev/shm", "ro"))
    assert m == {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm",
                 "options": ["rbind", "rprivate", "nosuid", "nodev", "ro"]}


def test_the_pods_shm_size_is_the_host_tmpfs_size(tmp_path: Path) -> None:
    from shim.vmm import _sizing

    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root", what="requires_root")
    shm = tmp_path / "shm"
    shm.mkdir()
    spec = {"mounts": [{"destination": "/dev/shm", "type": "bind", "source": str(shm),
                        "options": ["rbind"]}]}
    assert _sizing.shm_source(spec) == str(shm)
    assert _sizing.tmpfs_bytes(str(shm)) == 0  # not a tmpfs: the guest's default
    import subprocess

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "shm", str(shm)], check=True)
    try:
        assert _sizing.tmpfs_bytes(_sizing.shm_source(spec)) == 8 << 20
    finally:
        subprocess.run(["umount", str(shm)], check=True)
    assert _sizing.shm_source({"mounts": []}) == ""
