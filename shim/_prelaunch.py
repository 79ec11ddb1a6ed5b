"""Launching a new shim's sandbox while the daemon is still importing.

A daemon that ``start`` spawned for a new sandbox gets, as its first
Create, the task whose bundle is its working directory, and the sandbox
that Create needs is sized from that bundle's OCI spec.  Launching it from
that spec before the daemon imports its heavy modules overlaps two
start-ups that otherwise follow each other: the daemon's imports and the
backend's (for ``process``, the agent's own interpreter start-up).

Create adopts the launch (:meth:`Prelaunch.take`) when its spec is the one
launched for; a different spec, or a daemon that exits without a Create,
stops the launched sandbox (:meth:`Prelaunch.aclose`).  Light on purpose:
only modules the daemon cannot do without are imported here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from shim.config import ShimConfig
from shim.dirs import SandboxDir
from shim.vmm import _sizing
from shim.vmm import backend as get_backend
from shim.vmm.api import AGENT_COMMAND, Backend, LaunchSpec
from shim.vmm.api import Sandbox as VmmSandbox

log = logging.getLogger("keel.shim.prelaunch")


def launch_spec(sandbox_id: str, config: ShimConfig, root: Path,
                spec: dict[str, Any] | None = None) -> LaunchSpec:
    """What the backend gets; *spec* (the first container's OCI spec) gives
    the pod's network namespace and size."""
    cmd = config.agent_command or AGENT_COMMAND
    size = _sizing.workload([spec] if spec else [])
    return LaunchSpec(sandbox_id=sandbox_id, root=root, agent_command=cmd,
                      agent_args=("--runtime", config.runtime),
                      netns=netns_path(spec) if spec else None,
                      workload_vcpus=size.vcpus, workload_memory_mib=size.memory_mib,
                      host_namespaces=host_namespaces(spec) if spec else frozenset(),
                      shm_source=_sizing.shm_source(spec) if spec else "")


#: Namespace types a sandbox may share with the host (Kubernetes hostNetwork,
#: hostIPC, hostPID, and the UTS namespace that comes with hostNetwork).
SHAREABLE = ("network", "ipc", "uts", "pid")


def host_namespaces(spec: dict[str, Any]) -> frozenset[str]:
    """The types of :data:`SHAREABLE` that *spec* does not list: the host's."""
    listed = {ns.get("type") for ns in (spec.get("linux") or {}).get("namespaces") or ()
              if isinstance(ns, dict)}
    return frozenset(t for t in SHAREABLE if t not in listed)


def netns_path(spec: dict[str, Any]) -> str | None:
    """The network namespace path of an OCI spec (the pod's, set up by CNI), if any."""
    for ns in (spec.get("linux") or {}).get("namespaces") or ():
        if ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return None


class Prelaunch:
    """One sandbox launch in flight or done, for the first Create to adopt.

    Owns the launch task and, until :meth:`take` hands it over, the sandbox
    it starts.  The daemon must ``await aclose()`` before it exits.
    """

    def __init__(self, spec: dict[str, Any], backend: Backend,
                 task: asyncio.Task[VmmSandbox]) -> None:
        self.spec = spec
        self._backend = backend
        self._task: asyncio.Task[VmmSandbox] | None = task

    async def take(self, spec: dict[str, Any] | None) -> VmmSandbox | None:
        """The launched sandbox if it was launched for *spec* (raising what the
        launch raised); None otherwise, after stopping it.  Once only."""
        task = self._task
        if task is None:
            return None
        if spec != self.spec:
            log.info("first container's spec differs from its bundle's; relaunching")
            await self.aclose()
            return None
        self._task = None
        return await task

    async def aclose(self) -> None:
        """Stop the launched sandbox unless :meth:`take` handed it over (idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        try:
            vm = await task
        except Exception as exc:  # nobody asked for it: only worth a line
            log.info("unused sandbox launch failed: %s", exc)
            return
        try:
            await vm.stop()
        finally:
            self._backend.close_fds(vm)


async def start(sandbox_id: str, config: ShimConfig, bundle: Path) -> Prelaunch | None:
    """Begin launching the sandbox for the OCI spec in *bundle*; None when
    there is no readable spec (Create then reports the problem)."""
    try:
        spec = json.loads((bundle / "config.json").read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(spec, dict):
        return None
    backend = get_backend(config.backend)
    sdir = SandboxDir.of(config.state_root, sandbox_id)
    sdir.create()
    task = asyncio.get_running_loop().create_task(
        backend.launch(launch_spec(sandbox_id, config, sdir.root, spec)),
        name=f"prelaunch-{sandbox_id}")
    await asyncio.sleep(0)  # let the launch reach its first wait before the caller imports
    return Prelaunch(spec, backend, task)
