"""The KVM probe: a real guest boot with a deadline, cached; TCG otherwise."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from shim.vmm.qemu import _accel, image

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_probe_boots_the_guest_kernel_under_tcg(vm_image: image.Image) -> None:
    """The probe's own guest (kernel, no initrd, panic, exit) works: None means "it booted"."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu
    started = time.monotonic()
    assert asyncio.run(_accel.boot_probe(qemu, vm_image.kernel, 30.0, accel="tcg")) is None
    print(f"[vm] probe guest under TCG: {time.monotonic() - started:.2f}s")


def test_probe_result_is_recorded_and_cached(vm_image: image.Image, tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu
    cache = tmp_path / "probe.json"
    started = time.monotonic()
    first = asyncio.run(_accel.choose(qemu, vm_image.kernel, "auto", cache, 5.0))
    elapsed = time.monotonic() - started
    print(f"[vm] accelerator: {first.name} ({first.reason}) in {elapsed:.2f}s")
    assert first.name in ("kvm", "tcg") and elapsed < 5.0 + 3.0
    assert cache.exists()
    again = asyncio.run(_accel.choose(qemu, vm_image.kernel, "auto", cache, 5.0))
    assert again.name == first.name and again.reason.endswith("(cached)")
    forced = asyncio.run(_accel.choose(qemu, vm_image.kernel, "tcg", cache, 5.0))
    assert (forced.name, forced.reason) == ("tcg", "configured")


def test_probe_that_hangs_is_killed_at_its_deadline(vm_image: image.Image) -> None:
    """A guest that does not finish in time (here: TCG given 0.3s) counts as unusable."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu
    started = time.monotonic()
    why = asyncio.run(_accel.boot_probe(qemu, vm_image.kernel, 0.3, accel="tcg"))
    assert why is not None and "within 0.3s" in why
    assert time.monotonic() - started < 3.0
