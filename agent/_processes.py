"""Processes and containers: the state machine and each process's stdio.

A container is its init process (exec_id ``""``) plus exec processes.
Every process moves through an explicit state machine; an illegal call
raises FailedPrecondition naming the current state.  The container's
state is its init's state (PAUSED exists only there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

from agent import state
from agent._fds import FdTable
from agent._output import OutputBuffer, OutputPump, enlarge_pipe
from agent._stdin import StdinWriter
from keel.errors import NotFound
from keel.lifecycle import Lifecycle, State

log = logging.getLogger("keel.agent.processes")


@dataclasses.dataclass(frozen=True, slots=True)
class Stdio:
    """Which streams a process has; a terminal means one pty for all of them."""

    terminal: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ExitInfo:
    status: int
    exited_at_ns: int


class Process(Lifecycle):
    """One process.  Its fields are owned by the agent core, on the event loop."""

    log_moves = True

    def __init__(self, container_id: str, exec_id: str, stdio: Stdio, fingerprint: str,
                 output_limit: int) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        #: Digest of the request that made it: an identical retry is not an error.
        self.fingerprint = fingerprint
        self.pid = 0
        self.state = State.CREATED
        self.started = False
        self.exit: ExitInfo | None = None
        self.stdout = OutputBuffer(output_limit)
        self.stderr = OutputBuffer(output_limit)
        self.stdin: StdinWriter | None = None
        self.pty_fd = -1
        self.removed = False
        self._pumps: list[OutputPump] = []
        self._done = asyncio.Event()
        if not (stdio.stdout or stdio.terminal):
            self.stdout.close()
        if not stdio.stderr or stdio.terminal:
            self.stderr.close()  # a terminal merges stderr into the pty (stdout)

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def what(self) -> str:
        kind = f"exec {self.exec_id} of container" if self.exec_id else "container"
        return f"{kind} {self.container_id}"

    def on_exit(self, status: int, exited_at_ns: int) -> None:
        """Called once by the reaper: record the status and wake every waiter."""
        self.exit = ExitInfo(status, exited_at_ns)
        self.to(State.STOPPED, "record the exit of")
        self._done.set()

    async def wait_exit(self) -> ExitInfo:
        """Block until exit; NotFound if the process is removed meanwhile."""
        await self._done.wait()
        if self.exit is None:
            raise NotFound(f"{self.what} was removed")
        return self.exit

    def attach(self, pipes: ChildPipes, fds: FdTable, pty_fd: int, stdin_limit: int) -> None:
        """Take over the parent ends of a started process's stdio."""
        if pty_fd >= 0:
            self.pty_fd = pty_fd
            out = fds.add(os.dup(pty_fd), f"pty-out:{self.name}")
            self._pumps.append(OutputPump(out, self.stdout, fds.close, f"{self.name} pty"))
            self.stdin = StdinWriter(pty_fd, stdin_limit, fds.close, f"{self.name} stdin",
                                     keep_open=True)
            return
        for buf, fd, stream in ((self.stdout, pipes.stdout_r, "stdout"),
                                (self.stderr, pipes.stderr_r, "stderr")):
            if fd >= 0:
                self._pumps.append(OutputPump(fd, buf, fds.close, f"{self.name} {stream}"))
        if pipes.stdin_w >= 0:
            self.stdin = StdinWriter(pipes.stdin_w, stdin_limit, fds.close, f"{self.name} stdin")
        pipes.handed_over()

    def record(self) -> state.ProcessRecord:
        """What the state file keeps of this process."""
        return state.ProcessRecord(
            exec_id=self.exec_id,
            pid=self.pid,
            state=self.state.value,
            started=self.started,
            terminal=self.stdio.terminal,
            stdin=self.stdio.stdin,
            stdout=self.stdio.stdout,
            stderr=self.stdio.stderr,
            exit_status=self.exit.status if self.exit else None,
            exited_at_ns=self.exit.exited_at_ns if self.exit else 0,
            stdin_offset=self.stdin.ledger.accepted if self.stdin else 0,
            stdout_offset=self.stdout.end,
            stderr_offset=self.stderr.end,
            stdin_closed=bool(self.stdin and self.stdin.closed),
            fingerprint=self.fingerprint,
        )

    # -- in-place upgrade ---------------------------------------------

    def freeze_io(self) -> None:
        """Stop pumping output and writing stdin; the fds stay open (for the exec)."""
        for pump in self._pumps:
            pump.stop_reading()
        if self.stdin is not None:
            self.stdin.freeze()

    def thaw_io(self) -> None:
        """Undo :meth:`freeze_io` (the exec failed, or the new image has committed)."""
        for pump in self._pumps:
            pump.start_reading()
        if self.stdin is not None:
            self.stdin.thaw()

    def pumped_fds(self) -> list[int]:
        return [pump.fd for pump in self._pumps if pump.fd >= 0]

    def restore(self, *, pid: int, state: State, started: bool, exit: ExitInfo | None) -> None:
        """Set what an upgrade handed over (the process object was just made)."""
        self.pid, self.state, self.started, self.exit = pid, state, started, exit
        if exit is not None:
            self._done.set()

    def adopt_io(self, pumps: list[OutputPump], stdin: StdinWriter | None, pty_fd: int) -> None:
        """Take the pumps and stdin writer an upgrade rebuilt on inherited fds."""
        self._pumps = pumps
        self.stdin = stdin
        self.pty_fd = pty_fd

    def release(self, fds: FdTable) -> None:
        """Close every fd and buffer of the process (on RemoveProcess)."""
        self.removed = True
        for pump in self._pumps:
            pump.close()
        if self.stdin is not None:
            self.stdin.abort()
        fds.close(self.pty_fd)
        self.pty_fd = -1
        self._done.set()


