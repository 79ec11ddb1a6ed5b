"""Bad input: clear errors within a deadline, and nothing left behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from keel.errors import Unavailable
from shim.vmm.qemu import QemuBackend, QemuSandbox, image
from tests.vm.conftest import config, connect, spec, vms_of
from tests.vm.helpers import leftovers, process_gone

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.mark.parametrize("kernel", ["missing", "garbage"])
def test_bad_kernel_is_a_clear_error(vm_image: image.Image, sandbox_root: Path,
                                     kernel: str) -> None:
    path = sandbox_root.parent / f"{sandbox_root.name}-vmlinux"
    if kernel == "garbage":
        path.write_bytes(b"not a kernel\n" * 100)
    backend = QemuBackend(config(vm_image, kernel=path))
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable) as err:
            asyncio.run(backend.launch(spec(sandbox_root)))
    finally:
        path.unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    print(f"[vm] {kernel} kernel: {err.value} ({elapsed:.2f}s)")
    assert elapsed < 10
    assert str(path) in str(err.value) if kernel == "missing" else "kernel" in str(err.value)
    assert list(sandbox_root.iterdir()) == [] and leftovers(sandbox_root) == []
    assert vms_of(sandbox_root) == []


async def _launch_and_wait(backend: QemuBackend, root: Path, agent_timeout: float,
                           *agent_args: str) -> tuple[QemuSandbox, Exception, float]:
    vm = await backend.launch(spec(root, *agent_args))
    # As the shim does: the connection's call timeout is the agent timeout too (over
    # virtio-serial the dial always succeeds, so the first Hello is what waits).
    conn = connect(vm, timeout=agent_timeout)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable) as err:
            await conn.wait_ready(agent_timeout, vm.alive)
        return vm, err.value, time.monotonic() - started
    finally:
        conn.close()
        await vm.stop()  # what the shim does when the agent does not answer
        backend.close_fds(vm)


def test_agent_that_exits_stops_the_vm(vm_image: image.Image, sandbox_root: Path) -> None:
    """A broken agent command: the agent (PID 1) exits, the guest panics, qemu exits."""
    backend = QemuBackend(config(vm_image))
    vm, err, elapsed = asyncio.run(_launch_and_wait(backend, sandbox_root, 60, "--no-such-flag"))
    print(f"[vm] broken agent command: {err} after {elapsed:.2f}s")
    assert "exited before its agent answered" in str(err)
    console = (sandbox_root / "agent.log").read_text(errors="replace")
    assert "unrecognized arguments: --no-such-flag" in console
    assert process_gone(vm.pid) and leftovers(sandbox_root) == []


def test_guest_that_never_answers_is_stopped(vm_image: image.Image, sandbox_root: Path) -> None:
    """A guest whose init never starts the agent: the agent timeout, then stop()."""
    backend = QemuBackend(config(vm_image, kernel_args=("rdinit=/bin/busybox", "--", "sleep", "3600")))
    vm, err, elapsed = asyncio.run(_launch_and_wait(backend, sandbox_root, 4.0))
    print(f"[vm] silent guest: {err} after {elapsed:.2f}s")
    assert "did not answer within 4.0s" in str(err)
    assert 4.0 <= elapsed < 8.0
    assert process_gone(vm.pid) and leftovers(sandbox_root) == []
    assert vms_of(sandbox_root) == []
