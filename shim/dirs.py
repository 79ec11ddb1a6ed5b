"""SandboxDir: the one place that knows every on-disk path of a sandbox.

Layout (DESIGN section 5): ``<state_root>/sandboxes/<id>/`` holds
``state.json``, ``ops.sock`` (opsd), the agent channels, the agent's own
state directory and logs.  Directories are 0700, sockets 0600.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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

    def channel(self, name: str) -> Path:
        """Host end of a sandbox channel ("agent", "ops")."""
        return self.root / f"{name}.chan"

    @property
    def agent_state(self) -> Path:
        """The agent's own state directory (process backend: shared path)."""
        return self.root / "agent"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    @property
    def vmm_log(self) -> Path:
        return self.root / "vmm.log"

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
