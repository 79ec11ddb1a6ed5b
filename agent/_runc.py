"""The OCI runtime command line (runc; crun takes the same arguments).

Each call spawns the runtime with ``subprocess.Popen`` and awaits its exit
through the agent's :class:`~agent._reaper.Reaper` (never ``Popen.wait``:
the reaper owns waitpid).  The runtime logs JSON to a per-call file; its
error messages become ``RuntimeFailed("runc create failed: <message>")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from agent._reaper import Reaper
from keel.errors import FailedPrecondition, NotFound
from observability.spans import Tracer

log = logging.getLogger("keel.agent.runc")


class RuntimeFailed(FailedPrecondition):
    """The OCI runtime ran and refused or failed; the message is its own."""


class RuntimeMissing(FailedPrecondition):
    """The OCI runtime binary cannot be found."""


#: The stdio fds a runtime process gets: stdin, stdout, stderr.
StdioFds = tuple[int, int, int]


def _error_message(log_file: IO[bytes], stderr: IO[bytes] | None) -> str:
    """The runtime's own words: error lines of its JSON log, else its stderr."""
    log_file.seek(0)
    errors = []
    for line in log_file.read().decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            errors.append(str(entry.get("msg", "")).strip())
    if errors:
        return "; ".join(dict.fromkeys(e for e in errors if e))
    if stderr is not None:
        stderr.seek(0)
        return stderr.read(4096).decode(errors="replace").strip()
    return ""


class Runc:
    """Runs runtime commands against one state root (``runc --root``)."""

    def __init__(self, binary: str, root: Path, reaper: Reaper, timeout_s: float, *,
                 tracer: Tracer | None = None) -> None:
        self.binary = binary
        self._tracer = tracer or Tracer("keel-agent")
        self.root = root
        self._reaper = reaper
        self._timeout_s = timeout_s
        self._name = os.path.basename(binary) or binary

    def resolve(self) -> str:
        """The runtime's path; RuntimeMissing (with the configured name) if absent."""
        found = shutil.which(self.binary)
        if found is None:
            raise RuntimeMissing(
                f"OCI runtime {self.binary!r} not found (agent --runtime); cannot run containers"
            )
        return found

    async def run(self, args: Sequence[str], *, stdio: StdioFds | None = None) -> bytes:
        """Run ``<runtime> --root R --log L --log-format json ARGS``; return its stdout.

        With *stdio* the runtime (and through it the container) gets those
        fds; otherwise /dev/null in and temp files out.  Raises
        RuntimeFailed on a non-zero exit or a timeout.
        """
        binary = self.resolve()
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._tracer.span(f"{self._name} {args[0]}",
                                                  {"process.command_args": " ".join(args)}))
            log_file = stack.enter_context(tempfile.NamedTemporaryFile(dir=self.root, prefix=".log-"))
            argv = [binary, "--root", str(self.root), "--log", log_file.name,
                    "--log-format", "json", *args]
            out = err = None
            if stdio is None:
                out = stack.enter_context(tempfile.TemporaryFile(dir=self.root))
                err = stack.enter_context(tempfile.TemporaryFile(dir=self.root))
                devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                stack.callback(os.close, devnull)
                stdio = (devnull, out.fileno(), err.fileno())
            status = await self._spawn_and_wait(argv, stdio, args[0])
            if status != 0:
                message = _error_message(log_file, err) or f"exit status {status}"
                for lead in (f"{self._name} {args[0]} failed:", f"{args[0]} failed:"):
                    message = message.removeprefix(lead).strip()  # runc often says it already
                raise RuntimeFailed(f"{self._name} {args[0]} failed: {message}")
            if out is None:
                return b""
            out.seek(0)
            return out.read()

    async def _spawn_and_wait(self, argv: list[str], stdio: StdioFds, action: str) -> int:
        since = time.monotonic_ns()
        try:
            # Popen only forks and execs (no waiting): the reaper awaits the exit.
            proc = subprocess.Popen(argv, stdin=stdio[0], stdout=stdio[1],  # noqa: ASYNC220
                                    stderr=stdio[2], close_fds=True)
        except OSError as exc:
            raise RuntimeMissing(f"cannot execute OCI runtime {argv[0]!r}: {exc}") from exc
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    return (await self._reaper.wait(proc.pid, since)).status
            except TimeoutError:
                log.error("%s %s timed out after %ss; killing it", self._name, action,
                          self._timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await self._reaper.wait(proc.pid, since)
                raise RuntimeFailed(
                    f"{self._name} {action} timed out after {self._timeout_s}s"
                ) from None
        finally:
            # The reaper reaped it (or will): Popen must never waitpid() a reused pid.
            if proc.returncode is None:
                proc.returncode = -1

    async def create(self, cid: str, bundle: Path, pid_file: Path, stdio: StdioFds,
                     console: Path | None) -> None:
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console is not None:
            args += ["--console-socket", str(console)]
        await self.run([*args, cid], stdio=stdio)

    async def exec(self, cid: str, process_file: Path, pid_file: Path, stdio: StdioFds,
                   console: Path | None) -> None:
        args = ["exec", "--detach", "--pid-file", str(pid_file), "--process", str(process_file)]
        if console is not None:
            args += ["--console-socket", str(console)]
        await self.run([*args, cid], stdio=stdio)

    async def kill(self, cid: str, sig: int, all_processes: bool) -> None:
        """Signal the container's init (or all its processes).

        NotFound when the runtime says the container is not running.
        """
        try:
            await self.run(["kill", *(["--all"] if all_processes else []), cid, str(sig)])
        except RuntimeFailed as exc:
            # runc has no error codes: its message is all there is to classify.
            if "not running" in str(exc) or "does not exist" in str(exc):
                raise NotFound(f"container {cid}: process already finished") from exc
            raise

    async def delete(self, cid: str) -> None:
        await self.run(["delete", "--force", cid])

    async def events_stats(self, cid: str) -> dict[str, Any]:
        doc = json.loads(await self.run(["events", "--stats", cid]))
        data = doc.get("data") if isinstance(doc, dict) else None
        return data if isinstance(data, dict) else {}

    async def ps(self, cid: str) -> list[int]:
        pids = json.loads(await self.run(["ps", "--format", "json", cid]) or b"[]")
        return [int(p) for p in pids or []]


@contextlib.contextmanager
def console_socket(state_dir: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A listening unix socket for ``--console-socket``; yields (path, socket).

    Under *state_dir* when the path fits in sun_path, else under the temp dir.
    """
    base = state_dir / "console"
    if len(str(base)) > 80:
        base = Path(tempfile.gettempdir())
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="keel-con-", dir=base))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = tmp / "s"
        sock.bind(str(path))
        sock.listen(1)
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def receive_console_nowait(sock: socket.socket, name: str) -> int:
    """The pty master the runtime sent on *sock* (it has already exited)."""
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        raise RuntimeFailed(f"{name}: the runtime did not send a console") from None
    with conn:
        conn.setblocking(False)
        _, fds, flags, _ = socket.recv_fds(conn, 4096, 4)
    if flags & socket.MSG_CTRUNC or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise RuntimeFailed(f"{name}: expected one console fd from the runtime, got {len(fds)}")
    return fds[0]
