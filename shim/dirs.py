"""SandboxDir: the one place that knows every on-disk path of a sandbox.

Layout (DESIGN section 5): ``<state_root>/sandboxes/<id>/`` holds
``state.json``, ``ops.sock`` (opsd), the agent channels, the agent's own
state directory and logs; a VM sandbox adds qemu's QMP socket, pid file
and log, the 9p share and the records of rootfs mounts.  Directories are
0700, sockets 0600.  Backends get the directory as ``LaunchSpec.root``
and name their files through this class too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from keel.errors import InvalidArgument

#: sun_path holds 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107
#: The largest pid Linux hands out (pid_max's ceiling, 2**22).
PID_MAX = 4194304


@dataclass(frozen=True, slots=True)
class SandboxDir:
    root: Path

    @classmethod
    def of(cls, state_root: Path, sandbox_id: str) -> SandboxDir:
        return cls(state_root / "sandboxes" / sandbox_id)

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def ops_socket(self) -> Path:
        return self.root / "ops.sock"

    def ops_socket_tmp(self, pid: int) -> Path:
        """Where the shim of *pid* binds ops.sock before renaming it into place
        (short: it must fit where ops.sock does, ``check_fits``)."""
        return self.root / f".o{pid}"

    def channel(self, name: str) -> Path:
        """Host end of a sandbox channel ("agent", "ops"): the agent's socket
        (process backend) or qemu's chardev socket of a virtio-serial port."""
        return self.root / f"{name}.chan"

    @property
    def agent_state(self) -> Path:
        """The agent's own state directory (process backend: shared path)."""
        return self.root / "agent"

    @property
    def agent_log(self) -> Path:
        """The agent's log; a VM's serial console (kernel messages too)."""
        return self.root / "agent.log"

    @property
    def vmm_log(self) -> Path:
        """The VMM's own stderr."""
        return self.root / "vmm.log"

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "vmm.pid"

    @property
    def shared(self) -> Path:
        """The per-sandbox read-write 9p share (guest: /run/keel/shared)."""
        return self.root / "shared"

    @property
    def rootfs_marks(self) -> Path:
        """Host-only records of the rootfs mounts ``share_rootfs`` made (never shared)."""
        return self.root / "rootfs-mounts"

    def sockets(self, channels: Iterable[str]) -> list[Path]:
        """A VM's unix sockets: QMP and the host end of each of *channels*."""
        return [self.qmp, *(self.channel(name) for name in channels)]

    def check_sockets(self, channels: Iterable[str]) -> None:
        """InvalidArgument if a socket path would not fit in sun_path."""
        for sock in self.sockets(channels):
            if len(str(sock).encode()) > SUN_PATH_MAX:
                raise InvalidArgument(f"sandbox path too long for a unix socket: {sock}")

    def check_fits(self) -> None:
        """InvalidArgument, naming the state root, if any socket of this
        sandbox (ops.sock, the channels, a VM's QMP) would not fit in
        sun_path: checked at ``start``, before a daemon exists."""
        longest = max((self.ops_socket, self.ops_socket_tmp(PID_MAX), *self.sockets(("agent", "ops"))),
                      key=lambda p: len(str(p).encode()))
        size = len(str(longest).encode())
        if size > SUN_PATH_MAX:
            root = self.root.parent.parent
            raise InvalidArgument(
                f"state root {root} is too long for sandbox {self.id}: its socket {longest}"
                f" would be {size} bytes, and a unix socket path takes at most {SUN_PATH_MAX};"
                f" use a state_root of at most {len(str(root).encode()) - size + SUN_PATH_MAX}"
                f" bytes")

    def create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.agent_state.mkdir(mode=0o700, exist_ok=True)

    def exists(self) -> bool:
        return self.root.is_dir()


def sandboxes(state_root: Path) -> list[SandboxDir]:
    """Every sandbox directory under *state_root*, sorted by id."""
    base = state_root / "sandboxes"
    if not base.is_dir():
        return []
    return [SandboxDir(p) for p in sorted(base.iterdir()) if p.is_dir()]
