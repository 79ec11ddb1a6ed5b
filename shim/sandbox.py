"""The shim's sandbox (pod): its VMM sandbox, agent connection and containers.

The Task service (``service.py``) translates containerd's requests into
calls on :class:`Sandbox`; nothing here sees a protobuf type of
containerd's.  The concerns around it live in their own modules, each
handed what it needs:

- ``shim._process``: containers and processes, their states and records;
- ``shim._pumps``: stdio endpoints and the pumps between them and the agent;
- ``shim._exits``: exit watchers and TaskExit ordering;
- ``shim._resume``: the sandbox's side of a live shim handoff;
- ``shim._agent_upgrade``: the agent's in-place upgrade.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from agent.api import pb
from keel import clock, procfs
from keel.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    KeelError,
    NotFound,
    Unavailable,
)
from keel.lifecycle import State
from keel.logs import tail
from observability.spans import detached
from observability.tracing import Tracing
from shim import _pumps, _tracing, events_pb, keel_events_pb, version
from shim._agentconn import AgentConnection, DialChannel
from shim._bundle import read_spec
from shim._container_calls import ContainerCalls
from shim._events import EventPublisher
from shim._exits import Exits
from shim._portforward import PortRelay
from shim._prelaunch import Prelaunch, launch_spec
from shim._process import Container, Process, exit_now
from shim._pumps import Endpoints
from shim.config import ShimConfig
from shim.dirs import SandboxDir
from shim.state import Exit, SandboxRecord, ShimIdentity, Stdio, store
from shim.vmm import backend as get_backend
from shim.vmm.api import LaunchSpec, MountSpec
from shim.vmm.api import Sandbox as VmmSandbox

log = logging.getLogger("keel.shim")
#: Seconds a signal may take in the agent (at most; the connection's timeout
#: if shorter) before a SIGKILL to the sandbox stops it through its VMM.
KILL_DEADLINE_S = 10.0


#: What a "sandbox launch" span tells of the VM (from its record).
_VM_KEYS = ("accel", "machine", "template", "vcpus", "memory_mib")


class Sandbox(ContainerCalls):
    """One pod's sandbox.  Lives on the daemon's event loop; its background
    jobs (pumps, exit watchers, the sandbox watch) run in *tasks*.

    ``lock`` serialises what changes the set of containers (create,
    delete, shutdown) and is held across a handoff freeze.
    """

    def __init__(self, sandbox_id: str, namespace: str, config: ShimConfig,
                 events: EventPublisher, tasks: asyncio.TaskGroup) -> None:
        self.id = sandbox_id
        self.namespace = namespace
        self.config = config
        self.dir = SandboxDir.of(config.state_root, sandbox_id)
        self.tasks = tasks
        self.lock = asyncio.Lock()
        self.exits = Exits(events, tasks, self.persist)
        self.vm: VmmSandbox | None = None
        #: A launch begun before this object existed (shim._prelaunch); set by the daemon.
        self.prelaunch: Prelaunch | None = None
        self.agent: AgentConnection | None = None
        #: The one connection to the agent's ops channel (a virtio-serial port
        #: serves one client): upgrades, staging and console sessions share it.
        self.ops: DialChannel | None = None
        #: The console switch set live; None: the config decides (shim/_console.py).
        self.console: bool | None = None
        #: Tracing (shim/_tracing.py); the ratio set live, None: the config decides.
        self.tracing = Tracing("keel-shim", config.tracing, {"keel.sandbox.id": sandbox_id,
                               "keel.namespace": namespace, "service.version": version()})
        self.trace_ratio: float | None = None
        self.span_pump = _tracing.SpanPump(self)
        #: Set while a shim handoff holds the agent's ops port: no ops call of ours.
        self.ops_frozen = False
        #: When the sandbox started (ns since the epoch; kept across shim upgrades).
        self.created_at_ns = 0
        self.containers: dict[str, Container] = {}
        #: Presented on every agent call; the agent binds the first it sees (agent/_session.py).
        self.session_key = secrets.token_hex(16)
        self._store = store(self.dir)
        self._events = events
        self._backend = get_backend(config.backend)
        self._sandbox_watch: asyncio.Task[None] | None = None
        self._ports: PortRelay | None = None
        #: What the processes of a sandbox that dies are reported with: 255,
        #: or 137 when the shim killed it for a SIGKILL the agent did not take.
        self._death_status = 255
        self._violations = 0

    # -- the sandbox itself ------------------------------------------------

    def _launch_spec(self, spec: dict[str, Any] | None = None) -> LaunchSpec:
        return launch_spec(self.id, self.config, self.dir.root, spec)

    def _connect(self, vm: VmmSandbox) -> AgentConnection:
        self.vm = vm
        self.agent = AgentConnection(vm.dialer("agent"), client_version=version(),
                                     session=f"shim-{os.getpid()}",
                                     session_key=self.session_key,
                                     timeout=self.config.agent_timeout_s,
                                     deadline=self.config.agent_call_timeout_s)
        self.agent.on_violation = self._protocol_violation
        self.ops = DialChannel(vm.dialer("ops"), self.session_key)
        return self.agent

    def release_ops(self) -> None:
        """Close the ops connection (a handoff's new shim needs the port); the
        next ops call dials again."""
        if self.ops is not None:
            self.ops.close()

    def _protocol_violation(self, cid: str, eid: str, detail: str) -> None:
        """Publish ``/keel/protocol-violation`` (the stream concerned logged it and stopped)."""
        self._violations += 1
        self._events.publish_nowait("/keel/protocol-violation", keel_events_pb.ProtocolViolation(
            sandbox_id=self.id, container_id=cid, exec_id=eid, detail=detail,
            count=self._violations))

    async def _ensure_started(self, spec: dict[str, Any] | None = None) -> AgentConnection:
        if self.agent is not None:
            return self.agent
        self.dir.create()
        tracer = self.tracing.tracer
        with tracer.span("sandbox launch", {"keel.backend": self._backend.name}) as span:
            launched = await self.prelaunch.take(spec) if self.prelaunch is not None else None
            vm = launched or await self._backend.launch(self._launch_spec(spec))
            if span is not None:
                span.set("keel.prelaunched", launched is not None)
                span.set("keel.vm", " ".join(f"{k}={v}" for k, v in sorted(vm.record().items())
                                             if k in _VM_KEYS))
        self.created_at_ns = time.time_ns()
        log.info("sandbox %s started (%s backend, pid %d)", self.id, self._backend.name, vm.pid)
        agent = self._connect(vm)
        try:
            with tracer.span("agent ready"):
                hello = await agent.wait_ready(self.config.agent_timeout_s, vm.alive)
            _tracing.guest_boot(self, vm.record(), hello)
        except KeelError as exc:
            agent_log = tail(self.dir.agent_log, 600)
            await self._stop_vm()
            raise Unavailable(f"{exc}; agent log: {agent_log}") from exc
        log.info("sandbox %s: agent %s ready (API %d, pid %d)", self.id, hello.agent_version,
                 hello.api_version, hello.agent_pid)
        self.watch_sandbox()
        await self.relay_ports()
        self.persist()
        if self.tracing.ratio > 0:
            self.span_pump.kick()
        return agent

    def adopt(self, rec: SandboxRecord) -> None:
        """Take over the running sandbox of *rec* (a new shim after a handoff).

        Raises NotFound when its VMM is gone.  Nothing runs until the
        handoff's ``go_live``.
        """
        self.session_key = rec.session_key  # "" when an older release started it: keyless
        self.console, self.created_at_ns = rec.console, rec.created_at_ns
        self._connect(self._backend.restore(self._launch_spec(), rec.vmm))
        self.containers = {c.id: Container.from_record(c) for c in rec.containers}

    def watch_sandbox(self) -> None:
        """Report every running process as exited (255) if the sandbox dies."""
        self._sandbox_watch = self.tasks.create_task(self._watch_sandbox(), context=detached(),
                                                     name=f"sandbox-watch-{self.id}")

    def unwatch_sandbox(self) -> None:
        if self._sandbox_watch is not None:
            self._sandbox_watch.cancel()  # it waits on the pidfd we may close
            self._sandbox_watch = None

    async def _watch_sandbox(self) -> None:
        vm = self.vm
        assert vm is not None
        await vm.wait_exit()
        if self.vm is not vm:
            return
        log.error("sandbox %s died; reporting its processes as exited (%d)", self.id,
                  self._death_status)
        self.exits.sandbox_died((p for c in self.containers.values() for p in c.processes()),
                                self._death_status)

    async def relay_ports(self) -> None:
        """Relay the pod's host-side localhost into the sandbox, where the backend needs it."""
        netns = self.vm.pod_netns() if self.vm is not None else None
        if netns and self.agent is not None and self._ports is None:
            self._ports = await PortRelay.start(self.id, netns, self.agent)

    async def _stop_vm(self) -> None:
        await self.span_pump.drain()
        self.span_pump.stop()
        if self._ports is not None:
            self._ports.close()
            self._ports = None
        self.unwatch_sandbox()
        vm, self.vm = self.vm, None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.ops is not None:
            self.ops.close()
            self.ops = None
        if vm is not None:
            await vm.stop()
            self._backend.close_fds(vm)

    def persist(self) -> SandboxRecord:
        """Write the sandbox's state file (atomically); the record written."""
        rec = SandboxRecord(
            sandbox_id=self.id, namespace=self.namespace, backend=self._backend.name,
            vmm=self.vm.record() if self.vm else {},
            shim=ShimIdentity(os.getpid(), procfs.start_time(os.getpid())),
            shim_version=version(),
            containers=tuple(c.record() for c in self.containers.values()),
            session_key=self.session_key,
            console=self.console, created_at_ns=self.created_at_ns,
        )
        self._store.save(rec)
        return rec

    async def shutdown(self) -> bool:
        """Stop the sandbox if no container is left; True if it was stopped."""
        async with self.lock:
            if self.containers:
                return False
            await self._stop_vm()
            self.dir.remove()
            return True

    def _live_agent(self) -> AgentConnection:
        if self.agent is None:
            raise FailedPrecondition(f"sandbox {self.id} has no running agent")
        return self.agent

    # -- containers and processes -------------------------------------------

    def container(self, cid: str) -> Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise NotFound(f"container {cid} not found in sandbox {self.id}") from None

    async def create(self, cid: str, bundle: str, mounts: tuple[MountSpec, ...], stdio: Stdio) -> int:
        async with self.lock:
            if cid in self.containers:
                raise AlreadyExists(f"container {cid} already exists")
            spec_json, spec = read_spec(Path(bundle))
            if stdio.terminal:
                stdio = Stdio(stdio.stdin, stdio.stdout, "", True)  # stderr is unused with a tty
            ends = Endpoints.open(stdio)
            try:
                agent = await self._ensure_started(spec)
                resp = await self._create_in_vm(agent, cid, bundle, mounts, spec, spec_json, ends,
                                                stdio.terminal)
            except BaseException:
                ends.close()
                raise
            proc = Process(cid, "", stdio, pid=resp.pid)
            self.containers[cid] = Container(cid, bundle, mounts, proc)
            _pumps.start(proc, agent, ends, self.tasks)
            self.persist()
        self._events.publish_nowait("/tasks/create", events_pb.TaskCreate(
            container_id=cid, bundle=bundle, pid=resp.pid,
            rootfs=[_pb_mount(m) for m in mounts],
            io=events_pb.TaskIo(stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
                                terminal=stdio.terminal)))
        log.info("created container %s (pid %d)", cid, resp.pid)
        return resp.pid

    async def _create_in_vm(self, agent: AgentConnection, cid: str, bundle: str,
                            mounts: tuple[MountSpec, ...], spec: dict[str, Any],
                            spec_json: bytes, ends: Endpoints,
                            terminal: bool) -> pb.CreateContainerResponse:
        assert self.vm is not None
        rootfs_host = Path(bundle) / ("rootfs" if mounts else
                                      (spec.get("root") or {}).get("path", "rootfs"))
        guest_spec = self.vm.guest_spec(spec_json)  # refuses what it cannot give, first
        try:
            rootfs = await self.vm.share_rootfs(cid, mounts, rootfs_host)
            guest_spec = await self.vm.share_volumes(cid, guest_spec)
            req = pb.CreateContainerRequest(
                container_id=cid, spec_json=guest_spec, rootfs=rootfs,
                stdio=ends.wire(terminal))
            return await agent.call(agent.stub.create_container, req)
        except BaseException:
            await self.vm.unshare_rootfs(cid, rootfs_host)
            raise

    async def start(self, cid: str, eid: str) -> int:
        c = self.container(cid)
        p = c.process(eid)
        if p.state is State.RUNNING:
            return p.pid
        p.require("start", State.CREATED)
        agent = self._live_agent()
        resp = await agent.call(agent.stub.start_process,
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
        self.exits.watch(p, agent)
        self.persist()
        log.info("started %s (pid %d)", p.name, p.pid)
        return p.pid

    async def wait(self, cid: str, eid: str) -> Exit:
        p = self.container(cid).process(eid)
        await p.exited.wait()
        assert p.exit is not None
        return p.exit

    async def kill(self, cid: str, eid: str, sig: int, all_: bool) -> None:
        """Signal a process through the agent.  Killing the pod never depends
        on the agent: a SIGKILL to the sandbox's own container that the agent
        does not take (dead, stuck) stops the sandbox through its VMM, and
        every process of it is reported killed (137)."""
        p = self.container(cid).process(eid)
        if p.state is State.STOPPED:
            raise NotFound(f"process {p.name} already finished")
        agent = self._live_agent()
        try:
            await agent.call(agent.stub.signal_process, pb.SignalProcessRequest(
                container_id=cid, exec_id=eid, signal=sig, all=all_),
                timeout=min(self.config.agent_timeout_s, KILL_DEADLINE_S), resend=False)
        except (DeadlineExceeded, Unavailable) as exc:
            if not (sig == signal.SIGKILL and not eid and cid == self.id and self.vm is not None):
                raise
            log.warning("sandbox %s: the agent did not take SIGKILL (%s); stopping the sandbox"
                        " through its %s backend", self.id, exc, self._backend.name)
            self._death_status = 128 + signal.SIGKILL
            await self.vm.stop()  # the sandbox watch reports every process as killed

    async def delete(self, cid: str, eid: str) -> tuple[int, Exit]:
        async with self.lock:
            c = self.container(cid)
            p = c.process(eid)
            p.require("delete", State.CREATED, State.STOPPED)
            agent = self._live_agent()
            assert self.vm is not None
            # A sandbox that died took its agent's process table with it:
            # deleting never waits on an agent that cannot answer.
            if self.vm.alive():
                try:
                    await agent.call(agent.stub.remove_process,
                                     pb.RemoveProcessRequest(container_id=cid, exec_id=eid))
                except NotFound:
                    pass  # already removed (a retried Delete)
            exit = p.exit or exit_now(0)
            for q in (p,) if eid else c.processes():
                await _pumps.stop(q)
                await self.exits.unwatch(q)
                q.close_stdio()
            if eid:
                del c.execs[eid]
            else:
                await self.vm.unshare_rootfs(cid, Path(c.bundle) / "rootfs")
                del self.containers[cid]
                self._events.publish_nowait("/tasks/delete", events_pb.TaskDelete(
                    container_id=cid, pid=p.pid, exit_status=exit.status,
                    exited_at=clock.utc_of_ns(exit.at_ns)))
            self.persist()
            log.info("deleted %s", p.name)
            return p.pid, exit


def _pb_mount(m: MountSpec) -> Any:
    from shim._pb.containerd import types as types_pb

    return types_pb.Mount(type=m.type, source=m.source, options=list(m.options))
