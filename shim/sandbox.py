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
from pathlib import Path
from typing import Any

from agent.api import pb
from keel import clock, procfs
from keel.errors import AlreadyExists, FailedPrecondition, KeelError, NotFound, Unavailable
from keel.logs import tail
from shim import events_pb, version
from shim._agentconn import AgentConnection
from shim._events import EventPublisher
from shim._prelaunch import Prelaunch, launch_spec, netns_path
from shim._process import Container, Exit, Process, State, Stdio
from shim._pumps import InputPump, OutputPump
from shim._stdio import Sink, Source
from shim.config import ShimConfig
from shim.dirs import SandboxDir
from shim.state import SandboxRecord, store
from shim.vmm import _sizing
from shim.vmm import backend as get_backend
from shim.vmm.api import LaunchSpec, MountSpec
from shim.vmm.api import Sandbox as VmmSandbox

log = logging.getLogger("keel.shim")

#: How long an exit report waits for the process's output to drain.
OUTPUT_GRACE_S = 2.0
#: Seconds one Hello to an upgraded agent may go unanswered before the shim redials.
UPGRADE_HELLO_ATTEMPT_S = 30.0


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
        #: A launch begun before this object existed (shim._prelaunch); set by the daemon.
        self.prelaunch: Prelaunch | None = None
        self.agent: AgentConnection | None = None
        self.containers: dict[str, Container] = {}
        self._lock = asyncio.Lock()
        self._sandbox_watch: asyncio.Task[None] | None = None

    # -- sandbox lifecycle -------------------------------------------------

    def _launch_spec(self, spec: dict[str, Any] | None = None) -> LaunchSpec:
        return launch_spec(self.id, self.config, self.dir.root, spec)

    async def _ensure_started(self, spec: dict[str, Any] | None = None) -> AgentConnection:
        if self.agent is not None:
            return self.agent
        self.dir.create()
        launched = await self.prelaunch.take(spec) if self.prelaunch is not None else None
        self.vm = launched or await self._backend.launch(self._launch_spec(spec))
        log.info("sandbox %s started (%s backend, pid %d)", self.id, self._backend.name, self.vm.pid)
        self.agent = AgentConnection(self.vm.dialer("agent"), client_version=version(),
                                     session=f"shim-{os.getpid()}", timeout=self.config.agent_timeout_s)
        try:
            hello = await self.agent.wait_ready(self.config.agent_timeout_s, self.vm.alive)
        except KeelError as exc:
            agent_log = tail(self.dir.agent_log, 600)
            await self._stop_vm()
            raise Unavailable(f"{exc}; agent log: {agent_log}") from exc
        log.info("agent %s ready (API %d, pid %d)", hello.agent_version, hello.api_version, hello.agent_pid)
        self._sandbox_watch = self._tasks.create_task(self._watch_sandbox(),
                                                      name=f"sandbox-watch-{self.id}")
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
        if self._sandbox_watch is not None:
            self._sandbox_watch.cancel()  # it waits on the pidfd we are about to close
            self._sandbox_watch = None
        vm, self.vm = self.vm, None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if vm is not None:
            await vm.stop()
            self._backend.close_fds(vm)

    def _persist(self) -> SandboxRecord:
        rec = SandboxRecord(
            sandbox_id=self.id, namespace=self.namespace, backend=self._backend.name,
            vmm={**(self.vm.record() if self.vm else {}), "shim": _shim_identity()},
            shim_version=version(),
            containers=tuple(c.record() for c in self.containers.values()),
        )
        self._store.save(rec)
        return rec

    async def shutdown(self) -> bool:
        """Stop the sandbox if no container is left; True if it was stopped."""
        async with self._lock:
            if self.containers:
                return False
            await self._stop_vm()
            _remove_tree(self.dir.root)
            return True

    # -- live handoff ------------------------------------------------------

    async def freeze(self) -> SandboxRecord:
        """Stop every pump at a chunk boundary and every exit watcher, let go
        of the agent channel, persist; returns the record a new shim resumes.

        Between freeze and ``thaw``/exit nothing is sent to containerd and
        nothing is read from the agent.
        """
        await self._lock.acquire()
        for c in self.containers.values():
            for p in c.processes():
                await _stop_process(p)
        if self._sandbox_watch is not None:
            self._sandbox_watch.cancel()
        if self.agent is not None:
            self.agent.close()  # virtio-serial allows one client: release the port
        rec = self._persist()
        return rec

    def claim(self) -> None:
        """Record this shim as the sandbox's owner in the state file.

        The new shim claims before READY, so that once the old one has
        committed, a crash of the new one is seen as a dead owner by
        containerd's ``delete`` (the old one may linger a moment); ``thaw``
        claims back after a failed handoff.
        """
        self._persist()

    def thaw(self) -> None:
        """Undo ``freeze`` after a failed handoff: resume where we stopped."""
        try:
            self.claim()
            self._resume_processes(reopen=False)
            if self.vm is not None:
                self._sandbox_watch = self._tasks.create_task(self._watch_sandbox(),
                                                              name=f"sandbox-watch-{self.id}")
        finally:
            self._lock.release()

    async def restore(self, rec: SandboxRecord) -> None:
        """Re-attach to a running sandbox from a record (new shim side).

        Dials the agent and checks that it knows every container; pumps and
        watchers start only in ``go_live()``, after the old shim let go.
        """
        from shim._process import container_from_record

        self.vm = self._backend.restore(self._launch_spec(), rec.vmm)
        self.agent = AgentConnection(self.vm.dialer("agent"), client_version=version(),
                                     session=f"shim-{os.getpid()}", timeout=self.config.agent_timeout_s)
        self.containers = {c["id"]: container_from_record(c) for c in rec.containers}

    async def check_health(self) -> None:
        """The agent answers and holds every container we know of."""
        assert self.agent is not None and self.vm is not None
        await self.agent.wait_ready(self.config.agent_timeout_s, self.vm.alive)
        state = await self.agent.call(self.agent.stub.get_state, pb.Empty())
        known = {c.container_id for c in state.containers}
        missing = sorted(set(self.containers) - known)
        if missing:
            raise FailedPrecondition(f"agent does not know containers {', '.join(missing)}")

    def go_live(self) -> None:
        """Start pumps, watchers and the sandbox watch (new shim, after commit)."""
        self._resume_processes(reopen=True)
        self._sandbox_watch = self._tasks.create_task(self._watch_sandbox(),
                                                      name=f"sandbox-watch-{self.id}")
        self._persist()

    def _resume_processes(self, reopen: bool) -> None:
        for c in self.containers.values():
            for p in c.processes():
                if reopen:
                    sinks, source = _reopen(p)
                else:
                    p.resume_from = p.offsets()
                    sinks = {n: o.sink for n, o in p.outputs.items() if not o.eof.is_set()}
                    source = p.input.source if p.input and not p.input.closed else None
                    p.outputs, p.input = {}, None
                self._start_pumps(p, sinks, source)
                if p.state in (State.RUNNING, State.PAUSED):
                    self._watch(p)
                elif p.exit is not None and not p.exit_published:
                    self._record_exit(p, p.exit, force=True)

    # -- agent upgrade -----------------------------------------------------

    async def upgrade_agent(self, agent_path: str, to_version: str) -> Any:
        """Have the agent exec *agent_path* in place (same PID, containers
        stay its children); the agent channel reconnects by itself and the
        pumps resume at their offsets.  Returns the ops UpgradeAgentResponse.
        """
        from agent.api import ops_pb
        from shim._agentconn import DialChannel

        if self.vm is None or self.agent is None:
            raise FailedPrecondition(f"sandbox {self.id} has no running agent")
        channel = DialChannel(self.vm.dialer("ops"))
        try:
            stub = ops_pb.OpsServiceStub(channel)
            resp = await self.agent.call(
                stub.upgrade_agent,
                ops_pb.UpgradeAgentRequest(agent_path=agent_path, to_version=to_version),
                timeout=60.0, retry_for=0)
        finally:
            channel.close()
        began = asyncio.get_running_loop().time()
        # A VM's agent ends the host's old serial session itself (GOAWAY); should
        # that be lost, a Hello unanswered for long is taken as a dead connection.
        hello = await self.agent.wait_ready(self.config.agent_timeout_s, self.vm.alive,
                                            attempt_s=UPGRADE_HELLO_ATTEMPT_S)
        # The agent answered just before its exec; what runs now tells how it
        # ended.  The gap is as the shim saw it: that answer to the new Hello.
        resp.gap_s = asyncio.get_running_loop().time() - began
        resp.rolled_back = hello.agent_version != resp.to_version
        resp.message = (f"release {resp.to_version} failed; back on {hello.agent_version}"
                        if resp.rolled_back else "upgraded")
        log.info("agent upgraded %s -> %s (now %s, gap %.0f ms%s)", resp.from_version,
                 resp.to_version, hello.agent_version, resp.gap_s * 1000,
                 ", rolled back" if resp.rolled_back else "")
        self._persist()
        return resp

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
                from keel.errors import InvalidArgument

                raise InvalidArgument(f"{spec_path}: not a valid OCI spec: {exc}") from exc
            if stdio.terminal:
                stdio = Stdio(stdio.stdin, stdio.stdout, "", True)  # stderr is unused with a tty
            sinks = {"stdout": Sink.open(stdio.stdout), "stderr": Sink.open(stdio.stderr)}
            source = Source.open(stdio.stdin)
            agent = await self._ensure_started(spec)
            assert self.vm is not None
            rootfs_host = Path(bundle) / "rootfs"
            if not mounts:
                root = (spec.get("root") or {}).get("path", "rootfs")
                rootfs_host = Path(bundle) / root
            try:
                rootfs = await self.vm.share_rootfs(cid, mounts, rootfs_host)
                req = pb.CreateContainerRequest(
                    container_id=cid, spec_json=_guest_spec(self.vm, spec_json), rootfs=rootfs,
                    stdio=_pb_stdio(stdio, sinks, source))
                resp = await agent.call(agent.stub.create_container, req)
            except BaseException:
                _close(sinks, source)
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

    def _start_pumps(self, proc: Process, sinks: dict[str, Sink | None],
                     source: Source | None) -> None:
        """Start (or resume, from ``proc.resume_from``) the stdio pumps."""
        assert self.agent is not None
        offsets = proc.resume_from
        streams = {"stdout": pb.OutputStream(1), "stderr": pb.OutputStream(2)}
        for name, sink in sinks.items():
            if sink is None:
                continue
            pump = OutputPump(self.agent, proc.cid, proc.eid, streams[name], sink,
                              int(offsets.get(name, 0)))
            proc.outputs[name] = pump
            pump.task = self._tasks.create_task(
                _guard(pump.run(), f"{name} pump of {proc.name}"), name=f"{name}-{proc.name}")
        if source is not None:
            proc.input = InputPump(self.agent, proc.cid, proc.eid, source, int(offsets.get("stdin", 0)),
                                   started=not proc.eid or proc.state is not State.CREATED)
            proc.input.task = self._tasks.create_task(
                _guard(proc.input.run(), f"stdin pump of {proc.name}"), name=f"stdin-{proc.name}")

    def _watch(self, p: Process) -> None:
        p.watcher = self._tasks.create_task(
            _guard(self._watch_exit(p), f"exit watcher of {p.name}"), name=f"wait-{p.name}")

    async def start(self, cid: str, eid: str) -> int:
        c = self.container(cid)
        p = c.process(eid)
        if p.state is State.RUNNING:
            return p.pid
        p.require("start", State.CREATED)
        assert self.agent is not None
        resp = await self.agent.call(self.agent.stub.start_process,
                                     pb.StartProcessRequest(container_id=cid, exec_id=eid))
        p.pid = resp.pid
        p.to(State.RUNNING, "start")
        if p.input is not None:
            p.input.started.set()  # the agent takes the exec's stdin now
        if eid:
            self._events.publish_nowait("/tasks/exec-started", events_pb.TaskExecStarted(
                container_id=cid, exec_id=eid, pid=p.pid))
        else:
            self._events.publish_nowait("/tasks/start", events_pb.TaskStart(container_id=cid, pid=p.pid))
        self._watch(p)
        self._persist()
        log.info("started %s (pid %d)", p.name, p.pid)
        return p.pid

    async def _watch_exit(self, p: Process) -> None:
        assert self.agent is not None
        req = pb.WaitProcessRequest(container_id=p.cid, exec_id=p.eid)
        resp = await self.agent.call(self.agent.stub.wait_process, req, retry_for=24 * 3600)
        pending = [o.eof.wait() for o in p.outputs.values()]
        if pending:
            try:
                async with asyncio.timeout(OUTPUT_GRACE_S):
                    await asyncio.gather(*pending)
            except TimeoutError:
                log.info("%s exited; its output is still open (held by another process)", p.name)
        self._record_exit(p, Exit(resp.exit_status, resp.exited_at_ns))

    def _record_exit(self, p: Process, exit: Exit, force: bool = False) -> None:
        if p.exit is not None and not force:
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
        c.init.require("exec in", State.RUNNING, State.PAUSED)
        if stdio.terminal:
            stdio = Stdio(stdio.stdin, stdio.stdout, "", True)
        sinks = {"stdout": Sink.open(stdio.stdout), "stderr": Sink.open(stdio.stderr)}
        source = Source.open(stdio.stdin)
        assert self.agent is not None
        try:
            await self.agent.call(self.agent.stub.exec_process, pb.ExecProcessRequest(
                container_id=cid, exec_id=eid, process_json=process_json,
                stdio=_pb_stdio(stdio, sinks, source)))
        except BaseException:
            _close(sinks, source)
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
            p.require("delete", State.CREATED, State.STOPPED)
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
            for q in (p,) if eid else c.processes():
                await _stop_process(q)
                q.close_stdio()
            if eid:
                del c.execs[eid]
            else:
                await self.vm.unshare_rootfs(cid, Path(c.bundle) / "rootfs")
                del self.containers[cid]
                self._events.publish_nowait("/tasks/delete", events_pb.TaskDelete(
                    container_id=cid, pid=p.pid, exit_status=exit.status, exited_at=clock.utc_of_ns(exit.at_ns)))
            self._persist()
            log.info("deleted %s", p.name)
            return p.pid, exit

    async def close_io(self, cid: str, eid: str) -> None:
        p = self.container(cid).process(eid)
        if p.input is not None:
            await p.input.close_input()

    async def resize(self, cid: str, eid: str, width: int, height: int) -> None:
        p = self.container(cid).process(eid)
        if p.state is State.STOPPED:
            return  # ctr resizes after a short-lived process exited; runc's shim ignores it too
        assert self.agent is not None
        try:
            await self.agent.call(self.agent.stub.resize_pty, pb.ResizePtyRequest(
                container_id=cid, exec_id=eid, width=width, height=height))
        except (NotFound, FailedPrecondition):
            pass  # it exited while the call was on its way: as above

    async def pause(self, cid: str) -> None:
        c = self.container(cid)
        c.init.require("pause", State.RUNNING)
        assert self.agent is not None
        await self.agent.call(self.agent.stub.pause_container, pb.ContainerRequest(container_id=cid))
        c.init.to(State.PAUSED, "pause")
        self._events.publish_nowait("/tasks/paused", events_pb.TaskPaused(container_id=cid))
        self._persist()

    async def resume(self, cid: str) -> None:
        c = self.container(cid)
        c.init.require("resume", State.PAUSED)
        assert self.agent is not None
        await self.agent.call(self.agent.stub.resume_container, pb.ContainerRequest(container_id=cid))
        c.init.to(State.RUNNING, "resume")
        self._events.publish_nowait("/tasks/resumed", events_pb.TaskResumed(container_id=cid))
        self._persist()

    async def update(self, cid: str, resources_json: bytes) -> None:
        self.container(cid).init.require("update", State.CREATED, State.RUNNING, State.PAUSED)
        assert self.agent is not None
        # A VM grows first (QemuSandbox.grow_to: vCPU/DIMM hotplug), so the
        # new limits have room; sized by this container's resources alone.
        grow = getattr(self.vm, "grow_to", None)
        if grow is not None:
            try:
                resources = json.loads(resources_json or b"{}")
            except ValueError:
                resources = {}
            if not isinstance(resources, dict):
                resources = {}
            await grow(_sizing.workload([{"linux": {"resources": resources}}]))
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


