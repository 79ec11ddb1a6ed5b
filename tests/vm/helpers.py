"""Running containers in a VM sandbox, and checking what a stopped sandbox left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.api import pb
from shim._agentconn import AgentConnection
from shim.vmm.api import MountSpec
from shim.vmm.qemu import QemuSandbox
from tests.agent_harness import make_rootfs, make_spec, read_both

REPO = Path(__file__).resolve().parents[2]

__all__ = ["launch_in_child", "mount_options", "make_rootfs", "run_container", "leftovers", "process_gone", "writable"]


async def run_container(vm: QemuSandbox, conn: AgentConnection, cid: str, args: Sequence[str],
                        rootfs: Path, *, mounts: Sequence[MountSpec] = (),
                        spec: Callable[[Sequence[str], str], dict[str, Any]] = make_spec,
                        ) -> tuple[int, bytes, bytes]:
    """Share *rootfs*, run *args* in a container to its end; (exit status, stdout, stderr).

    *spec* makes the OCI spec from (args, id).  Unshares the rootfs whatever happens.
    """
    doc = spec(args, cid)
    guest_rootfs = await vm.share_rootfs(cid, mounts, rootfs)
    try:
        stub = conn.stub
        await conn.call(stub.create_container, pb.CreateContainerRequest(
            container_id=cid, spec_json=json.dumps(doc).encode(), rootfs=guest_rootfs,
            stdio=pb.Stdio(stdout=True, stderr=True)))
        await conn.call(stub.start_process, pb.StartProcessRequest(container_id=cid))
        out, err = await read_both(stub, cid)
        waited = await conn.call(stub.wait_process, pb.WaitProcessRequest(container_id=cid))
        await conn.call(stub.remove_process, pb.RemoveProcessRequest(container_id=cid))
    finally:
        await vm.unshare_rootfs(cid, rootfs)
    return waited.exit_status, out, err


def writable(args: Sequence[str], cid: str) -> dict[str, Any]:
    """A spec with a writable root."""
    doc = make_spec(args, cid)
    doc["root"] = {"path": "rootfs", "readonly": False}
    return doc


def process_gone(pid: int) -> bool:
    """True if *pid* does not exist or is a zombie (exited, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def mount_options(point: Path) -> set[str]:
    """The per-mount options of the mount at *point* (the newest one there)."""
    found: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(point):
                found = set(fields[5].split(","))
    return found


def leftovers(root: Path) -> list[str]:
    """What a stopped sandbox must not leave: sockets, pid file, share, mounts."""
    found = [p.name for p in root.iterdir()
             if p.suffix in (".sock", ".chan", ".pid") or p.name in ("shared", "rootfs-mounts")]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(root) in line.split()[4]]
    return found


_LAUNCH = """
import asyncio, json, sys
from pathlib import Path
from shim.vmm.api import LaunchSpec
from shim.vmm.qemu import QemuBackend, QemuConfig
cfg = QemuConfig(image=Path(sys.argv[1]), probe_cache=Path(sys.argv[3]))
root = Path(sys.argv[2])
spec = LaunchSpec(sandbox_id=root.name, root=root, agent_command=(), agent_args=("--runtime", "runc"))
vm = asyncio.run(QemuBackend(cfg).launch(spec))
print(json.dumps(vm.record()))
"""


def launch_in_child(image_dir: Path, root: Path, probe_cache: Path) -> dict[str, Any]:
    """Launch a VM from a separate Python process that then exits (an "old shim").

    Returns the sandbox record that process would have persisted.
    """
    res = subprocess.run([sys.executable, "-c", _LAUNCH, str(image_dir), str(root), str(probe_cache)],
                         capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))
