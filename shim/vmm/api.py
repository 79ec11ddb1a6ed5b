"""The VMM backend interface: small Protocols and one registry.

A backend launches a sandbox (a VM, or namespaces for ``process``), says
how to reach a channel of it, shares container root filesystems into it,
reports liveness through a pidfd and stops it.  Everything else (agent
protocol, state, upgrade) is identical across backends.

Both creating a sandbox and restoring one after a shim handoff go through
the same registry: ``BACKENDS[name](config)`` gives a Backend; a Backend
either ``launch``es a new sandbox or ``restore``s one from the record a
previous shim persisted.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.api import NET_SYSCTLS_ANNOTATION
from keel.errors import InvalidArgument

if TYPE_CHECKING:
    from shim.vmm._sizing import Workload

#: Connects a new stream socket to one channel of a sandbox.
Dialer = Callable[[], Awaitable[socket.socket]]

#: This release's own agent (``LaunchSpec.agent_command`` unless configured).
AGENT_COMMAND = (sys.executable, "-m", "agent")


@dataclass(frozen=True, slots=True)
class MountSpec:
    """One rootfs mount as containerd sends it (no target)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What a backend needs to start a sandbox."""

    sandbox_id: str
    #: The sandbox directory (sockets, logs, agent state for ``process``).
    root: Path
    #: argv of the agent, without channel or state arguments.
    agent_command: Sequence[str]
    #: Extra arguments the agent gets (runtime, log level).
    agent_args: Sequence[str] = ()
    vcpus: int = 1
    memory_mib: int = 256
    env: Mapping[str, str] = field(default_factory=dict)
    #: The pod's network namespace (the OCI spec's ``network`` namespace path),
    #: for backends that must carry it into the sandbox (a VM); None: none.
    netns: str | None = None
    #: What the pod's containers ask for on top of the base size
    #: (``shim.vmm._sizing.workload``); backends with a fixed size ignore it.
    workload_vcpus: int = 0
    workload_memory_mib: int = 0
    #: OCI namespace types ("network", "ipc", "uts", "pid") the pod shares
    #: with the host: the first container's spec does not list them (OCI:
    #: an unlisted type is the runtime's own).  A backend honours them or
    #: refuses the launch with InvalidArgument; it never silently isolates.
    host_namespaces: frozenset[str] = frozenset()
    #: The host tmpfs the first container binds at /dev/shm (the pod's shared
    #: memory), whose size a VM gives its own /dev/shm; "": none.
    shm_source: str = ""


def is_host_bind(m: Mapping[str, Any]) -> bool:
    """True for an OCI mount of a host path (type "bind" or a bind option)."""
    return m.get("type") == "bind" or bool({"bind", "rbind"} & set(m.get("options") or ()))


#: Mount propagation options of the OCI spec that let mounts cross the
#: boundary between host and container (private ones never do).
PROPAGATION = ("shared", "rshared", "slave", "rslave", "unbindable", "runbindable")


def check_propagation(spec: Mapping[str, Any], *, allowed: Sequence[str], why: str) -> None:
    """InvalidArgument if a mount of *spec* (or its rootfs) asks for a
    propagation other than private or one of *allowed*, naming the mount and
    *why* the backend cannot give it (Kubernetes: mountPropagation)."""
    asks = [("the root filesystem", str((spec.get("linux") or {}).get("rootfsPropagation") or ""))]
    for m in spec.get("mounts") or ():
        if isinstance(m, Mapping):
            asks += [(f"mount {m.get('destination')}", str(o)) for o in m.get("options") or ()]
    for what, option in asks:
        if option in PROPAGATION and option not in allowed:
            raise InvalidArgument(f"{what} asks for {option} mount propagation, which this"
                                  f" backend cannot give: {why}")


def check_no_agent_annotations(spec: Mapping[str, Any]) -> None:
    """InvalidArgument if *spec* already carries an annotation that only a
    backend's ``guest_spec`` may write (the agent acts on it)."""
    if NET_SYSCTLS_ANNOTATION in (spec.get("annotations") or {}):
        raise InvalidArgument(f"annotation {NET_SYSCTLS_ANNOTATION} is Keel's own; a container"
                              " spec may not set it")


class Sandbox(Protocol):
    """A running sandbox as one backend sees it."""

    @property
    def pid(self) -> int:
        """Host pid of the VMM (``process``: of the agent)."""

    def record(self) -> dict[str, Any]:
        """JSON-able identity a later shim passes to ``Backend.restore``."""

    def dialer(self, channel: str) -> Dialer:
        """Connect to channel "agent" or "ops"."""

    def alive(self) -> bool:
        """True while the sandbox process runs (pidfd, not a pid guess)."""

    def pod_netns(self) -> str | None:
        """The pod's network namespace on the host when the pod's servers are
        not reachable from it (a VM): its localhost is relayed into the
        sandbox for CRI PortForward (shim/_portforward.py).  None otherwise."""

    async def wait_exit(self) -> None:
        """Return when the sandbox process has ended."""

    async def share_rootfs(
        self, container_id: str, mounts: Sequence[MountSpec], host_path: Path
    ) -> str:
        """Make the container's root filesystem visible to the agent.

        *host_path* is the bundle's ``rootfs`` directory; when *mounts* is
        empty it already holds the filesystem.  Returns the path the agent
        must use.  Raises Internal when a mount fails.
        """

    async def share_volumes(self, container_id: str, spec_json: bytes) -> bytes:
        """Make the container's host bind mounts visible to the agent; returns
        the spec with their sources as the agent sees them (after
        ``guest_spec``).  Raises InvalidArgument for a source that does not
        exist, Internal when a mount fails."""

    def guest_image(self) -> tuple[str, dict[str, Any]] | None:
        """The id and manifest of the image the guest booted (a VM), or None
        when the agent runs on the host (its paths are the host's)."""

    async def unshare_rootfs(self, container_id: str, host_path: Path) -> None:
        """Undo ``share_rootfs`` and ``share_volumes``; idempotent, and safe
        after a partial share."""

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the sandbox and everything in it; idempotent."""

    def guest_spec(self, spec_json: bytes) -> bytes:
        """The OCI spec as the agent in this sandbox must see it (a VM
        rewrites host-only parts, such as the pod's netns path)."""

    async def grow_to(self, workload: Workload) -> None:
        """Grow the sandbox to its base size plus *workload*, as far as it
        can (hotplug); a sandbox of fixed size does nothing.  Never shrinks."""


class Backend(Protocol):
    name: str

    async def launch(self, spec: LaunchSpec) -> Sandbox:
        """Start a sandbox; raises Unavailable/Internal with a clear message."""

    def restore(self, spec: LaunchSpec, record: Mapping[str, Any]) -> Sandbox:
        """Re-attach to a running sandbox from its persisted record.

        Raises NotFound when the sandbox process is gone.
        """

    def close_fds(self, sandbox: Sandbox) -> None:
        """Release this process's handles (pidfd, sockets) without stopping."""


BackendFactory = Callable[[], Backend]
