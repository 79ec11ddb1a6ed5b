"""The ``process`` backend: the agent as PID 1 of new namespaces, no VM.

For tests and hosts without virtualization.  It is NOT a security
boundary: the agent runs as root on the host kernel, in pid, mount, uts,
ipc and network namespaces only.

Channels are unix sockets in the sandbox directory that the agent listens
on.  Root filesystems are mounted inside the sandbox's mount namespace
(``nsenter``), so they never show up in, or leak into, the host's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from keel import procfs
from keel.errors import Internal, NotFound, Unavailable
from shim.dirs import SandboxDir
from shim.vmm._mountcmd import mount_argv
from shim.vmm._sizing import Workload
from shim.vmm.api import (
    AGENT_COMMAND,
    Dialer,
    LaunchSpec,
    MountSpec,
    check_no_agent_annotations,
    check_propagation,
)
from shim.vmm.process import _cgroups
from upgrade.aio import ExitWatch

_log = logging.getLogger("keel.shim.process")


class ProcessSandbox:
    """The agent's process, PID 1 of the sandbox's PID namespace, or (hostPID)
    a subreaper in the host's, with the cgroup of each of its containers
    recorded (``_cgroups``): stopping it kills them too."""

    def __init__(self, spec: LaunchSpec, pid: int, pidfd: int, *, host_pid: bool = False,
                 cgroups: dict[str, str] | None = None) -> None:
        self._spec = spec
        self._pid = pid
        self._pidfd = pidfd
        self._host_pid = host_pid
        #: container id -> cgroup (hierarchy-relative), for a hostPID sandbox.
        self._cgroups = dict(cgroups or {})
        self._exit = ExitWatch(pidfd)

    @property
    def pid(self) -> int:
        return self._pid

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"pid": self._pid,
                               "start_time": procfs.start_time(self._pid) if self.alive() else 0}
        if self._host_pid:
            rec.update(host_pid=True, cgroups=dict(self._cgroups))
        return rec

    async def kill_containers(self) -> None:
        """hostPID: SIGKILL every process of the pod, as a PID 1's death would."""
        if self._cgroups:
            await asyncio.to_thread(_cgroups.kill_all, list(self._cgroups.values()))

    def _socket_path(self, channel: str) -> Path:
        return SandboxDir(self._spec.root).channel(channel)

    def dialer(self, channel: str) -> Dialer:
        path = str(self._socket_path(channel))

        async def dial() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
            return sock

        return dial

    def guest_image(self) -> None:
        return None  # the agent runs on the host: a release's paths are its own

    def pod_netns(self) -> str | None:
        return None  # the agent and the containers live in the pod's namespace itself

    def alive(self) -> bool:
        if self._pidfd < 0:
            return False
        return not select.select([self._pidfd], [], [], 0)[0]

    async def wait_exit(self) -> None:
        """Return once the agent has exited and (hostPID) the pod's processes
        are gone too, as they would be with the PID 1 of a namespace."""
        if self.alive():
            await self._exit.wait()
        try:
            await self.kill_containers()
        except Internal as exc:
            _log.error("sandbox %s: %s", self._spec.sandbox_id, exc)

    async def _nsenter(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        cmd = ["nsenter", "-t", str(self._pid), "-m", "--", *argv]
        return await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, timeout=10, check=False
        )

    async def share_rootfs(
        self, container_id: str, mounts: Sequence[MountSpec], host_path: Path
    ) -> str:
        for m in mounts:
            res = await self._nsenter(*mount_argv(m, host_path))
            if res.returncode != 0:
                raise Internal(
                    f"mount {m.type} rootfs of {container_id}: {res.stderr.decode(errors='replace').strip()}"
                )
        return str(host_path)

    def guest_spec(self, spec_json: bytes) -> bytes:
        # The agent runs on the host: it sees the host's paths.  Host mounts
        # reach the sandbox (a slave of the host's tree), so rslave volumes
        # work; nothing propagates back, so rshared ones cannot.
        spec = json.loads(spec_json)
        check_no_agent_annotations(spec)
        check_propagation(spec, allowed=("rslave", "slave"),
                          why="the sandbox's mount tree is a slave of the host's: mounts"
                              " made in a container never reach the host")
        return spec_json

    async def share_volumes(self, container_id: str, spec_json: bytes) -> bytes:
        if self._host_pid:  # the cgroup is how a stop reaches the container
            spec = json.loads(spec_json)
            self._cgroups[container_id] = _cgroups.resolve(
                (spec.get("linux") or {}).get("cgroupsPath"))
        return spec_json  # host paths are the agent's paths

    async def grow_to(self, workload: Workload) -> None:
        pass  # no VM: the containers' cgroups are the only limits

    async def unshare_rootfs(self, container_id: str, host_path: Path) -> None:
        self._cgroups.pop(container_id, None)  # deleted: runc removed its cgroup
        if not self.alive():
            return  # the mount namespace died with the sandbox
        while True:
            res = await self._nsenter("umount", str(host_path))
            if res.returncode != 0:
                return  # not mounted (any more)

    async def stop(self, timeout: float = 5.0) -> None:
        await self.kill_containers()  # hostPID: the kernel would not
        if not self.alive():
            return
        # PID 1 of the pid namespace: when it dies the kernel kills the rest.
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.wait_exit()
        except TimeoutError:
            raise Internal(f"sandbox pid {self._pid} did not exit within {timeout}s of SIGKILL") from None

    def close(self) -> None:
        if self._pidfd >= 0:
            self._exit.close()
            os.close(self._pidfd)
            self._pidfd = -1


