"""The ``qemu`` backend: each sandbox is a real VM (KVM where usable, else TCG).

A sandbox is a daemonized qemu (its own session, no parent-death signal:
it outlives the shim) booting the Keel guest image (``image``): a PVH
kernel, an initramfs whose ``/init`` mounts a read-only root over 9p and
execs the agent as PID 1, and a per-sandbox read-write 9p share for
container root filesystems.  The agent's two channels are virtio-serial
ports whose host ends are unix sockets in the sandbox directory; QMP
(``qmp.sock``) reports status, quits the VM and hotplugs vCPUs and memory
on q35/pc.  When the pod has a network namespace, its veth is bridged to a
tap whose fd qemu gets (``_net``).  Layout of the sandbox directory:
``SandboxDir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keel import procfs
from keel.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from keel.logs import tail
from shim.dirs import SandboxDir
from shim.vmm import _sizing
from shim.vmm.api import LaunchSpec
from shim.vmm.qemu import _accel, _cmdline, _mounts, _net, _prune, _template
from shim.vmm.qemu._initramfs import PORTS
from shim.vmm.qemu._sandbox import QemuSandbox
from shim.vmm.qemu.config import QemuConfig, load
from upgrade.aio import wait_readable

__all__ = ["QemuBackend", "QemuConfig", "QemuSandbox"]

log = logging.getLogger("keel.shim.qemu")


async def _exits(pidfd: int, timeout: float) -> bool:
    """Whether the process of *pidfd* exits within *timeout* s (False for no pidfd).

    A failed clone whose qemu is exiting may lose its sockets just before its pidfd says so.
    """
    if pidfd < 0:
        return False
    try:
        async with asyncio.timeout(timeout):
            await wait_readable(pidfd)
    except TimeoutError:
        return False
    return True


class _VmGone(Unavailable):
    """qemu daemonized, then exited before its pid could be read."""


class QemuBackend:
    name = "qemu"

    def __init__(self, config: QemuConfig | None = None) -> None:
        self.config = config if config is not None else load()

    def _image(self) -> tuple[tuple[str, Path, Path, Path], str]:
        """(id, kernel, initrd, guest root), and the image's directory ("" for a custom one)."""
        cfg = self.config
        where = ""
        if cfg.kernel and cfg.initrd and cfg.rootfs:
            parts = ("custom", cfg.kernel, cfg.initrd, cfg.rootfs)
        else:
            from shim.vmm.qemu import image  # not at import: `python -m ...image` runs it

            # An explicit image; else the one this release's install recorded;
            # else the cache's newest ("current").
            recorded = None if cfg.image else _prune.release_image()
            try:
                img = image.load(cfg.image or recorded)
            except NotFound as exc:
                if recorded is not None:
                    raise Unavailable(
                        f"the guest image this release recorded ({recorded}, in"
                        f" {sys.prefix}/{_prune.RELEASE_IMAGE}) is missing: build it again with"
                        f" `{sys.prefix}/bin/python -m shim.vmm.qemu.image build --release"
                        f" {sys.prefix}`") from exc
                raise Unavailable(str(exc)) from exc
            parts = (img.id, cfg.kernel or img.kernel, cfg.initrd or img.initrd, cfg.rootfs or img.rootfs)
            where = str(img.dir)
        for what, path in zip(("kernel", "initrd", "guest root"), parts[1:], strict=True):
            if not path.exists():
                raise Unavailable(f"guest {what} {path} does not exist")
        return parts, where

    async def launch(self, spec: LaunchSpec) -> QemuSandbox:
        """Start the VM; returns once qemu runs (the agent answers seconds later).

        Raises Unavailable with qemu's message when it cannot start; then
        nothing of the attempt is left in the sandbox directory.
        InvalidArgument, before anything starts, for a pod that asks to share
        the host's namespaces.
        """
        if spec.host_namespaces:
            kinds = ", ".join(sorted(spec.host_namespaces))
            raise InvalidArgument(
                f"the pod asks for the host's {kinds} namespace (hostNetwork, hostIPC or"
                f" hostPID: its spec lists no such namespace); a VM sandbox cannot share the"
                f" host's namespaces: run such pods with another RuntimeClass")
        cfg = self.config
        files = SandboxDir(spec.root)
        files.check_sockets(PORTS)
        (image_id, kernel, initrd, rootfs), image_dir = self._image()
        qemu = shutil.which(cfg.qemu)
        if qemu is None:
            raise Unavailable(f"{cfg.qemu} not found (apt-get install qemu-system-x86)")
        accel = await _accel.choose(qemu, kernel, cfg.accel, cfg.probe_cache, cfg.kvm_probe_timeout_s)
        vcpus = max(cfg.vcpus, spec.vcpus) + spec.workload_vcpus
        memory = max(cfg.memory_mib, spec.memory_mib) + spec.workload_memory_mib
        nic, tap_fd = await self._attach_network(spec)
        info = {"accel": accel.name, "accel_reason": accel.reason, "machine": cfg.machine,
                "image": image_id, "image_dir": image_dir, "vcpus": vcpus, "memory_mib": memory, "qemu": qemu,
                "base_vcpus": vcpus - spec.workload_vcpus,
                "base_memory_mib": memory - spec.workload_memory_mib}
        if cfg.template and nic is None:
            try:
                pid, pidfd, tpl_key = await self._launch_clone(
                    spec, files, qemu, accel, (image_id, kernel, initrd, rootfs), vcpus, memory)
            except Exception as exc:  # noqa: BLE001 - the template is an optimisation: cold-boot
                log.warning("sandbox %s: starting from a template failed, cold boot instead: %s",
                            spec.sandbox_id, exc)
            else:
                log.info("sandbox %s: qemu pid %d restored from template %s, %s/%s, %d vCPU, "
                         "%d MiB", spec.sandbox_id, pid, tpl_key, cfg.machine, accel.name, vcpus, memory)
                return QemuSandbox(files, pid, pidfd, {**info, "template": tpl_key})
        try:
            argv = _cmdline.argv(
                cfg, accel, files, name=spec.sandbox_id[:32], kernel=kernel, initrd=initrd,
                rootfs=rootfs, vcpus=vcpus, memory_mib=memory,
                cmdline=_cmdline.kernel_cmdline(cfg, accel, spec.agent_args,
                                                nic.guest_config() if nic else "",
                                                shm_bytes=_sizing.tmpfs_bytes(spec.shm_source)
                                                if spec.shm_source else 0),
                tap=(tap_fd, nic.mac) if nic else None)
            await asyncio.to_thread(self._prepare, files)
            pid = await self._start(argv, files, (tap_fd,) if nic else ())
            pidfd = os.pidfd_open(pid)
        except BaseException as exc:
            await asyncio.to_thread(self._discard, files)
            if nic is not None:
                await asyncio.to_thread(_net.teardown, nic.netns, nic.veth)
            if isinstance(exc, ProcessLookupError):
                raise Unavailable(f"qemu exited at once; console: {tail(files.agent_log, 1500)}") from None
            raise
        finally:
            if nic is not None:
                os.close(tap_fd)  # qemu holds its own copy
        if nic is not None:
            info["network"] = {"netns": nic.netns, "veth": nic.veth, "mac": nic.mac,
                               "addresses": list(nic.addresses)}
        log.info("sandbox %s: qemu pid %d, %s/%s, %d vCPU, %d MiB, image %s (%s)", spec.sandbox_id,
                 pid, cfg.machine, accel.name, vcpus, memory, image_id, accel.reason)
        return QemuSandbox(files, pid, pidfd, info)

    async def _launch_clone(self, spec: LaunchSpec, files: SandboxDir, qemu: str,
                            accel: _accel.Accel, image: tuple[str, Path, Path, Path], vcpus: int,
                            memory: int) -> tuple[int, int, str]:
        """Start the VM by restoring its template (built now if missing): (pid, pidfd, key).

        Raises on any failure, leaving nothing of the attempt behind.
        """
        cfg = self.config
        image_id, kernel, initrd, rootfs = image
        cmdline = _cmdline.kernel_cmdline(cfg, accel, (), template=True)

        def argv_for(f: SandboxDir, ram: Path, clone: bool) -> list[str]:
            return _cmdline.argv(cfg, accel, f, name=spec.sandbox_id[:32] if clone else "template",
                                 kernel=kernel, initrd=initrd, rootfs=rootfs, vcpus=vcpus,
                                 memory_mib=memory, cmdline=cmdline, memory=(ram, not clone),
                                 incoming=clone)

        # Everything a clone must share with its template (paths of sockets and shares may differ).
        shape = {"image": image_id, "kernel": _template.file_id(kernel),
                 "initrd": _template.file_id(initrd), "rootfs": str(rootfs),
                 "qemu": [qemu, *_template.file_id(Path(qemu))], "machine": cfg.machine,
                 "accel": accel.name, "vcpus": vcpus, "memory_mib": memory, "cmdline": cmdline,
                 "balloon": cfg.free_page_reporting,
                 "hotplug": [cfg.max_vcpus, cfg.max_memory_mib, cfg.memory_slots] if cfg.hotplug else None}
        tpl = await _template.ensure(cfg.template_dir, _template.key(shape), shape, argv_for,
                                     self._start, cfg.template_build_timeout_s)
        await asyncio.to_thread(self._prepare, files)
        pidfd = -1
        try:
            pid = await self._start(argv_for(files, tpl.memory, True), files)
            pidfd = os.pidfd_open(pid)
            await _template.resume(files, tpl, spec.sandbox_id, spec.agent_args,
                                   cfg.template_timeout_s)
        except BaseException as exc:
            if isinstance(exc, (_VmGone, ProcessLookupError)) or await _exits(pidfd, 1.0):
                # qemu exited by itself: the snapshot did not load (a timeout on a
                # busy host leaves it running, and the template alone).
                log.warning("template %s: a clone died while restoring: discarded", tpl.key)
                await asyncio.to_thread(_template.discard, tpl)
            if pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
            else:
                self._kill_daemon(files)
            await asyncio.to_thread(self._discard, files)
            raise
        return pid, pidfd, tpl.key

    @staticmethod
    async def _attach_network(spec: LaunchSpec) -> tuple[_net.PodNic | None, int]:
        """The pod's veth bridged to a tap (and the tap's fd), if the pod has a network.

        A namespace without an interface (a pod with only loopback) gives a
        VM without a NIC; a namespace that cannot be entered is an error.
        """
        if not spec.netns:
            return None, -1
        try:
            return await asyncio.to_thread(_net.attach, spec.netns)
        except FailedPrecondition as exc:
            log.warning("sandbox %s: no pod network: %s", spec.sandbox_id, exc)
            return None, -1

    @staticmethod
    def _prepare(files: SandboxDir) -> None:
        files.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if files.shared.exists():
            _mounts.unshare_all(files.shared, files.rootfs_marks)  # left by a crashed sandbox
        files.shared.mkdir(mode=0o700)
        _mounts.seal_share(files.shared)
        for path in (*files.sockets(PORTS), files.pidfile):
            path.unlink(missing_ok=True)

    @staticmethod
    def _discard(files: SandboxDir) -> None:
        _mounts.unshare_all(files.shared, files.rootfs_marks)
        for path in (*files.sockets(PORTS), files.pidfile, files.agent_log, files.vmm_log):
            path.unlink(missing_ok=True)

    async def _start(self, argv: list[str], files: SandboxDir,
                     pass_fds: tuple[int, ...] = ()) -> int:
        """Run qemu -daemonize; its parent exits once the VM is set up.  Returns the VM's pid."""
        log_fd = os.open(files.vmm_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        # The console (qemu appends to it) is the guest's words: root's eyes only.
        os.close(os.open(files.agent_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=log_fd, start_new_session=True, pass_fds=pass_fds)
        finally:
            os.close(log_fd)
        try:
            async with asyncio.timeout(self.config.start_timeout_s):
                rc = await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # our child, by pid
            await proc.wait()
            self._kill_daemon(files)
            raise Unavailable(f"qemu did not start within {self.config.start_timeout_s}s: "
                              f"{tail(files.vmm_log, 1500)}") from None
        if rc != 0:
            raise Unavailable(f"qemu failed to start (exit {rc}): {tail(files.vmm_log, 1500)}")
        try:
            return int(files.pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise _VmGone(f"qemu started but wrote no pid file (it exits removing it): "
                          f"{exc}; {tail(files.vmm_log, 1500)}") from exc

    @staticmethod
    def _kill_daemon(files: SandboxDir) -> None:
        """Kill the daemonized qemu of this attempt, if it got that far (checked by pid file)."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(files.pidfile.read_text().strip())
            if str(files.pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pidfd = os.pidfd_open(pid)
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                finally:
                    os.close(pidfd)

    def restore(self, spec: LaunchSpec, record: Mapping[str, Any]) -> QemuSandbox:
        """Re-attach to the VM of *record*; NotFound when it is gone."""
        pid = int(record["pid"])
        try:
            pidfd = procfs.open_pidfd(pid, int(record["start_time"]))
        except (ProcessLookupError, FileNotFoundError):
            raise NotFound(f"sandbox {spec.sandbox_id}: VM pid {pid} is gone") from None
        info = {k: v for k, v in record.items() if k not in ("pid", "start_time", "shim")}
        return QemuSandbox(SandboxDir(spec.root), pid, pidfd, info)

    def close_fds(self, sandbox: Any) -> None:
        sandbox.close()
