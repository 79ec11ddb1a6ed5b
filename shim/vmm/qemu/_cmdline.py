"""The qemu command line of a sandbox, and the files it puts in the sandbox dir.

Choices (measured in research/qemu.md sections 4 and 7): the PVH
``vmlinux`` (no bzImage decompression), microvm with modern virtio-mmio
unless hotplug is wanted (q35/pc with virtio-pci), one vCPU unless asked,
``tsc_early_khz`` under TCG (microvm otherwise can hang calibrating the
TSC), ``quiet`` and a few kernel flags that skip boot-time self checks.

qemu runs ``-daemonize`` in its own session: it outlives the shim (a live
shim upgrade hands the sandbox to a new shim), and its parent returns only
once every socket exists, or with an error.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from keel.errors import InvalidArgument
from shim.dirs import SandboxDir
from shim.vmm.qemu._accel import Accel, tsc_khz
from shim.vmm.qemu._initramfs import PORTS, ROOT_TAG, SHARE_TAG
from shim.vmm.qemu.config import QemuConfig

#: x86 COMMAND_LINE_SIZE.
_KERNEL_CMDLINE_MAX = 2047
#: The RAM block of a file-backed guest: a clone's must be named as its template's.
_RAM_ID = "keel-ram"


def _memory_backend(memory: tuple[Path, bool] | None) -> str:
    return f",memory-backend={_RAM_ID}" if memory else ""


def shell_word(path: Path) -> str:
    """*path* for a ``exec:`` migration URI (run by ``sh -c``); InvalidArgument if it needs quoting."""
    if any(c.isspace() or c in "'\"\\$`;&|<>(){}*?[]~#!" for c in str(path)):
        raise InvalidArgument(f"path unusable in a shell command: {path}")
    return str(path)


def kernel_cmdline(config: QemuConfig, accel: Accel, agent_args: Sequence[str],
                   net: str = "", *, template: bool = False, shm_bytes: int = 0) -> str:
    """The guest kernel command line; InvalidArgument if the agent args cannot travel on it.

    *net* is the pod network for the guest init (``_net.PodNic.guest_config``).
    A *template* VM waits for the host's ``go`` line (``_template``), which
    carries the agent args and network instead.
    """
    if any("\n" in a for a in agent_args):
        raise InvalidArgument("agent arguments must not contain newlines")
    words = ["console=ttyS0", "panic=-1", "quiet", "cryptomgr.notests", "rodata=off",
             "init_on_alloc=0"]
    if accel.name == "tcg" and (khz := tsc_khz()):
        words.append(f"tsc_early_khz={khz}")
    if config.hotplug:
        words.append("memhp_default_state=online")
    else:
        words.append("pci=off")  # microvm has no PCI bus: skip probing for one
    if template:
        words.append("keel.template=1")
    if agent_args:
        lines = "".join(f"{a}\n" for a in agent_args)
        words.append("keel.args=" + base64.b64encode(lines.encode()).decode())
    if net:
        words.append("keel.net=" + base64.b64encode(net.encode()).decode())
    if shm_bytes > 0:
        words.append(f"keel.shm={shm_bytes}")
    words += config.kernel_args
    line = " ".join(words)
    if len(line) > _KERNEL_CMDLINE_MAX:
        raise InvalidArgument(f"kernel command line too long ({len(line)} bytes)")
    return line


def argv(config: QemuConfig, accel: Accel, files: SandboxDir, *, name: str, kernel: Path,
         initrd: Path, rootfs: Path, vcpus: int, memory_mib: int, cmdline: str,
         tap: tuple[int, str] | None = None, memory: tuple[Path, bool] | None = None,
         incoming: bool = False) -> list[str]:
    """The full qemu argv (absolute paths: qemu -daemonize changes to /).

    *tap* is (an open tap fd qemu inherits, the guest NIC's MAC).  *memory*
    is (a file, shared?) holding the guest RAM: a template VM's own file
    (shared: the guest writes it), a clone's copy-on-write mapping of its
    template's file (``_template``).  *incoming*: wait for QMP
    ``migrate-incoming`` instead of booting (a clone).
    """
    max_vcpus = vcpus
    if config.hotplug:
        bus = "pci"
        machine = ["-M", config.machine + _memory_backend(memory)]
        max_vcpus = max(vcpus, config.max_vcpus)
        smp = f"{vcpus},maxcpus={max_vcpus}"
        mem = f"size={memory_mib}M,slots={config.memory_slots},maxmem={max(memory_mib, config.max_memory_mib)}M"
    else:
        bus = "device"
        machine = ["-M", "microvm,isa-serial=on" + _memory_backend(memory),
                   "-global", "virtio-mmio.force-legacy=false"]
        smp, mem = str(vcpus), f"{memory_mib}M"
    args = [
        config.qemu, *machine, *accel.qemu_args(config.tcg_tb_mib, max_vcpus=max_vcpus),
        "-smp", smp, "-m", mem,
        "-name", f"keel-{name}", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-daemonize", "-pidfile", str(files.pidfile),
        # -D: once daemonized, qemu's stderr (an assertion, an abort) goes to
        # vmm.log rather than /dev/null.
        "-D", str(files.vmm_log),
        "-chardev", f"file,id=console,path={files.agent_log},append=on", "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={files.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        # The read-only guest root, and the per-sandbox share (container rootfs
        # bind mounts live under it, hence multidevs=remap).  security_model=none:
        # the guest sees host owners and modes, host symlinks stay symlinks (the
        # mapped models break them); the share is mounted nodev,nosuid,noexec on
        # the host so what the guest creates there stays inert (_mounts).
        "-fsdev", f"local,id=fsroot,path={rootfs},security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-{bus},fsdev=fsroot,mount_tag={ROOT_TAG}",
        "-fsdev", f"local,id=fsshare,path={files.shared},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-{bus},fsdev=fsshare,mount_tag={SHARE_TAG}",
        "-device", f"virtio-serial-{bus},id=vser0",
    ]
    for channel, port in PORTS.items():
        args += ["-chardev", f"socket,id=ch-{channel},path={files.channel(channel)},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=ch-{channel},name={port}"]
    if config.free_page_reporting:
        args += ["-device", f"virtio-balloon-{bus},free-page-reporting=on"]
    if tap is not None:
        fd, mac = tap
        args += ["-netdev", f"tap,id=net0,fd={fd}",
                 "-device", f"virtio-net-{bus},netdev=net0,mac={mac}"]
    if memory is not None:
        path, shared = memory
        args += ["-object", f"memory-backend-file,id={_RAM_ID},size={memory_mib}M,mem-path={path},"
                            f"share={'on' if shared else 'off'}"]
    if incoming:
        args += ["-incoming", "defer"]
    for value in (str(kernel), str(initrd), str(rootfs), str(files.root),
                  *([str(memory[0])] if memory else [])):
        if "," in value:
            raise InvalidArgument(f"qemu option values cannot contain ',': {value}")
    return args
