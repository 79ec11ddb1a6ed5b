"""Live shim handoff: the old shim passes its sandbox to a new release.

containerd must never see its connection close (it would run ``delete``
and kill the pod), so the old shim hands the *established* connections,
with their already-read bytes and the requests still pending on them
(``Wait``), plus the listener, to the new shim over SCM_RIGHTS.  Sequence
and wire format: upgrade/PROTOCOL.md.

  old                                   new
  spawn(new, handoff fd) ──────────────▶ import, init
                        ◀── hello{version, reads} ──
  compatible? freeze ───── state + fds ─────▶ restore, dial agent, health
                        ◀─────── ready ──────────
  commit ───────────────────────────────▶ serve, go live
  release, exit

Before ``commit`` the new shim has read nothing from containerd or the
agent, so on any failure (error, timeout, the new shim dying) the old one
thaws and carries on: it never closed anything.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from keel.errors import FailedPrecondition
from shim import version
from shim.state import KIND, SCHEMA_VERSION
from upgrade.handoff import PROTOCOL_VERSION, HandoffChannel, HandoffError, pair

log = logging.getLogger("keel.shim.handoff")

TIMEOUT_S = 20.0
#: How long the old shim waits, after commit, for the new one to serve ops.sock.
SERVING_TIMEOUT_S = 10.0
#: One-shot fault injection for tests: a file in the sandbox directory
#: naming the phase at which the *new* shim kills itself.
FAILPOINT_FILE = "handoff-failpoint"


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    from_version: str
    to_version: str
    new_pid: int
    freeze_ms: float
    #: False when the new shim died after commit (before serving ops.sock):
    #: the sandbox is lost, as with any crashed shim.
    serving: bool = True


def failpoint(sandbox_dir: Path, phase: str) -> None:
    """Die here if the test asked for it (SIGKILL: no cleanup, like a crash)."""
    path = sandbox_dir / FAILPOINT_FILE
    try:
        wanted = path.read_text().strip()
    except OSError:
        return
    if wanted == phase:
        path.unlink(missing_ok=True)
        log.warning("failpoint %s: killing myself", phase)
        os.kill(os.getpid(), signal.SIGKILL)


def _encode_conn(frozen: Any, index: int) -> dict[str, Any]:
    return {
        "fd": index,
        "unparsed": base64.b64encode(frozen.unparsed).decode(),
        "pending": [{"stream_id": p.stream_id, "body": base64.b64encode(p.body).decode()}
                    for p in frozen.pending],
    }


def release_env() -> dict[str, str]:
    """This shim's environment without what would make another release's
    interpreter import *this* release's code (a release runs its own)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


