"""The agent's lifetime: set up (fresh, or resuming an upgrade), serve until
SIGTERM, stop gracefully -- or exec a new release in place.

Owns the agent's TaskGroup (every long-lived task belongs to it), the
reaper, the fd table, the channels and the upgrader.  A graceful stop
closes the listeners, lets in-flight lifecycle operations finish, writes
the state file and leaves containers alone: they die with the sandbox.

Order matters for an in-place upgrade: the reaper starts only once the
resumed processes are watched, and the listeners are opened (the
inherited sockets adopted) only after the commit, so a resume that fails
leaves every inherited fd as it found it for the previous release.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import uuid
from functools import partial
from pathlib import Path

from grpclib.events import RecvRequest

from agent import _resume, state
from agent._channels import Channels, open_listener
from agent._core import AgentCore
from agent._fds import FdTable
from agent._ops import agent_version
from agent._reaper import Reaper, become_subreaper
from agent._runc import Runc, RuntimeMissing
from agent._session import SessionGate
from agent._stage import Stager
from agent._tasks import Operations
from agent._tracing import AgentTracing
from agent._upgrade import Upgrader, this_tree
from agent.config import AgentConfig
from agent.service import AgentService, OpsService
from keel.errors import KeelError
from keel.logs import loop_error_handler

log = logging.getLogger("keel.agent")


def _prepare_dirs(config: AgentConfig) -> None:
    for sub in ("", "runc", "bundles"):
        (config.state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def _replace_previous_state(config: AgentConfig) -> None:
    """A fresh start (new boot id) replaces what an earlier agent left; say so."""
    try:
        old = state.store(config.state_dir).load()
    except KeelError as exc:
        log.warning("replacing unreadable state of an earlier agent: %s", exc)
        return
    if old is not None:
        log.info("replacing state of earlier boot %s (%d containers)", old.boot_id,
                 len(old.containers))


def _check_runtime(runc: Runc) -> None:
    try:
        log.info("OCI runtime: %s", runc.resolve())
    except RuntimeMissing as exc:  # keep serving: every container call will say why it fails
        log.error("%s", exc)


def _open_listeners(config: AgentConfig) -> dict[str, socket.socket]:
    return {listen.channel: open_listener(listen) for listen in config.listens}


async def serve(config: AgentConfig) -> None:
    """Run the agent until SIGTERM or SIGINT (or until an upgrade execs a new image).

    With ``config.mode == "resume"`` anything wrong with the hand-over
    raises before anything was touched (agent/__main__.py then goes back
    to the previous release).
    """
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_error_handler(log))
    if not become_subreaper():
        log.warning("not a subreaper: container exits will be lost if they are not our children")
    _prepare_dirs(config)
    fds = FdTable()
    resumed = _resume.load(config, fds) if config.mode == "resume" else None
    if config.mode == "recover":
        _resume.set_aside(config)
    # A fresh agent fails fast on a bad listener; a resuming one adopts them after the commit.
    listeners = _open_listeners(config) if resumed is None else {}
    reaper = Reaper()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await _serve(config, fds, reaper, listeners, stop, resumed)
    finally:
        reaper.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def _keep_key(core: AgentCore, key: str) -> None:
    core.session_key = key
    core.persist()


async def _serve(config: AgentConfig, fds: FdTable, reaper: Reaper,
                 listeners: dict[str, socket.socket], stop: asyncio.Event,
                 resumed: _resume.Resumed | None) -> None:
    """Serve both channels until *stop*; the TaskGroup outlives every call."""
    channels = Channels(fds)
    boot_id = resumed.saved.boot_id if resumed else uuid.uuid4().hex
    tracing = AgentTracing()
    runc = Runc(config.runtime, config.state_dir / "runc", reaper, config.runtime_timeout_s,
                tracer=tracing.tracer)
    _check_runtime(runc)
    if resumed is None:
        _replace_previous_state(config)
    async with asyncio.TaskGroup() as group:
        core = AgentCore(config, boot_id=boot_id, reaper=reaper, fds=fds, runc=runc,
                         ops=Operations(group))
        if resumed is not None:
            _resume.commit(resumed, core, reaper, fds, config)
            listeners = _open_listeners(config)
        else:
            core.persist()
        reaper.start()
        upgrader = Upgrader(config, core, reaper, fds, group)
        stager = Stager(config.state_dir / "releases", Path(this_tree()))
        gate = SessionGate(core.session_key, partial(_keep_key, core))

        async def on_request(event: RecvRequest) -> None:
            await gate.on_request(event)  # refuses a call without the key: not traced
            await tracing.on_request(event)

        await channels.start(listeners, {"agent": [AgentService(core, gate)],
                                         "ops": [OpsService(core, upgrader, stager,
                                                            core.consoles, tracing)]},
                             on_request)
        log.info("keel-agent %s %s (boot %s)", agent_version(),
                 "resumed and ready" if resumed else "ready", boot_id)
        await stop.wait()
        log.info("stopping: closing channels; containers are left running")
        upgrader.cancel()
        await channels.aclose()
        core.consoles.close_all()
        # Leaving the group waits for in-flight lifecycle operations to finish.
    core.persist()
