"""The agent's persisted state: ``<state-dir>/state.json`` and ``upgrade.json``.

``state.json`` is written (atomically, through :class:`upgrade.store.StateStore`)
after every lifecycle change: enough for a new agent image exec'd in place
(DESIGN section 6) to resume: containers, processes, pids, exit statuses,
stdin and output offsets, the boot id, and the fds it keeps open.  The
same records answer GetState, so what a resuming shim sees is what a
resuming agent would read.

Offsets are the stream lengths at the time of the last write.  The output
bytes themselves are only in it during an in-place upgrade: then
``handover`` describes the bytes the old image held (output not yet
acknowledged, stdin accepted but not yet written) and where they lie in
the hand-over file, plus the exits the reaper collected that no process
claimed yet.

``upgrade.json`` exists only while an upgrade is in flight (written by the
old image just before ``execve``, removed by the image that commits): how
to start the previous release again, every fd to keep open, and the
timing the new image needs to measure the gap.  It is a separate file so
a rollback still works when ``state.json`` cannot be read, and it is plain
JSON that ``agent/__main__.py`` reads with the standard library only.

Schema history: 1 = first version; 2 = ``handover`` and ``last_upgrade``
(migration :func:`v1_to_v2`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from upgrade.store import StateStore

SCHEMA_VERSION = 2
KIND = "keel-agent-state"
UPGRADE_KIND = "keel-agent-upgrade"
UPGRADE_SCHEMA_VERSION = 1
#: File names under the state directory.
STATE_FILE = "state.json"
UPGRADE_FILE = "upgrade.json"


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
class ConsoleRecord:
    """A console session (agent/_console.py): what an exec'd image resumes it from.

    Its streams travel in the hand-over as those of container ``""``, exec
    ``session_id``; its fds under the roles ``console:<id>:out|err|in|ctl``.
    """

    session_id: str
    pid: int
    terminal: bool
    container_id: str
    exit_status: int | None
    exited_at_ns: int
    stdout_offset: int
    stderr_offset: int
    stdin_offset: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamHandover:
    """Bytes one stream held at the exec: ``[base, base + length)`` of the stream.

    For stdout/stderr: output not acknowledged yet; ``ended``: the pipe hit
    EOF (its fd is closed).  For stdin: bytes accepted but not yet written
    to the process; ``ended``: CloseStdin was asked; ``broken``: why the
    stdin fd went away (the reader closed it), or "".
    """

    container_id: str
    exec_id: str
    #: "stdout", "stderr" or "stdin".
    stream: str
    base: int
    #: Where the bytes lie in the hand-over file.
    position: int
    length: int
    ended: bool
    broken: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ExitRecord:
    """An exit the reaper collected that no process claimed (yet)."""

    pid: int
    status: int
    exited_at_ns: int
    reaped_mono_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class Handover:
    upgrade_id: str
    #: File name (under the state dir) holding every stream's bytes back to back.
    blob: str
    blob_size: int
    blob_sha256: str
    streams: tuple[StreamHandover, ...] = ()
    unclaimed: tuple[ExitRecord, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeResult:
    """How the last in-place upgrade ended (kept for the log and operators)."""

    upgrade_id: str
    from_version: str
    to_version: str
    #: The version now running.
    running_version: str
    rolled_back: bool
    #: Last RPC answered by the old image -> first answered by the new one (0: not yet).
    gap_s: float
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class AgentState:
    #: Random per agent start; kept across an in-place upgrade.
    boot_id: str
    containers: tuple[ContainerRecord, ...] = ()
    #: Role -> fd of every fd the agent holds (see agent._fds).
    fds: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Only between an upgrade's exec and the commit of the image that resumes.
    handover: Handover | None = None
    last_upgrade: UpgradeResult | None = None
    #: The key of the shim session that owns this agent ("" for none: agent/_session.py).
    session_key: str = ""
    consoles: tuple[ConsoleRecord, ...] = ()


def encode(state: AgentState) -> dict[str, Any]:
    return dataclasses.asdict(state)


def _handover(doc: dict[str, Any] | None) -> Handover | None:
    if doc is None:
        return None
    return Handover(
        upgrade_id=str(doc["upgrade_id"]), blob=str(doc["blob"]), blob_size=int(doc["blob_size"]),
        blob_sha256=str(doc["blob_sha256"]),
        streams=tuple(StreamHandover(**s) for s in doc["streams"]),
        unclaimed=tuple(ExitRecord(**e) for e in doc["unclaimed"]),
    )


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
    last = doc.get("last_upgrade")
    return AgentState(boot_id=str(doc["boot_id"]), containers=containers, fds=fds,
                      handover=_handover(doc.get("handover")),
                      last_upgrade=UpgradeResult(**last) if last is not None else None,
                      session_key=str(doc.get("session_key", "")),
                      consoles=tuple(ConsoleRecord(**c) for c in doc.get("consoles", ())))


def v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 had no upgrades: nothing handed over, no last upgrade."""
    return {**doc, "handover": None, "last_upgrade": None}


def store(state_dir: Path) -> StateStore[AgentState]:
    """The state file of the agent whose state directory is *state_dir*."""
    return StateStore(
        state_dir / STATE_FILE,
        kind=KIND,
        version=SCHEMA_VERSION,
        encode=encode,
        decode=decode,
        migrations={1: v1_to_v2},
    )


# -- upgrade.json ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Launch:
    """How to execve an agent image: the exact executable, argv and environment."""

    executable: str
    argv: tuple[str, ...]
    env: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeRecord:
    """An upgrade in flight.  ``agent/__main__.py`` reads ``previous``, ``fds``,
    ``rollbacks`` and ``recoveries`` with plain JSON: keep those names."""

    upgrade_id: str
    from_version: str
    to_version: str
    #: The image that wrote this (argv ends with --resume).
    previous: Launch
    #: The image it execs.
    target: Launch
    #: Role -> fd of everything to keep open across execve (listeners, pipes, ptys).
    fds: dict[str, int]
    #: Monotonic ns (survives execve) of the last RPC the old image answered.
    last_served_mono_ns: int
    #: Monotonic ns just before execve.
    exec_mono_ns: int
    #: Set by the guard when it goes back to ``previous``; at most 1.
    rollbacks: int = 0
    #: Set by the guard when ``previous`` could not resume either; at most 1.
    recoveries: int = 0
    #: Why the last image failed, written by the guard.
    failure: str = ""


def _launch(doc: dict[str, Any]) -> Launch:
    return Launch(str(doc["executable"]), tuple(map(str, doc["argv"])),
                  {str(k): str(v) for k, v in dict(doc["env"]).items()})


def _decode_upgrade(doc: dict[str, Any]) -> UpgradeRecord:
    return UpgradeRecord(
        upgrade_id=str(doc["upgrade_id"]), from_version=str(doc["from_version"]),
        to_version=str(doc["to_version"]), previous=_launch(doc["previous"]),
        target=_launch(doc["target"]), fds={str(k): int(v) for k, v in dict(doc["fds"]).items()},
        last_served_mono_ns=int(doc["last_served_mono_ns"]),
        exec_mono_ns=int(doc["exec_mono_ns"]), rollbacks=int(doc.get("rollbacks", 0)),
        recoveries=int(doc.get("recoveries", 0)), failure=str(doc.get("failure", "")),
    )


def upgrade_store(state_dir: Path) -> StateStore[UpgradeRecord]:
    return StateStore(
        state_dir / UPGRADE_FILE,
        kind=UPGRADE_KIND,
        version=UPGRADE_SCHEMA_VERSION,
        encode=dataclasses.asdict,
        decode=_decode_upgrade,
    )