async def hand_off(daemon: Any, shim_path: str) -> Result:
    """Old side.  Raises (and keeps serving) if anything fails before commit."""
    if not os.access(shim_path, os.X_OK):
        raise FailedPrecondition(f"{shim_path} is not an executable shim")
    mine, theirs = pair()
    flags = daemon.flags
    argv = [shim_path, "-namespace", flags.namespace, "-address", flags.address,
            "-publish-binary", flags.publish_binary, "-id", flags.id,
            "-sandbox-id", daemon.sandbox.id, "-socket", flags.socket,
            "-handoff-fd", str(theirs.fileno())]
    if flags.debug:
        argv.append("-debug")
    ops_sock = daemon.sandbox.dir.ops_socket
    ops_before = _inode(ops_sock)
    # Spans (under opsd's upgrade span when it traces): the handoff, its
    # hello, and the freeze window with its phases; the new shim's restore
    # nests under the freeze through the state message's traceparent.
    tracer = daemon.sandbox.tracing.tracer
    top = tracer.begin("shim handoff", {"keel.sandbox.id": daemon.sandbox.id,
                                        "keel.shim.from": version(), "keel.shim.path": shim_path,
                                        "keel.shim.pid": os.getpid()},
                       force=True)
    ctx = top.context if top is not None else None
    t_spawn = time.time_ns()
    freeze_span = None
    # The new shim's stderr (an unlinked file): what a release that dies
    # before it can log (at import) printed, for the error we return.
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    # Plain Popen, not asyncio's: the new shim outlives this process, so no
    # child watcher may own it; fork+exec does not block the loop for long.
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                             stderr=errors, pass_fds=(theirs.fileno(),),
                             process_group=0, env=release_env())
    theirs.close()
    ch = HandoffChannel(mine)
    frozen = None
    try:
        try:
            hello, fds = await ch.recv(TIMEOUT_S)
        except HandoffError as exc:
            raise HandoffError(await _died(child, errors, shim_path, exc)) from exc
        _close_fds(fds)
        tracer.record("handoff hello", t_spawn, time.time_ns(),
                      {"keel.shim.to": str(hello.get("version", ""))}, parent=ctx, force=True)
        _check_hello(hello)
        freeze_span = tracer.begin("handoff freeze", parent=ctx, force=True)
        w0 = time.time_ns()
        t0 = time.monotonic()
        frozen, record = await daemon.freeze()
        t_frozen = time.monotonic()
        w_frozen = time.time_ns()
        state = {
            "type": "state",
            "sandbox": daemon.sandbox_doc(record),
            "connections": [_encode_conn(f, i + 1) for i, f in enumerate(frozen)],
        }
        if freeze_span is not None:  # a key older shims do not read
            state["traceparent"] = freeze_span.context.traceparent
        await ch.send(state, [daemon.listener.fileno(), *(f.fd for f in frozen)])
        ready, fds = await ch.recv(TIMEOUT_S)
        _close_fds(fds)
        if ready["type"] != "ready":
            raise HandoffError(f"new shim refused: {ready.get('reason', ready)}")
        w_ready = time.time_ns()
        await ch.send({"type": "commit"})
        t_commit = time.monotonic()
        freeze_ms = (t_commit - t0) * 1000
        if freeze_span is not None:
            inner = freeze_span.context
            tracer.record("quiesce", w0, w_frozen, parent=inner, force=True)
            tracer.record("transfer and restore", w_frozen, w_ready, parent=inner, force=True)
            tracer.record("commit", w_ready, time.time_ns(), parent=inner, force=True)
            freeze_span.set("keel.freeze_ms", f"{freeze_ms:.1f}")
            tracer.end(freeze_span)
    except BaseException as exc:
        tracer.end(freeze_span, error=str(exc))
        tracer.end(top, error=f"{type(exc).__name__}: {exc}")
        log.error("handoff to %s failed, thawing: %s", shim_path, exc)
        _reap(child)
        if frozen is not None:
            daemon.thaw()
        raise
    finally:
        for f in frozen or ():
            os.close(f.fd)
        ch.close()
        errors.close()
    w_commit = time.time_ns()
    serving = await _wait_serving(ops_sock, ops_before, child)
    tracer.record("new shim serving", w_commit, time.time_ns(), parent=ctx, force=True)
    if top is not None:
        top.set("keel.shim.to", str(ready.get("version", "")))
        top.set("keel.freeze_ms", f"{freeze_ms:.1f}")
    tracer.end(top, error="" if serving else "the new shim died after taking over")
    log.info("handed sandbox %s to %s (pid %d); freeze %.1f ms (quiesce %.1f ms, new shim "
             "restore %.1f ms: %s)", daemon.sandbox.id, ready.get("version"), child.pid, freeze_ms,
             (t_frozen - t0) * 1000, (t_commit - t_frozen) * 1000, ready.get("phases", "-"))
    return Result(version(), str(ready.get("version", "")), child.pid, freeze_ms, serving)


def _check_hello(hello: dict[str, Any]) -> None:
    if hello.get("type") != "hello":
        raise HandoffError(f"expected hello, got {hello.get('type')!r}")
    if hello.get("protocol") != PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"new shim speaks handoff protocol {hello.get('protocol')}, this one {PROTOCOL_VERSION}")
    reads = hello.get("reads", {}).get(KIND, [])
    if SCHEMA_VERSION not in reads:
        raise FailedPrecondition(
            f"new shim {hello.get('version')} cannot read sandbox state schema {SCHEMA_VERSION} "
            f"(it reads {reads}); upgrade through an intermediate release")


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


async def _wait_serving(ops_sock: Path, before: int, child: subprocess.Popen[bytes]) -> bool:
    """After commit: wait (bounded) until the new shim's ops.sock replaced ours,
    so whoever asked for the upgrade next talks to the new shim.  False if
    the new shim died first."""
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while _inode(ops_sock) in (before, 0):  # 0: an older shim unlinks before it binds
        if child.poll() is not None:
            log.error("new shim pid %d died after commit (exit status %s)", child.pid,
                      child.returncode)
            return False
        if time.monotonic() > deadline:
            log.warning("new shim pid %d does not serve %s yet", child.pid, ops_sock)
            return True
        await asyncio.sleep(0.005)
    return True


