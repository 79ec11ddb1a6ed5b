"""OpsService.UpgradeAgent, the old image's half: check, answer, drain, execve.

1. :meth:`Upgrader.prepare` (in the RPC): the path must be an absolute,
   executable file, or a release *directory* (a tree holding the ``agent``
   package, as the VM image installs releases under ``/opt/keel``: it runs
   on this interpreter, with the same options, that tree first on
   ``PYTHONPATH`` instead of this one's); no other upgrade may be running,
   and the release must pass a *preflight*: ``AGENT_PATH --preflight
   --state-dir DIR`` (a child process) imports all of the new release and
   reads the state file, then prints its version.  Anything wrong is
   FAILED_PRECONDITION and nothing changed.  The RPC is answered (``message="exec"``) and flushed to the
   socket: after the exec nobody could answer it.
2. :meth:`Upgrader.start`: *freeze* (new lifecycle calls, Hello and Health
   wait at the gate; reads, writes and waits go on) and let in-flight
   lifecycle operations *drain*.
3. Synchronously, so nothing else runs in between: stop reaping (exits
   stay zombies of this PID), freeze all I/O, write the hand-over
   (agent/_handover.py) and the state, write ``upgrade.json`` (how to go
   back), clear FD_CLOEXEC on every fd in the table and ``execve`` the new
   release with the same options, ``--listen-fd`` for the listeners and
   ``--resume``.  A virtio-serial channel hands over its port, not its
   bridge's listener (``--listen-fd CHANNEL=serial:FD``), after the bridge
   was flushed (agent/_serial.py).  Connections are close-on-exec: every
   caller sees its connection drop and retries on the new image.
4. If execve fails, or the drain does not finish in time, everything is
   thawed and this image keeps serving (the caller sees the old version in
   Health).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING

from agent import _handover, state
from agent._core import AgentCore
from agent._fds import FdTable
from agent._ops import agent_version
from agent._reaper import Reaper
from agent.config import CHANNELS, AgentConfig, Listen
from keel.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from agent import _serial

log = logging.getLogger("keel.agent.upgrade")

#: Seconds the new release's preflight may take.
PREFLIGHT_TIMEOUT_S = 30.0
#: Seconds the serial bridges may take to hand the host what the sessions wrote.
SERIAL_FLUSH_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    upgrade_id: str
    agent_path: str
    from_version: str
    to_version: str


def _check_path(agent_path: str) -> str:
    if not agent_path:
        raise InvalidArgument("agent_path is required")
    path = Path(agent_path)
    if not path.is_absolute():
        raise FailedPrecondition(f"agent_path {agent_path!r} is not an absolute path")
    if path.is_dir():
        if not (path / "agent" / "__init__.py").is_file():
            raise FailedPrecondition(f"agent_path {agent_path} is a directory without an "
                                     f"agent package")
        return agent_path
    if not path.is_file():
        raise FailedPrecondition(f"agent_path {agent_path} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        raise FailedPrecondition(f"agent_path {agent_path} is not executable")
    return agent_path


def current_launch(argv: list[str]) -> state.Launch:
    """How to exec this very image again with *argv* (the arguments after the program)."""
    # sys.orig_argv = interpreter, its options, "-m agent" or a script, then sys.argv[1:].
    prefix = sys.orig_argv[:len(sys.orig_argv) - (len(sys.argv) - 1)]
    if len(prefix) < 2:
        prefix = [sys.executable, "-m", "agent"]
    return state.Launch(sys.executable, (sys.executable, *prefix[1:], *argv), dict(os.environ))


def this_tree() -> str:
    """The directory this image's ``agent`` package was imported from."""
    return str(Path(__file__).resolve().parent.parent)


def release_launch(agent_path: str, argv: list[str]) -> state.Launch:
    """How to exec release *agent_path* (a file, or a tree run like this image) with *argv*."""
    if not Path(agent_path).is_dir():
        return state.Launch(agent_path, (agent_path, *argv), dict(os.environ))
    this = current_launch(argv)
    env = dict(this.env)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.realpath(p) != this_tree()]
    env["PYTHONPATH"] = os.pathsep.join([agent_path, *rest])
    return state.Launch(this.executable, this.argv, env)


