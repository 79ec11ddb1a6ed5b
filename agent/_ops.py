"""The ops channel's logic: health, identity and RPC activity.

``UpgradeAgent`` (exec a new release in place, DESIGN section 6) lives in
agent/_upgrade.py (old image) and agent/_resume.py (new image).  Health
reports the version of the image now running; uptime is measured from
the process start time, which execve does not reset.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

from agent import state
from agent.api import API_VERSION
from keel import procfs, release


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    agent_version: str
    api_version: int
    agent_pid: int
    boot_id: str
    containers: int
    uptime_s: float
    state_schema: int


def agent_version() -> str:
    """This agent's release (keel.release: package metadata, or the guest image's marker)."""
    return release.version()


def health(boot_id: str, containers: int) -> Health:
    return Health(
        ok=True,
        agent_version=agent_version(),
        api_version=API_VERSION,
        agent_pid=os.getpid(),
        boot_id=boot_id,
        containers=containers,
        uptime_s=procfs.uptime_s(),
        state_schema=state.SCHEMA_VERSION,
    )



class Activity:
    """When the agent last answered an RPC, on the monotonic clock (which survives
    execve: the upgrade gap is the old image's last answer to the new one's first)."""

    def __init__(self) -> None:
        self.last_served_mono_ns = 0
        self._on_first: Callable[[int], None] | None = None

    def served(self) -> None:
        """Called after every answered RPC (success or error, not cancelled)."""
        self.last_served_mono_ns = now = time.monotonic_ns()
        callback, self._on_first = self._on_first, None
        if callback is not None:
            callback(now)

    def on_next_served(self, callback: Callable[[int], None]) -> None:
        """Call *callback(mono_ns)* once, when the next RPC has been answered."""
        self._on_first = callback
