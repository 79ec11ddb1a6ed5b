"""The launcher process itself (shim/_launcher.py): warm up, serve one
request per connection, fork, answer with the pid.

It holds a lock next to its socket for as long as it serves (one launcher
per release), imports :data:`WARM_MODULES` once, and forks from a single
thread.  What a fork goes on to do is in ``shim._launcher_child``.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from keel import peercred
from shim._launcher_child import intermediate
from shim._launcher_wire import ACK, LauncherError, recv, send
from upgrade.scm import close_all

#: Seconds the launcher waits for a forked child to report its pid.
FORK_TIMEOUT_S = 10.0
#: A caller's whole request must arrive within this (README: at most 5 s):
#: one trickling a byte at a time cannot hold the launcher.
REQUEST_S = 5.0
#: What the launcher imports before it serves: the daemon's and the
#: process agent's working set (a forked child imports anything else on
#: first use, as the exec path does).  Not the qemu backend: a VM's agent
#: runs in the guest, and every module here is resident in every child.
WARM_MODULES = (
    "shim._daemon", "shim._prelaunch", "shim.service", "shim.sandbox", "shim._events",
    "shim._opsserver", "shim.ttrpc", "shim._process", "shim._agentconn",
    "shim.state", "shim.vmm.process", "shim._handoff", "shim._bundle",
    "agent._cli", "agent.service", "agent._daemon", "agent.state", "agent._upgrade",
)
#: Warmed too when the config traces (``--tracing``): the exporter a shim
#: loads at its first span would otherwise cost each new pod ~70 ms of
#: imports, run while its first Task calls are served.  A node whose config
#: does not trace has a launcher without them (its key differs: _start.py).
TRACING_MODULES = (
    "observability.export", "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.sdk.trace", "opentelemetry.sdk.resources",
)


class Launcher:
    """Serves *path* until *idle_s* seconds pass without a request, or SIGTERM."""

    def __init__(self, path: Path, idle_s: float, *, tracing: bool = False) -> None:
        self.path = path
        self.idle_s = idle_s
        self.tracing = tracing
        #: The lock and the listener: a forked child closes them first.
        self.own_fds: list[int] = []

    def warm(self) -> None:
        import gc
        import importlib

        for name in (*WARM_MODULES, *(TRACING_MODULES if self.tracing else ())):
            importlib.import_module(name)
        gc.collect()
        gc.freeze()  # children must not touch (and so copy) these objects' pages

    def serve(self) -> int:
        """Serve; the process's exit status (0 also when another launcher serves)."""
        import fcntl
        import logging
        import threading

        log = logging.getLogger("keel.launcher")
        lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another launcher of this release serves (or is starting)
        os.ftruncate(lock, 0)
        os.write(lock, f"{os.getpid()}\n".encode())  # who serves, for people and tests
        t0 = time.monotonic()
        self.warm()
        if threading.active_count() != 1:
            log.error("a warm module started a thread: refusing to fork from here")
            return 1
        listener, ours = _listen(self.path)
        self.own_fds = [lock, listener.fileno()]
        stop = False

        def on_term(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_term)
        log.info("launcher pid %d ready in %.2fs on %s (idle exit after %gs)",
                 os.getpid(), time.monotonic() - t0, self.path, self.idle_s)
        last = time.monotonic()
        listener.settimeout(1.0)
        try:
            while not stop and time.monotonic() - last < self.idle_s:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except InterruptedError:
                    continue
                last = time.monotonic()
                with conn:
                    self._handle(conn, log)
        finally:
            if _inode(self.path) == ours:
                self.path.unlink(missing_ok=True)
            listener.close()
        log.info("launcher pid %d exiting (%s)", os.getpid(), "SIGTERM" if stop else "idle")
        return 0

    def _handle(self, conn: socket.socket, log: Any) -> None:
        """One request.  A forked child waits on a pipe until the caller has
        acknowledged its pid: a caller that gave up (timed out, died) and
        starts the daemon or agent itself must not get a twin of it, so
        without the acknowledgement the pipe closes and the child exits."""
        conn.settimeout(5.0)
        fds: list[int] = []
        go = -1
        try:
            cred = peercred.of(conn)
            pid, uid = cred.pid, cred.uid
            # Read first, refuse after: a refusal sent while the caller still
            # writes would reach it as a broken pipe instead of the reason.
            req, fds = recv(conn, within=REQUEST_S)
            conn.settimeout(5.0)  # recv left its own, shorter, timeout behind
            if uid != os.getuid():
                raise LauncherError(f"peer uid {uid} is not {os.getuid()}")
            reply, go = self._fork(req, fds, pid, conn)
            log.debug("%s for pid %d: %s", req.get("op"), pid, reply)
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a crash
            log.warning("request refused: %s", exc)
            reply = {"error": f"launcher: {exc}"}
        finally:
            close_all(fds)
        try:
            send(conn, reply)
            if go >= 0:
                if conn.recv(1) == ACK:
                    os.write(go, b"g")
                else:
                    log.warning("caller pid %d left before it took %s: child stopped", pid, reply)
        except OSError as exc:
            if go >= 0:
                log.warning("caller pid %d left before it took %s (%s): child stopped",
                            pid, reply, exc)
        finally:
            if go >= 0:
                os.close(go)

    def _fork(self, req: dict[str, Any], fds: list[int], peer: int,
              conn: socket.socket) -> tuple[dict[str, Any], int]:
        """Validate, fork; the reply and the write end of the child's go pipe."""
        op = _check(req, fds)
        r, w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:  # the intermediate: never returns
            intermediate(op, req, fds, peer, w, go_r, [*self.own_fds, conn.fileno(), r, go_w])
        os.close(w)
        os.close(go_r)
        try:
            data = b""
            deadline = time.monotonic() + FORK_TIMEOUT_S
            while True:
                try:
                    chunk = _read_until(r, deadline)
                except LauncherError:
                    os.kill(child, signal.SIGKILL)
                    os.close(go_w)  # a grandchild, if any, exits on EOF
                    raise
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(r)
            os.waitpid(child, 0)
        text = data.decode(errors="replace")
        if not text.isdigit():
            os.close(go_w)
            raise LauncherError(text or "child died before it could start")
        return {"pid": int(text)}, go_w


