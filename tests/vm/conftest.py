"""Fixtures of the VM tests: the guest image (built once, cached) and booted sandboxes.

Prerequisites: root, qemu-system-x86_64, and what the image build needs
(apt-get with current lists, dpkg-deb, debootstrap, chroot, pip, network to
the Debian and PyPI registries on a cold cache).  A missing prerequisite
skips every test here with the reason; with CI=true it fails instead.

The image is cached under ``$KEEL_IMAGE_DIR`` (default
``/var/cache/keel/image``) by a hash of its inputs: the first run builds it
(about a minute), later runs reuse it (about a second).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shim._agentconn import AgentConnection
from shim.vmm.api import LaunchSpec
from shim.vmm.qemu import QemuBackend, QemuConfig, QemuSandbox, _mounts, image

#: Seconds a TCG guest may take to answer Hello (it takes ~5-10 s on a loaded 2-core host).
AGENT_TIMEOUT_S = 60.0


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"[vm] cannot run in CI (CI=true, refusing to skip): {reason}", pytrace=False)
    pytest.skip(f"SKIPPED (environment) [vm]: {reason}")


def _missing() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["needs root (mounts, qemu 9p as root)"]
    tools = {"qemu-system-x86_64": "qemu-system-x86", "debootstrap": "debootstrap",
             "apt-get": "apt", "dpkg-deb": "dpkg", "chroot": "coreutils", "mount": "mount"}
    missing += [f"{tool} not found (apt-get install {pkg})"
                for tool, pkg in tools.items() if shutil.which(tool) is None]
    return missing


@pytest.fixture(scope="session")
def vm_image() -> image.Image:
    """The guest image for the working tree (built or reused), or a loud skip."""
    if missing := _missing():
        skip_or_fail("; ".join(missing))
    started = time.monotonic()
    try:
        img = image.build(image.default_dir(), say=lambda line: print(f"[image] {line}"))
    except Exception as exc:  # noqa: BLE001 - any build failure is an environment problem here
        skip_or_fail(f"cannot build the guest image: {exc}")
        raise
    print(f"[image] ready in {time.monotonic() - started:.1f}s: {img.id}")
    return img


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    """A short sandbox directory (unix socket paths are limited to 107 bytes).

    Teardown is a safety net for failed tests: it kills a VM still running
    from this directory (by pid), detaches mounts (never deleting through
    one), then removes the directory.
    """
    root = Path(tempfile.mkdtemp(prefix="kvm-", dir="/tmp"))
    yield root
    for pid in vms_of(root):
        print(f"[vm] teardown: killing leaked VM pid {pid} of {root}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _mounts.unshare_all(root / "shared", root / "rootfs-mounts")
    remove_tree(root)


def vms_of(root: Path) -> list[int]:
    """Pids of live qemu processes started for sandbox dir *root* (by their -pidfile)."""
    needle = f"-pidfile\0{root}/vmm.pid\0".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "cmdline").read_bytes():
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(proc.name))
    return pids


def remove_tree(path: Path) -> None:
    """rmtree, after detaching every mount below *path* (never delete through a mount)."""
    _mounts.unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def config(img: image.Image, **kw: object) -> QemuConfig:
    return QemuConfig(image=img.initrd.parent,
                      probe_cache=Path(tempfile.gettempdir()) / "keel-test-kvm-probe.json",
                      **kw)  # type: ignore[arg-type]


def spec(root: Path, *agent_args: str) -> LaunchSpec:
    return LaunchSpec(sandbox_id=root.name, root=root, agent_command=(),
                      agent_args=agent_args or ("--runtime", "runc"))


def connect(vm: QemuSandbox, timeout: float = 30.0) -> AgentConnection:
    return AgentConnection(vm.dialer("agent"), client_version="vm-test", session="pytest",
                           timeout=timeout)


@contextlib.asynccontextmanager
async def booted(img: image.Image, root: Path, **kw: object) -> AsyncIterator[
        tuple[QemuSandbox, AgentConnection, float]]:
    """Launch a VM and wait for its agent; yields (sandbox, connection, boot-to-ready s).

    Always stops the VM and checks that nothing is left running.
    """
    backend = QemuBackend(config(img, **kw))
    started = time.monotonic()
    vm = await backend.launch(spec(root))
    conn = connect(vm)
    try:
        await conn.wait_ready(AGENT_TIMEOUT_S, vm.alive)
        ready = time.monotonic() - started
        print(f"[vm] {backend.config.machine}/{vm.accel}: boot to agent ready {ready:.2f}s")
        yield vm, conn, ready
    except BaseException:
        print(f"[vm] console:\n{(root / 'agent.log').read_text(errors='replace')[-3000:]}")
        raise
    finally:
        conn.close()
        await vm.stop()
        backend.close_fds(vm)
