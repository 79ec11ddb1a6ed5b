"""Containers and processes as the shim tracks them, with explicit states.

The legal transitions are a table; an illegal call raises
FailedPrecondition naming the current state (containerd's
``process/init_state.go`` does the same with one type per state).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from typing import Any

from agent.errors import FailedPrecondition
from shim._pumps import InputPump, OutputPump
from shim.vmm.api import MountSpec


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


_LEGAL: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.RUNNING, State.STOPPED}),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPED}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPED}),
    State.STOPPED: frozenset(),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Exit:
    status: int
    at_ns: int

    @classmethod
    def now(cls, status: int) -> Exit:
        return cls(status, time.time_ns())


@dataclasses.dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Process:
    """One process (init: ``exec_id == ""``) of a container."""

    def __init__(self, cid: str, eid: str, stdio: Stdio, *, pid: int = 0,
                 state: State = State.CREATED, exit: Exit | None = None) -> None:
        self.cid = cid
        self.eid = eid
        self.stdio = stdio
        self.pid = pid
        self.state = state
        self.exit = exit
        self.exited = asyncio.Event()
        if exit is not None:
            self.exited.set()
        self.outputs: list[OutputPump] = []
        self.input: InputPump | None = None
        #: Tasks (pumps, exit watcher) owned by this process; cancelled on delete.
        self.tasks: list[asyncio.Task[Any]] = []
        #: True once TaskExit was queued for containerd.
        self.exit_published = exit is not None

    @property
    def name(self) -> str:
        return f"{self.cid}/{self.eid}" if self.eid else self.cid

    def to(self, new: State) -> None:
        if new is self.state:
            return
        if new not in _LEGAL[self.state]:
            raise FailedPrecondition(f"process {self.name} is {self.state.value}, cannot become {new.value}")
        self.state = new

    def require(self, *states: State, action: str) -> None:
        if self.state not in states:
            raise FailedPrecondition(f"cannot {action} {self.name}: it is {self.state.value}")

    def cancel_tasks(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.tasks.clear()

    def record(self) -> dict[str, Any]:
        return {
            "exec_id": self.eid,
            "stdio": dataclasses.asdict(self.stdio),
            "pid": self.pid,
            "state": self.state.value,
            "exit": dataclasses.asdict(self.exit) if self.exit else None,
            "exit_published": self.exit_published,
            "offsets": {
                "stdout": self.outputs[0].offset if len(self.outputs) > 0 else 0,
                "stderr": self.outputs[1].offset if len(self.outputs) > 1 else 0,
                "stdin": self.input.offset if self.input else 0,
            },
        }


class Container:
    def __init__(self, cid: str, bundle: str, mounts: tuple[MountSpec, ...], init: Process) -> None:
        self.id = cid
        self.bundle = bundle
        self.mounts = mounts
        self.init = init
        self.execs: dict[str, Process] = {}

    def process(self, eid: str) -> Process:
        from agent.errors import NotFound

        if not eid:
            return self.init
        try:
            return self.execs[eid]
        except KeyError:
            raise NotFound(f"exec {eid!r} of container {self.id} not found") from None

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bundle": self.bundle,
            "mounts": [dataclasses.asdict(m) for m in self.mounts],
            "init": self.init.record(),
            "execs": [p.record() for p in self.execs.values()],
        }
