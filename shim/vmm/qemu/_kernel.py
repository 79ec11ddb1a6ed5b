"""The guest kernel from a Debian package: PVH ``vmlinux`` and module order.

Debian's ``vmlinuz`` is an xz-compressed bzImage; decompressing it under
TCG costs ~2.4 s per boot, while QEMU boots the uncompressed ELF directly
through its PVH entry note (research/qemu.md section 2).  Every virtio and
9p driver is a module in that kernel, so the initramfs must ``insmod`` them
in dependency order; the order is computed from each module's own
``depends=`` (``.modinfo``), the same data ``depmod`` writes to
``modules.dep`` (kmod is not needed on the build host).
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Iterable
from pathlib import Path

from keel.errors import Internal

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"

#: Modules the guest needs (dependencies are added): virtio transports for
#: microvm (mmio) and q35/pc (pci), virtio-serial ports, 9p over virtio, and
#: virtio-net for a pod network.
GUEST_MODULES = ("virtio_pci", "virtio_mmio", "virtio_console", "9pnet_virtio", "9p", "virtio_net",
                 "virtio_balloon")


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the ELF kernel embedded (xz) in *bzimage* to *out*.

    Raises Internal when no xz stream holds an ELF image (another
    compression, or a kernel without the PVH note would need the bzImage).
    """
    data = bzimage.read_bytes()
    start = 0
    while (pos := data.find(_XZ_MAGIC, start)) >= 0:
        start = pos + 1
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
        except lzma.LZMAError:
            continue
        if elf.startswith(_ELF_MAGIC):
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(elf)
            tmp.replace(out)
            return
    raise Internal(f"{bzimage}: no xz-compressed ELF kernel inside")


def _modinfo(ko: Path) -> dict[str, str]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    data = ko.read_bytes()
    if data[:4] != _ELF_MAGIC or data[4] != 2:
        raise Internal(f"{ko}: not an ELF64 kernel module (compressed modules are not supported)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = sections[shstrndx][4]
    info: dict[str, str] = {}
    for name_off, _type, _flags, _addr, off, size in sections:
        end = data.index(b"\0", strtab_off + name_off)
        if data[strtab_off + name_off:end] != b".modinfo":
            continue
        for entry in data[off:off + size].split(b"\0"):
            key, sep, value = entry.partition(b"=")
            if sep:
                info.setdefault(key.decode(), value.decode(errors="replace"))
    return info


def module_index(moddir: Path) -> dict[str, Path]:
    """Module name (``-`` spelled ``_``) -> .ko path, for every module under *moddir*."""
    return {ko.stem.replace("-", "_"): ko for ko in moddir.rglob("*.ko")}


def insmod_order(index: dict[str, Path], wanted: Iterable[str]) -> list[str]:
    """*wanted* plus their dependencies, every module after its dependencies.

    Raises Internal naming a module that is missing (a kernel built with it
    ``=y`` would need no module: such names are simply not wanted).
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str) -> None:
        key = name.replace("-", "_")
        if key in order:
            return
        if key in visiting:
            raise Internal(f"module dependency cycle at {key}")
        if key not in index:
            raise Internal(f"kernel module {key} (needed by {needed_by}) is not in the package")
        visiting.add(key)
        for dep in filter(None, _modinfo(index[key]).get("depends", "").split(",")):
            visit(dep, key)
        visiting.discard(key)
        order.append(key)

    for name in wanted:
        visit(name, "the guest")
    return order


def modules_dep(index: dict[str, Path], order: Iterable[str], root: Path) -> str:
    """A ``modules.dep`` for *order* (for people reading the initramfs)."""
    lines = []
    for name in order:
        deps = filter(None, _modinfo(index[name]).get("depends", "").split(","))
        rel = [str(index[d.replace("-", "_")].relative_to(root)) for d in deps]
        lines.append(f"{index[name].relative_to(root)}: {' '.join(rel)}".rstrip())
    return "\n".join(lines) + "\n"
