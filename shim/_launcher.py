"""The launcher: forks shim daemons and process-backend agents from an
interpreter that has imported them already.

Every pod start paid for the start-up of two more interpreters after
``start`` -- the daemon's and the agent's, each ~0.2 s of imports (grpclib,
betterproto, the generated APIs) -- and ``ctr run --rm`` took 5x as long
as with the runc shim.  A Go shim re-execs itself for free;
Python cannot, so one process per release keeps those modules imported
and forks: a forked daemon serves within milliseconds of ``start``.

* **Who starts it**: ``start``.  When no launcher of this release answers,
  ``start`` runs the daemon the plain way (exec) and spawns a launcher in
  the background for the pods that follow.  It is a cache, never needed:
  every caller falls back to exec when it is absent, busy past a deadline
  or says no.
* **Lifetime**: it exits after ``launcher_idle_s`` seconds without a
  request (``shim`` config; 0 disables the launcher), or on SIGTERM,
  removing its socket.  It owns nothing: what it forked is reparented
  at once (double fork) and lives on without it.
* **Which release**: the socket's name is a hash of the interpreter,
  the package location and the newest mtime of the modules
  (:func:`release_key`): an upgrade, a reinstall or an edit gets a new
  launcher; the old one idles out.
* **Trust**: the socket is 0600 in a 0700 directory under the state root,
  and each connection's peer credentials must carry the launcher's uid.
  A request names one of two things the launcher does itself -- serve as
  a shim daemon (``shim``), start an agent in new namespaces (``agent``) --
  never a program to execute.
* **Not** ``delete``: containerd's post-exit ``delete`` finds nothing left
  to do, so its cost is the interpreter's start, which a launcher client
  pays as well.
* **What a child inherits** from the caller, not from the launcher: its
  cgroup (the caller's, read from ``/proc/<peer pid>/cgroup``), working
  directory, environment, stdio, and a process title that reads like the
  command line the exec path would have had.  Python's hash seed is the
  launcher's, shared by its children (as with any fork).

Wire (one request per connection): a 4-byte big-endian length and a JSON
object, its fds in the same message (SCM_RIGHTS); the reply is framed the
same way, without fds.  Requests and replies::

  {"op": "shim",  "argv": FLAGS, "env": ENV, "cwd": DIR}   fds: [listener]
      -> {"pid": DAEMON_PID}
  {"op": "agent", "argv": AGENT_ARGS, "env": ENV, "cwd": DIR,
                  "hostname": NAME, "log": PATH}           fds: []
      -> {"pid": AGENT_PID} (host pid of the new pid namespace's PID 1)
  any failure -> {"error": TEXT}

The client half (:func:`request`, :func:`spawn`) imports only the standard
library: ``start`` runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from keel import peercred
from upgrade.scm import close_all, fds_of, rights

#: Most bytes a request or reply may have (an environment fits many times).
MAX_MESSAGE = 1 << 20
MAX_FDS = 4
#: Seconds the launcher waits for a forked child to report its pid.
FORK_TIMEOUT_S = 10.0
#: The caller's acknowledgement of a pid reply.
ACK = b"\x01"
#: Packages whose modules make up a release (their mtimes go into the key).
PACKAGES = ("shim", "agent", "upgrade", "observability")
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


class LauncherError(Exception):
    """The launcher refused or failed a request (the caller falls back)."""


class NotRunning(LauncherError):
    """No launcher listens at the path (not started yet, or idled out)."""


# -- client ------------------------------------------------------------------


def release_key() -> str:
    """Identity of the code this interpreter runs: the interpreter, its
    module path (less the working directory, which ``-m`` puts first), where
    the packages live and the newest mtime among their modules.  Not the
    version: importlib.metadata alone would cost ``start`` more than the
    fork saves, and a release's version only changes with its files."""
    here = Path(__file__).resolve().parent.parent
    newest = 0
    stack = [str(here / p) for p in PACKAGES]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if e.name != "__pycache__":
                    stack.append(e.path)
            elif e.name.endswith(".py"):
                try:
                    newest = max(newest, e.stat().st_mtime_ns)
                except OSError:
                    continue
    cwd = os.getcwd()
    paths = [p for p in sys.path if p and p != cwd]
    ident = "\0".join([sys.executable, *paths, str(here), str(newest)])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def socket_path(state_root: Path, key: str | None = None) -> Path:
    return state_root / "launcher" / f"{key or release_key()}.sock"


