"""The launcher's client half (shim/_launcher.py): find this release's
launcher, ask it for a fork, start one in the background.

Standard library only (and ``upgrade.scm``, which is too): ``start`` runs
it, and every import here is paid for on each container start.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shim._launcher_wire import ACK, LauncherError, NotRunning, recv, send
from upgrade.scm import close_all

#: Packages whose modules make up a release (their mtimes go into the key).
PACKAGES = ("keel", "shim", "agent", "upgrade", "observability")


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
            send(sock, doc, fds)
            reply, extra = recv(sock)
            close_all(extra)
            if "error" not in reply:
                sock.sendall(ACK)  # only now may the child go on (see Launcher._handle)
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


def spawn(path: Path, idle_s: float, env: Mapping[str, str], *, tracing: bool = False) -> None:
    """Start a launcher for *path* in the background (it exits at once if
    another one holds the path's lock)."""
    import subprocess

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = os.open(path.with_suffix(".log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                  0o600)
    try:
        subprocess.Popen([sys.executable, *_interpreter_flags(), "-m", "shim._launcher",
                          "--socket", str(path),
                          "--idle", str(idle_s), *(["--tracing"] if tracing else [])],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=dict(env),
                         cwd="/", start_new_session=True)
    finally:
        os.close(log)
