"""q35: vCPU and memory hotplug over QMP, seen from inside the guest."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keel.errors import FailedPrecondition
from shim._agentconn import AgentConnection
from shim.vmm.qemu import QemuSandbox, image
from tests.vm.conftest import booted, remove_tree
from tests.vm.helpers import make_rootfs, run_container

pytestmark = [pytest.mark.vm, pytest.mark.slow]

CPU = "/sys/devices/system/cpu"
# Read only: a hot-added CPU must come online without anything in a
# container writing /sys (the guest agent onlines it; there is no udev).
SHOW = f"cat {CPU}/present {CPU}/online; nproc; grep MemTotal /proc/meminfo"


def _mem_kib(out: bytes) -> int:
    m = re.search(rb"MemTotal:\s+(\d+) kB", out)
    assert m, out
    return int(m.group(1))


def test_q35_vcpu_and_memory_hotplug(vm_image: image.Image, sandbox_root: Path) -> None:
    """A vCPU hot-added right after boot (multi-threaded TCG aborted qemu
    there: every translation-cache region was in use), then a DIMM."""
    bundles = Path(tempfile.mkdtemp(prefix="kvm-hp-"))
    rootfs = make_rootfs(bundles / "rootfs")

    async def until(vm: QemuSandbox, conn: AgentConnection, cid: str,
                    done: Callable[[bytes], bool]) -> bytes:
        """Run SHOW in fresh containers until *done* says its output is what was awaited."""
        out = b""
        for attempt in range(30):  # each run is a container start (~1 s under TCG)
            status, out, err = await run_container(vm, conn, f"{cid}{attempt}", ["sh", "-c", SHOW],
                                                   rootfs)
            assert status == 0, err
            if done(out):
                break
        return out

    async def scenario() -> None:
        async with booted(vm_image, sandbox_root, machine="q35", max_vcpus=2,
                          max_memory_mib=1024, memory_slots=2) as (vm, conn, _ready):
            plugged = time.monotonic()
            assert await vm.add_vcpu() == 2
            with pytest.raises(FailedPrecondition, match="maxcpus"):
                await vm.add_vcpu()
            before = await until(vm, conn, "c", lambda out: out.split()[1:3] == [b"0-1", b"2"])
            present, online, nproc = before.split()[:3]
            assert (present, online, nproc) == (b"0-1", b"0-1", b"2"), before
            print(f"[vm] hotplug: vCPUs 1 -> {nproc.decode()} online in the guest "
                  f"{time.monotonic() - plugged:.1f}s after device_add")
            console = (sandbox_root / "agent.log").read_text(errors="replace")
            assert "hot-added cpu1 is online" in console, console[-2000:]

            dimm = await vm.add_memory(256)
            assert dimm == "keel-dimm0" and vm.record()["memory_mib"] == 512 + 256
            after = await until(vm, conn, "m", lambda out: _mem_kib(out) > _mem_kib(before))
            grown = _mem_kib(after) - _mem_kib(before)
            print(f"[vm] hotplug: MemTotal +{grown} kB")
            assert 200 * 1024 <= grown <= 256 * 1024, (before, after)

            # What qemu prints once daemonized reaches vmm.log (qemu -D), not /dev/null.
            os.kill(vm.pid, signal.SIGTERM)
            await asyncio.wait_for(vm.wait_exit(), 20)
            vmm_log = (sandbox_root / "vmm.log").read_text(errors="replace")
            assert "terminating on signal 15" in vmm_log, vmm_log

    try:
        asyncio.run(scenario())
    finally:
        remove_tree(bundles)
