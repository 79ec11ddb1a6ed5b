"""What an in-place upgrade hands from the old agent image to the new one.

The old image, frozen (no pump reads, no stdin writes, no reaping), calls
:func:`write`: every stream's held bytes go back to back into
``<state-dir>/handover-<upgrade id>.bin`` and a :class:`state.Handover`
(offsets, positions, a digest, unclaimed exits) goes into the state file.
The new image calls :func:`rebuild`, which only reads: it builds the
containers and processes with their buffers and adopts the inherited fds
into its fd table without touching them, so a resume that fails later can
still hand everything, untouched, back to the previous release.  Only
after the commit does :meth:`Rebuilt.start_io` pump and write again.

The hand-over file is written without fsync: it has to survive an
``execve``, not a machine crash (which the sandbox does not survive).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from agent import state
from agent._console import HANDOVER_CID, Handed
from agent._console import role as console_role
from agent._fds import FdTable
from agent._output import OutputBuffer, OutputPump
from agent._processes import Container, ExitInfo, Process, Stdio
from agent._reaper import Exit
from agent._stdin import StdinWriter
from agent.config import AgentConfig
from keel.lifecycle import State
from upgrade.errors import CorruptState

log = logging.getLogger("keel.agent.handover")

BLOB_PREFIX = "handover-"
#: The container id console sessions' streams travel under (no container has it).
CONSOLES = HANDOVER_CID


def blob_path(state_dir: Path, upgrade_id: str) -> Path:
    return state_dir / f"{BLOB_PREFIX}{upgrade_id}.bin"


#: What write() hands over per stream owner: (container id, exec id, stdout,
#: stderr, stdin).  Processes are one kind; console sessions are the other,
#: under container CONSOLES (``Consoles.streams``).
Streams = tuple[str, str, OutputBuffer, OutputBuffer, StdinWriter | None]


def write(state_dir: Path, upgrade_id: str, processes: Iterable[Process],
          unclaimed: Iterable[Exit], consoles: Iterable[Streams] = ()) -> state.Handover:
    """Write the held bytes of *processes* and console sessions (frozen) to
    the hand-over file; describe them."""
    chunks: list[bytes] = []
    streams: list[state.StreamHandover] = []
    position = 0

    def add(cid: str, eid: str, stream: str, base: int, data: bytes, ended: bool,
            broken: str = "") -> None:
        nonlocal position
        streams.append(state.StreamHandover(cid, eid, stream, base, position, len(data), ended,
                                            broken))
        chunks.append(data)
        position += len(data)

    owners = [(p.container_id, p.exec_id, p.stdout, p.stderr, p.stdin) for p in processes]
    for cid, eid, stdout, stderr, stdin in [*owners, *consoles]:
        add(cid, eid, "stdout", stdout.base, stdout.held(), stdout.eof)
        add(cid, eid, "stderr", stderr.base, stderr.held(), stderr.eof)
        if stdin is not None:
            pending = stdin.pending()
            add(cid, eid, "stdin", stdin.ledger.accepted - len(pending), pending,
                stdin.close_requested, stdin.broken)
    blob = b"".join(chunks)
    path = blob_path(state_dir, upgrade_id)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return state.Handover(
        upgrade_id=upgrade_id, blob=path.name, blob_size=len(blob),
        blob_sha256=hashlib.sha256(blob).hexdigest(), streams=tuple(streams),
        unclaimed=tuple(state.ExitRecord(e.pid, e.status, e.exited_at_ns, e.reaped_mono_ns)
                        for e in unclaimed),
    )


def _read_blob(state_dir: Path, handover: state.Handover) -> bytes:
    path = state_dir / handover.blob
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CorruptState(f"hand-over file {path}: {exc}") from exc
    if len(blob) != handover.blob_size or hashlib.sha256(blob).hexdigest() != handover.blob_sha256:
        raise CorruptState(f"hand-over file {path} does not match the state "
                           f"({len(blob)} bytes, expected {handover.blob_size})")
    return blob


@dataclasses.dataclass
class _PendingIO:
    """The fds of one process, adopted but not started yet."""

    proc: Process
    outputs: list[tuple[int, OutputBuffer, str]]
    pty_fd: int
    stdin_fd: int
    stdin: state.StreamHandover | None
    stdin_pending: bytes


@dataclasses.dataclass
class Rebuilt:
    """The containers an upgrade handed over, ready to adopt; nothing runs yet."""

    containers: list[Container]
    unclaimed: list[Exit]
    #: Inherited fds nobody claimed (closed after the commit).
    leftover_fds: list[int]
    _io: list[_PendingIO]
    consoles: list[Handed] = dataclasses.field(default_factory=list)

    def start_io(self, fds: FdTable, config: AgentConfig) -> None:
        """After the commit: pump the inherited pipes, write pending stdin."""
        for io in self._io:
            name = io.proc.name
            pumps = [OutputPump(fd, buf, fds.close, label) for fd, buf, label in io.outputs]
            writer = None
            if io.stdin is not None:
                writer = StdinWriter.resumed(
                    io.stdin_fd, config.stdin_buffer_bytes, fds.close, f"{name} stdin",
                    accepted=io.stdin.base + io.stdin.length, pending=io.stdin_pending,
                    close_requested=io.stdin.ended, broken=io.stdin.broken,
                    keep_open=io.proc.stdio.terminal)
            io.proc.adopt_io(pumps, writer, io.pty_fd)
            if writer is not None:
                writer.thaw()
        for fd in self.leftover_fds:
            fds.close(fd)


class _Builder:
    def __init__(self, st: state.AgentState, blob: bytes, fds: FdTable, config: AgentConfig):
        assert st.handover is not None
        self._blob = blob
        self._fds = fds
        self._limit = config.output_buffer_bytes
        # Listeners and serial ports are the channels' (agent/_channels.py opens them).
        self._unadopted = {role: fd for role, fd in st.fds.items()
                           if not role.startswith(("listener:", "serial:"))}
        self._streams = {(s.container_id, s.exec_id, s.stream): s for s in st.handover.streams}
        self.io: list[_PendingIO] = []

    def leftovers(self) -> list[int]:
        for role, fd in self._unadopted.items():
            log.warning("inherited fd %d (%s) belongs to nothing; closing it after the commit",
                        fd, role)
            self._fds.adopt(fd, f"leftover:{role}")
        return list(self._unadopted.values())

    def fd(self, role: str) -> int:
        fd = self._unadopted.pop(role, -1)
        return -1 if fd < 0 else self._fds.adopt(fd, role)

    def stream(self, cid: str, eid: str, stream: str) -> tuple[state.StreamHandover, bytes] | None:
        h = self._streams.get((cid, eid, stream))
        if h is None:
            return None
        return h, self._blob[h.position:h.position + h.length]

    def stdin(self, cid: str, eid: str, offset: int, name: str
              ) -> tuple[state.StreamHandover | None, bytes]:
        """The stdin hand-over of *cid*/*eid* and its pending bytes, which must
        end at *offset* (what the state recorded)."""
        found = self.stream(cid, eid, "stdin")
        if found is None:
            return None, b""
        h, data = found
        if h.base + h.length != offset:
            raise CorruptState(f"{name} stdin: hand-over ends at {h.base + h.length}, the state"
                               f" says {offset}")
        return h, data

    def output(self, cid: str, eid: str, stream: str, end: int) -> OutputBuffer:
        found = self.stream(cid, eid, stream)
        if found is None:
            raise CorruptState(f"hand-over has no {stream} of {cid}/{eid}")
        h, data = found
        if h.base + h.length != end:
            raise CorruptState(f"{cid}/{eid} {stream}: hand-over ends at {h.base + h.length}, "
                               f"the state says {end}")
        return OutputBuffer.restored(self._limit, h.base, data, h.ended)

    def process(self, cid: str, rec: state.ProcessRecord) -> Process:
        stdio = Stdio(rec.terminal, rec.stdin, rec.stdout, rec.stderr)
        p = Process(cid, rec.exec_id, stdio, rec.fingerprint, self._limit)
        exit = None if rec.exit_status is None else ExitInfo(rec.exit_status, rec.exited_at_ns)
        p.restore(pid=rec.pid, state=State(rec.state), started=rec.started, exit=exit)
        p.stdout = self.output(cid, rec.exec_id, "stdout", rec.stdout_offset)
        p.stderr = self.output(cid, rec.exec_id, "stderr", rec.stderr_offset)
        name = p.name
        outputs = []
        for stream, buf in (("stdout", p.stdout), ("stderr", p.stderr)):
            fd = self.fd(f"{stream}:{name}:r")
            if fd >= 0:
                outputs.append((fd, buf, f"{name} {stream}"))
        pty_fd = self.fd(f"pty:{name}")
        out = self.fd(f"pty-out:{name}")
        if out >= 0:
            outputs.append((out, p.stdout, f"{name} pty"))
        stdin, pending = self.stdin(cid, rec.exec_id, rec.stdin_offset, name)
        # A pty's writer shares the pty fd (a released one just stays released on thaw).
        stdin_fd = pty_fd if rec.terminal else self.fd(f"stdin:{name}:w")
        self.io.append(_PendingIO(p, outputs, pty_fd, stdin_fd, stdin, pending))
        return p


def _console(builder: _Builder, rec: state.ConsoleRecord) -> Handed:
    sid = rec.session_id
    stdin, pending = builder.stdin(CONSOLES, sid, rec.stdin_offset, f"console {sid}")
    return Handed(rec, builder.output(CONSOLES, sid, "stdout", rec.stdout_offset),
                  builder.output(CONSOLES, sid, "stderr", rec.stderr_offset), stdin, pending,
                  {which: fd for which in ("out", "err", "in", "ctl")
                   if (fd := builder.fd(console_role(sid, which))) >= 0})


def rebuild(st: state.AgentState, state_dir: Path, fds: FdTable,
            config: AgentConfig) -> Rebuilt:
    """Containers, processes and fds of a hand-over state.  Only reads; raises
    CorruptState (or OSError for an fd that is not open) when anything does not fit."""
    if st.handover is None:
        raise CorruptState(f"{state_dir / state.STATE_FILE} has no hand-over: nothing to resume")
    builder = _Builder(st, _read_blob(state_dir, st.handover), fds, config)
    containers = []
    for c in st.containers:
        procs = [builder.process(c.container_id, rec) for rec in c.processes]
        inits = [p for p in procs if not p.exec_id]
        if len(inits) != 1:
            raise CorruptState(f"container {c.container_id} has {len(inits)} init processes")
        container = Container(c.container_id, Path(c.bundle), inits[0])
        container.execs = {p.exec_id: p for p in procs if p.exec_id}
        containers.append(container)
    consoles = [_console(builder, rec) for rec in st.consoles]
    unclaimed = [Exit(e.pid, e.status, e.exited_at_ns, e.reaped_mono_ns)
                 for e in st.handover.unclaimed]
    return Rebuilt(containers, unclaimed, builder.leftovers(), builder.io, consoles)
