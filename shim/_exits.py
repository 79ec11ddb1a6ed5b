"""Exits: each running process's WaitProcess long poll, and TaskExit in order.

Ordering rules containerd relies on (research: containerd-shim.md 4.2):
TaskStart is queued before Start returns and before any TaskExit; an exit
is reported after the process's output reached containerd's fifos (or a
short grace period passed, for output held open by an orphan).  Exit
statuses stay in the agent until the shim removes the process, so a
watcher stopped by a handoff is simply started again by the new shim.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from agent.api import pb
from keel import clock
from keel.lifecycle import State
from shim import events_pb
from shim._agentconn import AgentConnection
from shim._background import finish, spawn
from shim._events import EventPublisher
from shim._process import Process, exit_now
from shim.state import Exit

log = logging.getLogger("keel.shim")

#: How long an exit report waits for the process's output to drain.
OUTPUT_GRACE_S = 2.0
#: A watcher's WaitProcess retries this long through agent reconnects.
WAIT_RETRY_S = 24 * 3600


class Exits:
    """Watches exits of one sandbox's processes and reports them to containerd.

    *persist* is called after each recorded exit (the state file keeps
    whether containerd was told).
    """

    def __init__(self, events: EventPublisher, tasks: asyncio.TaskGroup,
                 persist: Callable[[], object]) -> None:
        self._events = events
        self._tasks = tasks
        self._persist = persist

    def watch(self, p: Process, agent: AgentConnection) -> None:
        """Start *p*'s exit watcher (it must be running or paused)."""
        p.watcher = spawn(self._tasks, self._wait(p, agent), f"exit watcher of {p.name}",
                          f"wait-{p.name}")

    async def unwatch(self, p: Process) -> None:
        """Stop *p*'s exit watcher, if any; the agent keeps the status."""
        watcher, p.watcher = p.watcher, None
        await finish(watcher)

    async def _wait(self, p: Process, agent: AgentConnection) -> None:
        req = pb.WaitProcessRequest(container_id=p.cid, exec_id=p.eid)
        # A long wait: no deadline, the exit comes when it comes.
        resp = await agent.call(agent.stub.wait_process, req, timeout=None, attempt_s=None,
                                retry_for=WAIT_RETRY_S)
        pending = [o.eof.wait() for o in p.outputs.values()]
        if pending:
            try:
                async with asyncio.timeout(OUTPUT_GRACE_S):
                    await asyncio.gather(*pending)
            except TimeoutError:
                log.info("%s exited; its output is still open (held by another process)", p.name)
        if resp.oom_killed and not p.eid:
            # Before TaskExit, as runc's shim: CRI then reports reason OOMKilled.
            log.info("%s: the kernel OOM-killed a process of the container", p.name)
            self._events.publish_nowait("/tasks/oom", events_pb.TaskOom(container_id=p.cid))
        # The time is the host's, when the shim learns of the exit (as Kata's
        # shim does): a guest's clock drifts (TCG) and the guest is untrusted.
        self.record(p, exit_now(resp.exit_status))

    def record(self, p: Process, exit: Exit, *, again: bool = False) -> None:
        """Record *p*'s exit and queue TaskExit; a second exit is ignored
        unless *again* (a resumed shim reporting what the old one could not)."""
        if p.exit is not None and not again:
            return
        p.exit = exit
        p.to(State.STOPPED, "record the exit of")
        self._events.publish_nowait("/tasks/exit", events_pb.TaskExit(
            container_id=p.cid, id=p.eid or p.cid, pid=p.pid, exit_status=exit.status,
            exited_at=clock.utc_of_ns(exit.at_ns)))
        p.exit_published = True
        p.exited.set()
        log.info("%s exited with status %d", p.name, exit.status)
        try:
            self._persist()
        except OSError as exc:
            log.error("cannot persist state: %s", exc)

    def sandbox_died(self, processes: Iterable[Process], status: int = 255) -> None:
        """The sandbox is gone: every started, unfinished process exited with *status*."""
        for p in processes:
            if p.state is not State.STOPPED and p.state is not State.CREATED:
                self.record(p, exit_now(status))