class ChildPipes:
    """The pipes for a process about to be spawned by the runtime.

    ``child_fds()`` are what the runtime (hence the process) gets;
    streams not requested get /dev/null.  After a successful spawn call
    ``close_child_ends()`` then hand the parent ends to the process
    (:meth:`Process.attach`); ``close()`` closes whatever is still ours.
    """

    def __init__(self, stdio: Stdio, fds: FdTable, name: str) -> None:
        self._fds = fds
        self.stdin_w = self.stdout_r = self.stderr_r = -1
        devnull = self._own(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC), f"devnull:{name}")
        ins, outs, errs = devnull, devnull, devnull
        if not stdio.terminal:
            if stdio.stdin:
                ins, self.stdin_w = self._pipe(f"stdin:{name}")
            if stdio.stdout:
                self.stdout_r, outs = self._pipe(f"stdout:{name}")
                enlarge_pipe(outs)
            if stdio.stderr:
                self.stderr_r, errs = self._pipe(f"stderr:{name}")
                enlarge_pipe(errs)
        self._child_fds: tuple[int, int, int] | tuple[()] = (ins, outs, errs)

    def _own(self, fd: int, role: str) -> int:
        return self._fds.add(fd, role)

    def _pipe(self, role: str) -> tuple[int, int]:
        """(read end, write end), both registered in the fd table."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self._own(r, role + ":r")
        self._own(w, role + ":w")
        return r, w

    def child_fds(self) -> tuple[int, int, int]:
        if not self._child_fds:
            raise RuntimeError("child ends already closed")
        return self._child_fds

    def close_child_ends(self) -> None:
        """Close our copies of the child's ends (once: fd numbers get reused)."""
        for fd in {*self._child_fds}:
            self._fds.close(fd)
        self._child_fds = ()

    def handed_over(self) -> None:
        self.stdin_w = self.stdout_r = self.stderr_r = -1

    def close(self) -> None:
        self.close_child_ends()
        for fd in (self.stdin_w, self.stdout_r, self.stderr_r):
            self._fds.close(fd)
        self.handed_over()


class Container:
    """A container: its init process, its exec processes and its bundle."""

    def __init__(self, container_id: str, bundle: Path, init: Process) -> None:
        self.id = container_id
        self.bundle = bundle
        self.init = init
        self.execs: dict[str, Process] = {}
        #: Serialises lifecycle calls on this container (create, start, kill...).
        self.lock = asyncio.Lock()

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"exec {exec_id} of container {self.id} not found") from None

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]
