"""containerd's Task v2 service: the ttrpc adapter over ``Sandbox``.

Generated containerd types stop here.  Each handler validates, calls the
sandbox and builds the response; errors are our classes, which the ttrpc
server maps to status codes in one table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import betterproto
from betterproto.lib.google.protobuf import Any as PbAny
from betterproto.lib.google.protobuf import Empty

from agent.api import pb
from keel import clock, ids
from keel.errors import InvalidArgument, NotFound, Unimplemented
from keel.lifecycle import State
from shim import version
from shim._pb.containerd.task import v2 as task_pb
from shim._pb.containerd.v1 import types as ctypes_pb
from shim._pb.io.containerd.cgroups import v1 as cg_pb
from shim.sandbox import Sandbox
from shim.state import Exit, Stdio
from shim.vmm.api import MountSpec

SERVICE = "containerd.task.v2.Task"
_STATUS = {
    State.CREATED: ctypes_pb.Status(1),
    State.RUNNING: ctypes_pb.Status(2),
    State.STOPPED: ctypes_pb.Status(3),
    State.PAUSED: ctypes_pb.Status(4),
}
MAX_JSON = 1 << 20


def _json_any(any_: PbAny | None, what: str) -> bytes:
    if any_ is None or not any_.value:
        raise InvalidArgument(f"{what} is missing")
    if len(any_.value) > MAX_JSON:
        raise InvalidArgument(f"{what} is larger than {MAX_JSON} bytes")
    try:
        doc = json.loads(any_.value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return bytes(any_.value)


class TaskService:
    """Handlers for every Task method; ``methods()`` feeds the ttrpc server."""

    def __init__(self, sandbox: Sandbox, on_shutdown: Callable[[], None]) -> None:
        self._sb = sandbox
        self._on_shutdown = on_shutdown

    def methods(self) -> dict[str, tuple[type[betterproto.Message], Callable[..., Awaitable[Any]]]]:
        return {
            "State": (task_pb.StateRequest, self.state),
            "Create": (task_pb.CreateTaskRequest, self.create),
            "Start": (task_pb.StartRequest, self.start),
            "Delete": (task_pb.DeleteRequest, self.delete),
            "Pids": (task_pb.PidsRequest, self.pids),
            "Pause": (task_pb.PauseRequest, self.pause),
            "Resume": (task_pb.ResumeRequest, self.resume),
            "Checkpoint": (task_pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (task_pb.KillRequest, self.kill),
            "Exec": (task_pb.ExecProcessRequest, self.exec),
            "ResizePty": (task_pb.ResizePtyRequest, self.resize_pty),
            "CloseIO": (task_pb.CloseIoRequest, self.close_io),
            "Update": (task_pb.UpdateTaskRequest, self.update),
            "Wait": (task_pb.WaitRequest, self.wait),
            "Stats": (task_pb.StatsRequest, self.stats),
            "Connect": (task_pb.ConnectRequest, self.connect),
            "Shutdown": (task_pb.ShutdownRequest, self.shutdown),
        }

    async def state(self, req: task_pb.StateRequest, ctx: Any = None) -> task_pb.StateResponse:
        ids.check(req.id)
        c = self._sb.container(req.id)
        p = c.process(req.exec_id)
        resp = task_pb.StateResponse(
            id=p.eid or c.id, bundle=c.bundle, pid=p.pid, status=_STATUS[p.state],
            stdin=p.stdio.stdin, stdout=p.stdio.stdout, stderr=p.stdio.stderr,
            terminal=p.stdio.terminal)
        if p.exit is not None:
            resp.exit_status = p.exit.status
            resp.exited_at = clock.utc_of_ns(p.exit.at_ns)
        return resp

    async def create(self, req: task_pb.CreateTaskRequest, ctx: Any = None) -> task_pb.CreateTaskResponse:
        ids.check(req.id)
        if req.checkpoint or req.parent_checkpoint:
            raise Unimplemented("keel does not support checkpoint/restore")
        if not req.bundle or not os.path.isabs(req.bundle):
            raise InvalidArgument(f"bundle must be an absolute path, not {req.bundle!r}")
        mounts = tuple(MountSpec(m.type, m.source, tuple(m.options)) for m in req.rootfs)
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        pid = await self._sb.create(req.id, req.bundle, mounts, stdio)
        return task_pb.CreateTaskResponse(pid=pid)

    async def start(self, req: task_pb.StartRequest, ctx: Any = None) -> task_pb.StartResponse:
        ids.check(req.id)
        ids.check(req.exec_id, "exec id", optional=True)
        return task_pb.StartResponse(pid=await self._sb.start(req.id, req.exec_id))

    async def delete(self, req: task_pb.DeleteRequest, ctx: Any = None) -> task_pb.DeleteResponse:
        ids.check(req.id)
        ids.check(req.exec_id, "exec id", optional=True)
        pid, exit = await self._sb.delete(req.id, req.exec_id)
        return task_pb.DeleteResponse(pid=pid, exit_status=exit.status, exited_at=clock.utc_of_ns(exit.at_ns))

    async def pids(self, req: task_pb.PidsRequest, ctx: Any = None) -> task_pb.PidsResponse:
        ids.check(req.id)
        procs = await self._sb.pids(req.id)
        return task_pb.PidsResponse(processes=[ctypes_pb.ProcessInfo(pid=p.pid) for p in procs])

    async def pause(self, req: task_pb.PauseRequest, ctx: Any = None) -> Empty:
        await self._sb.pause(ids.check(req.id))
        return Empty()

    async def resume(self, req: task_pb.ResumeRequest, ctx: Any = None) -> Empty:
        await self._sb.resume(ids.check(req.id))
        return Empty()

    async def checkpoint(self, req: task_pb.CheckpointTaskRequest, ctx: Any = None) -> Empty:
        raise Unimplemented("keel does not support checkpoint")

    async def kill(self, req: task_pb.KillRequest, ctx: Any = None) -> Empty:
        ids.check(req.id)
        ids.check(req.exec_id, "exec id", optional=True)
        if not 0 < req.signal < 65:
            raise InvalidArgument(f"invalid signal {req.signal}")
        await self._sb.kill(req.id, req.exec_id, req.signal, req.all)
        return Empty()

    async def exec(self, req: task_pb.ExecProcessRequest, ctx: Any = None) -> Empty:
        ids.check(req.id)
        ids.check(req.exec_id, "exec id")
        spec = _json_any(req.spec, "exec process spec")
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        await self._sb.exec(req.id, req.exec_id, spec, stdio)
        return Empty()

    async def resize_pty(self, req: task_pb.ResizePtyRequest, ctx: Any = None) -> Empty:
        ids.check(req.id)
        ids.check(req.exec_id, "exec id", optional=True)
        await self._sb.resize(req.id, req.exec_id, req.width, req.height)
        return Empty()

    async def close_io(self, req: task_pb.CloseIoRequest, ctx: Any = None) -> Empty:
        ids.check(req.id)
        ids.check(req.exec_id, "exec id", optional=True)
        if req.stdin:
            await self._sb.close_io(req.id, req.exec_id)
        return Empty()

    async def update(self, req: task_pb.UpdateTaskRequest, ctx: Any = None) -> Empty:
        ids.check(req.id)
        await self._sb.update(req.id, _json_any(req.resources, "resources"))
        return Empty()

    async def wait(self, req: task_pb.WaitRequest, ctx: Any = None) -> task_pb.WaitResponse:
        ids.check(req.id)
        ids.check(req.exec_id, "exec id", optional=True)
        exit: Exit = await self._sb.wait(req.id, req.exec_id)
        return task_pb.WaitResponse(exit_status=exit.status, exited_at=clock.utc_of_ns(exit.at_ns))

    async def stats(self, req: task_pb.StatsRequest, ctx: Any = None) -> task_pb.StatsResponse:
        ids.check(req.id)
        s = await self._sb.stats(req.id)
        metrics = _metrics(s)
        return task_pb.StatsResponse(stats=PbAny(type_url="io.containerd.cgroups.v1.Metrics",
                                                 value=bytes(metrics)))

    async def connect(self, req: task_pb.ConnectRequest, ctx: Any = None) -> task_pb.ConnectResponse:
        try:
            task_pid = self._sb.container(req.id).init.pid if req.id else 0
        except NotFound:
            task_pid = 0  # as the runc shim answers for an unknown id
        return task_pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid, version=version())

    async def shutdown(self, req: task_pb.ShutdownRequest, ctx: Any = None) -> Empty:
        if await self._sb.shutdown():
            self._on_shutdown()
        return Empty()


def _metrics(s: pb.CgroupStats) -> cg_pb.Metrics:
    return cg_pb.Metrics(
        pids=cg_pb.PidsStat(current=s.pids_current, limit=s.pids_limit),
        cpu=cg_pb.CpuStat(
            usage=cg_pb.CpuUsage(total=s.cpu_usage_ns, kernel=s.cpu_kernel_ns, user=s.cpu_user_ns,
                                 per_cpu=list(s.cpu_per_cpu_ns)),
            throttling=cg_pb.Throttle(periods=s.cpu_periods, throttled_periods=s.cpu_throttled_periods,
                                      throttled_time=s.cpu_throttled_time_ns)),
        memory=cg_pb.MemoryStat(
            cache=s.memory_cache, rss=s.memory_rss,
            usage=cg_pb.MemoryEntry(limit=s.memory_limit, usage=s.memory_usage,
                                    max=s.memory_max_usage, failcnt=s.memory_failcnt)),
        memory_oom_control=cg_pb.MemoryOomControl(oom_kill=s.oom_kills),
    )