async def _launch_forked(spec: LaunchSpec, argv: list[str], env: dict[str, str], hostname: str,
                         log: str) -> int | None:
    """The agent forked by the launcher that forked this shim (its modules
    are imported there already); None when there is none or it cannot, and
    the caller starts a fresh interpreter.  Only for this release's own agent."""
    sock = os.environ.get("KEEL_LAUNCHER")
    if not sock or tuple(spec.agent_command) != AGENT_COMMAND:
        return None
    from shim import _launcher

    args = argv[len(spec.agent_command):]
    try:
        reply = await asyncio.to_thread(
            _launcher.request, Path(sock),
            {"op": "agent", "argv": args, "env": env, "cwd": os.getcwd(), "hostname": hostname,
             "log": log, "share": sorted(spec.host_namespaces)}, timeout=10.0)
    except _launcher.LauncherError as exc:
        _log.info("launcher did not start the agent (%s); starting it fresh", exc)
        return None
    return int(reply["pid"])


class ProcessBackend:
    name = "process"

    async def launch(self, spec: LaunchSpec) -> ProcessSandbox:
        root = spec.root
        files = SandboxDir(root)
        for chan in ("agent", "ops"):
            files.channel(chan).unlink(missing_ok=True)
        argv = [
            *spec.agent_command,
            "--state-dir", str(files.agent_state),
            "--listen", f"agent=unix:{files.channel('agent')}",
            "--listen", f"ops=unix:{files.channel('ops')}",
            *spec.agent_args,
        ]
        env = {**os.environ, **spec.env}
        hostname, log = spec.sandbox_id[:63], str(root / "agent.log")
        pid = await _launch_forked(spec, argv, env, hostname, log)
        if pid is None:
            share = ",".join(sorted(spec.host_namespaces)) or "-"
            cmd = [sys.executable, "-m", "shim.vmm.process._nsinit", hostname, log, share, "--",
                   *argv]
            res = await asyncio.to_thread(
                subprocess.run, cmd, capture_output=True, timeout=30, env=env, check=False
            )
            if res.returncode != 0 or not res.stdout.strip().isdigit():
                raise Unavailable(
                    f"cannot start process sandbox: {res.stderr.decode(errors='replace').strip()}"
                )
            pid = int(res.stdout)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise Unavailable(f"sandbox agent (pid {pid}) exited at once; see {root / 'agent.log'}") from None
        return ProcessSandbox(spec, pid, pidfd, host_pid="pid" in spec.host_namespaces)

    def restore(self, spec: LaunchSpec, record: Mapping[str, Any]) -> ProcessSandbox:
        pid = int(record["pid"])
        cgroups = {str(k): str(v) for k, v in (record.get("cgroups") or {}).items()}
        try:
            pidfd = procfs.open_pidfd(pid, int(record["start_time"]))
        except (ProcessLookupError, FileNotFoundError):
            if cgroups:  # hostPID: the dead agent's pod dies with it, as in a PID namespace
                _cgroups.kill_all(cgroups.values())
            raise NotFound(f"sandbox {spec.sandbox_id}: agent pid {pid} is gone") from None
        return ProcessSandbox(spec, pid, pidfd, host_pid=bool(record.get("host_pid")),
                              cgroups=cgroups)

    def close_fds(self, sandbox: Any) -> None:
        sandbox.close()


def wait_gone(pid: int, timeout: float) -> bool:
    """Poll until *pid* no longer exists (for callers without a pidfd)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.01)
    return False
