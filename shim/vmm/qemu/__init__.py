"""The ``qemu`` backend: each sandbox is a real VM (KVM where usable, else TCG).

A sandbox is a daemonized qemu (its own session, no parent-death signal:
it outlives the shim) booting the Keel guest image (``image``): a PVH
kernel, an initramfs whose ``/init`` mounts a read-only root over 9p and
execs the agent as PID 1, and a per-sandbox read-write 9p share for
container root filesystems.  The agent's two channels are virtio-serial
ports whose host ends are unix sockets in the sandbox directory; QMP
(``qmp.sock``) reports status, quits the VM and hotplugs vCPUs and memory
on q35/pc.  Layout of the sandbox directory: ``_cmdline.SandboxFiles``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import KeelError, NotFound, Unavailable
from shim.vmm.api import LaunchSpec
from shim.vmm.qemu import _accel, _cmdline, _mounts
from shim.vmm.qemu._sandbox import QemuSandbox, start_time
from shim.vmm.qemu.config import QemuConfig, load

__all__ = ["QemuBackend", "QemuConfig", "QemuSandbox"]

log = logging.getLogger("keel.shim.qemu")


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace").strip() or "(empty)"
    except OSError:
        return "(none)"


class QemuBackend:
    name = "qemu"

    def __init__(self, config: QemuConfig | None = None) -> None:
        self.config = config if config is not None else load()

    def _image(self) -> tuple[str, Path, Path, Path]:
        cfg = self.config
        if cfg.kernel and cfg.initrd and cfg.rootfs:
            parts = ("custom", cfg.kernel, cfg.initrd, cfg.rootfs)
        else:
            from shim.vmm.qemu import image  # not at import: `python -m ...image` runs it

            try:
                img = image.load(cfg.image)
            except NotFound as exc:
                raise Unavailable(str(exc)) from exc
            parts = (img.id, cfg.kernel or img.kernel, cfg.initrd or img.initrd, cfg.rootfs or img.rootfs)
        for what, path in zip(("kernel", "initrd", "guest root"), parts[1:], strict=True):
            if not path.exists():
                raise Unavailable(f"guest {what} {path} does not exist")
        return parts

    async def launch(self, spec: LaunchSpec) -> QemuSandbox:
        """Start the VM; returns once qemu runs (the agent answers seconds later).

        Raises Unavailable with qemu's message when it cannot start; then
        nothing of the attempt is left in the sandbox directory.
        """
        cfg = self.config
        files = _cmdline.SandboxFiles(spec.root)
        files.check()
        image_id, kernel, initrd, rootfs = self._image()
        qemu = shutil.which(cfg.qemu)
        if qemu is None:
            raise Unavailable(f"{cfg.qemu} not found (apt-get install qemu-system-x86)")
        accel = await _accel.choose(qemu, kernel, cfg.accel, cfg.probe_cache, cfg.kvm_probe_timeout_s)
        vcpus, memory = max(cfg.vcpus, spec.vcpus), max(cfg.memory_mib, spec.memory_mib)
        argv = _cmdline.argv(
            cfg, accel, files, name=spec.sandbox_id[:32], kernel=kernel, initrd=initrd,
            rootfs=rootfs, vcpus=vcpus, memory_mib=memory,
            cmdline=_cmdline.kernel_cmdline(cfg, accel, spec.agent_args))
        try:
            await asyncio.to_thread(self._prepare, files)
            pid = await self._start(argv, files)
            pidfd = os.pidfd_open(pid)
        except BaseException as exc:
            await asyncio.to_thread(self._discard, files)
            if isinstance(exc, ProcessLookupError):
                raise Unavailable(f"qemu exited at once; console: {_tail(files.console)}") from None
            raise
        info = {"accel": accel.name, "accel_reason": accel.reason, "machine": cfg.machine,
                "image": image_id, "vcpus": vcpus, "memory_mib": memory, "qemu": qemu}
        log.info("sandbox %s: qemu pid %d, %s/%s, %d vCPU, %d MiB, image %s (%s)", spec.sandbox_id,
                 pid, cfg.machine, accel.name, vcpus, memory, image_id, accel.reason)
        return QemuSandbox(files, pid, pidfd, info)

    @staticmethod
    def _prepare(files: _cmdline.SandboxFiles) -> None:
        files.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if files.shared.exists():
            _mounts.unshare_all(files.shared, files.rootfs_marks)  # left by a crashed sandbox
        files.shared.mkdir(mode=0o700)
        _mounts.seal_share(files.shared)
        for path in (*files.sockets(), files.pidfile):
            path.unlink(missing_ok=True)

    @staticmethod
    def _discard(files: _cmdline.SandboxFiles) -> None:
        _mounts.unshare_all(files.shared, files.rootfs_marks)
        for path in (*files.sockets(), files.pidfile, files.console, files.vmm_log):
            path.unlink(missing_ok=True)

    async def _start(self, argv: list[str], files: _cmdline.SandboxFiles) -> int:
        """Run qemu -daemonize; its parent exits once the VM is set up.  Returns the VM's pid."""
        log_fd = os.open(files.vmm_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=log_fd, start_new_session=True)
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
                              f"{_tail(files.vmm_log)}") from None
        if rc != 0:
            raise Unavailable(f"qemu failed to start (exit {rc}): {_tail(files.vmm_log)}")
        try:
            return int(files.pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise Unavailable(f"qemu started but wrote no pid file: {exc}") from exc

    @staticmethod
    def _kill_daemon(files: _cmdline.SandboxFiles) -> None:
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
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, FileNotFoundError):
            raise NotFound(f"sandbox {spec.sandbox_id}: VM pid {pid} is gone") from None
        try:
            if start_time(pid) != int(record["start_time"]):
                raise ProcessLookupError
        except (ProcessLookupError, FileNotFoundError, KeelError):
            os.close(pidfd)
            raise NotFound(f"sandbox {spec.sandbox_id}: VM pid {pid} is gone") from None
        info = {k: v for k, v in record.items() if k not in ("pid", "start_time", "shim")}
        return QemuSandbox(_cmdline.SandboxFiles(spec.root), pid, pidfd, info)

    def close_fds(self, sandbox: Any) -> None:
        sandbox.close()
