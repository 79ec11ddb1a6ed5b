"""The shim's core: one sandbox (pod), its containers and their processes.

Owns the VMM sandbox, the agent connection, the stdio pumps, the exit
watchers and the persisted state.  The Task service (``service.py``)
translates containerd's requests into calls on this class; nothing here
sees a protobuf type of containerd's.

Ordering rules containerd relies on (research: containerd-shim.md 4.2):
TaskStart is queued before Start returns and before any TaskExit; an exit
is reported after the process's output reached containerd's fifos (or a
short grace period passed, for output held open by an orphan).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from agent.api import AlreadyExists, FailedPrecondition, KeelError, NotFound, Unavailable, pb
from shim import events_pb, version
from shim._agentconn import AgentConnection
from shim._events import EventPublisher
from shim._process import Container, Exit, Process, State, Stdio
from shim._pumps import InputPump, OutputPump
from shim._stdio import Sink, Source
from shim.config import ShimConfig
from shim.dirs import SandboxDir
from shim.state import SandboxRecord, store
from shim.vmm import backend as get_backend
from shim.vmm.api import LaunchSpec, MountSpec
from shim.vmm.api import Sandbox as VmmSandbox

log = logging.getLogger("keel.shim")

#: How long an exit report waits for the process's output to drain.
OUTPUT_GRACE_S = 2.0


class Sandbox:
    def __init__(self, sandbox_id: str, namespace: str, config: ShimConfig,
                 events: EventPublisher, tasks: asyncio.TaskGroup) -> None:
        self.id = sandbox_id
        self.namespace = namespace
        self.config = config
        self.dir = SandboxDir.of(config.state_root, sandbox_id)
        self._store = store(self.dir)
        self._events = events
        self._tasks = tasks
        self._backend = get_backend(config.backend)
        self.vm: VmmSandbox | None = None
        self.agent: AgentConnection | None = None
        self.containers: dict[str, Container] = {}
        self._lock = asyncio.Lock()

    # -- sandbox lifecycle -------------------------------------------------

    def _launch_spec(self) -> LaunchSpec:
        cmd = self.config.agent_command or (sys.executable, "-m", "agent")
        return LaunchSpec(sandbox_id=self.id, root=self.dir.root, agent_command=cmd,
                          agent_args=("--runtime", self.config.runtime))

    async def _ensure_started(self) -> AgentConnection:
        if self.agent is not None:
            return self.agent
        self.dir.create()
        self.vm = await self._backend.launch(self._launch_spec())
        log.info("sandbox %s started (%s backend, pid %d)", self.id, self._backend.name, self.vm.pid)
        self.agent = AgentConnection(self.vm.dialer("agent"), client_version=version(),
                                     session=f"shim-{os.getpid()}", timeout=self.config.agent_timeout_s)
        try:
            hello = await self.agent.wait_ready(self.config.agent_timeout_s, self.vm.alive)
        except KeelError as exc:
            tail = _tail(self.dir.agent_log)
            await self._stop_vm()
            raise Unavailable(f"{exc}; agent log: {tail}") from exc
        log.info("agent %s ready (API %d, pid %d)", hello.agent_version, hello.api_version, hello.agent_pid)
        self._tasks.create_task(self._watch_sandbox(), name=f"sandbox-watch-{self.id}")
        self._persist()
        return self.agent

    async def _watch_sandbox(self) -> None:
        assert self.vm is not None
        vm = self.vm
        await vm.wait_exit()
        if self.vm is not vm:
            return
        log.error("sandbox %s died; reporting its processes as exited", self.id)
        for c in self.containers.values():
            for p in (c.init, *c.execs.values()):
                if p.state is not State.STOPPED and p.state is not State.CREATED:
                    self._record_exit(p, Exit.now(255))

    async def _stop_vm(self) -> None:
        vm, self.vm = self.vm, None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if vm is not None:
            await vm.stop()
            self._backend.close_fds(vm)

    def _persist(self) -> None:
        rec = SandboxRecord(
            sandbox_id=self.id, namespace=self.namespace, backend=self._backend.name,
            vmm={**(self.vm.record() if self.vm else {}), "shim": _shim_identity()},
            shim_version=version(),
            containers=tuple(c.record() for c in self.containers.values()),
        )
        self._store.save(rec)

    async def shutdown(self) -> bool:
        """Stop the sandbox if no container is left; True if it was stopped."""
        async with self._lock:
            if self.containers:
                return False
            await self._stop_vm()
            _remove_tree(self.dir.root)
            return True

    # -- containers --------------------------------------------------------

    def container(self, cid: str) -> Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise NotFound(f"container {cid} not found in sandbox {self.id}") from None

    async def create(self, cid: str, bundle: str, mounts: tuple[MountSpec, ...], stdio: Stdio) -> int:
        async with self._lock:
            if cid in self.containers:
                raise AlreadyExists(f"container {cid} already exists")
            spec_path = Path(bundle) / "config.json"
            try:
                spec_json = spec_path.read_bytes()
                spec = json.loads(spec_json)
            except FileNotFoundError:
                raise NotFound(f"{spec_path} does not exist") from None
            except (ValueError, UnicodeDecodeError) as exc:
                from agent.errors import InvalidArgument

                raise InvalidArgument(f"{spec_path}: not a valid OCI spec: {exc}") from exc
            if stdio.terminal:
                stdio = Stdio(stdio.stdin, stdio.stdout, "", True)  # stderr is unused with a tty
            sinks = [Sink.open(stdio.stdout), Sink.open(stdio.stderr)]
            source = Source.open(stdio.stdin)
            agent = await self._ensure_started()
            assert self.vm is not None
            rootfs_host = Path(bundle) / "rootfs"
            if not mounts:
                root = (spec.get("root") or {}).get("path", "rootfs")
                rootfs_host = Path(bundle) / root
            try:
                rootfs = await self.vm.share_rootfs(cid, mounts, rootfs_host)
                req = pb.CreateContainerRequest(
                    container_id=cid, spec_json=spec_json, rootfs=rootfs,
                    stdio=_pb_stdio(stdio, sinks, source))
                resp = await agent.call(agent.stub.create_container, req)
            except BaseException:
                for s in sinks:
                    if s:
                        s.close()
                if source:
                    source.close()
                if mounts:
                    await self.vm.unshare_rootfs(cid, rootfs_host)
                raise
            proc = Process(cid, "", stdio, pid=resp.pid)
            c = Container(cid, bundle, mounts, proc)
            self.containers[cid] = c
            self._start_pumps(proc, sinks, source)
            self._persist()
        self._events.publish_nowait("/tasks/create", events_pb.TaskCreate(
            container_id=cid, bundle=bundle, pid=resp.pid,
            rootfs=[_pb_mount(m) for m in mounts],
            io=events_pb.TaskIo(stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
                                terminal=stdio.terminal)))
        log.info("created container %s (pid %d)", cid, resp.pid)
        return resp.pid

    def _start_pumps(self, proc: Process, sinks: list[Sink | None], source: Source | None,
                     offsets: dict[str, int] | None = None) -> None:
        assert self.agent is not None
        offsets = offsets or {}
        streams = (pb.OutputStream.STDOUT, pb.OutputStream.STDERR)
        for name, stream, sink in zip(("stdout", "stderr"), streams, sinks, strict=True):
            if sink is None:
                continue
            pump = OutputPump(self.agent, proc.cid, proc.eid, stream, sink, offsets.get(name, 0))
            proc.outputs.append(pump)
            proc.tasks.append(self._tasks.create_task(
                _guard(pump.run(), f"{name} pump of {proc.name}"), name=f"{name}-{proc.name}"))
        if source is not None:
            proc.input = InputPump(self.agent, proc.cid, proc.eid, source, offsets.get("stdin", 0))
            proc.tasks.append(self._tasks.create_task(
                _guard(proc.input.run(), f"stdin pump of {proc.name}"), name=f"stdin-{proc.name}"))

    async def start(self, cid: str, eid: str) -> int:
        c = self.container(cid)
        p = c.process(eid)
        if p.state is State.RUNNING:
            return p.pid
        p.require(State.CREATED, action="start")
        assert self.agent is not None
        resp = await self.agent.call(self.agent.stub.start_process,
                                     pb.StartProcessRequest(container_id=cid, exec_id=eid))
        p.pid = resp.pid
        p.to(State.RUNNING)
        if eid:
            self._events.publish_nowait("/tasks/exec-started", events_pb.TaskExecStarted(
                container_id=cid, exec_id=eid, pid=p.pid))
        else:
            self._events.publish_nowait("/tasks/start", events_pb.TaskStart(container_id=cid, pid=p.pid))
        p.tasks.append(self._tasks.create_task(
            _guard(self._watch_exit(p), f"exit watcher of {p.name}"), name=f"wait-{p.name}"))
        self._persist()
        log.info("started %s (pid %d)", p.name, p.pid)
        return p.pid

    async def _watch_exit(self, p: Process) -> None:
        assert self.agent is not None
        req = pb.WaitProcessRequest(container_id=p.cid, exec_id=p.eid)
        resp = await self.agent.call(self.agent.stub.wait_process, req, retry_for=24 * 3600)
        pending = [o.eof.wait() for o in p.outputs]
        if pending:
            try:
                async with asyncio.timeout(OUTPUT_GRACE_S):
                    await asyncio.gather(*pending)
            except TimeoutError:
                log.info("%s exited; its output is still open (held by another process)", p.name)
        self._record_exit(p, Exit(resp.exit_status, resp.exited_at_ns))

    def _record_exit(self, p: Process, exit: Exit) -> None:
        if p.exit is not None:
            return
        p.exit = exit
        p.state = State.STOPPED
        self._events.publish_nowait("/tasks/exit", events_pb.TaskExit(
            container_id=p.cid, id=p.eid or p.cid, pid=p.pid, exit_status=exit.status,
            exited_at=_ts(exit.at_ns)))
        p.exit_published = True
        p.exited.set()
        log.info("%s exited with status %d", p.name, exit.status)
        try:
            self._persist()
        except OSError as exc:
            log.error("cannot persist state: %s", exc)

    async def wait(self, cid: str, eid: str) -> Exit:
        p = self.container(cid).process(eid)
        await p.exited.wait()
        assert p.exit is not None
        return p.exit

    async def kill(self, cid: str, eid: str, sig: int, all_: bool) -> None:
        p = self.container(cid).process(eid)
        if p.state is State.STOPPED:
            raise NotFound(f"process {p.name} already finished")
        assert self.agent is not None
        await self.agent.call(self.agent.stub.signal_process, pb.SignalProcessRequest(
            container_id=cid, exec_id=eid, signal=sig, all=all_))

    async def exec(self, cid: str, eid: str, process_json: bytes, stdio: Stdio) -> None:
        c = self.container(cid)
        if eid in c.execs:
            raise AlreadyExists(f"exec {eid} already exists in container {cid}")
        c.init.require(State.RUNNING, State.PAUSED, action="exec in")
        if stdio.terminal:
            stdio = Stdio(stdio.stdin, stdio.stdout, "", True)
        sinks = [Sink.open(stdio.stdout), Sink.open(stdio.stderr)]
        source = Source.open(stdio.stdin)
        assert self.agent is not None
        try:
            await self.agent.call(self.agent.stub.exec_process, pb.ExecProcessRequest(
                container_id=cid, exec_id=eid, process_json=process_json,
                stdio=_pb_stdio(stdio, sinks, source)))
        except BaseException:
            for s in sinks:
                if s:
                    s.close()
            if source:
                source.close()
            raise
        p = Process(cid, eid, stdio)
        c.execs[eid] = p
        self._start_pumps(p, sinks, source)
        self._persist()
        self._events.publish_nowait("/tasks/exec-added", events_pb.TaskExecAdded(container_id=cid, exec_id=eid))

    async def delete(self, cid: str, eid: str) -> tuple[int, Exit]:
        async with self._lock:
            c = self.container(cid)
            p = c.process(eid)
            p.require(State.CREATED, State.STOPPED, action="delete")
            if eid:
                # Execs have no ordering constraints with init, but the
                # container must still exist in the agent.
                pass
            assert self.agent is not None and self.vm is not None
            try:
                await self.agent.call(self.agent.stub.remove_process,
                                      pb.RemoveProcessRequest(container_id=cid, exec_id=eid))
            except NotFound:
                pass  # already removed (a retried Delete)
            exit = p.exit or Exit.now(0)
            p.cancel_tasks()
            _close_pumps(p)
            if eid:
                del c.execs[eid]
            else:
                for e in c.execs.values():
                    e.cancel_tasks()
                    _close_pumps(e)
                await self.vm.unshare_rootfs(cid, Path(c.bundle) / "rootfs")
                del self.containers[cid]
                self._events.publish_nowait("/tasks/delete", events_pb.TaskDelete(
                    container_id=cid, pid=p.pid, exit_status=exit.status, exited_at=_ts(exit.at_ns)))
            self._persist()
            log.info("deleted %s", p.name)
            return p.pid, exit

    async def close_io(self, cid: str, eid: str) -> None:
        p = self.container(cid).process(eid)
        if p.input is None:
            return
        for t in p.tasks:
            if t.get_name().startswith("stdin-"):
                t.cancel()
        await p.input.close_input()

    async def resize(self, cid: str, eid: str, width: int, height: int) -> None:
        p = self.container(cid).process(eid)
        p.require(State.CREATED, State.RUNNING, State.PAUSED, action="resize the terminal of")
        assert self.agent is not None
        await self.agent.call(self.agent.stub.resize_pty, pb.ResizePtyRequest(
            container_id=cid, exec_id=eid, width=width, height=height))

    async def pause(self, cid: str) -> None:
        c = self.container(cid)
        c.init.require(State.RUNNING, action="pause")
        assert self.agent is not None
        await self.agent.call(self.agent.stub.pause_container, pb.ContainerRequest(container_id=cid))
        c.init.to(State.PAUSED)
        self._events.publish_nowait("/tasks/paused", events_pb.TaskPaused(container_id=cid))
        self._persist()

    async def resume(self, cid: str) -> None:
        c = self.container(cid)
        c.init.require(State.PAUSED, action="resume")
        assert self.agent is not None
        await self.agent.call(self.agent.stub.resume_container, pb.ContainerRequest(container_id=cid))
        c.init.to(State.RUNNING)
        self._events.publish_nowait("/tasks/resumed", events_pb.TaskResumed(container_id=cid))
        self._persist()

    async def update(self, cid: str, resources_json: bytes) -> None:
        self.container(cid).init.require(State.CREATED, State.RUNNING, State.PAUSED, action="update")
        assert self.agent is not None
        await self.agent.call(self.agent.stub.update_container, pb.UpdateContainerRequest(
            container_id=cid, resources_json=resources_json))

    async def stats(self, cid: str) -> pb.CgroupStats:
        self.container(cid)
        assert self.agent is not None
        resp = await self.agent.call(self.agent.stub.stats_container, pb.ContainerRequest(container_id=cid))
        return resp.stats

    async def pids(self, cid: str) -> list[pb.ProcessEntry]:
        c = self.container(cid)
        if c.init.state is State.STOPPED:
            return []
        assert self.agent is not None
        resp = await self.agent.call(self.agent.stub.list_processes, pb.ContainerRequest(container_id=cid))
        return list(resp.processes)


async def _guard(coro: Any, what: str) -> None:
    """Run a background job; log its failure instead of tearing the shim down."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("%s failed: %s", what, exc)


def _close_pumps(p: Process) -> None:
    for o in p.outputs:
        o._sink.close()
    if p.input is not None:
        p.input._source.close()


def _pb_stdio(stdio: Stdio, sinks: list[Sink | None], source: Source | None) -> pb.Stdio:
    return pb.Stdio(terminal=stdio.terminal, stdin=source is not None,
                    stdout=sinks[0] is not None, stderr=sinks[1] is not None and not stdio.terminal)


def _pb_mount(m: MountSpec) -> Any:
    from shim._pb.containerd import types as types_pb

    return types_pb.Mount(type=m.type, source=m.source, options=list(m.options))


def _ts(ns: int) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace").strip() or "(empty)"
    except OSError:
        return "(none)"


def _shim_identity() -> dict[str, int]:
    from shim.vmm.process import _start_time

    return {"pid": os.getpid(), "start_time": _start_time(os.getpid())}


def _remove_tree(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)


__all__ = ["Sandbox", "FailedPrecondition"]
