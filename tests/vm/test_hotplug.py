"""q35: vCPU and memory hotplug over QMP, seen from inside the guest."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path

import pytest

from keel.errors import FailedPrecondition
from shim.vmm.qemu import image
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
    bundles = Path(tempfile.mkdtemp(prefix="kvm-hp-"))
    rootfs = make_rootfs(bundles / "rootfs")

    async def scenario() -> None:
        async with booted(vm_image, sandbox_root, machine="q35", max_vcpus=2,
                          max_memory_mib=1024, memory_slots=2) as (vm, conn, _ready):
            status, before, err = await run_container(vm, conn, "p0", ["sh", "-c", SHOW], rootfs)
            assert status == 0, err
            assert before.split()[:3] == [b"0", b"0", b"1"], before

            plugged = time.monotonic()
            assert await vm.add_vcpu() == 2
            with pytest.raises(FailedPrecondition, match="maxcpus"):
                await vm.add_vcpu()
            dimm = await vm.add_memory(256)
            assert dimm == "keel-dimm0" and vm.record()["memory_mib"] == 512 + 256

            after = b""
            for attempt in range(30):  # each run is a container start (~1 s under TCG)
                status, after, err = await run_container(vm, conn, f"p{attempt + 1}",
                                                         ["sh", "-c", SHOW], rootfs)
                assert status == 0, err
                if after.split()[1:3] == [b"0-1", b"2"]:
                    break
            present, online, nproc = after.split()[:3]
            assert (present, online, nproc) == (b"0-1", b"0-1", b"2"), after
            grown = _mem_kib(after) - _mem_kib(before)
            print(f"[vm] hotplug: vCPUs 1 -> {nproc.decode()} online in the guest "
                  f"{time.monotonic() - plugged:.1f}s after device_add, MemTotal +{grown} kB")
            assert 200 * 1024 <= grown <= 256 * 1024, (before, after)
            console = (sandbox_root / "agent.log").read_text(errors="replace")
            assert "hot-added cpu1 is online" in console, console[-2000:]

    try:
        asyncio.run(scenario())
    finally:
        remove_tree(bundles)
