"""The ops channel's logic: health and identity (agent upgrade comes later).

``UpgradeAgent`` (exec a new release in place, DESIGN section 6) is not
implemented yet; what it will need is already in place: the state file
(agent/state.py) is rewritten after every lifecycle change, every fd to
keep across execve is in the agent's FdTable, the boot id lives in the
state file, and uptime is measured from the process start time (which
execve does not reset).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path

from agent import state
from agent.api import API_VERSION
from agent.errors import Unimplemented


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
    """The installed ``keel`` distribution's version, or ``0+unknown`` from a checkout."""
    try:
        return importlib.metadata.version("keel")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def process_uptime_s(pid: int | None = None) -> float:
    """Seconds since the process started (survives execve, unlike time.monotonic deltas)."""
    stat = Path(f"/proc/{pid or 'self'}/stat").read_text()
    # Field 22 (starttime, clock ticks since boot); fields counted after the ")" of comm.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, boot_uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def health(boot_id: str, containers: int) -> Health:
    return Health(
        ok=True,
        agent_version=agent_version(),
        api_version=API_VERSION,
        agent_pid=os.getpid(),
        boot_id=boot_id,
        containers=containers,
        uptime_s=process_uptime_s(),
        state_schema=state.SCHEMA_VERSION,
    )


def upgrade_agent(agent_path: str, to_version: str) -> None:
    raise Unimplemented(
        f"UpgradeAgent (to {to_version or agent_path!r}) is not implemented by agent "
        f"{agent_version()} yet"
    )
