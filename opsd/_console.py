"""Console sessions as opsd runs them: opsctl <-> opsd <-> the shim <-> the agent.

opsd owns each session's offsets: it reads the session's output from the
agent at its offsets and writes stdin at its offset, through the sandbox's
``ops.sock`` (ShimOps.Console*, relayed by the shim to the agent's ops
channel).  So when the shim is replaced by a live upgrade the session
pauses while ``ops.sock`` changes hands and resumes where it was, nothing
lost or doubled (the agent keeps the bytes nobody acknowledged and accepts
a resent write once); an agent upgrade hands the session to the new image
at the same offsets.

Every session is audited: a line in opsd's log (the journal under systemd)
when it opens and when it ends, and the shim's records in the sandbox's
``audit.log``.  A session ends when its command exits, when opsctl goes
away (the stream breaks: the session is reaped, its process group killed),
on ``opsctl console kill``, or when the agent no longer knows it (an agent
that restarted, or rolled back to a release without consoles).  Output is
read from the agent only as fast as opsctl takes it (HTTP/2 flow control),
so a slow reader holds the agent's buffer full and the command blocks,
never opsd's memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from agent.api import ops_pb
from keel import ids, retry
from keel.errors import (
    InvalidArgument,
    KeelError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    from_code,
)
from keel.peercred import PeerCred
from opsd._pb.keel.opsd import v1 as pb
from shim.api import SandboxDir

log = logging.getLogger("opsd.console")
T = TypeVar("T")

#: How long a session waits for its sandbox's shim to answer again (a shim
#: upgrade takes seconds; a VM's under emulation, tens).
RESUME_S = 120.0
#: Long-poll of one output read, and of one exit wait.
POLL_MS = 2000
READ_BYTES = 256 * 1024
MAX_SESSIONS = 64
#: Output bytes per second one session may move (stdout and stderr
#: together): a hundred full screens a second, and a session that prints
#: without end then leaves the sandbox's containers their CPU
#: (bench/console.py: a pod's stdout with `yes` in a console at 4 MiB/s ran
#: at 0.80x of its speed alone, at 1 MiB/s at 1.01x).
RATE_BYTES_S = 1 << 20
#: How long a killed session may take to end by itself.
KILL_S = 10.0
MAX_SIZE = 9999


@dataclasses.dataclass(slots=True)
class Session:
    id: str
    sandbox_id: str
    container_id: str
    argv: list[str]
    terminal: bool
    caller: PeerCred
    tty: str
    started_at: float = dataclasses.field(default_factory=time.time)
    bytes_in: int = 0
    bytes_out: int = 0
    task: asyncio.Task[None] | None = None
    end_reason: str = ""
    ended: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def view(self) -> pb.ConsoleSession:
        return pb.ConsoleSession(
            id=self.id, sandbox_id=self.sandbox_id, container_id=self.container_id,
            argv=self.argv, uid=self.caller.uid, pid=self.caller.pid, tty=self.tty,
            started_at=self.started_at, bytes_in=self.bytes_in, bytes_out=self.bytes_out)


class ShimLink:
    """ShimOps calls on one sandbox's ``ops.sock``, dialed again after each
    loss and retried while the shim is away (a handoff) for up to RESUME_S."""

    def __init__(self, state_root: Path, sandbox_id: str) -> None:
        self._sock = SandboxDir.of(state_root, sandbox_id).ops_socket
        self._sandbox = sandbox_id
        self._channel: Channel | None = None

    def _stub(self) -> ops_pb.ShimOpsStub:
        if self._channel is None:
            self._channel = Channel(path=str(self._sock))
        return ops_pb.ShimOpsStub(self._channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def once(self, call: Callable[[ops_pb.ShimOpsStub], Awaitable[T]]) -> T:
        """One attempt; our error classes (Unavailable for a lost connection)."""
        try:
            return await call(self._stub())
        except GRPCError as exc:
            raise from_code(exc.status.value, exc.message or exc.status.name) from exc
        except FileNotFoundError as exc:  # no ops.sock: no such sandbox, or it is gone
            self.close()
            raise Unavailable(f"sandbox {self._sandbox} not found or not running (no "
                              f"{self._sock})") from exc
        except (TimeoutError, OSError, StreamTerminatedError) as exc:
            self.close()  # whoever serves the path next gets a new connection
            raise Unavailable(f"sandbox {self._sandbox}: {self._sock}: {exc!r}") from exc

    async def call(self, call: Callable[[ops_pb.ShimOpsStub], Awaitable[T]],
                   on_pause: Callable[[str], None] | None = None) -> T:
        """:meth:`once`, again while the shim is unavailable, for up to RESUME_S."""
        paused = False

        def note(exc: BaseException) -> None:
            nonlocal paused
            if not paused and on_pause is not None:
                on_pause(str(exc))
            paused = True

        async for attempt in retry.retrying(first=0.05, cap=1.0, on=(Unavailable,),
                                            within=RESUME_S, before_sleep=note):
            with attempt:
                return await self.once(call)
        raise AssertionError("unreachable")


class Consoles:
    """Every open session of this opsd."""

    def __init__(self, state_root: Path) -> None:
        self.state_root = state_root
        self._sessions: dict[str, Session] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def list(self) -> list[pb.ConsoleSession]:
        return [s.view() for s in self._sessions.values()]

    async def kill(self, sid: str, by: PeerCred | None) -> None:
        """End a session: SIGKILL to its process group, so that it ends as
        sessions end (its last output and its exit status reach opsctl); if
        that cannot be delivered within KILL_S, the relay is cancelled."""
        session = self._sessions.get(sid)
        if session is None or session.task is None:
            raise NotFound(f"no open console session {sid!r} (opsctl console ls)")
        session.end_reason = f"killed by uid {by.uid if by else '?'} (opsctl console kill)"
        log.info("console %s: %s", sid, session.end_reason)
        link = ShimLink(self.state_root, session.sandbox_id)
        try:
            async with asyncio.timeout(KILL_S):
                await link.once(_control(ops_pb.ConsoleControlRequest(sid, 0, 0, signal.SIGKILL)))
                await session.ended.wait()
        except (KeelError, TimeoutError) as exc:
            log.warning("console %s: the kill did not end it (%s); ending the relay", sid, exc)
            session.task.cancel()
        finally:
            link.close()

    async def enable(self, sandbox_id: str, on: bool) -> bool:
        link = ShimLink(self.state_root, ids.check(sandbox_id, "sandbox id"))
        try:
            r = await link.once(lambda s: s.console_enable(ops_pb.ConsoleEnableRequest(on),
                                                           timeout=10))
        finally:
            link.close()
        return r.enabled

    async def serve(self, stream: Stream[pb.ConsoleInput, pb.ConsoleOutput],
                    caller: PeerCred) -> None:
        """One Console call: open the session the first message asks for, relay
        the next ones to it, send its output, then its exit."""
        first = await stream.recv_message()
        opening = first.open if first is not None else None
        session = self._open(opening, caller)
        assert opening is not None
        link = ShimLink(self.state_root, session.sandbox_id)
        send_lock = asyncio.Lock()

        async def send(msg: pb.ConsoleOutput) -> None:
            async with send_lock:  # stdout and stderr relays share the stream
                await stream.send_message(msg)

        session.task = asyncio.current_task()
        self._sessions[session.id] = session
        status: int | None = None
        started = False
        try:
            await self._start(session, link, opening)
            started = True
            await send(pb.ConsoleOutput(session_id=session.id))
            status = await self._relay(session, link, stream, send)
            session.end_reason = session.end_reason or "exited"
            await send(pb.ConsoleOutput(exited=True, exit_status=status))
        except NotFound as exc:  # the agent no longer knows it (a rollback to an older
            # release, a restarted agent, a VM rebooted)
            if not started:
                raise
            session.end_reason = f"lost: {exc}"
            await send(pb.ConsoleOutput(note=session.end_reason, exited=True, exit_status=255))
        except (_Detached, StreamTerminatedError):
            pass  # opsctl detached or went away: the session ends below
        finally:
            self._sessions.pop(session.id, None)
            session.ended.set()
            if started:
                task = asyncio.get_running_loop().create_task(self._close(session, link, status))
                self._closing.add(task)  # runs even when this call was cancelled
                task.add_done_callback(self._closing.discard)
            else:
                link.close()
                log.info("console %s not started", session.id)

    async def _relay(self, session: Session, link: ShimLink,
                     stream: Stream[pb.ConsoleInput, pb.ConsoleOutput],
                     send: Callable[[pb.ConsoleOutput], Awaitable[None]]) -> int:
        """Input and output until the session exits (its status) or opsctl leaves."""
        inp = asyncio.create_task(self._pump_input(session, link, stream))
        out = asyncio.create_task(self._pump_output(session, link, send))
        try:
            done, _ = await asyncio.wait({inp, out}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (inp, out):
                task.cancel()
            await asyncio.gather(inp, out, return_exceptions=True)
        if out in done:
            return out.result()
        inp.result()  # raises why it ended
        raise AssertionError("the input relay ended without a reason")

    def _open(self, req: pb.ConsoleOpen | None, caller: PeerCred) -> Session:
        if req is None or not req.sandbox_id:
            raise InvalidArgument("the first console message must open a session (sandbox_id)")
        if len(self._sessions) >= MAX_SESSIONS:
            raise ResourceExhausted(f"{MAX_SESSIONS} console sessions are open on this node")
        sandbox = ids.check(req.sandbox_id, "sandbox id")
        container = ids.check(req.container_id, "container id", optional=True)
        session = Session(f"c{secrets.token_hex(5)}", sandbox, container, list(req.argv),
                          bool(req.terminal), caller, _tty_of(caller.pid) or req.tty[:64])
        log.info("console %s opened by uid %d (pid %d, tty %s) on sandbox %s%s: %r",
                 session.id, caller.uid, caller.pid, session.tty or "none", sandbox,
                 f" container {container}" if container else "", session.argv or ["(shell)"])
        return session

    async def _start(self, session: Session, link: ShimLink, req: pb.ConsoleOpen) -> None:
        env = {"TERM": req.term[:64]} if req.term else {}
        start = ops_pb.ConsoleStartRequest(
            session_id=session.id, argv=session.argv, terminal=session.terminal,
            rows=min(req.rows, MAX_SIZE), cols=min(req.cols, MAX_SIZE),
            container_id=session.container_id, env=env,
            caller=ops_pb.ConsoleCaller(uid=session.caller.uid, pid=session.caller.pid,
                                        tty=session.tty))
        await link.once(lambda s: s.console_start(start, timeout=30))

    async def _pump_output(self, session: Session, link: ShimLink,
                           send: Callable[[pb.ConsoleOutput], Awaitable[None]]) -> int:
        """Relay stdout and stderr until both end; the exit status."""
        def paused(why: str) -> None:
            log.info("console %s: paused (%s); resuming when the shim answers", session.id, why)

        began = time.monotonic()

        async def stream(n: int) -> None:
            offset = 0
            while True:
                req = ops_pb.ConsoleReadRequest(session.id, n, offset, READ_BYTES, POLL_MS)
                r = await link.call(_read(req), paused)
                if r.data:
                    offset += len(r.data)
                    session.bytes_out += len(r.data)
                    # Sending waits for opsctl to read (HTTP/2 flow control): a
                    # slow reader stops these reads, the agent's buffer fills and
                    # the command blocks.
                    await send(pb.ConsoleOutput(stdout=r.data) if n == 1
                               else pb.ConsoleOutput(stderr=r.data))
                    ahead = session.bytes_out / RATE_BYTES_S - (time.monotonic() - began)
                    if ahead > 0:  # over the session's rate: the agent holds the rest
                        await asyncio.sleep(ahead)
                if r.eof:
                    return

        streams = [asyncio.create_task(stream(1)), asyncio.create_task(stream(2))]
        try:
            await asyncio.gather(*streams)
        finally:
            for task in streams:
                task.cancel()
        wait = ops_pb.ConsoleWaitRequest(session.id, POLL_MS)
        while True:
            w = await link.call(lambda s: s.console_wait(wait, timeout=POLL_MS / 1000 + 15),
                                paused)
            if w.exited:
                return w.exit_status

    async def _pump_input(self, session: Session, link: ShimLink,
                          stream: Stream[pb.ConsoleInput, pb.ConsoleOutput]) -> None:
        offset = 0
        while (msg := await stream.recv_message()) is not None:
            if msg.stdin or msg.close_stdin:
                write = ops_pb.ConsoleWriteRequest(session.id, offset, msg.stdin, msg.close_stdin)
                r = await link.call(_write(write))
                offset = r.offset
                session.bytes_in += len(msg.stdin)
            if (msg.rows and msg.cols) or msg.signal:
                ctl = ops_pb.ConsoleControlRequest(session.id, min(msg.rows, MAX_SIZE),
                                                   min(msg.cols, MAX_SIZE), msg.signal)
                await link.call(_control(ctl))
        # opsctl ended its side without the session ending: it detached.
        session.end_reason = session.end_reason or "the client detached"
        raise _Detached

    async def _close(self, session: Session, link: ShimLink, status: int | None) -> None:
        reason = session.end_reason or "the client went away"
        try:
            r = await link.call(lambda s: s.console_remove(
                ops_pb.ConsoleRemoveRequest(session.id, reason, session.bytes_in,
                                            session.bytes_out), timeout=30))
            status = r.exit_status if r.exited else status
        except KeelError as exc:
            log.warning("console %s: could not end it in sandbox %s: %s", session.id,
                        session.sandbox_id, exc)
        finally:
            link.close()
        log.info("console %s ended (%s): exit %s, %d bytes in, %d bytes out, %.1fs", session.id,
                 reason, "none" if status is None else status, session.bytes_in,
                 session.bytes_out, time.time() - session.started_at)


# One call each (a retry sends the same request: the same offset).
def _read(req: ops_pb.ConsoleReadRequest
          ) -> Callable[[ops_pb.ShimOpsStub], Awaitable[ops_pb.ConsoleReadResponse]]:
    return lambda s: s.console_read(req, timeout=req.wait_ms / 1000 + 15)


def _write(req: ops_pb.ConsoleWriteRequest
           ) -> Callable[[ops_pb.ShimOpsStub], Awaitable[ops_pb.ConsoleWriteResponse]]:
    return lambda s: s.console_write(req, timeout=30)


def _control(req: ops_pb.ConsoleControlRequest
             ) -> Callable[[ops_pb.ShimOpsStub], Awaitable[ops_pb.ConsoleControlResponse]]:
    return lambda s: s.console_control(req, timeout=10)


class _Detached(Exception):
    """opsctl closed its half of the stream: end the session."""


def _tty_of(pid: int) -> str:
    """The terminal on the caller's stdin, if any (its own claim is not needed)."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/0")
    except OSError:
        return ""
    return target if target.startswith(("/dev/pts/", "/dev/tty")) else ""


__all__ = ["Consoles", "Session", "ShimLink"]
