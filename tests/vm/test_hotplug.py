"""q35: vCPU and memory hotplug over QMP, seen from inside the guest."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

import pytest

from agent.api import FailedPrecondition
from shim.vmm.qemu import image
from tests.vm.conftest import booted, remove_tree
from tests.vm.helpers import make_rootfs, privileged, run_container

pytestmark = [pytest.mark.vm, pytest.mark.slow]

CPU = "/sys/devices/system/cpu"
# Hotplugged CPUs come up offline (no udev in the guest): the privileged
# container onlines them, as the agent will have to.
ONLINE_ALL = (f"cat {CPU}/present {CPU}/online; "
              f"for c in {CPU}/cpu[1-9]*; do echo 1 > $c/online; done; "
              f"cat {CPU}/online; nproc; grep MemTotal /proc/meminfo")


def _mem_kib(out: bytes) -> int:
    m = re.search(rb"MemTotal:\s+(\d+) kB", out)
    assert m, out
    return int(m.group(1))


def test_q35_vcpu_and_memory_hotplug(vm_image: image.Image, sandbox_root: Path) -> None:
    bundles = Path(tempfile.mkdtemp(prefix="kvm-hp-"))
    rootfs = make_rootfs(bundles / "rootfs")

    async def scenario() -> None:
        async with booted(vm_image, sandbox_root, machine="q35", max_vcpus=2,
                          max_memory_mib=1024, memory_slots=2) as (vm, conn, _ready):
            status, before, err = await run_container(vm, conn, "p0", ["sh", "-c", ONLINE_ALL],
                                                      rootfs, spec=privileged)
            assert status == 0, err
            assert before.split()[:4] == [b"0", b"0", b"0", b"1"], before

            assert await vm.add_vcpu() == 2
            with pytest.raises(FailedPrecondition, match="maxcpus"):
                await vm.add_vcpu()
            dimm = await vm.add_memory(256)
            assert dimm == "keel-dimm0" and vm.record()["memory_mib"] == 512 + 256

            status, after, err = await run_container(vm, conn, "p1", ["sh", "-c", ONLINE_ALL],
                                                     rootfs, spec=privileged)
            assert status == 0, err
            present, online_before, online_after, nproc = after.split()[:4]
            assert (present, online_before, online_after, nproc) == (b"0-1", b"0", b"0-1", b"2")
            grown = _mem_kib(after) - _mem_kib(before)
            print(f"[vm] hotplug: vCPUs 1 -> {nproc.decode()}, MemTotal +{grown} kB")
            assert 200 * 1024 <= grown <= 256 * 1024, (before, after)

    try:
        asyncio.run(scenario())
    finally:
        remove_tree(bundles)
