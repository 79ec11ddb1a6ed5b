"""Debug console sessions: processes the agent runs with its own tools.

A session is a command (a login shell unless told) that the agent spawns
itself, not through the OCI runtime: in the sandbox (the guest VM's root
on qemu, the sandbox's namespaces on the process backend), or in one
container's namespaces and cgroups but on the agent's filesystem, so that a
container image without a shell can still be debugged (its files are under
``$KEEL_CONTAINER_ROOT``, ``/proc/<its pid>/root``).  With a terminal the session gets a pseudo-terminal
of its own (a new session and process group, the pty as its controlling
terminal); without, three pipes.

Its streams are addressed by offset exactly like a container's output
(``agent._output``) and stdin (``agent._stdin``): a reader acknowledges by
reading on, a writer that reconnects resends from its offset and nothing is
lost or doubled.  That is what lets opsd carry a session across a shim
upgrade.  Buffers are bounded (the output buffer size of the agent's config):
a slow reader stops the session's writes, never grows memory.

Sessions cross an agent upgrade as containers' processes do: their fds are
in the agent's fd table (kept across the exec), :meth:`Consoles.freeze`
stops their I/O, the bytes held go into the hand-over with the session
records (:meth:`records`, :meth:`streams`), and the new image rebuilds them
(:meth:`Consoles.adopt`): same process, same offsets.  An exited session
nobody reads for :data:`EXITED_TTL_S` is removed; at most
:data:`MAX_SESSIONS` exist at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import shutil
import signal
import termios
import time
from collections.abc import Callable, Mapping, Sequence

from agent import state
from agent._fds import FdTable
from agent._output import OutputBuffer, OutputPump
from agent._reaper import Exit, Reaper
from agent._stdin import StdinWriter
from keel import ids
from keel.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger("keel.agent.console")

MAX_SESSIONS = 16
#: The container id sessions' streams travel under in a hand-over (no container has it).
HANDOVER_CID = ""
#: How long an exited session stays for a reader that went away.
EXITED_TTL_S = 300.0
DEFAULT_COMMAND = ("/bin/sh", "-l")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ARGV = 256
MAX_ARG_BYTES = 64 * 1024
MAX_ENV = 32
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: Runs the command inside *pid*'s cgroups, then its namespaces (not its
#: mount namespace: the tools are ours).  ``sh -c`` moves itself into every
#: cgroup before it execs, so nothing the command forks escapes them.
_JOIN = ('while [ "$1" != -- ]; do echo $$ 2>/dev/null > "$1" || {'
         ' echo "keel console: cannot join the container\'s cgroup $1" >&2; exit 125; };'
         ' shift; done; shift; exec "$@"')


@dataclasses.dataclass(slots=True)
class Session:
    id: str
    pid: int
    terminal: bool
    container_id: str
    stdout: OutputBuffer
    stderr: OutputBuffer
    stdin: StdinWriter
    pumps: list[OutputPump]
    #: A terminal's control fd (resizes), -1 without one.
    control: int = -1
    exit: Exit | None = None
    exited: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    last_read: float = dataclasses.field(default_factory=time.monotonic)

    def record(self) -> state.ConsoleRecord:
        return state.ConsoleRecord(
            self.id, self.pid, self.terminal, self.container_id,
            self.exit.status if self.exit else None, self.exit.exited_at_ns if self.exit else 0,
            self.stdout.end, self.stderr.end, self.stdin.ledger.accepted)


@dataclasses.dataclass(slots=True)
class Handed:
    """A session as the hand-over describes it (agent/_handover.py), before adopt."""

    record: state.ConsoleRecord
    stdout: OutputBuffer
    stderr: OutputBuffer
    #: The stdin stream's hand-over and its pending bytes (None: nothing held).
    stdin: state.StreamHandover | None
    stdin_pending: bytes
    #: Role suffix ("out", "err", "in", "ctl") -> adopted fd.
    fds: dict[str, int]


def role(sid: str, which: str) -> str:
    """The fd table role of session *sid*'s fd *which* (out, err, in, ctl)."""
    return f"console:{sid}:{which}"


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    argv = tuple(argv) or DEFAULT_COMMAND
    if len(argv) > MAX_ARGV or sum(len(a.encode()) for a in argv) > MAX_ARG_BYTES:
        raise InvalidArgument(f"command too long (at most {MAX_ARGV} arguments, "
                              f"{MAX_ARG_BYTES} bytes)")
    if any("\0" in a for a in argv) or not argv[0]:
        raise InvalidArgument("command: empty program or NUL in an argument")
    return argv