_netns_path = netns_path


def _guest_spec(vm: VmmSandbox, spec_json: bytes) -> bytes:
    """The spec as the agent must see it: a VM backend rewrites host-only parts
    (``QemuSandbox.guest_spec``); the process backend's agent runs on the host."""
    adapt = getattr(vm, "guest_spec", None)
    return adapt(spec_json) if adapt is not None else spec_json


async def _guard(coro: Any, what: str) -> None:
    """Run a background job; log its failure instead of tearing the shim down."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("%s failed: %s", what, exc)


async def _stop_process(p: Process) -> None:
    """Stop a process's pumps at chunk boundaries and its exit watcher."""
    for pump in (*p.outputs.values(), *([p.input] if p.input else [])):
        await pump.stop()
    if p.watcher is not None:
        p.watcher.cancel()
        try:
            await p.watcher
        except asyncio.CancelledError:
            if not p.watcher.cancelled():
                raise
        p.watcher = None


def _reopen(p: Process) -> tuple[dict[str, Sink | None], Source | None]:
    """Open the stdio endpoints again in a new shim, skipping finished ones."""
    done = p.resume_from
    stdio = p.stdio
    sinks = {
        "stdout": None if done.get("stdout_eof") else Sink.open(stdio.stdout),
        "stderr": None if done.get("stderr_eof") or stdio.terminal else Sink.open(stdio.stderr),
    }
    source = None if done.get("stdin_closed") else Source.open(stdio.stdin)
    return sinks, source


def _close(sinks: dict[str, Sink | None], source: Source | None) -> None:
    for sink in sinks.values():
        if sink:
            sink.close()
    if source:
        source.close()


def _pb_stdio(stdio: Stdio, sinks: dict[str, Sink | None], source: Source | None) -> pb.Stdio:
    return pb.Stdio(terminal=stdio.terminal, stdin=source is not None,
                    stdout=sinks["stdout"] is not None,
                    stderr=sinks["stderr"] is not None and not stdio.terminal)


def _pb_mount(m: MountSpec) -> Any:
    from shim._pb.containerd import types as types_pb

    return types_pb.Mount(type=m.type, source=m.source, options=list(m.options))


def _shim_identity() -> dict[str, int]:
    return {"pid": os.getpid(), "start_time": procfs.start_time(os.getpid())}


def _remove_tree(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)


__all__ = ["Sandbox", "FailedPrecondition"]
