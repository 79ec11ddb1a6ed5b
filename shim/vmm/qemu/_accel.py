"""KVM or TCG: a real probe with a deadline, cached on disk.

``/dev/kvm`` existing proves little: under nested virtualization qemu can
abort setting an MSR (``-cpu host``) or hang in the guest kernel
(research/qemu.md).  So the probe boots the guest kernel itself under KVM
with the CPU model the backend would use, no initrd and ``panic=-1
-no-reboot``: a working KVM prints the kernel banner and exits when the
kernel panics (no root), in well under a second.  Anything else (qemu
error, abort, no banner, no exit before the deadline: the probe is then
killed by pid) means TCG.

The result is cached in a JSON file keyed by the boot id, the qemu binary
and the kernel, so a shim probes once per host boot; ``/run`` is cleared
at reboot anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("keel.shim.qemu")

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
BANNER = b"Linux version"


@dataclasses.dataclass(frozen=True, slots=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str

    def qemu_args(self, tcg_tb_mib: int = 0, *, max_vcpus: int = 1) -> list[str]:
        """*tcg_tb_mib*: TCG's translation cache in MiB (0: qemu's default, up to 1 GiB).

        *max_vcpus*: the most vCPUs the guest can have (hotplug included).
        Past one, TCG runs single-threaded.  Multi-threaded TCG gives each
        vCPU thread its own region of the translation cache, and qemu 7.2
        aborts (``tcg_region_initial_alloc__locked: assertion failed``) when
        a hot-added vCPU finds every region in use; and the guests seen to
        stall for minutes under TCG all had two vCPUs on multi-threaded TCG.
        """
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # -cpu max: python starts 3x faster than with qemu64 (research/qemu.md 7.3).
        tb = f",tb-size={tcg_tb_mib}" if tcg_tb_mib else ""
        thread = ",thread=single" if max_vcpus > 1 else ""
        return ["-accel", f"tcg{tb}{thread}", "-cpu", "max"]


def tsc_khz() -> int | None:
    """The host TSC rate (TCG guests see it), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    return int(float(m.group(1)) * 1000) if m else None


def _key(qemu: str, kernel: Path) -> dict[str, object]:
    def ident(p: str | Path) -> list[object]:
        st = os.stat(p)
        return [str(p), st.st_size, st.st_mtime_ns]

    return {"boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "qemu": ident(qemu), "kernel": ident(kernel)}


def _kvm_device() -> str | None:
    """None if /dev/kvm answers the API version ioctl, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"/dev/kvm: KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    return None if version == KVM_API_VERSION else f"/dev/kvm: API version {version}"


async def boot_probe(qemu: str, kernel: Path, timeout: float, accel: str = "kvm") -> str | None:
    """None if a guest kernel boots to its banner and exits in time, else why not.

    *accel* other than kvm is for testing the probe itself.
    """
    with tempfile.TemporaryDirectory(prefix="keel-kvm-probe-") as tmp:
        console = Path(tmp, "console")
        cpu = "host" if accel == "kvm" else "max"
        tsc = "" if accel == "kvm" or not (khz := tsc_khz()) else f" tsc_early_khz={khz}"
        argv = [qemu, "-accel", accel, "-cpu", cpu, "-M", "microvm", "-m", "128",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{console}", "-kernel", str(kernel),
                "-append", f"console=ttyS0 panic=-1 keel.probe=1{tsc}"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            async with asyncio.timeout(timeout):
                _, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 9)  # our own child, by pid
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await proc.wait()
            return f"{accel} guest did not finish booting within {timeout}s (hung)"
        text = err.decode(errors="replace").strip().splitlines()
        out = console.read_bytes() if console.exists() else b""
    if proc.returncode != 0:
        return f"qemu -accel {accel} exited with {proc.returncode}: {' | '.join(text[-2:])}"
    if BANNER not in out:
        return f"{accel} guest kernel printed no banner"
    return None


async def choose(qemu: str, kernel: Path, wanted: str, cache: Path, timeout: float) -> Accel:
    """The accelerator to use for *wanted* ("auto", "kvm", "tcg").

    "kvm" and "tcg" are taken as given (no probe); "auto" probes once per
    boot (cached in *cache*) and logs the choice.
    """
    if wanted != "auto":
        return Accel(wanted, "configured")
    qemu_path = shutil.which(qemu) or qemu
    key = _key(qemu_path, kernel)
    with contextlib.suppress(OSError, ValueError, KeyError):
        doc = json.loads(cache.read_text())
        if doc["key"] == key:
            return Accel(doc["accel"], f"{doc['reason']} (cached)")
    problem = _kvm_device() or await boot_probe(qemu_path, kernel, timeout)
    accel = Accel("tcg", f"KVM unusable: {problem}") if problem else Accel("kvm", "KVM probe passed")
    log.info("accelerator: %s (%s)", accel.name, accel.reason)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "accel": accel.name, "reason": accel.reason}))
        tmp.replace(cache)
    return accel