def _check(req: dict[str, Any], fds: list[int]) -> str:
    """The request's op, once every field of it is valid; LauncherError otherwise."""
    op = req.get("op")
    argv, env, cwd = req.get("argv"), req.get("env"), req.get("cwd")
    if op not in ("shim", "agent"):
        raise LauncherError(f"unknown op {op!r}")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise LauncherError("argv must be a list of strings")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in env.items())):
        raise LauncherError("env must map strings to strings")
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        raise LauncherError("cwd must be an absolute path")
    if op == "shim" and argv[-1:] in (["start"], ["delete"]):
        raise LauncherError("shim takes the daemon's flags, without an action")
    want = {"shim": 1, "agent": 0}[op]
    if len(fds) != want:
        raise LauncherError(f"{op} takes {want} fds, got {len(fds)}")
    if op == "agent" and not (isinstance(req.get("hostname"), str)
                              and isinstance(req.get("log"), str)):
        raise LauncherError("agent needs hostname and log")
    share = req.get("share", [])
    if not (isinstance(share, list) and set(share) <= {"network", "ipc", "uts", "pid"}):
        raise LauncherError(f"share must list host namespaces among network, ipc, uts, pid:"
                            f" {share!r}")
    return op


def _listen(path: Path) -> tuple[socket.socket, int]:
    """A listener bound at *path* (0600), and its inode.  Bound under a
    temporary name and renamed: callers see the socket only once it is ready."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(str(tmp))
    os.chmod(tmp, 0o600)
    listener.listen(64)
    ours = os.stat(tmp).st_ino
    os.replace(tmp, path)
    return listener, ours


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def _read_until(fd: int, deadline: float) -> bytes:
    import select

    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise LauncherError("the launcher's child did not answer in time")
    return os.read(fd, 64)
