"""``containerd-shim-keel-v2 delete``: clean up after an unreachable shim.

containerd runs this after every task connection closes (also after a
normal delete, when there is nothing left to do) and at start-up for
bundles whose shim it cannot reach (research containerd-shim.md 2.7).  It
must be idempotent, take well under 5 s, need neither containerd nor the
shim daemon, touch only its own task, and print a raw DeleteResponse.

If the sandbox still runs its agent, the task's container is killed and
removed through the agent; when no container is left the sandbox is
stopped, its directory and the dead shim's socket removed.  Deletes of one
sandbox (containerd runs one per task, at once when a pod's shim died) take
turns on a lock of the sandbox directory.  A corrupt state file is reported
on stderr (containerd logs it) and left in place.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from keel import procfs
from shim._flags import Flags

if TYPE_CHECKING:
    from shim.dirs import SandboxDir
    from shim.state import ShimIdentity

DEADLINE_S = 4.0


def delete(flags: Flags) -> int:
    status = 128 + signal.SIGKILL
    try:
        # containerd runs this after every normal delete too (and waits for
        # it): when the sandbox is gone already, answer without asyncio or
        # betterproto, whose imports would be most of this process's life.
        if not _cleaned_up(flags):
            import asyncio

            asyncio.run(asyncio.wait_for(_cleanup(flags), DEADLINE_S))
    except Exception as exc:  # report, but still answer: containerd must go on
        print(f"keel delete {flags.id}: {exc}", file=sys.stderr)
    sys.stdout.buffer.write(delete_response(status, time.time_ns()))
    sys.stdout.flush()
    return 0


def _cleaned_up(flags: Flags) -> bool:
    """True when the task's sandbox directory is gone (the stale socket, if
    any, is removed here); False when :func:`_cleanup` has work to do."""
    from shim import config as config_mod
    from shim._bundle import noted_config, sandbox_id, socket_path
    from shim.dirs import SandboxDir

    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    cfg = config_mod.load(noted_config(bundle))  # the pod's own config, as start had it
    sid = sandbox_id(bundle, flags.id)
    if SandboxDir.of(cfg.state_root, sid).root.exists():
        return False
    _unlink_stale(socket_path(cfg.state_root, flags.address, flags.namespace, sid))
    return True


def delete_response(exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{exit_status, exited_at} in protobuf
    wire format (pid 0 is the default and not written), encoded by hand so
    the fast path needs no protobuf library."""
    secs, nanos = divmod(exited_at_ns, 1_000_000_000)
    stamp = b"\x08" + _varint(secs) + (b"\x10" + _varint(nanos) if nanos else b"")
    status = b"\x10" + _varint(exit_status) if exit_status else b""
    return status + b"\x1a" + _varint(len(stamp)) + stamp


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


async def _cleanup(flags: Flags) -> None:
    from shim import config as config_mod
    from shim._bundle import noted_config, sandbox_id, socket_path
    from shim.dirs import SandboxDir

    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    cfg = config_mod.load(noted_config(bundle))  # the pod's own config, as start had it
    sid = sandbox_id(bundle, flags.id)
    sdir = SandboxDir.of(cfg.state_root, sid)
    shim_socket = socket_path(cfg.state_root, flags.address, flags.namespace, sid)
    try:
        lock = os.open(sdir.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        _unlink_stale(shim_socket)  # a normal delete already cleaned up the rest
        return
    try:
        # containerd runs one delete per task, concurrently when a pod's
        # shim dies: each must see the others' changes to the state.
        await _lock(lock)
        await _cleanup_locked(flags, bundle, sid, sdir, shim_socket)
    finally:
        os.close(lock)


async def _lock(fd: int) -> None:
    """flock *fd* exclusively, polling so that the caller's deadline applies."""
    import asyncio

    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(0.02)


async def _cleanup_locked(flags: Flags, bundle: Path, sid: str, sdir: SandboxDir,
                          shim_socket: Path) -> None:
    from agent.api import pb
    from keel.errors import NotFound
    from shim import version
    from shim._agentconn import AgentConnection
    from shim.state import store
    from shim.vmm import backend as get_backend
    from shim.vmm.api import LaunchSpec

    st = store(sdir)
    rec = st.load()
    if rec is None:
        _unlink_stale(shim_socket)  # a normal delete already cleaned up the rest
        return
    if _shim_alive(rec.shim):
        return  # a live shim owns this sandbox and its state
    backend = get_backend(rec.backend)
    spec = LaunchSpec(sandbox_id=sid, root=sdir.root, agent_command=())
    try:
        vm = backend.restore(spec, rec.vmm)
    except NotFound:
        vm = None
    others = [c for c in rec.containers if c.id != flags.id]
    if vm is not None:
        conn = AgentConnection(vm.dialer("agent"), client_version=version(),
                               session="shim-delete", session_key=rec.session_key, timeout=1.0)
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
        sdir.remove()
        _unlink_stale(shim_socket)  # the dead shim's listener


async def _remove_container(conn, pb, cid: str) -> None:  # type: ignore[no-untyped-def]
    from keel.errors import FailedPrecondition, NotFound

    try:
        await conn.call(conn.stub.signal_process, pb.SignalProcessRequest(
            container_id=cid, signal=signal.SIGKILL, all=True), timeout=2.0, retry_for=0.5,
            resend=False)
    except (NotFound, FailedPrecondition):
        pass
    try:
        await conn.call(conn.stub.wait_process, pb.WaitProcessRequest(container_id=cid),
                        timeout=2.0, retry_for=0.5)
    except NotFound:
        return
    try:
        await conn.call(conn.stub.remove_process, pb.RemoveProcessRequest(container_id=cid),
                        timeout=10.0, retry_for=0.5)
    except NotFound:
        pass


def _unlink_stale(path: Path) -> None:
    """Remove the shim socket at *path* unless a live shim still listens on it.

    Holds the lock ``start`` binds and listens under, so a socket that a new
    shim has bound but not yet listens on is never taken for a stale one.
    """
    import socket

    if not path.parent.is_dir():
        return
    lock = os.open(path.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe.connect(str(path))
    except FileNotFoundError:
        return
    except OSError:
        path.unlink(missing_ok=True)
    finally:
        probe.close()
        os.close(lock)


def _shim_alive(shim: ShimIdentity | None) -> bool:
    """True when the shim recorded in state still runs (pid + start time).

    A killed shim can linger as a zombie of containerd (a child subreaper)
    while this runs; a zombie has exited and counts as gone.
    """
    return shim is not None and procfs.is_running(shim.pid, shim.start_time)
