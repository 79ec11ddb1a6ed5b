"""``python -m shim.vmm.qemu.image prune``: images nothing uses go, the others stay.

A fake image cache (manifests and part directories laid out as
``image.build`` lays them out, without the big files), a state root with
sandbox records, and a releases root.  A "running VM" is a real process
(``sleep``) whose pid and start time the record names, so the liveness
check is the one production runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel import procfs
from shim.dirs import SandboxDir
from shim.state import SandboxRecord, ShimIdentity, store
from shim.vmm.qemu import _prune, image


def _image(cache: Path, image_id: str, kernel: str, rootfs: str, agent: str) -> None:
    img = cache / f"img-{image_id}"
    img.mkdir(parents=True)
    (cache / kernel).mkdir(exist_ok=True)
    (cache / kernel / "vmlinux").write_bytes(b"k")
    (cache / rootfs / "root" / "opt" / "keel" / agent).mkdir(parents=True, exist_ok=True)
    (img / "initramfs.cpio").write_bytes(b"i")
    (img / "manifest.json").write_text(json.dumps({
        "id": image_id, "format": image.FORMAT, "kernel": str(cache / kernel / "vmlinux"),
        "initrd": str(img / "initramfs.cpio"), "rootfs": str(cache / rootfs / "root"),
        "agent_dir": f"/opt/keel/{agent}"}))


def _vm(state_root: Path, sid: str, image_id: str, pid: int, start_time: int) -> None:
    sdir = SandboxDir.of(state_root, sid)
    sdir.create()
    store(sdir).save(SandboxRecord(
        sandbox_id=sid, namespace="default", backend="qemu",
        vmm={"image": image_id, "pid": pid, "start_time": start_time, "accel": "tcg"},
        shim=ShimIdentity(2**22, 1), shim_version="0.1.0"))


@pytest.fixture
def vm_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def node(tmp_path: Path, vm_process: subprocess.Popen[bytes]) -> tuple[Path, Path, Path]:
    """A cache of five images: CUR (current), REL (named by release 0.2.0), RUN (a
    running VM's), DEAD (a VM record whose qemu is gone) and OLD (nothing)."""
    cache, state, releases = tmp_path / "cache", tmp_path / "state", tmp_path / "releases"
    _image(cache, "cur", "kernel-1", "rootfs-a", "agent-cur")
    _image(cache, "rel", "kernel-1", "rootfs-a", "agent-rel")
    _image(cache, "run", "kernel-2", "rootfs-b", "agent-run")
    _image(cache, "dead", "kernel-3", "rootfs-a", "agent-dead")
    _image(cache, "old", "kernel-3", "rootfs-c", "agent-old")
    (cache / "current").symlink_to("img-cur")
    _prune.record_release_image(releases / "0.2.0", cache / "img-rel", "rel")
    _vm(state, "pod-run", "run", vm_process.pid, procfs.start_time(vm_process.pid))
    _vm(state, "pod-dead", "dead", vm_process.pid, procfs.start_time(vm_process.pid) + 1)
    return cache, state, releases


def _names(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")}


def test_prune_keeps_what_is_used_and_removes_the_rest(node: tuple[Path, Path, Path]) -> None:
    cache, state, releases = node
    removed, used = _prune.prune(cache, state, releases, dry_run=True)
    assert _names(cache) == {"img-cur", "img-rel", "img-run", "img-dead", "img-old", "current",
                             "kernel-1", "kernel-2", "kernel-3", "rootfs-a", "rootfs-b",
                             "rootfs-c"}  # a dry run removes nothing
    vm_pid = json.loads(SandboxDir.of(state, "pod-run").state.read_text())["vmm"]["pid"]
    assert used.reasons == {"cur": ["current"], "rel": ["release 0.2.0"],
                            "run": [f"VM of sandbox pod-run (qemu pid {vm_pid})"]}
    removed_now, _ = _prune.prune(cache, state, releases)
    assert removed_now == removed == ["img-dead", "img-old", "kernel-3",
                                      "rootfs-a/root/opt/keel/agent-dead", "rootfs-c"]
    assert _names(cache) == {"img-cur", "img-rel", "img-run", "current", "kernel-1", "kernel-2",
                             "rootfs-a", "rootfs-b"}
    assert sorted(p.name for p in (cache / "rootfs-a/root/opt/keel").iterdir()) == [
        "agent-cur", "agent-rel"]
    for kept in ("cur", "rel", "run"):
        assert image.load(cache / f"img-{kept}").id == kept


def test_an_image_is_free_once_its_vm_is_gone(node: tuple[Path, Path, Path],
                                              vm_process: subprocess.Popen[bytes]) -> None:
    cache, state, releases = node
    vm_process.kill()
    vm_process.wait()
    removed, used = _prune.prune(cache, state, releases)
    assert "img-run" in removed and "rootfs-b" in removed and "kernel-2" in removed
    assert set(used.reasons) == {"cur", "rel"}


def test_an_unreadable_manifest_of_a_kept_image_keeps_every_part(
        node: tuple[Path, Path, Path]) -> None:
    cache, state, releases = node
    (cache / "img-rel" / "manifest.json").write_text("{not json")
    removed, used = _prune.prune(cache, state, releases)
    assert removed == ["img-dead", "img-old"]  # images only: the parts' users are unknown
    assert {"kernel-3", "rootfs-c"} <= _names(cache)
    assert (cache / "rootfs-a/root/opt/keel/agent-dead").is_dir()
    assert "parts are kept too" in used.reasons[""][0]


def test_release_image_is_what_the_release_recorded(tmp_path: Path) -> None:
    rel = tmp_path / "0.3.0"
    assert _prune.release_image(rel) is None
    _prune.record_release_image(rel, tmp_path / "cache" / "img-x", "x")
    assert _prune.release_image(rel) == tmp_path / "cache" / "img-x"
    (rel / _prune.RELEASE_IMAGE).write_text("[]")
    assert _prune.release_image(rel) is None


def test_the_cli_prints_what_it_kept_and_removed(node: tuple[Path, Path, Path]) -> None:
    cache, state, releases = node
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "shim.vmm.qemu.image", "prune", "--out", str(cache),
                        "--state-root", str(state), "--releases", str(releases), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "kept img-rel: release 0.2.0" in r.stdout, r.stdout
    assert "would remove img-old" in r.stdout and "would remove img-dead" in r.stdout, r.stdout
    assert (cache / "img-old").is_dir()


def test_a_record_that_cannot_be_read_removes_nothing(node: tuple[Path, Path, Path]) -> None:
    """A corrupt record, or one a newer release wrote, might be a running VM's."""
    cache, state, releases = node
    SandboxDir.of(state, "pod-new").create()
    SandboxDir.of(state, "pod-new").state.write_text(
        '{"schema_version": 99, "kind": "keel.shim.sandbox"}')
    before = _names(cache)
    removed, used = _prune.prune(cache, state, releases)
    assert removed == [] and _names(cache) == before
    assert "sandbox pod-new: its state cannot be read" in used.blind, used.blind
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "shim.vmm.qemu.image", "prune", "--out", str(cache),
                        "--state-root", str(state), "--releases", str(releases)],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode == 1 and "nothing removed: sandbox pod-new" in r.stderr, r
    assert _names(cache) == before


def test_a_process_naming_an_image_keeps_it(node: tuple[Path, Path, Path]) -> None:
    """A VM still booting has no record: its command line names its image and parts."""
    cache, state, releases = node
    booting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "-initrd", str(cache / "img-old" / "initramfs.cpio"),
                                "-virtfs", f"path={cache / 'rootfs-c' / 'root'},readonly=on"])
    try:
        removed, used = _prune.prune(cache, state, releases)
    finally:
        booting.kill()
        booting.wait()
    assert used.reasons["old"] == [f"named by running pid {booting.pid}"]
    assert removed == ["img-dead", "rootfs-a/root/opt/keel/agent-dead"], removed
    assert {"img-old", "kernel-3", "rootfs-c"} <= _names(cache)