class Upgrader:
    """At most one upgrade at a time; owned by the daemon, used by OpsService."""

    def __init__(self, config: AgentConfig, core: AgentCore, reaper: Reaper, fds: FdTable,
                 group: asyncio.TaskGroup) -> None:
        self._config = config
        self._core = core
        self._reaper = reaper
        self._fds = fds
        self._group = group
        self._busy: Plan | None = None
        self._task: asyncio.Task[None] | None = None

    async def prepare(self, agent_path: str, to_version: str) -> Plan:
        """Check the request and the release; FailedPrecondition when it cannot go."""
        if self._busy is not None:
            raise FailedPrecondition(f"an upgrade to {self._busy.agent_path} is already running")
        path = _check_path(agent_path)
        plan = Plan(uuid.uuid4().hex[:12], path, agent_version(), to_version or "?")
        self._busy = plan
        try:
            version = await self._preflight(path)
            if to_version and version != to_version:
                raise FailedPrecondition(f"{path} is release {version}, not {to_version}")
        except BaseException:
            self._busy = None
            raise
        self._busy = plan = dataclasses.replace(plan, to_version=version)
        log.info("upgrade %s: %s -> %s (%s) passed its preflight", plan.upgrade_id,
                 plan.from_version, version, path)
        return plan

    def abandon(self, plan: Plan) -> None:
        """The answer could not be sent: do not go on."""
        if self._busy is plan:
            self._busy = None

    def start(self, plan: Plan) -> None:
        """Freeze, drain and exec, in the agent's TaskGroup (after the answer was sent)."""
        self._task = self._group.create_task(self._run(plan), name=f"upgrade {plan.upgrade_id}")

    def cancel(self) -> None:
        """The agent is stopping: an upgrade that has not exec'd yet is abandoned."""
        if self._task is not None:
            self._task.cancel()

    async def _preflight(self, path: str) -> str:
        """Run the release's ``--preflight``; its version, or FailedPrecondition."""
        launch = release_launch(path, ["--preflight", "--state-dir", str(self._config.state_dir)])
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            status = await self._run_child(launch, out, err)
            out.seek(0)
            err.seek(0)
            output, errors = out.read(65536), err.read(65536).decode(errors="replace").strip()
        if status != 0:
            raise FailedPrecondition(f"release {path} failed its preflight (exit status "
                                     f"{status}): {errors[-2000:] or 'no message'}")
        try:
            version = json.loads(output)["agent_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"release {path}: unreadable preflight answer "
                                     f"{output[:200]!r}") from exc
        return str(version)

    async def _run_child(self, launch: state.Launch, out: IO[bytes], err: IO[bytes]) -> int:
        since = time.monotonic_ns()
        try:
            # Popen only forks and execs: the reaper (the one waitpid owner) awaits the exit.
            proc = subprocess.Popen(  # noqa: ASYNC220
                list(launch.argv), executable=launch.executable, env=launch.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot execute {launch.executable}: {exc}") from exc
        try:
            async with asyncio.timeout(PREFLIGHT_TIMEOUT_S):
                return (await self._reaper.wait(proc.pid, since)).status
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            raise
        finally:
            proc.returncode = -1 if proc.returncode is None else proc.returncode

    async def _run(self, plan: Plan) -> None:
        ops = self._core.operations
        began = time.monotonic()
        ops.freeze()
        try:
            async with asyncio.timeout(self._config.runtime_timeout_s):
                await ops.wait_idle()
        except TimeoutError:
            self._give_up(plan, "lifecycle operations did not finish in time")
            return
        except asyncio.CancelledError:
            self._give_up(plan, "the agent is stopping")
            raise
        log.info("upgrade %s: drained in %.1f ms", plan.upgrade_id, (time.monotonic() - began) * 1e3)
        await self._wait_serial_quiet()
        self._exec(plan)

    async def _wait_serial_quiet(self) -> None:
        """Let the serial bridges hand the host what the sessions wrote (the
        UpgradeAgent answer among it), so the exec cuts between HTTP/2 frames."""
        bridges = self._serial_bridges()
        if not bridges:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SERIAL_FLUSH_TIMEOUT_S):
                # The bridges are callback driven and have no "drained" event: poll.
                while not all(b.quiet() for b in bridges.values()):  # noqa: ASYNC110
                    await asyncio.sleep(0.005)

    def _serial_bridges(self) -> dict[str, _serial.Bridge]:
        if not any(listen.kind in ("serial", "serial-fd") for listen in self._config.listens):
            return {}
        from agent import _serial

        return _serial.bridges()

    def _give_up(self, plan: Plan, why: str) -> None:
        log.error("upgrade %s to %s abandoned: %s; staying on %s", plan.upgrade_id,
                  plan.to_version, why, plan.from_version)
        self._core.last_upgrade = state.UpgradeResult(
            plan.upgrade_id, plan.from_version, plan.to_version, plan.from_version,
            rolled_back=False, gap_s=0.0, message=f"not started: {why}")
        self._core.persist()
        self._core.operations.thaw()
        self._busy = None

    def _argv(self) -> list[str]:
        """This agent's options, with the listeners (or serial ports) as the fds it keeps open."""
        fds = self._fds.snapshot()
        listens = tuple(Listen(ch, "serial-fd", str(fds[f"serial:{ch}"])) if f"serial:{ch}" in fds
                        else Listen(ch, "fd", str(fds[f"listener:{ch}"])) for ch in CHANNELS)
        return [*dataclasses.replace(self._config, listens=listens).to_argv(), "--resume"]

    def _hand_over_ports(self, bridges: dict[str, _serial.Bridge],
                         swapped: list[tuple[int, int, str]]) -> None:
        """Put each serial channel's port in the fd table in place of its bridge's
        listener (which dies with this image), noting each in *swapped* for
        :meth:`_take_back_ports`."""
        listeners = self._fds.snapshot()
        for channel, bridge in bridges.items():
            if not bridge.flush_nowait(SERIAL_FLUSH_TIMEOUT_S):
                log.warning("channel %s: the host did not take the last bytes of its session",
                            channel)
            listener = listeners.get(f"listener:{channel}", -1)
            if listener >= 0:
                self._fds.forget(listener)
            self._fds.add(bridge.port_fd, f"serial:{channel}")
            swapped.append((listener, bridge.port_fd, channel))

    def _take_back_ports(self, swapped: list[tuple[int, int, str]]) -> None:
        for listener, port, channel in swapped:
            self._fds.forget(port)
            os.set_inheritable(port, False)
            if listener >= 0:
                self._fds.add(listener, f"listener:{channel}")

    def _exec(self, plan: Plan) -> None:
        """Hand over and execve; returns only if that failed (then all is thawed)."""
        began = time.monotonic_ns()
        self._reaper.stop()
        self._reaper.reap_nowait()  # exits pending now land on their processes first
        self._core.freeze_io()
        blob = _handover.blob_path(self._config.state_dir, plan.upgrade_id)
        records = state.upgrade_store(self._config.state_dir)
        swapped: list[tuple[int, int, str]] = []
        try:
            self._hand_over_ports(self._serial_bridges(), swapped)
            argv = self._argv()
            handover = _handover.write(self._config.state_dir, plan.upgrade_id,
                                       self._core.processes(), self._reaper.unclaimed(),
                                       self._core.consoles.streams())
            self._core.persist(handover, strict=True)
            target = release_launch(plan.agent_path, argv)
            records.save(state.UpgradeRecord(
                plan.upgrade_id, plan.from_version, plan.to_version, current_launch(argv), target,
                self._fds.snapshot(), self._core.activity.last_served_mono_ns,
                time.monotonic_ns()))
            self._fds.set_inheritable(True)
            log.info("upgrade %s: exec %s (hand-over: %d streams, %d bytes, written in %.1f ms)",
                     plan.upgrade_id, plan.agent_path, len(handover.streams), handover.blob_size,
                     (time.monotonic_ns() - began) / 1e6)
            os.execve(target.executable, target.argv, target.env)
        except Exception as exc:  # whatever it was, this image must keep serving
            if not isinstance(exc, OSError):
                log.exception("upgrade %s: hand-over failed", plan.upgrade_id)
            self._fds.set_inheritable(False)
            self._take_back_ports(swapped)
            records.path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            self._core.thaw_io()
            self._reaper.start()
            self._give_up(plan, f"cannot exec {plan.agent_path}: {exc}")
