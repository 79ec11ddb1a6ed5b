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
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from shim._agentconn import AgentConnection
from shim.vmm.api import LaunchSpec
from shim.vmm.qemu import QemuBackend, QemuConfig, QemuSandbox, _mounts, image
from tests.containerd import Containerd, force_cleanup, install_shim_wrapper, leftovers
from tests.images.busybox import build_image, import_image
from tests.prereq import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
IMAGE_CACHE = Path(os.environ.get("KEEL_TEST_CACHE", "/var/tmp/keel-test-cache")) / "images"

#: Seconds a TCG guest may take to answer Hello (it takes ~5-10 s on a loaded 2-core host).
AGENT_TIMEOUT_S = 60.0


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
    return build_vm_image()


def build_vm_image() -> image.Image:
    """The guest image for the working tree (built or reused), or a loud skip
    (a failure under CI=true)."""
    if missing := _missing():
        skip_or_fail("; ".join(missing), what="vm")
    started = time.monotonic()
    try:
        img = image.build(image.default_dir(), say=lambda line: print(f"[image] {line}"))
    except Exception as exc:  # noqa: BLE001 - any build failure is an environment problem here
        skip_or_fail(f"cannot build the guest image: {exc}", what="vm")
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


# --- a private containerd whose Keel shim runs every sandbox in a VM ----------------

KEEL_RUNTIME = "io.containerd.keel.v2"
#: The shim's agent timeout in these tests: the default (30 s for qemu) is
#: too tight for a TCG boot on a 2-core host shared with other test runs.
SHIM_AGENT_TIMEOUT_S = 120


def write_keel_config(path: Path, img: image.Image, **qemu: object) -> Path:
    """A Keel config file selecting the qemu backend with the test image."""
    lines = ["[shim]", 'backend = "qemu"', f"agent_timeout_s = {SHIM_AGENT_TIMEOUT_S}", "",
             "[qemu]", f'image = "{img.initrd.parent}"',
             f'probe_cache = "{Path(tempfile.gettempdir()) / "keel-test-kvm-probe.json"}"']
    for key, value in qemu.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def vm_containerd(vm_image: image.Image, require_env: Callable[[str], None]) -> Iterator[Containerd]:
    """A private containerd (tests/containerd/) with busybox imported and a
    ``containerd-shim-keel-v2`` whose ``KEEL_CONFIG`` selects the qemu backend.

    Keel's state lives under the temp root, so a VM left running is one of
    its ``leftovers()`` (qemu's command line names its sandbox dir there).
    Teardown removes every task, stops containerd and fails the module if
    any process (shim, qemu), mount or socket is left.
    """
    require_env("integration")
    tmp = Path(tempfile.mkdtemp(prefix="kctd-", dir="/tmp"))  # short: socket paths below it
    keel_config = write_keel_config(tmp / "keel.toml", vm_image)
    # KEEL_CONFIG in containerd's environment too: shims given by path
    # (``--runtime /path/to/release/shim``) inherit it from there.
    ctd = Containerd(tmp, namespace="keel-vm-test",
                     env={"KEEL_STATE_ROOT": str(tmp / "keel"), "KEEL_CONFIG": str(keel_config)})
    install_shim_wrapper(ctd.paths.bin_dir, sys.executable,
                         env={"PYTHONPATH": str(REPO), "KEEL_CONFIG": str(keel_config)})
    ctd.start()
    try:
        import_image(ctd.ctr_prefix(), build_image(IMAGE_CACHE))
        yield ctd
    finally:
        _containerd_teardown(ctd)


def _containerd_teardown(ctd: Containerd) -> None:
    problems = []
    if ctd.pid is not None:
        try:
            ctd.remove_all(timeout=120)
        except Exception as exc:  # noqa: BLE001 - report, but still stop and clean up
            problems.append(f"remove_all: {exc}")
    found = ctd.stop(leftover_grace=15.0)
    if found:
        problems.append(f"left behind after containerd stopped:\n{found}")
        force_cleanup(found)
    tmp = ctd.paths.tmp_root
    still = leftovers(tmp)
    if still.mounts:
        problems.append(f"could not unmount; kept {tmp}:\n{still}")
    elif not problems:
        shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        pytest.fail("private containerd (qemu backend) teardown:\n" + "\n".join(problems)
                    + f"\n--- containerd log tail ({ctd.paths.log}) ---\n{ctd.log_tail()}",
                    pytrace=False)
