"""The agent's process table and every operation on it.

Works on our own types (service.py translates protobuf at the boundary).
Runs on the event loop only.  Lifecycle calls on one container are
serialised by a per-container lock and run as :class:`Operations` so a
caller that disconnects never leaves one half done.  The state file is
rewritten after every lifecycle change.

For an in-place upgrade the core can freeze its I/O (:meth:`AgentCore.freeze_io`),
snapshot itself with a hand-over, and, in the new image, adopt the
containers rebuilt from it (:meth:`AgentCore.adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent import _bundle, _oom, _sysctls, state
from agent._console import Consoles
from agent._fds import FdTable
from agent._ops import Activity
from agent._processes import ChildPipes, Container, ExitInfo, Process, Stdio
from agent._reaper import Exit, Reaper
from agent._runc import Runc, StdioFds, console_socket, receive_console_nowait
from agent._stats import CgroupStats, from_runc_events
from agent._tasks import KeyedLocks, Operations
from agent.config import AgentConfig
from keel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, KeelError, NotFound
from keel.lifecycle import State

log = logging.getLogger("keel.agent.core")

#: Launches the runtime for a process: (stdio fds, console socket or None).
Launch = Callable[[StdioFds, Path | None], Awaitable[None]]


def fingerprint(*parts: object) -> str:
    """Digest of a request's defining fields, to tell a retry from a conflict."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


