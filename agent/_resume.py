"""OpsService.UpgradeAgent, the new image's half: load, adopt, commit, serve.

``--resume``: :func:`load` reads ``state.json`` (migrating older schemas)
and ``upgrade.json`` and rebuilds containers, processes and buffers from
the hand-over, adopting the inherited fds *without* using them.  Any
failure up to here raises, and agent/__main__.py goes back to the
previous release with everything untouched.  :func:`commit` is the point
of no return: it writes the state (no hand-over any more), removes
``upgrade.json`` and the hand-over file, sets FD_CLOEXEC again, starts the
pumps and stdin writers and lets the reaper collect the children that
exited during the exec.  The daemon then serves on the inherited
listeners.  The gap (old image's last answered RPC to this one's first)
is logged and kept in ``state.last_upgrade``.

``--recover`` (the guard's last resort when the previous release cannot
resume either): :func:`set_aside` moves the unreadable state and the
upgrade record aside, kept for the operator, and the agent starts fresh
on the inherited listeners with a new boot id.  Containers keep running,
unmanaged; the shim sees the new boot id.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from agent import _handover, state
from agent._core import AgentCore
from agent._fds import FdTable
from agent._ops import agent_version
from agent._reaper import Reaper
from agent.config import AgentConfig
from upgrade.errors import CorruptState

log = logging.getLogger("keel.agent.resume")


@dataclasses.dataclass
class Resumed:
    saved: state.AgentState
    #: None when upgrade.json is missing (a resume without the old image's record).
    record: state.UpgradeRecord | None
    rebuilt: _handover.Rebuilt
    loaded_mono_ns: int


def load(config: AgentConfig, fds: FdTable) -> Resumed:
    """Everything the old image handed over; raises (CorruptState, OSError...) if unusable."""
    st = state.store(config.state_dir).load()
    if st is None:
        raise CorruptState(f"no {config.state_dir / state.STATE_FILE} to resume from")
    record = state.upgrade_store(config.state_dir).load()
    rebuilt = _handover.rebuild(st, config.state_dir, fds, config)
    return Resumed(st, record, rebuilt, time.monotonic_ns())


def commit(resumed: Resumed, core: AgentCore, reaper: Reaper, fds: FdTable,
           config: AgentConfig) -> None:
    """Take over for good (see the module docstring); call before serving."""
    rec = resumed.record
    running = agent_version()
    if rec is not None:
        rolled_back = rec.rollbacks > 0
        core.last_upgrade = state.UpgradeResult(
            rec.upgrade_id, rec.from_version, rec.to_version, running, rolled_back, 0.0,
            f"rolled back: {rec.failure}" if rolled_back else "upgraded")
    core.session_key = resumed.saved.session_key
    core.adopt(resumed.rebuilt.containers)
    # The point of no return: without upgrade.json the guard no longer goes back.
    state.upgrade_store(config.state_dir).path.unlink(missing_ok=True)
    core.persist(strict=True)
    if resumed.saved.handover is not None:
        (config.state_dir / resumed.saved.handover.blob).unlink(missing_ok=True)
    fds.set_inheritable(False)
    resumed.rebuilt.start_io(fds, config)
    core.consoles.adopt(resumed.rebuilt.consoles)
    reaper.restore_unclaimed(resumed.rebuilt.unclaimed)
    streams = resumed.saved.handover.streams if resumed.saved.handover else ()
    if rec is None:
        log.warning("resumed %d containers without an upgrade record", len(core))
        return
    exec_ms = (resumed.loaded_mono_ns - rec.exec_mono_ns) / 1e6
    if rec.rollbacks:
        log.error("upgrade %s to %s ROLLED BACK (%s); running %s again", rec.upgrade_id,
                  rec.to_version, rec.failure, running)
    log.info("upgrade %s: %s resumed %d containers, %d streams (exec to state loaded %.1f ms)",
             rec.upgrade_id, running, len(core), len(streams), exec_ms)
    core.activity.on_next_served(lambda now: _gap(core, rec, now))


def _gap(core: AgentCore, rec: state.UpgradeRecord, now_mono_ns: int) -> None:
    gap_s = (now_mono_ns - rec.last_served_mono_ns) / 1e9
    log.info("upgrade %s: gap %.1f ms (last RPC answered by %s to first answered by %s)",
             rec.upgrade_id, gap_s * 1e3, rec.from_version, agent_version())
    if core.last_upgrade is not None:
        core.last_upgrade = dataclasses.replace(core.last_upgrade, gap_s=gap_s)
        core.persist()


def set_aside(config: AgentConfig) -> None:
    """--recover: keep the unreadable state and the upgrade record under new names."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in (state.STATE_FILE, state.UPGRADE_FILE):
        path = config.state_dir / name
        if path.exists():
            aside = path.with_name(f"{name}.unreadable-{stamp}")
            path.rename(aside)
            log.error("recovering from a failed upgrade: %s kept as %s", path, aside)
    log.error("starting fresh after a failed upgrade: the containers of the previous state "
              "keep running but are no longer managed by this agent")
