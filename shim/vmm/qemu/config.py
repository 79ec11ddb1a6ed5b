"""QemuConfig: how the qemu backend builds its VMs (a validated frozen dataclass).

Loaded from the ``[qemu]`` table of the Keel config file (the same file as
the shim's ``[shim]`` table: ``$KEEL_CONFIG`` or ``/etc/keel/config.toml``)::

    [qemu]
    machine = "q35"          # microvm (default: fastest boot) | q35 | pc (hotplug)
    accel = "auto"           # auto (KVM if the probe passes, else TCG) | kvm | tcg
    vcpus = 1
    memory_mib = 512
    kernel_args = ["keel.debug=1"]
    template = true          # start sandboxes from a snapshot (see _template)

Sizing: a sandbox gets ``max(config, LaunchSpec)`` vCPUs and memory, so the
config gives floors and a pod's request can raise them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keel.errors import InvalidArgument
from shim.config import read_file

MACHINES = ("microvm", "q35", "pc")
ACCELS = ("auto", "kvm", "tcg")


@dataclasses.dataclass(frozen=True, slots=True)
class QemuConfig:
    #: The qemu binary (a name looked up in PATH, or a path).
    qemu: str = "qemu-system-x86_64"
    #: microvm boots fastest but cannot hotplug; q35/pc can (CPU and memory).
    machine: str = "microvm"
    accel: str = "auto"
    vcpus: int = 1
    #: vCPU slots for hotplug (q35/pc only).
    max_vcpus: int = 4
    memory_mib: int = 512
    #: Memory ceiling and DIMM slots for hotplug (q35/pc only).
    max_memory_mib: int = 4096
    memory_slots: int = 8
    #: A built image (``python -m shim.vmm.qemu.image build``): its directory
    #: or the cache directory holding ``current``; None: the default cache.
    image: Path | None = None
    #: Override single parts of the image.
    kernel: Path | None = None
    initrd: Path | None = None
    rootfs: Path | None = None
    #: TCG's translation cache (MiB).  qemu's default grows to 1 GiB and an idle
    #: guest keeps ~70 MiB of it resident; a smaller cache is retranslated more
    #: often.  0: qemu's default.  Ignored under KVM.
    tcg_tb_mib: int = 32
    #: A virtio-balloon device with free page reporting: memory a workload
    #: used and freed in the guest goes back to the host (qemu discards the
    #: reported pages) instead of staying resident in qemu for good.  Opt-in,
    #: as in Kata: the guest's reports cost VMM work, and under TCG here one
    #: 2-vCPU/768 MiB guest once stalled for minutes with it on (not
    #: reproduced since, cause unknown).
    free_page_reporting: bool = False
    #: Appended to the kernel command line.
    kernel_args: tuple[str, ...] = ()
    #: Seconds qemu may take to start (not the guest boot: the shim's agent timeout).
    start_timeout_s: float = 10.0
    #: Seconds ``stop`` waits after QMP ``quit`` before SIGKILL.
    stop_timeout_s: float = 3.0
    #: Seconds the KVM probe may take; its result is cached in *probe_cache*.
    kvm_probe_timeout_s: float = 5.0
    probe_cache: Path = Path("/run/keel/kvm-probe.json")
    #: Start sandboxes by restoring a snapshot of a template VM (``_template``;
    #: sandboxes with a pod network still cold-boot).  Any failure of the
    #: template path falls back to a cold boot.
    template: bool = False
    #: Where templates are kept, one directory per template key.  A tmpfs: a
    #: template's guest RAM is a file there, which clones map copy-on-write.
    template_dir: Path = Path("/dev/shm/keel-templates")
    #: Seconds building a template may take (a cold boot plus the agent's imports).
    template_build_timeout_s: float = 120.0
    #: Seconds a clone may take to answer ``go`` (restore, reseed, mounts).
    template_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.machine not in MACHINES:
            raise InvalidArgument(f"qemu config: machine must be one of {MACHINES}, not {self.machine!r}")
        if self.accel not in ACCELS:
            raise InvalidArgument(f"qemu config: accel must be one of {ACCELS}, not {self.accel!r}")
        if not 1 <= self.vcpus <= self.max_vcpus <= 255:
            raise InvalidArgument("qemu config: need 1 <= vcpus <= max_vcpus <= 255")
        if not 128 <= self.memory_mib <= self.max_memory_mib:
            raise InvalidArgument("qemu config: need 128 <= memory_mib <= max_memory_mib")
        if not 0 <= self.tcg_tb_mib <= 4096:
            raise InvalidArgument("qemu config: tcg_tb_mib must be within 0..4096")
        if not 0 <= self.memory_slots <= 256:
            raise InvalidArgument("qemu config: memory_slots must be within 0..256")
        if any(not a or any(c.isspace() for c in a) for a in self.kernel_args):
            raise InvalidArgument("qemu config: kernel_args must be non-empty words without spaces")
        for name in ("start_timeout_s", "stop_timeout_s", "kvm_probe_timeout_s", "template_timeout_s",
                     "template_build_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"qemu config: {name} must be positive")

    @property
    def hotplug(self) -> bool:
        """Whether the machine type can hotplug vCPUs and memory."""
        return self.machine != "microvm"

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> QemuConfig:
        """Build from a TOML table; raises InvalidArgument on unknown keys or bad types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields:
                raise InvalidArgument(f"qemu config: unknown key {key!r}")
            values[key] = _coerce(key, value)
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidArgument(f"qemu config: {exc}") from exc


def _coerce(key: str, value: Any) -> Any:
    if key in ("image", "kernel", "initrd", "rootfs", "probe_cache", "template_dir"):
        if not isinstance(value, str):
            raise InvalidArgument(f"qemu config: {key} must be a path string")
        return Path(value)
    if key == "kernel_args":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument("qemu config: kernel_args must be a list of strings")
        return tuple(value)
    if key.endswith("_s") and isinstance(value, int):
        return float(value)
    expected = {"qemu": str, "machine": str, "accel": str, "template": bool,
                "free_page_reporting": bool}.get(
        key, int if not key.endswith("_s") else float)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise InvalidArgument(f"qemu config: {key} must be {expected.__name__}")
    return value


def load(path: Path | None = None) -> QemuConfig:
    """The ``[qemu]`` table of *path*, ``$KEEL_CONFIG`` or the default file; defaults if absent."""
    file, raw = read_file(path)
    table = raw.get("qemu", {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"config file {file}: [qemu] must be a table")
    return QemuConfig.from_mapping(table)
