"""Finding sandboxes and talking to their shims (ShimOps on ``ops.sock``).

Every sandbox directory ``<state_root>/sandboxes/<id>/`` with an
``ops.sock`` is a candidate; a socket that does not answer Status within
the deadline is reported as :class:`Unreachable` (a note), never fatal.

Each call dials afresh: after UpgradeShim another process serves the same
path, so a cached connection would talk to a shim that is exiting.
Errors come back as KeelError classes (grpc codes via ``from_code``; a
socket that refuses or is missing is Unavailable).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from agent.api import ops_pb
from keel import ids, procfs
from keel.errors import DeadlineExceeded, KeelError, NotFound, Unavailable, Unimplemented, from_code
from observability.grpc import propagate
from shim.api import SandboxDir, load_record

_FANOUT = 16


def _clip(s: str, n: int = 128) -> str:
    return s[:n]


@dataclass(frozen=True, slots=True)
class ContainerView:
    id: str
    pid: int
    status: str
    execs: int


@dataclass(frozen=True, slots=True)
class SandboxView:
    """What a shim said about its sandbox in one Status call."""

    id: str
    shim_version: str
    agent_version: str
    shim_pid: int
    backend: str
    namespace: str
    containers: tuple[ContainerView, ...]
    state_schema: int
    #: A VM backend's accelerator (kvm, tcg); empty for the process backend.
    accel: str = ""

    def running(self) -> frozenset[str]:
        return frozenset(c.id for c in self.containers if c.status == "running")

    def version_of(self, component: str) -> str:
        return self.shim_version if component == "shim" else self.agent_version


@dataclass(frozen=True, slots=True)
class Unreachable:
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Switched:
    """The answer of an UpgradeShim/UpgradeAgent call."""

    from_version: str
    to_version: str
    new_pid: int
    detail: str
    #: The shim handoff's freeze window (shim), the agent's gap (agent); 0: not said.
    freeze_s: float = 0.0
    gap_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ContainerUsage:
    id: str
    #: None when the agent did not give the container's stats in time.
    cpu_ns: int | None
    memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class SandboxMetrics:
    """What a shim said about its sandbox in one Metrics call (opsd/_metrics.py).
    None: not known (the agent did not say in time; a shim older than Metrics
    said only what Status says)."""

    id: str
    namespace: str
    backend: str
    shim_version: str
    agent_version: str
    uptime_s: float | None
    console_sessions: int | None
    vm_rss_bytes: int | None
    vm_pss_bytes: int | None
    vcpus: int | None
    containers: tuple[ContainerUsage, ...]
    spans_dropped: int


class Shims(Protocol):
    """The edge opsd drives: the sandboxes of this node."""

    def ids(self) -> list[str]: ...

    async def status(self, sandbox_id: str) -> SandboxView: ...

    async def upgrade(self, sandbox_id: str, component: str, path: Path,
                      to_version: str) -> Switched: ...

    async def agent_release_problem(self, sandbox_id: str, agent_path: Path) -> str | None:
        """Why the sandbox's agent could not run that release (a VM whose image
        lacks what it needs), or None.  Reads only."""
        ...

    def owner_problem(self, view: SandboxView) -> str | None:
        """None if the shim that answered *view* owns the sandbox and runs;
        else what is wrong (``lost: ...`` when no live shim owns it)."""
        ...


def check_id(sandbox_id: str) -> str:
    """*sandbox_id* if it follows the id rule (it becomes a path under the state root)."""
    return ids.check(sandbox_id, "sandbox id")


class ShimClient:
    """:class:`Shims` over the real ``ops.sock`` endpoints under *state_root*."""

    def __init__(self, state_root: Path, *, status_timeout: float = 5.0,
                 upgrade_timeout: float = 120.0) -> None:
        self.state_root = state_root
        self.status_timeout = status_timeout
        self.upgrade_timeout = upgrade_timeout

    def ids(self) -> list[str]:
        base = self.state_root / "sandboxes"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and ids.valid(p.name))

    async def status(self, sandbox_id: str) -> SandboxView:
        async with self.stub(sandbox_id) as stub:
            r = await stub.status(ops_pb.StatusRequest(), timeout=self.status_timeout)
        return SandboxView(
            id=sandbox_id, shim_version=_clip(r.shim_version), agent_version=_clip(r.agent_version),
            shim_pid=r.shim_pid, backend=_clip(r.backend), namespace=_clip(r.namespace),
            containers=tuple(ContainerView(_clip(c.id), c.pid, _clip(c.status), len(c.exec_ids))
                             for c in r.containers[:4096]),
            state_schema=r.state_schema, accel=_clip(r.accel))

    async def upgrade(self, sandbox_id: str, component: str, path: Path,
                      to_version: str) -> Switched:
        """One sandbox's shim or agent switches to *path*; the shim does it synchronously."""
        async with self.stub(sandbox_id) as stub:
            if component == "shim":
                s = await stub.upgrade_shim(ops_pb.UpgradeShimRequest(str(path), to_version),
                                            timeout=self.upgrade_timeout)
                return Switched(s.from_version, s.to_version, s.new_shim_pid,
                                f"freeze {s.freeze_ms:.0f} ms", freeze_s=s.freeze_ms / 1000)
            a = await stub.upgrade_agent(ops_pb.UpgradeAgentRequest(str(path), to_version),
                                         timeout=self.upgrade_timeout)
            if a.rolled_back:
                raise Unavailable(f"sandbox {sandbox_id}: agent {to_version} failed and went back"
                                  f" to {a.from_version}: {a.message}")
            return Switched(a.from_version, a.to_version, 0, f"gap {a.gap_s * 1000:.0f} ms",
                            gap_s=a.gap_s)

    async def metrics(self, sandbox_id: str) -> SandboxMetrics:
        """One Metrics call (within the Status deadline; the caller may cut it
        shorter); what Status says for a shim older than Metrics."""
        try:
            async with self.stub(sandbox_id) as stub:
                r = await stub.metrics(ops_pb.MetricsRequest(), timeout=self.status_timeout)
        except Unimplemented:
            v = await self.status(sandbox_id)
            return SandboxMetrics(v.id, v.namespace, v.backend, v.shim_version, v.agent_version,
                                  None, None, None, None, None,
                                  tuple(ContainerUsage(c.id, None, None) for c in v.containers), 0)
        return SandboxMetrics(
            id=sandbox_id, namespace=_clip(r.namespace), backend=_clip(r.backend),
            shim_version=_clip(r.shim_version), agent_version=_clip(r.agent_version),
            uptime_s=r.uptime_s, console_sessions=r.console_sessions if r.console_sessions_known
            else None, vm_rss_bytes=r.vm_rss_bytes, vm_pss_bytes=r.vm_pss_bytes, vcpus=r.vcpus,
            containers=tuple(ContainerUsage(_clip(c.id), c.cpu_usage_ns if c.has_stats else None,
                                            c.memory_usage_bytes if c.has_stats else None)
                             for c in r.containers[:4096]),
            spans_dropped=r.spans_dropped)

    async def agent_release_problem(self, sandbox_id: str, agent_path: Path) -> str | None:
        try:
            async with self.stub(sandbox_id) as stub:
                r = await stub.check_agent_release(
                    ops_pb.CheckAgentReleaseRequest(agent_path=str(agent_path)),
                    timeout=self.status_timeout)
        except Unimplemented:  # a shim older than the check: its upgrade checks, or refuses
            return None
        return _clip(r.problem, 1024) or None

    def owner_problem(self, view: SandboxView) -> str | None:
        """Checked against the sandbox's state file: the shim that answered may
        be one that handed the sandbox off and is about to exit.  Without a
        state file there is nothing to check against (None)."""
        sdir = SandboxDir.of(self.state_root, check_id(view.id))
        try:
            owner = load_record(sdir).shim
        except NotFound:
            return None
        except KeelError as exc:
            return f"lost: its state cannot be read: {exc}"
        if owner is None:
            return "lost: no shim owns it"
        if not procfs.is_running(owner.pid, owner.start_time):
            return f"lost: the shim that owns it (pid {owner.pid}) is gone"
        if owner.pid != view.shim_pid:
            return (f"shim pid {view.shim_pid} answered, but the sandbox belongs to pid"
                    f" {owner.pid}")
        return None

    @asynccontextmanager
    async def stub(self, sandbox_id: str) -> AsyncIterator[ops_pb.ShimOpsStub]:
        """A ShimOps stub on the sandbox's ops.sock (opsd/_trace.py uses it too);
        connection and call errors become ours, naming the sandbox."""
        sock = SandboxDir.of(self.state_root, check_id(sandbox_id)).ops_socket
        channel = Channel(path=str(sock))
        propagate(channel)  # an upgrade's spans in the shim nest under opsd's
        try:
            yield ops_pb.ShimOpsStub(channel)
        except GRPCError as exc:
            raise from_code(exc.status.value, f"sandbox {sandbox_id}: {exc.message}") from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(f"sandbox {sandbox_id}: {sock} did not answer in time") from exc
        except (OSError, StreamTerminatedError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise Unavailable(f"sandbox {sandbox_id}: {sock}: {why}") from exc
        finally:
            channel.close()


async def scan(shims: Shims, ids: Iterable[str] | None = None
               ) -> tuple[list[SandboxView], list[Unreachable]]:
    """Status of every sandbox in *ids* (default: all), at most 16 calls at a time."""
    wanted = list(shims.ids() if ids is None else ids)
    limit = asyncio.Semaphore(_FANOUT)
    found: dict[str, SandboxView | Unreachable] = {}

    async def one(sid: str) -> None:
        async with limit:
            try:
                found[sid] = await shims.status(sid)
            except Exception as exc:  # every failure is a note, not a crash of the scan
                found[sid] = Unreachable(sid, str(exc))

    async with asyncio.TaskGroup() as tg:
        for sid in wanted:
            tg.create_task(one(sid))
    views = [v for sid in wanted if isinstance(v := found[sid], SandboxView)]
    dead = [v for sid in wanted if isinstance(v := found[sid], Unreachable)]
    return views, dead