def _send(sock: socket.socket, doc: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    body = json.dumps(doc).encode()
    if len(body) > MAX_MESSAGE:
        raise LauncherError(f"message of {len(body)} bytes is over {MAX_MESSAGE}")
    data = struct.pack(">I", len(body)) + body
    sent = sock.sendmsg([data], rights(fds))
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One framed message and its fds; LauncherError on anything malformed."""
    fds: list[int] = []
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        if len(buf) >= 4 and struct.unpack(">I", buf[:4])[0] > MAX_MESSAGE:
            close_all(fds)
            raise LauncherError("message over the size limit")
        data, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        fds.extend(fds_of(anc))
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise LauncherError(f"more than {MAX_FDS} fds")
        if not data:
            close_all(fds)
            raise LauncherError("connection closed mid-message" if buf else "no message")
        buf += data
    (n,) = struct.unpack(">I", buf[:4])
    try:
        doc = json.loads(buf[4 : 4 + n])
    except ValueError as exc:
        close_all(fds)
        raise LauncherError(f"malformed message: {exc}") from None
    if not isinstance(doc, dict):
        close_all(fds)
        raise LauncherError("malformed message: not an object")
    return doc, fds


def request(path: Path, doc: Mapping[str, Any], fds: Sequence[int] = (),
            timeout: float = 5.0) -> dict[str, Any]:
    """Send one request; its reply.  LauncherError when no launcher answers
    at *path*, or it answers with an error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"launcher {path}: {exc.strerror}") from None
        except OSError as exc:
            raise LauncherError(f"launcher {path}: {exc}") from None
        try:
            _send(sock, doc, fds)
            reply, extra = _recv(sock)
            close_all(extra)
            if "error" not in reply:
                sock.sendall(ACK)  # only now may the child go on (see _Launcher._handle)
        except OSError as exc:
            raise LauncherError(f"launcher {path}: {exc}") from None
    finally:
        sock.close()
    if "error" in reply:
        raise LauncherError(str(reply["error"]))
    return reply


def _interpreter_flags() -> list[str]:
    """This interpreter's flags that shape its module path, for the launcher
    (whose children must import what we would); -P always: its working
    directory (/) has no business on that path."""
    f = sys.flags
    return [flag for flag, on in (("-I", f.isolated), ("-E", f.ignore_environment and not f.isolated),
                                  ("-s", f.no_user_site and not f.isolated), ("-S", f.no_site),
                                  ("-P", True)) if on]


