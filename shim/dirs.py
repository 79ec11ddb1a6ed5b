"""SandboxDir: the one place that knows every on-disk path of a sandbox.

Layout (DESIGN section 5): ``<state_root>/sandboxes/<id>/`` holds
``state.json``, ``ops.sock`` (opsd), the agent channels, the agent's own
state directory and logs; a VM sandbox adds qemu's QMP socket, pid file
and log, the 9p share and the records of rootfs mounts.  Directories are
0700, sockets 0600.  Backends get the directory as ``LaunchSpec.root``
and name their files through this class too.

Unix socket paths hold at most 107 bytes.  A sandbox's sockets live in
its directory whenever they fit there (``/run/keel`` with CRI's
64-character pod ids, and every root earlier releases could use: the
layout stays theirs).  Where they would not fit (a long state root), they
live in a short directory of their own, ``<state_root>/c/<16 hex of the
sandbox id's sha256>/``, which works for state roots of up to
:data:`MAX_STATE_ROOT` bytes.  Every component derives the place from the
state root and the id alone, so shim, opsd, ``delete`` and later releases
agree without asking.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from keel.errors import InvalidArgument

#: sun_path holds 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107
#: The largest pid Linux hands out (pid_max's ceiling, 2**22).
PID_MAX = 4194304
#: Socket names a sandbox may have (``ops_socket_tmp`` at its longest).
_SOCKET_NAMES = ("ops.sock", f".o{PID_MAX}", "agent.chan", "ops.chan", "qmp.sock")
#: The short sockets directory: ``<root>/c/<16 hex>/``.
_SHORT = len("/c/") + 16 + 1
#: The longest state root whose sockets fit: a sandbox's in the short
#: directory, and the shim's own, ``<root>/s/<32 hex>`` (the stricter).
MAX_STATE_ROOT = min(SUN_PATH_MAX - _SHORT - max(len(n) for n in _SOCKET_NAMES),
                     SUN_PATH_MAX - len("/s/") - 32)


def _fits(directory: Path) -> bool:
    base = len(os.fsencode(directory)) + 1
    return all(base + len(name) <= SUN_PATH_MAX for name in _SOCKET_NAMES)


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
    def sockets_dir(self) -> Path:
        """Where this sandbox's unix sockets live (see the module's docstring)."""
        if _fits(self.root):
            return self.root
        digest = hashlib.sha256(self.id.encode()).hexdigest()[:16]
        return self.root.parent.parent / "c" / digest

    @property
    def ops_socket(self) -> Path:
        return self.sockets_dir / "ops.sock"

    def ops_socket_tmp(self, pid: int) -> Path:
        """Where the shim of *pid* binds ops.sock before renaming it into place
        (short: it must fit where ops.sock does, ``check_fits``)."""
        return self.sockets_dir / f".o{pid}"

    def channel(self, name: str) -> Path:
        """Host end of a sandbox channel ("agent", "ops"): the agent's socket
        (process backend) or qemu's chardev socket of a virtio-serial port."""
        return self.sockets_dir / f"{name}.chan"

    @property
    def agent_state(self) -> Path:
        """The agent's own state directory (process backend: shared path)."""
        return self.root / "agent"

    @property
    def audit_log(self) -> Path:
        """Console sessions' audit records, JSON lines (0600)."""
        return self.root / "audit.log"

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
        return self.sockets_dir / "qmp.sock"

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
        """InvalidArgument, naming the state root, if this sandbox's sockets
        (ops.sock, the channels, a VM's QMP) cannot fit in sun_path even in
        the short sockets directory: checked at ``start``, before a daemon
        exists."""
        sockets = self.sockets_dir
        root = self.root.parent.parent
        if _fits(sockets) and len(os.fsencode(root)) <= MAX_STATE_ROOT:
            return
        raise InvalidArgument(
            f"state root {root} is too long for sandbox {self.id}: its sockets under {sockets}"
            f" would not fit in a unix socket path ({SUN_PATH_MAX} bytes); use a state_root of"
            f" at most {MAX_STATE_ROOT} bytes")

    def create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.agent_state.mkdir(mode=0o700, exist_ok=True)
        if (sockets := self.sockets_dir) != self.root:
            sockets.parent.mkdir(mode=0o700, exist_ok=True)
            sockets.mkdir(mode=0o700, exist_ok=True)

    def remove(self) -> None:
        """Remove the sandbox directory and its sockets directory (best effort)."""
        shutil.rmtree(self.root, ignore_errors=True)
        if (sockets := self.sockets_dir) != self.root:
            shutil.rmtree(sockets, ignore_errors=True)

    def exists(self) -> bool:
        return self.root.is_dir()

def sandboxes(state_root: Path) -> list[SandboxDir]:
    """Every sandbox directory under *state_root*, sorted by id."""
    base = state_root / "sandboxes"
    if not base.is_dir():
        return []
    return [SandboxDir(p) for p in sorted(base.iterdir()) if p.is_dir()]
