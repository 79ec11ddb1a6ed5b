"""Containers and processes as the shim tracks them, with explicit states.

The legal transitions are a table; an illegal call raises
FailedPrecondition naming the current state (containerd's
``process/init_state.go`` does the same with one type per state).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from keel.errors import NotFound
from keel.lifecycle import Lifecycle, State
from shim._pumps import InputPump, OutputPump
from shim.vmm.api import MountSpec


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


class Process(Lifecycle):
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
        #: Output pumps by stream name ("stdout", "stderr"); input pump.
        self.outputs: dict[str, OutputPump] = {}
        self.input: InputPump | None = None
        #: Offsets and flags a restored process resumes from (see record()).
        self.resume_from: dict[str, Any] = {}
        #: The exit watcher task (WaitProcess long poll).
        self.watcher: asyncio.Task[Any] | None = None
        #: True once TaskExit was queued for containerd.
        self.exit_published = exit is not None

    @property
    def name(self) -> str:
        return f"{self.cid}/{self.eid}" if self.eid else self.cid

    @property
    def what(self) -> str:
        return f"exec {self.eid} of container {self.cid}" if self.eid else f"container {self.cid}"

    def offsets(self) -> dict[str, Any]:
        """Where each stdio stream stands, for a shim that resumes."""
        out: dict[str, Any] = dict(self.resume_from)
        for name, pump in self.outputs.items():
            out[name] = pump.offset
            out[f"{name}_eof"] = pump.eof.is_set()
        if self.input is not None:
            out["stdin"] = self.input.offset
            out["stdin_closed"] = self.input.closed
        return out

    def close_stdio(self) -> None:
        for pump in self.outputs.values():
            pump.sink.close()
        if self.input is not None:
            self.input.source.close()

    def record(self) -> dict[str, Any]:
        return {
            "exec_id": self.eid,
            "stdio": dataclasses.asdict(self.stdio),
            "pid": self.pid,
            "state": self.state.value,
            "exit": dataclasses.asdict(self.exit) if self.exit else None,
            "exit_published": self.exit_published,
            "offsets": self.offsets(),
        }


class Container:
    def __init__(self, cid: str, bundle: str, mounts: tuple[MountSpec, ...], init: Process) -> None:
        self.id = cid
        self.bundle = bundle
        self.mounts = mounts
        self.init = init
        self.execs: dict[str, Process] = {}

    def process(self, eid: str) -> Process:
        if not eid:
            return self.init
        try:
            return self.execs[eid]
        except KeyError:
            raise NotFound(f"exec {eid!r} of container {self.id} not found") from None

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bundle": self.bundle,
            "mounts": [dataclasses.asdict(m) for m in self.mounts],
            "init": self.init.record(),
            "execs": [p.record() for p in self.execs.values()],
        }


def process_from_record(cid: str, rec: dict[str, Any]) -> Process:
    """Rebuild a Process persisted by ``Process.record()``."""
    exit = Exit(**rec["exit"]) if rec.get("exit") else None
    p = Process(cid, rec["exec_id"], Stdio(**rec["stdio"]), pid=int(rec["pid"]),
                state=State(rec["state"]), exit=exit)
    p.exit_published = bool(rec.get("exit_published"))
    if exit is not None and not p.exit_published:
        p.exited.clear()  # containerd has not been told yet: resume reports it
    p.resume_from = dict(rec.get("offsets") or {})
    return p


def container_from_record(rec: dict[str, Any]) -> Container:
    mounts = tuple(MountSpec(m["type"], m["source"], tuple(m["options"])) for m in rec["mounts"])
    c = Container(rec["id"], rec["bundle"], mounts, process_from_record(rec["id"], rec["init"]))
    for e in rec["execs"]:
        p = process_from_record(rec["id"], e)
        c.execs[p.eid] = p
    return c
