"""``containerd-shim-keel-v2 delete``: clean up after an unreachable shim.

containerd runs this after every task connection closes (also after a
normal delete, when there is nothing left to do) and at start-up for
bundles whose shim it cannot reach (research containerd-shim.md 2.7).  It
must be idempotent, take well under 5 s, need neither containerd nor the
shim daemon, touch only its own task, and print a raw DeleteResponse.

If the sandbox still runs its agent, the task's container is killed and
removed through the agent; when no container is left the sandbox is
stopped and its directory removed.  A corrupt state file is reported on
stderr (containerd logs it) and left in place.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import sys
from pathlib import Path

from shim._flags import Flags

DEADLINE_S = 4.0


def delete(flags: Flags) -> int:
    from shim._pb.containerd.task import v2 as task_pb

    status = 128 + signal.SIGKILL
    try:
        asyncio.run(asyncio.wait_for(_cleanup(flags), DEADLINE_S))
    except Exception as exc:  # report, but still answer: containerd must go on
        print(f"keel delete {flags.id}: {exc}", file=sys.stderr)
    resp = task_pb.DeleteResponse(exit_status=status,
                                  exited_at=datetime.datetime.now(datetime.UTC))
    sys.stdout.buffer.write(bytes(resp))
    sys.stdout.flush()
    return 0


async def _cleanup(flags: Flags) -> None:
    from agent.api import NotFound, pb
    from shim import config as config_mod
    from shim import version
    from shim._agentconn import AgentConnection
    from shim._bundle import sandbox_id
    from shim.dirs import SandboxDir
    from shim.state import store
    from shim.vmm import backend as get_backend
    from shim.vmm.api import LaunchSpec

    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    cfg = config_mod.load()
    sid = sandbox_id(bundle, flags.id)
    sdir = SandboxDir.of(cfg.state_root, sid)
    st = store(sdir)
    rec = st.load()
    if rec is None:
        return  # a normal delete already cleaned up
    if _shim_alive(rec.vmm.get("shim")):
        return  # a live shim owns this sandbox and its state
    backend = get_backend(rec.backend)
    spec = LaunchSpec(sandbox_id=sid, root=sdir.root, agent_command=())
    try:
        vm = backend.restore(spec, rec.vmm)
    except NotFound:
        vm = None
    others = [c for c in rec.containers if c["id"] != flags.id]
    if vm is not None:
        conn = AgentConnection(vm.dialer("agent"), client_version=version(),
                               session="shim-delete", timeout=1.0)
        try:
            await _remove_container(conn, pb, flags.id)
        except Exception as exc:
            print(f"keel delete {flags.id}: agent: {exc}", file=sys.stderr)
        finally:
            conn.close()
        await vm.unshare_rootfs(flags.id, bundle / "rootfs")
        if not others:
            await vm.stop()
        backend.close_fds(vm)
    if others:
        from dataclasses import replace

        st.save(replace(rec, containers=tuple(others)))
    else:
        import shutil

        shutil.rmtree(sdir.root, ignore_errors=True)


async def _remove_container(conn, pb, cid: str) -> None:  # type: ignore[no-untyped-def]
    from agent.api import FailedPrecondition, NotFound

    try:
        await conn.call(conn.stub.signal_process, pb.SignalProcessRequest(
            container_id=cid, signal=signal.SIGKILL, all=True), retry_for=0.5)
    except (NotFound, FailedPrecondition):
        pass
    try:
        await conn.call(conn.stub.wait_process, pb.WaitProcessRequest(container_id=cid),
                        timeout=2.0, retry_for=0.5)
    except NotFound:
        return
    try:
        await conn.call(conn.stub.remove_process, pb.RemoveProcessRequest(container_id=cid),
                        retry_for=0.5)
    except NotFound:
        pass


def _shim_alive(info: dict | None) -> bool:
    """True when the shim recorded in state still runs (pid + start time)."""
    if not info:
        return False
    from shim.vmm.process import _start_time

    try:
        return _start_time(int(info["pid"])) == int(info["start_time"])
    except (OSError, KeyError, ValueError):
        return False
