"""A sandbox's side of a live shim handoff: freeze, thaw, restore, go live.

The old shim freezes (pumps stopped at chunk boundaries, exit watchers
stopped, agent channel released, state persisted) and either exits after
the new shim's READY or thaws.  The new shim restores from the record,
checks the agent's health, claims the state file and goes live (pumps and
watchers resume at the recorded offsets).  The daemon drives these steps
(``shim._daemon``, ``shim._handoff``); the wire protocol is in
``upgrade/PROTOCOL.md``.

Stdio is not passed as descriptors: the new shim reopens containerd's
fifos by path (a fifo opened O_RDWR never sees EOF from a missing peer,
and the byte offsets, not the open file, carry the stream's position),
so reopening loses and duplicates nothing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from agent.api import API_VERSION, MIN_API_VERSION, ops_pb, pb
from keel.errors import FailedPrecondition
from keel.lifecycle import State
from shim import _pumps
from shim._agentconn import DialChannel, ops_call
from shim._background import spawn
from shim._pumps import Endpoints
from shim.state import SandboxRecord

if TYPE_CHECKING:
    from shim._process import Process
    from shim.sandbox import Sandbox

log = logging.getLogger("keel.shim")


#: Seconds the agent check inside a handoff's freeze may take over the ops channel.
FREEZE_CHECK_S = 10.0


class SandboxHandoff:
    """Freeze/thaw (old shim) and restore/go-live (new shim) of one sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def freeze(self) -> SandboxRecord:
        """Stop every pump and exit watcher, let go of the agent channel,
        persist; returns the record a new shim resumes from.

        Holds the sandbox lock until ``thaw`` or exit: between them nothing
        is sent to containerd and nothing is read from the agent.
        """
        sb = self._sb
        await sb.lock.acquire()
        try:
            for c in sb.containers.values():
                for p in c.processes():
                    await _pumps.stop(p)
                    await sb.exits.unwatch(p)
            sb.unwatch_sandbox()
            if sb.agent is not None:
                sb.agent.close()  # virtio-serial allows one client: release the port
            return sb.persist()
        except BaseException:
            self.thaw()  # a freeze that cannot finish leaves the sandbox serving
            raise

    def claim(self) -> None:
        """Record this shim as the sandbox's owner in the state file.

        The new shim claims before READY, so that once the old one has
        committed, a crash of the new one is seen as a dead owner by
        containerd's ``delete`` (the old one may linger a moment); ``thaw``
        claims back after a failed handoff.
        """
        self._sb.persist()

    def thaw(self) -> None:
        """Undo ``freeze`` after a failed handoff: resume where we stopped."""
        sb = self._sb
        try:
            self.claim()
        except OSError as exc:  # the pumps' offsets are in memory: serve on regardless
            log.error("cannot persist state while thawing: %s", exc)
        try:
            for c in sb.containers.values():
                for p in c.processes():
                    p.resume_from = p.offsets()
                    self._resume(p, Endpoints.take_from(p))
            if sb.vm is not None:
                sb.watch_sandbox()
        finally:
            sb.lock.release()

    async def restore(self, rec: SandboxRecord) -> None:
        """Re-attach to the running sandbox of *rec* (new shim side).

        Pumps and watchers start only in ``go_live()``, after the old shim
        let go.  Raises NotFound when the sandbox is gone.
        """
        self._sb.adopt(rec)

    async def check_health(self, ops: DialChannel | None = None) -> str:
        """The agent answers and holds every container we know of; how it was
        asked, with the time each step took.

        Asked on the ops channel (one Health call, which names the agent's
        containers): the agent channel is then dialed by the pumps after
        commit, outside the freeze window (over virtio-serial under TCG a
        dial, Hello and GetState took ~130 ms of it).  An agent whose Health
        does not name its containers (older than that field), or is not ok,
        or speaks an API this shim does not, is asked as before, on the agent
        channel, whose Hello refuses an API out of range.  *ops*: a connection to the ops channel
        made before the freeze (shim/_handoff.py), else one is dialed."""
        sb = self._sb
        assert sb.agent is not None and sb.vm is not None
        t0 = time.monotonic()
        health = await self._ops_health(ops)
        t1 = time.monotonic()
        sb.agent.note_version(health.agent_version)
        speaks = MIN_API_VERSION <= health.api_version <= API_VERSION
        if health.ok and speaks and len(set(health.container_ids)) == health.containers:
            known = set(health.container_ids)
            how = f"ops Health {(t1 - t0) * 1000:.1f} ms"
        else:
            await sb.agent.wait_ready(sb.config.agent_timeout_s, sb.vm.alive)
            t2 = time.monotonic()
            state = await sb.agent.call(sb.agent.stub.get_state, pb.Empty())
            known = {c.container_id for c in state.containers}
            how = (f"ops Health {(t1 - t0) * 1000:.1f} ms, dial+Hello {(t2 - t1) * 1000:.1f} ms,"
                   f" GetState {(time.monotonic() - t2) * 1000:.1f} ms")
        missing = sorted(set(sb.containers) - known)
        if missing:
            raise FailedPrecondition(f"agent does not know containers {', '.join(missing)}")
        return how

    async def _ops_health(self, ops: DialChannel | None) -> ops_pb.HealthResponse:
        sb = self._sb
        assert sb.vm is not None
        # Inside the freeze: a stuck ops channel fails the handoff (the old shim
        # thaws) well before the old shim's own deadline.
        return await ops_call(ops or sb.ops or sb.vm.dialer("ops"),
                              lambda s: s.health(ops_pb.HealthRequest()),
                              min(sb.config.agent_timeout_s, FREEZE_CHECK_S), sb.session_key)

    def go_live(self) -> None:
        """Start pumps, watchers and the sandbox watch (new shim, after commit)."""
        sb = self._sb
        for c in sb.containers.values():
            for p in c.processes():
                self._resume(p, Endpoints.reopen(p.stdio, p.resume_from))
        sb.watch_sandbox()
        # The agent channel was not dialed before commit (the check used the ops
        # channel): dial it now, so the agent's version is known (ShimOps.Status)
        # even in a sandbox with no pump to dial it.
        spawn(sb.tasks, self._greet_agent(), "agent hello after handoff", f"hello-{sb.id}")
        # This shim's relay replaces the old one's (a new port, the chain rewritten).
        spawn(sb.tasks, sb.relay_ports(), "port-forward relay", f"ports-{sb.id}")
        sb.persist()

    async def _greet_agent(self) -> None:
        sb = self._sb
        assert sb.agent is not None and sb.vm is not None
        await sb.agent.wait_ready(sb.config.agent_timeout_s, sb.vm.alive)

    def _resume(self, p: Process, ends: Endpoints) -> None:
        sb = self._sb
        assert sb.agent is not None
        _pumps.start(p, sb.agent, ends, sb.tasks)
        if p.state in (State.RUNNING, State.PAUSED):
            sb.exits.watch(p, sb.agent)
        elif p.exit is not None and not p.exit_published:
            sb.exits.record(p, p.exit, again=True)
