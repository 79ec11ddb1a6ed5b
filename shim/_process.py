"""Containers and processes as the shim tracks them.

States move through :mod:`keel.lifecycle`'s table; an illegal call
raises FailedPrecondition naming the current state (containerd's
``process/init_state.go`` does the same with one type per state).  Each
object turns into its persisted record (:mod:`shim.state`) and back.
"""

from __future__ import annotations

import asyncio
import time

from keel.errors import NotFound
from keel.lifecycle import Lifecycle, State
from shim._pumps import InputPump, OutputPump
from shim.state import ContainerRecord, Exit, MountRecord, Offsets, ProcessRecord, Stdio
from shim.vmm.api import MountSpec


def exit_now(status: int) -> Exit:
    """An exit with *status* at the current time."""
    return Exit(status, time.time_ns())


class Process(Lifecycle):
    """One process (init: ``exec_id == ""``) of a container.

    Owned by the sandbox, on the event loop: its pumps and exit watcher
    are set by ``shim._pumps`` and ``shim._exits``.
    """

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
        #: Where a restored (or thawed) process's streams resume.
        self.resume_from = Offsets()
        #: The exit watcher task (WaitProcess long poll).
        self.watcher: asyncio.Task[None] | None = None
        #: True once TaskExit was queued for containerd.
        self.exit_published = exit is not None

    @property
    def name(self) -> str:
        return f"{self.cid}/{self.eid}" if self.eid else self.cid

    @property
    def what(self) -> str:
        return f"exec {self.eid} of container {self.cid}" if self.eid else f"container {self.cid}"

    def offsets(self) -> Offsets:
        """Where each stdio stream stands now (running pumps, else where they resumed)."""
        o = self.resume_from
        out, err = self.outputs.get("stdout"), self.outputs.get("stderr")
        return Offsets(
            stdout=out.offset if out else o.stdout,
            stderr=err.offset if err else o.stderr,
            stdin=self.input.offset if self.input else o.stdin,
            stdout_eof=out.eof.is_set() if out else o.stdout_eof,
            stderr_eof=err.eof.is_set() if err else o.stderr_eof,
            stdin_closed=self.input.closed if self.input else o.stdin_closed,
        )

    def close_stdio(self) -> None:
        for pump in self.outputs.values():
            pump.sink.close()
        if self.input is not None:
            self.input.source.close()

    def record(self) -> ProcessRecord:
        return ProcessRecord(exec_id=self.eid, stdio=self.stdio, pid=self.pid, state=self.state,
                             exit=self.exit, exit_published=self.exit_published,
                             offsets=self.offsets())

    @classmethod
    def from_record(cls, cid: str, rec: ProcessRecord) -> Process:
        p = cls(cid, rec.exec_id, rec.stdio, pid=rec.pid, state=rec.state, exit=rec.exit)
        p.exit_published = rec.exit_published
        if rec.exit is not None and not rec.exit_published:
            p.exited.clear()  # containerd has not been told yet: resume reports it
        p.resume_from = rec.offsets
        return p


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

    def record(self) -> ContainerRecord:
        return ContainerRecord(
            id=self.id, bundle=self.bundle,
            mounts=tuple(MountRecord(m.type, m.source, tuple(m.options)) for m in self.mounts),
            init=self.init.record(), execs=tuple(p.record() for p in self.execs.values()))

    @classmethod
    def from_record(cls, rec: ContainerRecord) -> Container:
        mounts = tuple(MountSpec(m.type, m.source, m.options) for m in rec.mounts)
        c = cls(rec.id, rec.bundle, mounts, Process.from_record(rec.id, rec.init))
        for e in rec.execs:
            p = Process.from_record(rec.id, e)
            c.execs[p.eid] = p
        return c
