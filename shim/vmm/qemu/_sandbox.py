"""QemuSandbox: one running VM as the shim sees it.

Owns the pidfd of the (daemonized) qemu process, the dialers of its two
virtio-serial channels, and QMP sessions.  The VM itself is owned by no
shim: it survives the shim, and a later shim re-attaches through
``QemuBackend.restore`` from :meth:`QemuSandbox.record`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from agent.api import NET_SYSCTLS_ANNOTATION
from keel import procfs
from keel.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable, Unimplemented
from shim.dirs import SandboxDir
from shim.vmm._dialers import ExclusiveDialer, unix_dialer
from shim.vmm._sizing import Workload
from shim.vmm.api import (
    Dialer,
    MountSpec,
    check_no_agent_annotations,
    check_propagation,
    is_host_bind,
)
from shim.vmm.qemu import _mounts, _net, _volumes
from shim.vmm.qemu import qmp as _qmp
from shim.vmm.qemu._initramfs import GUEST_SHARED, PORTS
from upgrade.aio import ExitWatch

log = logging.getLogger("keel.shim.qemu")


class QemuSandbox:
    """A VM started by :class:`~shim.vmm.qemu.QemuBackend`.

    *info* is the identity persisted in :meth:`record` (accelerator,
    machine, image, sizing); the pidfd is owned by this object until
    :meth:`close`.
    """

    def __init__(self, files: SandboxDir, pid: int, pidfd: int, info: dict[str, Any]) -> None:
        self.files = files
        self._pid = pid
        self._pidfd = pidfd
        self._exit = ExitWatch(pidfd)
        self.info = dict(info)
        self._dialers = {name: ExclusiveDialer(unix_dialer(str(files.channel(name))))
                         for name in PORTS}
        self._qmp_lock = asyncio.Lock()
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def accel(self) -> str:
        return str(self.info["accel"])

    def record(self) -> dict[str, Any]:
        alive = self.alive()
        return {**self.info, "pid": self._pid, "start_time": procfs.start_time(self._pid) if alive else 0}

    def dialer(self, channel: str) -> Dialer:
        """The channel's virtio-serial port; one connection at a time (the dialer
        shuts the previous one down before it dials again)."""
        try:
            return self._dialers[channel]
        except KeyError:
            raise InvalidArgument(f"unknown channel {channel!r} (known: {', '.join(PORTS)})") from None

    def guest_image(self) -> tuple[str, dict[str, Any]]:
        """The booted image's id and manifest (``{}`` when it cannot be read: a
        custom kernel/initrd/root, or an image removed since)."""
        image_id = str(self.info.get("image", ""))
        from shim.vmm.qemu import image  # not at import: `python -m ...image` runs it

        where = self.info.get("image_dir") or image.default_dir() / f"img-{image_id}"
        try:
            doc = json.loads((Path(where) / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            log.warning("sandbox %s: cannot read the manifest of its image %s: %s",
                        self.files.root.name, image_id, exc)
            return image_id, {}
        return image_id, doc if isinstance(doc, dict) and doc.get("id") == image_id else {}

    def pod_netns(self) -> str | None:
        netns = (self.info.get("network") or {}).get("netns")
        return str(netns) if netns else None

    def alive(self) -> bool:
        if self._pidfd < 0:
            return False
        return not select.select([self._pidfd], [], [], 0)[0]

    async def wait_exit(self) -> None:
        if self.alive():
            await self._exit.wait()  # shared: the sandbox watch and stop() both wait

    # -- QMP ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def qmp(self) -> AsyncIterator[_qmp.QmpClient]:
        """A QMP session (serialised: qemu serves one QMP client at a time)."""
        if not self.alive():
            raise Unavailable(f"sandbox VM (pid {self._pid}) is not running")
        async with self._qmp_lock, _qmp.QmpClient.connect(str(self.files.qmp)) as client:
            yield client

    async def status(self) -> str:
        """qemu's run state (``running``, ``paused``, ...)."""
        async with self.qmp() as client:
            return await _qmp.status(client)

    def _need_hotplug(self, what: str) -> None:
        if self.info.get("machine") == "microvm":
            raise Unimplemented(f"{what} hotplug needs machine q35 or pc; this sandbox runs microvm")

    async def add_vcpu(self) -> int:
        """Hotplug one vCPU; returns the vCPUs now present.  The guest must online it."""
        self._need_hotplug("vCPU")
        async with self.qmp() as client:
            count = await _qmp.add_vcpu(client)
        self.info["vcpus"] = count
        return count

    async def add_memory(self, mib: int) -> str:
        """Hotplug a *mib* MiB DIMM (onlined by the guest kernel); returns its id."""
        self._need_hotplug("memory")
        async with self.qmp() as client:
            dimm = await _qmp.add_memory(client, mib)
        self.info["memory_mib"] = int(self.info.get("memory_mib", 0)) + mib
        return dimm

    # -- container specs ------------------------------------------------------------------

    def guest_spec(self, spec_json: bytes) -> bytes:
        """The OCI spec as the agent in this VM must see it.

        A network namespace given by path is the pod's, on the host: its
        veth was bridged into this VM (``_net``), so in the guest the
        container shares the VM's own network (the VM is the pod's
        boundary).  Its ``net.*`` sysctls, which runc refuses for a
        container without a network namespace of its own, move to the
        annotation ``NET_SYSCTLS_ANNOTATION``: the agent sets them in the
        VM's namespace (``agent/_sysctls.py``).  Without a path the
        container gets a namespace of its own, as runc would give it.
        Other fields pass unchanged.  InvalidArgument for a mount that asks
        for non-private propagation, or a spec that sets that annotation.
        """
        spec = json.loads(spec_json)
        check_no_agent_annotations(spec)
        check_propagation(spec, allowed=(), why="a VM has a mount tree of its own; the"
                          " host's mounts and the guest's never propagate between them")
        namespaces = (spec.get("linux") or {}).get("namespaces")
        if not namespaces or not any(ns.get("type") == "network" and ns.get("path")
                                     for ns in namespaces):
            return spec_json
        linux = spec["linux"]
        linux["namespaces"] = [ns for ns in namespaces
                               if not (ns.get("type") == "network" and ns.get("path"))]
        sysctl = linux.get("sysctl") or {}
        net = {k: v for k, v in sysctl.items() if k.startswith("net.")}
        if net:
            linux["sysctl"] = {k: v for k, v in sysctl.items() if k not in net}
            annotations = spec.get("annotations") or {}
            spec["annotations"] = {**annotations, NET_SYSCTLS_ANNOTATION: json.dumps(net)}
        return json.dumps(spec).encode()

    async def grow_to(self, workload: Workload) -> None:
        """Hotplug vCPUs and memory until the VM has its base plus *workload*.

        Only grows (an unplug needs the guest's cooperation); a DIMM is
        rounded up to 128 MiB.  On microvm, or past ``maxcpus``/``maxmem``,
        it logs what is missing and returns: the container's cgroup limits
        still change, the VM just stays smaller than asked.
        """
        want_cpus = int(self.info.get("base_vcpus", 1)) + workload.vcpus
        want_mib = int(self.info.get("base_memory_mib", 0)) + workload.memory_mib
        have_cpus, have_mib = int(self.info["vcpus"]), int(self.info["memory_mib"])
        if want_cpus <= have_cpus and want_mib <= have_mib:
            return
        try:
            while int(self.info["vcpus"]) < want_cpus:
                await self.add_vcpu()
            if want_mib > have_mib:
                await self.add_memory(-(-(want_mib - have_mib) // 128) * 128)
        except (Unimplemented, FailedPrecondition, Internal) as exc:
            log.warning("sandbox %s: VM stays at %s vCPU / %s MiB (asked for %d / %d): %s",
                        self.files.root.name, self.info["vcpus"], self.info["memory_mib"],
                        want_cpus, want_mib, exc)
            return
        log.info("sandbox %s: VM grown to %s vCPU / %s MiB", self.files.root.name,
                 self.info["vcpus"], self.info["memory_mib"])

    # -- root filesystems -----------------------------------------------------------------

    async def share_rootfs(self, container_id: str, mounts: Sequence[MountSpec],
                           host_path: Path) -> str:
        def share() -> str:
            _mounts.mount_rootfs(self.files.rootfs_marks, container_id, mounts, host_path)
            rel = _mounts.bind_into_share(self.files.shared, self.files.rootfs_marks,
                                          container_id, host_path)
            return f"{GUEST_SHARED}/{rel}"

        try:
            return await asyncio.to_thread(share)
        except OSError as exc:
            raise Internal(f"sharing the rootfs of {container_id}: {exc}") from exc

    async def share_volumes(self, container_id: str, spec_json: bytes) -> bytes:
        """Bind the spec's host mounts into the share (``_volumes``)."""
        spec = json.loads(spec_json)
        if not any(isinstance(m, dict) and is_host_bind(m) for m in spec.get("mounts") or ()):
            return spec_json
        try:
            shared = await asyncio.to_thread(_volumes.share, self.files.shared,
                                             self.files.rootfs_marks, container_id, spec)
        except OSError as exc:
            raise Internal(f"sharing the volumes of {container_id}: {exc}") from exc
        return json.dumps(shared).encode()

    async def unshare_rootfs(self, container_id: str, host_path: Path) -> None:
        await asyncio.to_thread(_mounts.unshare, self.files.shared, self.files.rootfs_marks,
                                container_id)

    # -- stop ---------------------------------------------------------------------------

    async def stop(self, timeout: float = 5.0) -> None:
        """QMP ``quit``, SIGKILL after *timeout*; then unmount and remove the
        sandbox's sockets, pid file and share.  Keeps ``agent.log`` (console)
        and ``vmm.log``.  Idempotent; Internal if qemu does not die."""
        try:
            if self.alive():
                try:
                    async with asyncio.timeout(timeout):
                        with contextlib.suppress(Unavailable, Internal):
                            async with self.qmp() as client:
                                await client.execute("quit", timeout=min(timeout, 2.0))
                        await self.wait_exit()
                except TimeoutError:
                    log.warning("VM pid %d ignored quit for %.1fs: SIGKILL", self._pid, timeout)
                await self._kill()
        finally:
            if not self.alive():  # never unmount the share under a running VM
                await asyncio.to_thread(self.cleanup_files)
        self._stopped = True

    async def _kill(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        try:
            async with asyncio.timeout(5.0):
                await self.wait_exit()
        except TimeoutError:
            raise Internal(f"VM pid {self._pid} did not exit within 5s of SIGKILL") from None

    def cleanup_files(self) -> None:
        """Remove what the VM used in the sandbox dir and the pod network's
        redirect (the VM must be gone)."""
        if net := self.info.get("network"):
            _net.teardown(net["netns"], net["veth"])
        _mounts.unshare_all(self.files.shared, self.files.rootfs_marks)
        for path in (*self.files.sockets(PORTS), self.files.pidfile):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._pidfd >= 0:
            self._exit.close()
            os.close(self._pidfd)
            self._pidfd = -1
