"""Host bind mounts reach a VM's containers (what CRI gives every pod).

resolv.conf, hosts, volumes and the pod's /dev/shm are bind mounts of host
paths; the guest sees them through the sandbox's 9p share
(shim/vmm/qemu/_volumes.py).  Driven through containerd with
``ctr run --mount``, the same spec entries CRI writes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd import Containerd, wait_for
from tests.vm.conftest import KEEL_RUNTIME

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.requires_root]

BUSYBOX = "localhost/keel/busybox:test"
CTR_TIMEOUT_S = 240.0


@pytest.fixture
def host_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, as CRI mounts a pod's shm."""
    path = tmp_path / "shm"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "shm", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_bind_mounts_files_dirs_and_shm(vm_containerd: Containerd, tmp_path: Path,
                                        host_tmpfs: Path) -> None:
    ctd, cid = vm_containerd, f"vm-vol-{os.getpid()}"
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "hello").write_text("from the host\n")
    (ro / "kept").write_text("read only\n")
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.0.0.1\n")
    mounts = [f"type=bind,src={rw},dst=/data,options=rbind:rw",
              f"type=bind,src={ro},dst=/ro,options=rbind:ro",
              f"type=bind,src={conf},dst=/etc/resolv.conf,options=rbind:ro",
              f"type=bind,src={host_tmpfs},dst=/dev/shm,options=rbind:rw"]
    res = ctd.ctr("run", "-d", "--runtime", KEEL_RUNTIME,
                  *(arg for m in mounts for arg in ("--mount", m)),
                  BUSYBOX, cid, "sleep", "600", timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, (res, ctd.log_tail(40))

    def sh(eid: str, script: str) -> subprocess.CompletedProcess[str]:
        return ctd.ctr("tasks", "exec", "--exec-id", eid, cid, "sh", "-c", script,
                       timeout=CTR_TIMEOUT_S)

    try:
        # A directory both ways, a file, a read-only directory.
        got = sh("read", "cat /data/hello /etc/resolv.conf /ro/kept;"
                         " echo from-the-guest > /data/new; touch /ro/x 2>/dev/null || echo ro-refused")
        assert got.returncode == 0, got
        assert got.stdout == "from the host\nnameserver 10.0.0.1\nread only\nro-refused\n"
        assert (rw / "new").read_text() == "from-the-guest\n"
        assert not (ro / "x").exists()
        # A file the host rewrites in place (a ConfigMap update) is read afresh.
        conf.write_text("nameserver 10.0.0.2\n")
        assert sh("reread", "cat /etc/resolv.conf").stdout == "nameserver 10.0.0.2\n"
        # /dev/shm is guest memory of the host mount's size, not the 9p share.
        shm = sh("shm", "grep ' /dev/shm ' /proc/mounts; echo x > /dev/shm/seg").stdout
        assert shm.split()[2] == "tmpfs" and "size=8192k" in shm, shm
        assert list(host_tmpfs.iterdir()) == []
    finally:
        ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        wait_for(lambda: cid not in ctd.ctr("tasks", "ls").stdout
                 or "STOPPED" in ctd.ctr("tasks", "ls").stdout, 60, f"{cid} to stop")
        ctd.ctr("tasks", "rm", cid, timeout=CTR_TIMEOUT_S)
        ctd.ctr("containers", "rm", cid)
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"


def test_a_missing_bind_source_is_a_clear_error(vm_containerd: Containerd,
                                                tmp_path: Path) -> None:
    ctd, cid = vm_containerd, f"vm-nosrc-{os.getpid()}"
    gone = tmp_path / "gone"  # never made: ctr and containerd pass it on unchecked
    res = ctd.ctr("run", "--rm", "--runtime", KEEL_RUNTIME, "--mount",
                  f"type=bind,src={gone},dst=/data,options=rbind:rw", BUSYBOX, cid, "true",
                  timeout=CTR_TIMEOUT_S)
    assert res.returncode != 0
    assert f"mount /data: bind source {gone} does not exist on the host" in res.stderr, res.stderr
    ctd.ctr("containers", "rm", cid)
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"