def _environment(extra: Mapping[str, str], terminal: bool) -> dict[str, str]:
    if len(extra) > MAX_ENV:
        raise InvalidArgument(f"at most {MAX_ENV} environment variables")
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm" if terminal else "dumb"}
    for name, value in extra.items():
        if not _ENV_NAME.fullmatch(name) or "\0" in value or len(value) > 4096:
            raise InvalidArgument(f"bad environment variable {name[:64]!r}")
        env[name] = value
    return env


def cgroup_procs(pid: int) -> list[str]:
    """The ``cgroup.procs`` files of every cgroup *pid* is in (v1 and v2)."""
    files = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            names = [c.removeprefix("name=") for c in controllers.split(",") if c]
            base = "/sys/fs/cgroup" + (f"/{','.join(names)}" if names else "")
            procs = f"{base}{path.rstrip('/')}/cgroup.procs"
            if os.path.exists(procs):
                files.append(procs)
    return files


class Consoles:
    """Every console session of this agent.  *container_pid* names the init
    pid of a running container (NotFound, FailedPrecondition otherwise)."""

    def __init__(self, reaper: Reaper, fds: FdTable, buffer_bytes: int,
                 container_pid: Callable[[str], int]) -> None:
        self._reaper = reaper
        self._fds = fds
        self._limit = buffer_bytes
        self._container_pid = container_pid
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def _get(self, sid: str) -> Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise NotFound(f"console session {sid} not found (it ended, or the sandbox's agent"
                           f" restarted)") from None

    def start(self, sid: str, argv: Sequence[str], *, terminal: bool, rows: int, cols: int,
              container_id: str, env: Mapping[str, str]) -> int:
        """Spawn the session's command; its pid."""
        ids.check(sid, "session_id")
        self._expire()
        if sid in self._sessions:
            raise FailedPrecondition(f"console session {sid} exists")
        if len(self._sessions) >= MAX_SESSIONS:
            raise ResourceExhausted(f"{MAX_SESSIONS} console sessions are open in this sandbox")
        command = wanted = _check_argv(argv)
        environ = _environment(env, terminal)
        if container_id:
            pid = self._container_pid(ids.check(container_id, "container_id"))
            # Its files, as this session's /proc (the sandbox's) shows them.
            environ |= {"KEEL_CONTAINER_PID": str(pid), "KEEL_CONTAINER_ROOT": f"/proc/{pid}/root"}
            command = ("/bin/sh", "-c", _JOIN, "sh", *cgroup_procs(pid), "--",
                       "nsenter", "-t", str(pid), "-p", "-n", "-i", "-u", "--", *command)
        # Looked up in the session's PATH, not the agent's own.
        program = shutil.which(command[0], path=environ["PATH"]) or command[0]
        command = (program, *command[1:])
        since = time.monotonic_ns()
        try:
            if terminal:
                session = self._spawn_terminal(sid, command, environ, rows, cols)
            else:
                session = self._spawn_pipes(sid, command, environ)
        except OSError as exc:
            raise InvalidArgument(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
        session.container_id = container_id
        self._sessions[sid] = session
        self._reaper.watch(session.pid, since, functools.partial(self._exited, session))
        log.info("console session %s: pid %d runs %r%s%s", sid, session.pid, list(wanted),
                 f" in container {container_id}" if container_id else "",
                 " on a terminal" if terminal else "")
        return session.pid

    def _spawn_terminal(self, sid: str, command: Sequence[str], env: dict[str, str],
                        rows: int, cols: int) -> Session:
        master, slave = os.openpty()
        fds = [master]
        try:
            if rows and cols:
                termios.tcsetwinsize(master, (rows, cols))
            name = os.ttyname(slave)
            # A new session (setsid) that opens the pty without O_NOCTTY gets it
            # as its controlling terminal: Ctrl-C and Ctrl-Z work in it.
            actions = [(os.POSIX_SPAWN_OPEN, 0, name, os.O_RDWR, 0),
                       (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
            pid = os.posix_spawn(command[0], list(command), env, file_actions=actions,
                                  setsid=True)
            os.close(slave)
            slave = -1
            writer, control = os.dup(master), os.dup(master)
            fds += [writer, control]
        except BaseException:
            for fd in (*fds, slave):
                if fd >= 0:
                    os.close(fd)
            raise
        for which, fd in zip(("out", "in", "ctl"), fds, strict=True):
            self._fds.add(fd, role(sid, which))
        out, err = OutputBuffer(self._limit), OutputBuffer(self._limit)
        err.close()  # a terminal has one stream
        return Session(sid, pid, True, "", out, err, self._writer(sid, writer),
                       [self._pump(sid, master, out, "output")], control)

    def _spawn_pipes(self, sid: str, command: Sequence[str], env: dict[str, str]) -> Session:
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
        theirs = (pipes[0][0], pipes[1][1], pipes[2][1])
        try:
            actions = [(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(theirs)]
            pid = os.posix_spawn(command[0], list(command), env, file_actions=actions,
                                  setsid=True)
        except BaseException:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        finally:
            for fd in theirs:
                try:
                    os.close(fd)
                except OSError:
                    pass
        ours = {"in": pipes[0][1], "out": pipes[1][0], "err": pipes[2][0]}
        for which, fd in ours.items():
            self._fds.add(fd, role(sid, which))
        out, err = OutputBuffer(self._limit), OutputBuffer(self._limit)
        return Session(sid, pid, False, "", out, err, self._writer(sid, ours["in"]),
                       [self._pump(sid, ours["out"], out, "stdout"),
                        self._pump(sid, ours["err"], err, "stderr")])

    def _writer(self, sid: str, fd: int) -> StdinWriter:
        return StdinWriter(fd, self._limit, self._fds.close, f"console {sid} stdin")

    def _pump(self, sid: str, fd: int, buffer: OutputBuffer, what: str) -> OutputPump:
        return OutputPump(fd, buffer, self._fds.close, f"console {sid} {what}")

    def _exited(self, session: Session, exit: Exit) -> None:
        session.exit = exit
        session.exited.set()
        log.info("console session %s: pid %d exited with %d", session.id, exit.pid, exit.status)

    async def read(self, sid: str, stream: int, offset: int, max_bytes: int,
                   wait_s: float) -> tuple[bytes, bool]:
        session = self._get(sid)
        if stream not in (1, 2):
            raise InvalidArgument(f"stream must be 1 (stdout) or 2 (stderr), not {stream}")
        session.last_read = time.monotonic()
        buffer = session.stdout if stream == 1 else session.stderr
        return await buffer.read(offset, max(1, min(max_bytes, self._limit)), wait_s)

    async def write(self, sid: str, offset: int, data: bytes, close: bool) -> int:
        session = self._get(sid)
        accepted = await session.stdin.write(offset, data) if data else session.stdin.ledger.accepted
        if close and not session.terminal:
            session.stdin.close_at(offset + len(data))
        return accepted

    def control(self, sid: str, rows: int, cols: int, sig: int) -> None:
        session = self._get(sid)
        if rows and cols:
            if not session.terminal:
                raise FailedPrecondition(f"console session {sid} has no terminal to resize")
            # TIOCSWINSZ on the master: the kernel sends SIGWINCH to the foreground group.
            termios.tcsetwinsize(session.control, (min(rows, 9999), min(cols, 9999)))
        if sig:
            try:
                signal.Signals(sig)
            except ValueError:
                raise InvalidArgument(f"unknown signal {sig}") from None
            if session.exit is None:
                os.killpg(session.pid, sig)

    async def wait(self, sid: str, wait_s: float) -> Exit | None:
        session = self._get(sid)
        try:
            async with asyncio.timeout(wait_s):
                await session.exited.wait()
        except TimeoutError:
            return None
        return session.exit

    def remove(self, sid: str) -> Exit | None:
        """End the session: kill its process group if it runs, close its fds."""
        session = self._sessions.pop(sid, None)
        if session is None:
            raise NotFound(f"console session {sid} not found")
        self._close(session)
        return session.exit

    def _close(self, session: Session) -> None:
        if session.exit is None:
            try:
                os.killpg(session.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            log.info("console session %s: killed pid %d's group", session.id, session.pid)
        session.stdin.abort()
        for pump in session.pumps:
            pump.close()
        self._fds.close(session.control)
        session.control = -1

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, session in list(self._sessions.items()):
            if session.exit is not None and now - session.last_read > EXITED_TTL_S:
                log.info("console session %s: exited and unread for %.0fs, removed", sid,
                         EXITED_TTL_S)
                self.remove(sid)

    def close_all(self) -> None:
        """End every session (the agent stops)."""
        for sid in list(self._sessions):
            self.remove(sid)

    # -- across an in-place upgrade (agent/_upgrade.py, agent/_handover.py) --

    def freeze(self) -> None:
        """Stop every session's I/O; the fds stay open for the exec."""
        for session in self._sessions.values():
            for pump in session.pumps:
                pump.stop_reading()
            session.stdin.freeze()

    def thaw(self) -> None:
        """Undo :meth:`freeze` (the exec failed)."""
        for session in self._sessions.values():
            for pump in session.pumps:
                pump.start_reading()
            session.stdin.thaw()

    def records(self) -> tuple[state.ConsoleRecord, ...]:
        return tuple(s.record() for s in self._sessions.values())

    def streams(self) -> list[tuple[str, str, OutputBuffer, OutputBuffer, StdinWriter]]:
        """("", session id, stdout, stderr, stdin) of every session, as the
        hand-over file takes them (agent/_handover.py; frozen sessions only)."""
        return [(HANDOVER_CID, s.id, s.stdout, s.stderr, s.stdin)
                for s in self._sessions.values()]

    def adopt(self, handed: list[Handed]) -> None:
        """Take the sessions an upgrade handed over and start their I/O."""
        for h in handed:
            rec = h.record
            sid = rec.session_id
            writer = StdinWriter.resumed(
                h.fds.get("in", -1), self._limit, self._fds.close, f"console {sid} stdin",
                accepted=rec.stdin_offset, pending=h.stdin_pending,
                close_requested=h.stdin.ended if h.stdin else False,
                broken=h.stdin.broken if h.stdin else "")
            pumps = [self._pump(sid, fd, buffer, which) for which, buffer in
                     (("out", h.stdout), ("err", h.stderr)) if (fd := h.fds.get(which, -1)) >= 0]
            session = Session(sid, rec.pid, rec.terminal, rec.container_id, h.stdout, h.stderr,
                              writer, pumps, h.fds.get("ctl", -1))
            self._sessions[sid] = session
            if rec.exit_status is not None:
                session.exit = Exit(rec.pid, rec.exit_status, rec.exited_at_ns, 0)
                session.exited.set()
            else:
                self._reaper.watch(rec.pid, 0, functools.partial(self._exited, session))
            writer.thaw()
            log.info("console session %s (pid %d) resumed", sid, rec.pid)