class AgentCore:
    """Containers and processes of this sandbox."""

    def __init__(self, config: AgentConfig, *, boot_id: str, reaper: Reaper, fds: FdTable,
                 runc: Runc, ops: Operations) -> None:
        self.boot_id = boot_id
        self._config = config
        self._reaper = reaper
        self._fds = fds
        self._runc = runc
        self._ops = ops
        self._locks = KeyedLocks()
        self._containers: dict[str, Container] = {}
        self._bundles = config.state_dir / "bundles"
        self._store = state.store(config.state_dir)
        #: When RPCs were last answered (the upgrade gap is measured from it).
        self.activity = Activity()
        #: How the last in-place upgrade ended; persisted.
        self.last_upgrade: state.UpgradeResult | None = None
        #: The owning session's key (agent/_session.py); persisted.
        self.session_key = ""
        #: Console sessions (agent/_console.py): persisted and handed over with the rest.
        self.consoles = Consoles(reaper, fds, config.output_buffer_bytes, self.running_pid)

    # -- lookups ---------------------------------------------------------

    def container(self, cid: str) -> Container:
        try:
            return self._containers[cid]
        except KeyError:
            raise NotFound(f"container {cid} not found") from None

    def running_pid(self, cid: str) -> int:
        """The init pid of container *cid*, which must be running (or paused)."""
        init = self.container(cid).init
        init.require("open a console in", State.RUNNING, State.PAUSED)
        return init.pid

    def process(self, cid: str, eid: str) -> Process:
        return self.container(cid).process(eid)

    def __len__(self) -> int:
        return len(self._containers)

    def container_ids(self) -> list[str]:
        return list(self._containers)

    def processes(self) -> list[Process]:
        return [p for c in self._containers.values() for p in c.processes()]

    # -- in-place upgrade --------------------------------------------------

    @property
    def operations(self) -> Operations:
        return self._ops

    async def wait_open(self) -> None:
        """Return at once, unless an upgrade froze the agent: then wait (for the exec)."""
        await self._ops.wait_open()

    def freeze_io(self) -> None:
        for proc in self.processes():
            proc.freeze_io()
        self.consoles.freeze()

    def thaw_io(self) -> None:
        for proc in self.processes():
            proc.thaw_io()
        self.consoles.thaw()

    def adopt(self, containers: list[Container]) -> None:
        """Take the containers an upgrade handed over; watch their live processes' exits."""
        for container in containers:
            self._containers[container.id] = container
            for proc in container.processes():
                if proc.pid > 0 and proc.exit is None:
                    self._reaper.watch(proc.pid, 0, functools.partial(self._on_exit, proc))

    # -- create / exec / start -------------------------------------------

    async def create_container(self, cid: str, spec_json: bytes, rootfs: str, stdio: Stdio) -> int:
        """Create (not start) a container; an identical retry answers the same pid."""
        spec = _bundle.container_spec(spec_json, rootfs, stdio.terminal)
        net_sysctls = _sysctls.take_net_sysctls(spec)
        fp = fingerprint(spec_json, rootfs, stdio)
        return await self._ops.run(self._create(cid, spec, net_sysctls, fp, stdio),
                                   f"create {cid}")

    async def _create(self, cid: str, spec: dict[str, object], net_sysctls: dict[str, str],
                      fp: str, stdio: Stdio) -> int:
        async with self._locks.hold(cid):
            existing = self._containers.get(cid)
            if existing is not None:
                if existing.init.fingerprint != fp:
                    raise AlreadyExists(f"container {cid} exists with a different request")
                return existing.init.pid
            _sysctls.apply(net_sysctls)  # the netns the container will share: ours
            bundle = _bundle.Bundle(self._bundles, cid)
            bundle.create(spec)
            proc = Process(cid, "", stdio, fp, self._config.output_buffer_bytes)
            try:
                await self._spawn(proc, bundle.init_pid_file, lambda fds, console: self._runc.create(
                    cid, bundle.dir, bundle.init_pid_file, fds, console))
            except Exception:
                with contextlib.suppress(KeelError):
                    await self._runc.delete(cid)  # whatever half of it the runtime made
                bundle.remove()
                raise
            self._containers[cid] = Container(cid, bundle.dir, proc)
            log.info("%s: created, pid %d", cid, proc.pid)
            self.persist()
            return proc.pid

    async def _spawn(self, proc: Process, pid_file: Path, launch: Launch) -> None:
        """Run *launch* with fresh stdio, then adopt the process it started."""
        pipes = ChildPipes(proc.stdio, self._fds, proc.name)
        pty = -1
        since = time.monotonic_ns()
        try:
            pty = await self._launch(proc, pipes, launch)
            proc.pid = _bundle.read_pid(pid_file)
        except BaseException:
            pipes.close()
            self._fds.close(pty)
            raise
        proc.attach(pipes, self._fds, pty, self._config.stdin_buffer_bytes)
        self._reaper.watch(proc.pid, since, lambda exit: self._on_exit(proc, exit))

    async def _launch(self, proc: Process, pipes: ChildPipes, launch: Launch) -> int:
        """Run the runtime; returns the pty master it sent (registered), or -1."""
        if not proc.stdio.terminal:
            await launch(pipes.child_fds(), None)
            pipes.close_child_ends()
            return -1
        with console_socket(self._config.state_dir) as (path, sock):
            await launch(pipes.child_fds(), path)
            pipes.close_child_ends()
            return self._fds.add(receive_console_nowait(sock, proc.name), f"pty:{proc.name}")

    def _on_exit(self, proc: Process, exit: Exit) -> None:
        if proc.removed:
            return
        log.info("%s: pid %d exited with status %d", proc.name, exit.pid, exit.status)
        proc.on_exit(exit.status, exit.exited_at_ns)
        self.persist()

    async def exec_process(self, cid: str, eid: str, process_json: bytes, stdio: Stdio) -> None:
        """Register an exec (started by start_process); a retry is a no-op."""
        process = _bundle.exec_process(process_json, stdio.terminal)
        fp = fingerprint(process_json, stdio)
        async with self._locks.hold(cid):
            container = self.container(cid)
            existing = container.execs.get(eid)
            if existing is not None:
                if existing.fingerprint != fp:
                    raise AlreadyExists(f"exec {eid} of container {cid} exists with a different request")
                return
            container.init.require("exec in", State.RUNNING)
            _bundle.write_json(_bundle.Bundle(self._bundles, cid).exec_files(eid)[0], process)
            container.execs[eid] = Process(cid, eid, stdio, fp, self._config.output_buffer_bytes)
            log.info("%s/%s: exec registered: %s", cid, eid, process["args"])
            self.persist()

    async def start_process(self, cid: str, eid: str) -> int:
        """Start the init (runc start) or an exec (runc exec); a started one answers its pid."""
        return await self._ops.run(self._start(cid, eid), f"start {cid}/{eid}")

    async def _start(self, cid: str, eid: str) -> int:
        async with self._locks.hold(cid):
            container = self.container(cid)
            proc = container.process(eid)
            if proc.started:
                return proc.pid
            proc.require("start", State.CREATED)
            if eid:
                container.init.require("exec in", State.RUNNING)
                process_file, pid_file = _bundle.Bundle(self._bundles, cid).exec_files(eid)
                await self._spawn(proc, pid_file, lambda fds, console: self._runc.exec(
                    cid, process_file, pid_file, fds, console))
            else:
                await self._runc.run(["start", cid])
            proc.started = True
            if proc.state is State.CREATED:  # it may have exited already
                proc.to(State.RUNNING, "start")
            self.persist()
            return proc.pid

    # -- signals, exits, removal -----------------------------------------

    async def signal_process(self, cid: str, eid: str, sig: int, all_processes: bool) -> None:
        """Signal a process; NotFound once it has exited (containerd relies on that)."""
        if not 0 < sig < 65:
            raise InvalidArgument(f"signal {sig} is out of range 1-64")
        proc = self.process(cid, eid)
        if proc.state is State.STOPPED:
            raise NotFound(f"{proc.what} has already exited")
        log.info("%s: signal %d%s", proc.name, sig, " to all processes" if all_processes else "")
        if not eid:
            await self._ops.run(self._runc.kill(cid, sig, all_processes), f"kill {cid}")
            return
        proc.require("signal", State.RUNNING, State.PAUSED)
        try:
            os.kill(proc.pid, sig)  # safe: until we reap it, the pid is still this process
        except ProcessLookupError:
            raise NotFound(f"{proc.what} has already exited") from None

    async def wait_process(self, cid: str, eid: str) -> tuple[ExitInfo, int]:
        """(exit, pid) once the process has exited; kept until RemoveProcess."""
        proc = self.process(cid, eid)
        return await proc.wait_exit(), proc.pid

    def oom_killed(self, cid: str) -> bool:
        """Whether the kernel OOM-killed a process of container *cid* (read
        from its cgroup, which lives until the container is removed)."""
        container = self._containers.get(cid)
        if container is None:
            return False
        kills = _oom.oom_kills(_oom.cgroups_path(_bundle.Bundle(self._bundles, cid).config))
        return bool(kills)

    async def remove_process(self, cid: str, eid: str) -> None:
        """Forget an exited (or never started) process; for the init, delete the container."""
        await self._ops.run(self._remove(cid, eid), f"remove {cid}/{eid}")

    async def _remove(self, cid: str, eid: str) -> None:
        async with self._locks.hold(cid):
            container = self.container(cid)
            proc = container.process(eid)
            proc.require("remove", State.CREATED, State.STOPPED)
            if eid:
                proc.release(self._fds)
                del container.execs[eid]
                for path in _bundle.Bundle(self._bundles, cid).exec_files(eid):
                    path.unlink(missing_ok=True)
            else:
                await self._runc.delete(cid)
                if proc.state is State.CREATED:
                    # runc killed the waiting init: record its exit so waiters see it.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await proc.wait_exit()
                for p in container.processes():
                    p.release(self._fds)
                _bundle.Bundle(self._bundles, cid).remove()
                del self._containers[cid]
            log.info("%s: removed", proc.name)
            self.persist()

    # -- stdio -----------------------------------------------------------

    async def read_output(self, cid: str, eid: str, stderr: bool, offset: int, max_bytes: int,
                          wait_s: float) -> tuple[bytes, bool]:
        proc = self.process(cid, eid)
        buffer = proc.stderr if stderr else proc.stdout
        return await buffer.read(offset, max_bytes, wait_s)

    def _stdin(self, proc: Process) -> Process:
        if not (proc.stdio.stdin or proc.stdio.terminal):
            raise FailedPrecondition(f"{proc.what} has no stdin (Stdio.stdin was false)")
        if proc.stdin is None:
            raise FailedPrecondition(f"{proc.what} is {proc.state.value}; start it first")
        return proc

    async def write_stdin(self, cid: str, eid: str, offset: int, data: bytes) -> int:
        proc = self._stdin(self.process(cid, eid))
        assert proc.stdin is not None
        return await proc.stdin.write(offset, data)

    async def close_stdin(self, cid: str, eid: str, offset: int) -> None:
        proc = self.process(cid, eid)
        if not (proc.stdio.stdin or proc.stdio.terminal):
            return  # nothing to close
        self._stdin(proc)
        assert proc.stdin is not None
        if not proc.stdin.closed:
            proc.stdin.close_at(offset)
            self.persist()

    async def resize_pty(self, cid: str, eid: str, width: int, height: int) -> None:
        proc = self.process(cid, eid)
        if proc.pty_fd < 0:
            why = "is not started yet" if proc.stdio.terminal else "has no terminal"
            raise FailedPrecondition(f"{proc.what} {why}")
        if not (0 < width < 65536 and 0 < height < 65536):
            raise InvalidArgument(f"terminal size {width}x{height} is out of range")
        fcntl.ioctl(proc.pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    # -- container-wide --------------------------------------------------

    async def pause(self, cid: str, resume: bool) -> None:
        await self._ops.run(self._pause(cid, resume), f"{'resume' if resume else 'pause'} {cid}")

    async def _pause(self, cid: str, resume: bool) -> None:
        async with self._locks.hold(cid):
            init = self.container(cid).init
            action, before, after = (("resume", State.PAUSED, State.RUNNING) if resume
                                     else ("pause", State.RUNNING, State.PAUSED))
            init.require(action, before)
            await self._runc.run([action, cid])
            if init.state is before:
                init.to(after, action)
            self.persist()

    async def update(self, cid: str, resources_json: bytes) -> None:
        """Apply OCI LinuxResources (runc update)."""
        resources = _bundle.parse_object(resources_json, "resources_json")
        await self._ops.run(self._update(cid, resources), f"update {cid}")

    async def _update(self, cid: str, resources: dict[str, object]) -> None:
        async with self._locks.hold(cid):
            container = self.container(cid)
            container.init.require("update", State.CREATED, State.RUNNING, State.PAUSED)
            path = container.bundle / "resources.json"
            _bundle.write_json(path, resources)
            await self._runc.run(["update", "--resources", str(path), cid])
            log.info("%s: resources updated", cid)

    async def stats(self, cid: str) -> CgroupStats:
        self.container(cid).init.require("read stats of", State.CREATED, State.RUNNING,
                                         State.PAUSED)
        # An operation like any runtime call, so an upgrade waits for it to finish.
        return from_runc_events(await self._ops.run(self._runc.events_stats(cid), f"stats {cid}"))

    async def list_processes(self, cid: str) -> list[tuple[int, str]]:
        """(pid, exec_id) of every process in the container; exec_id "" if not an exec."""
        container = self.container(cid)
        container.init.require("list processes of", State.CREATED, State.RUNNING, State.PAUSED)
        by_pid = {p.pid: p.exec_id for p in container.execs.values()
                  if p.pid and p.state is not State.STOPPED}
        pids = await self._ops.run(self._runc.ps(cid), f"ps {cid}")
        return [(pid, by_pid.get(pid, "")) for pid in pids]

    # -- state -----------------------------------------------------------

    def snapshot(self, handover: state.Handover | None = None) -> state.AgentState:
        return state.AgentState(
            boot_id=self.boot_id,
            containers=tuple(
                state.ContainerRecord(c.id, str(c.bundle), tuple(p.record() for p in c.processes()))
                for c in self._containers.values()
            ),
            fds=self._fds.snapshot(),
            handover=handover,
            last_upgrade=self.last_upgrade,
            session_key=self.session_key,
            consoles=self.consoles.records(),
        )

    def persist(self, handover: state.Handover | None = None, *, strict: bool = False) -> None:
        """Write the state file.  A failure is logged (the change already happened),
        or raised (OSError) with *strict*: an upgrade must not exec without it."""
        try:
            self._store.save(self.snapshot(handover))
        except OSError as exc:
            if strict:
                raise
            log.error("cannot write %s: %s", self._store.path, exc)