async def _died(child: subprocess.Popen[bytes], errors: Any, shim_path: str,
                exc: Exception) -> str:
    """Why the new shim never said hello, with the end of what it printed."""
    for _ in range(100):  # it closed the channel: it is exiting
        if (status := child.poll()) is not None:
            break
        await asyncio.sleep(0.01)
    else:
        return f"new shim {shim_path} (pid {child.pid}) did not say hello: {exc}"
    errors.seek(0)
    lines = errors.read()[-4096:].decode(errors="replace").strip().splitlines()
    said = lines[-1] if lines else "no message"
    return f"new shim {shim_path} exited with status {status} before saying hello: {said}"


def _reap(child: subprocess.Popen[bytes]) -> None:
    """The new shim failed: make sure it is gone (we started it)."""
    if child.poll() is None:
        child.kill()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.error("new shim pid %d did not exit after SIGKILL", child.pid)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _warm_up() -> None:
    """Before hello, outside the freeze: build the metadata of every agent API
    message class (betterproto computes it on a class's first use, which in a
    fresh interpreter put ~50 ms of a VM's restore inside the freeze window)."""
    import betterproto

    from agent.api import ops_pb, pb

    t0 = time.monotonic()
    for module in (pb, ops_pb):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, betterproto.Message):
                obj().parse(bytes(obj()))
    log.debug("warmed up the agent API messages in %.1f ms", (time.monotonic() - t0) * 1000)


async def adopt(daemon: Any, fd: int) -> None:
    """New side: hello, receive, restore, ready, wait for commit, go live.

    Any failure before commit exits without touching the sandbox.
    """
    ch = HandoffChannel(socket.socket(fileno=fd))
    _warm_up()
    ops = await _ops_connection(daemon.sandbox.dir.channel("ops"))
    try:
        await _adopt(daemon, ch, ops)
    finally:
        if ops is not None:
            ops.close()


async def _ops_connection(path: Path) -> Any:
    """A connection to the agent's ops channel, made (and used once) before the
    freeze, so that the health check inside it is one call, not a dial: over
    virtio-serial under TCG a dial there took ~50 ms.  Every backend's channel
    is a unix socket at ``SandboxDir.channel``.  None if it cannot be made
    (the check then dials its own)."""
    from agent.api import ops_pb
    from keel.errors import KeelError
    from shim._agentconn import DialChannel, ops_call
    from shim.vmm._dialers import unix_dialer

    channel = DialChannel(unix_dialer(str(path)))
    try:
        await ops_call(channel, lambda s: s.health(ops_pb.HealthRequest()), 5.0)
    except BaseException as exc:
        channel.close()
        if not isinstance(exc, KeelError):
            raise
        log.info("no ops connection before the freeze (%s); the check will dial", exc)
        return None
    return channel


async def _adopt(daemon: Any, ch: HandoffChannel, ops: Any) -> None:
    sdir = daemon.sandbox.dir.root
    failpoint(sdir, "before-hello")
    await ch.send({"type": "hello", "protocol": PROTOCOL_VERSION, "version": version(),
                   "reads": {KIND: list(range(1, SCHEMA_VERSION + 1))}, "pid": os.getpid()})
    msg, fds = await ch.recv(TIMEOUT_S)
    try:
        if msg["type"] != "state":
            raise HandoffError(f"expected state, got {msg['type']!r}")
        failpoint(sdir, "after-state")
        w0 = time.time_ns()
        phases = await daemon.restore(msg["sandbox"], ops)
        # Under the old shim's freeze span, whatever this sandbox's ratio.
        daemon.sandbox.tracing.tracer.record(
            "new shim restore", w0, time.time_ns(), {"keel.phases": phases, "keel.shim.pid": os.getpid()},
            parent=msg.get("traceparent"), force=True)
        failpoint(sdir, "after-restore")
        await ch.send({"type": "ready", "version": version(), "pid": os.getpid(),
                       "phases": phases})
        commit, more = await ch.recv(TIMEOUT_S)
        _close_fds(more)
        if commit["type"] != "commit":
            raise HandoffError(f"expected commit, got {commit['type']!r}")
    except BaseException as exc:
        _close_fds(fds)
        try:
            await ch.send({"type": "failed", "reason": str(exc)})
        except HandoffError:
            pass
        raise
    finally:
        ch.close()
    failpoint(sdir, "after-commit")
    conns = [(socket.socket(fileno=fds[c["fd"]]), base64.b64decode(c["unparsed"]),
              [(p["stream_id"], base64.b64decode(p["body"])) for p in c["pending"]])
             for c in msg["connections"]]
    daemon.go_live(socket.socket(fileno=fds[0]), conns)
