"""A microvm sandbox end to end: boot, agent over virtio-serial, a busybox
container on a shared rootfs, reconnects, restore by a "new shim", stop."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api import pb
from keel.errors import Unimplemented
from shim._agentconn import AgentConnection
from shim.vmm.api import MountSpec
from shim.vmm.qemu import QemuBackend, QemuSandbox, image
from tests.vm.conftest import AGENT_TIMEOUT_S, config, connect, remove_tree, spec
from tests.vm.helpers import (
    launch_in_child,
    leftovers,
    make_rootfs,
    mount_options,
    process_gone,
    run_container,
    writable,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture
def bundles() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kvm-bundles-"))
    yield d
    remove_tree(d)


def _overlay(bundles: Path) -> tuple[Path, MountSpec]:
    """An overlay rootfs the way containerd hands one over: lower busybox, rw upper."""
    lower = make_rootfs(bundles / "lower")
    for d in ("upper", "work", "bundle/rootfs"):
        (bundles / d).mkdir(parents=True)
    opts = (f"lowerdir={lower}", f"upperdir={bundles / 'upper'}", f"workdir={bundles / 'work'}")
    return bundles / "bundle/rootfs", MountSpec("overlay", "overlay", opts)


def test_microvm_sandbox_end_to_end(vm_image: image.Image, sandbox_root: Path,
                                    bundles: Path) -> None:
    rootfs, overlay = _overlay(bundles)
    plain = make_rootfs(bundles / "plain")
    cfg = config(vm_image)
    # The VM is launched by another process that exits at once (an "old shim"):
    # it must keep running in a session of its own, and this process adopts it.
    started = time.monotonic()
    rec = launch_in_child(vm_image.initrd.parent, sandbox_root, cfg.probe_cache)
    pid = rec["pid"]

    async def scenario() -> None:
        backend = QemuBackend(cfg)
        vm = backend.restore(spec(sandbox_root), rec)
        conn = connect(vm)
        try:
            assert os.getsid(pid) != os.getsid(0), "qemu must run in a session of its own"
            assert rec["accel"] in ("kvm", "tcg") and rec["accel_reason"]
            assert rec["machine"] == "microvm" and rec["image"] == vm_image.id
            assert vm.alive() and vm.pid == pid
            await conn.wait_ready(AGENT_TIMEOUT_S, vm.alive)
            print(f"[vm] microvm/{vm.accel}: boot to agent ready {time.monotonic() - started:.2f}s "
                  f"(launched by a process that has exited)")
            assert await vm.status() == "running"
            with pytest.raises(Unimplemented, match="q35"):
                await vm.add_vcpu()
            await _containers(vm, conn, rootfs, overlay, plain, bundles, sandbox_root)
            await _reconnects(vm, conn)
            await _restored_by_new_shim(vm_image, sandbox_root, vm.record())
        except BaseException:
            print(f"[vm] console:\n{(sandbox_root / 'agent.log').read_text(errors='replace')[-3000:]}")
            raise
        finally:
            conn.close()
            await vm.stop()
            backend.close_fds(vm)
        assert not vm.alive() and process_gone(pid)
        assert leftovers(sandbox_root) == [] and leftovers(bundles) == []

    asyncio.run(scenario())


async def _containers(vm: QemuSandbox, conn: AgentConnection, rootfs: Path, overlay: MountSpec,
                      plain: Path, bundles: Path, root: Path) -> None:
    # A container on containerd-style overlay mounts: it writes to its rootfs,
    # and the write lands in the overlay's upper dir on the host.
    status, out, err = await run_container(
        vm, conn, "c1", ["sh", "-c", "echo hello from $(hostname); echo x > /written; "
                         "ls /bin/busybox; echo oops >&2; exit 3"],
        rootfs, mounts=[overlay], spec=writable)
    assert (status, out, err) == (3, b"hello from keel-test\n/bin/busybox\n", b"oops\n")
    assert (bundles / "upper/written").read_text() == "x\n"
    assert not os.path.ismount(rootfs), "unshare_rootfs left the overlay mounted"
    # A rootfs directory that is already populated (no mounts); while it is
    # shared, the host side of the share is nodev,nosuid,noexec.
    guest = await vm.share_rootfs("c2", [], plain)
    assert guest == "/run/keel/shared/c2/rootfs"
    options = mount_options(root / "shared/c2/rootfs")
    assert {"nodev", "nosuid", "noexec"} <= options, options
    await vm.unshare_rootfs("c2", plain)
    status, out, _ = await run_container(vm, conn, "c2", ["cat", "/proc/1/cmdline"], plain)
    assert (status, out) == (0, b"cat\0/proc/1/cmdline\0")
    assert not list((root / "shared").iterdir())


async def _reconnects(vm: QemuSandbox, conn: AgentConnection) -> None:
    """virtio-serial serves one host client per port: close and dial again, fast."""
    first = conn.hello
    assert first is not None
    conn.close()
    for i in range(3):
        again = connect(vm)
        started = time.monotonic()
        hello = await again.wait_ready(20, vm.alive)
        assert hello.boot_id == first.boot_id  # the same agent, a new HTTP/2 session
        state = await again.call(again.stub.get_state, pb.Empty())
        assert state.containers == []
        print(f"[vm] reconnect {i}: Hello in {time.monotonic() - started:.3f}s")
        again.close()
    # Dialing while the previous connection is still open: the dialer lets go of it first.
    a, b = connect(vm), connect(vm)
    await a.wait_ready(20, vm.alive)
    await b.wait_ready(20, vm.alive)
    a.close()
    b.close()


async def _restored_by_new_shim(img: image.Image, root: Path, rec: dict[str, Any]) -> None:
    """What a new shim does after a handoff: restore from the record, dial afresh."""
    backend = QemuBackend(config(img))
    vm2 = backend.restore(spec(root), rec)
    try:
        assert vm2.alive() and vm2.pid == rec["pid"]
        assert vm2.record()["accel"] == rec["accel"]
        conn2 = connect(vm2)
        try:
            hello = await conn2.wait_ready(20, vm2.alive)
            assert hello.agent_pid == 1
            assert await vm2.status() == "running"
        finally:
            conn2.close()
    finally:
        backend.close_fds(vm2)