def note(path: Path, line: str) -> None:
    """Append *line* to the launcher's log (for callers whose stderr is not theirs)."""
    try:
        with open(path.with_suffix(".log"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError:
        pass


def needs_spawn(path: Path) -> bool:
    """True when no launcher holds *path*'s lock (none serves or starts)."""
    import fcntl

    try:
        fd = os.open(path.with_suffix(".lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def spawn(path: Path, idle_s: float, env: Mapping[str, str]) -> None:
    """Start a launcher for *path* in the background (it exits at once if
    another one holds the path's lock)."""
    import subprocess

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = os.open(path.with_suffix(".log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                  0o600)
    try:
        subprocess.Popen([sys.executable, *_interpreter_flags(), "-m", "shim._launcher",
                          "--socket", str(path),
                          "--idle", str(idle_s)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=dict(env),
                         cwd="/", start_new_session=True)
    finally:
        os.close(log)


def _read_until(fd: int, deadline: float) -> bytes:
    import select

    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise LauncherError("the launcher's child did not answer in time")
    return os.read(fd, 64)


# -- server ------------------------------------------------------------------


class _Launcher:
    def __init__(self, path: Path, idle_s: float) -> None:
        self.path = path
        self.idle_s = idle_s
        self.own_fds: list[int] = []

    def warm(self) -> None:
        import gc
        import importlib

        for name in WARM_MODULES:
            importlib.import_module(name)
        gc.collect()
        gc.freeze()  # children must not touch (and so copy) these objects' pages

    def serve(self) -> int:
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
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        listener.listen(64)
        ours = os.stat(tmp).st_ino
        os.replace(tmp, self.path)  # callers see the socket only once it is ready
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
            req, fds = _recv(conn)
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
            _send(conn, reply)
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
        r, w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:  # the intermediate: never returns
            _intermediate(op, req, fds, peer, w, go_r, [*self.own_fds, conn.fileno(), r, go_w])
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


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def _intermediate(op: str, req: dict[str, Any], fds: list[int], peer: int, w: int, go: int,
                  close: list[int]) -> None:
    """Forked from the launcher: set up, fork the real child (which waits for
    a byte on *go*), report its pid (or what went wrong) on *w*, exit."""
    try:
        for fd in close:
            os.close(fd)
        _join_cgroup(peer)
        if op == "agent":
            from shim.vmm.process import _nsinit

            _nsinit.enter_namespaces()
        else:
            os.setsid()
        pid = os.fork()
        if pid:
            os.write(w, str(pid).encode())
            os._exit(0)
        os.close(w)
        if os.read(go, 1) != b"g":  # the caller never took our pid: it starts its own
            os._exit(0)
        os.close(go)
        _child(op, req, fds)  # never returns
    except BaseException as exc:  # noqa: BLE001 - the launcher reads this as the error
        try:
            os.write(w, f"{op}: {exc}".encode()[:4096])
        finally:
            os._exit(1)


def _join_cgroup(peer: int) -> None:
    """Move this process into *peer*'s cgroup (v2), unless already there."""
    try:
        with open(f"/proc/{peer}/cgroup") as f:
            theirs = next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)
        with open("/proc/self/cgroup") as f:
            mine = next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)
    except OSError as exc:
        raise LauncherError(f"cannot read the caller's cgroup: {exc}") from None
    if theirs is None or theirs == mine:
        return
    with open(f"/sys/fs/cgroup{theirs}/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def _child(op: str, req: dict[str, Any], fds: list[int]) -> None:
    """The forked daemon, action or agent: become what the exec path would
    have started, run it, exit.  Never returns."""
    status = 1
    try:
        import logging
        import random

        # What a fresh interpreter starts with (SIGPIPE ignored: a write to
        # a closed socket raises instead of killing), not the launcher's.
        for sig, handler in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGCHLD, signal.SIG_DFL),
                             (signal.SIGINT, signal.default_int_handler),
                             (signal.SIGPIPE, signal.SIG_IGN), (signal.SIGXFSZ, signal.SIG_IGN)):
            signal.signal(sig, handler)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        random.seed()
        argv: list[str] = req["argv"]
        if op == "agent":
            from shim.vmm.process import _nsinit

            _nsinit.become_init(req["hostname"], req["log"])
            from shim.vmm.api import AGENT_COMMAND

            title = [*AGENT_COMMAND, *argv]
        else:
            os.environ["KEEL_LISTEN_FD"] = str(fds[0])
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            title = [sys.executable, "-m", "shim", *argv]
        # As if exec'd: the agent's in-place upgrade re-execs from these.
        sys.argv = [sys.executable, *argv]
        sys.orig_argv = title
        if not _set_cmdline(title, req["env"]):
            import setproctitle

            setproctitle.setproctitle(" ".join(title))
        if op == "agent":
            from agent.__main__ import main as agent_main

            status = agent_main(argv)
        else:
            from shim.__main__ import main as shim_main

            status = shim_main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass
        os._exit(status)


_cmdline_buf: Any = None  # the new argv and env area: must live as long as the process


def _set_cmdline(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Make /proc/self/cmdline and /proc/self/environ read *argv* and *env*
    as after an exec (tools and people match shims by their flags), with
    prctl(PR_SET_MM_MAP); False where the kernel refuses (then a
    setproctitle title stands in).

    PR_SET_MM_MAP sets every field of the memory map at once, so the others
    are read back from /proc/self/stat, and brk with sbrk(0) as the last
    step before the call (nothing in between allocates from the heap).
    """
    import ctypes

    global _cmdline_buf
    names = ("start_code end_code start_data end_data start_brk brk start_stack "
             "arg_start arg_end env_start env_end").split()

    class MmMap(ctypes.Structure):
        _fields_ = [*((n, ctypes.c_uint64) for n in names), ("auxv", ctypes.c_uint64),
                    ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sbrk.restype = ctypes.c_void_p
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                               ctypes.c_ulong]
        raw = b"".join(a.encode() + b"\0" for a in argv)
        env_raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        buf = ctypes.create_string_buffer(raw + env_raw, len(raw) + len(env_raw))
        base = ctypes.addressof(buf)
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().rsplit(b")", 1)[1].split()
        field = lambda n: int(stat[n - 3])  # noqa: E731 - proc(5) numbers fields from 1
        m = MmMap(start_code=field(26), end_code=field(27), start_data=field(45),
                  end_data=field(46), start_brk=field(47), start_stack=field(28),
                  arg_start=base, arg_end=base + len(raw), env_start=base + len(raw),
                  env_end=base + len(raw) + len(env_raw), auxv=0, auxv_size=0,
                  exe_fd=0xFFFFFFFF)
        m.brk = libc.sbrk(0)
        if libc.prctl(35, 14, ctypes.byref(m), ctypes.sizeof(m), 0) != 0:  # PR_SET_MM, _MAP
            return False
    except (OSError, AttributeError, ValueError, IndexError):
        return False
    _cmdline_buf = buf
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging

    p = argparse.ArgumentParser(prog="python -m shim._launcher",
                                description="Fork Keel shim daemons and process agents from "
                                            "a warm interpreter (started by the shim's start).")
    p.add_argument("--socket", required=True, type=Path, help="socket to serve on")
    p.add_argument("--idle", type=float, default=600.0, help="exit after this many idle seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s launcher[%(process)d] %(levelname)s %(message)s")
    return _Launcher(args.socket, args.idle).serve()


if __name__ == "__main__":
    sys.exit(main())
