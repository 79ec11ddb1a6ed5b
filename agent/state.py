"""The agent's persisted state: ``<state-dir>/state.json``.

Written (atomically, through :class:`upgrade.store.StateStore`) after
every lifecycle change: enough for a new agent image exec'd in place
(DESIGN section 6) to resume: containers, processes, pids, exit statuses,
stdin and output offsets, the boot id, and the fds it keeps open.  The
same records answer GetState, so what a resuming shim sees is what a
resuming agent would read.

Offsets are the stream lengths at the time of the last write; the output
bytes themselves are not in this file.

Schema history: 1 = first version.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from upgrade.store import StateStore

SCHEMA_VERSION = 1
KIND = "keel-agent-state"


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessRecord:
    exec_id: str
    pid: int
    #: One of agent._processes.State values: created, running, paused, stopped.
    state: str
    started: bool
    terminal: bool
    stdin: bool
    stdout: bool
    stderr: bool
    exit_status: int | None
    exited_at_ns: int
    stdin_offset: int
    stdout_offset: int
    stderr_offset: int
    stdin_closed: bool
    fingerprint: str


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerRecord:
    container_id: str
    bundle: str
    processes: tuple[ProcessRecord, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class AgentState:
    #: Random per agent start; kept across an in-place upgrade.
    boot_id: str
    containers: tuple[ContainerRecord, ...] = ()
    #: Role -> fd of every fd the agent holds (see agent._fds).
    fds: dict[str, int] = dataclasses.field(default_factory=dict)


def encode(state: AgentState) -> dict[str, Any]:
    return dataclasses.asdict(state)


def decode(doc: dict[str, Any]) -> AgentState:
    """A current-version document -> AgentState; KeyError/TypeError on bad shape."""
    containers = tuple(
        ContainerRecord(
            container_id=str(c["container_id"]),
            bundle=str(c["bundle"]),
            processes=tuple(ProcessRecord(**p) for p in c["processes"]),
        )
        for c in doc["containers"]
    )
    fds = {str(k): int(v) for k, v in dict(doc.get("fds", {})).items()}
    return AgentState(boot_id=str(doc["boot_id"]), containers=containers, fds=fds)


def store(state_dir: Path) -> StateStore[AgentState]:
    """The state file of the agent whose state directory is *state_dir*."""
    return StateStore(
        state_dir / "state.json",
        kind=KIND,
        version=SCHEMA_VERSION,
        encode=encode,
        decode=decode,
        migrations={},
    )
