"""Drive a real keel-agent process: busybox rootfs, OCI specs, agent lifecycle, client calls.

Used by tests/integration/test_agent.py (and anything else that needs a
real agent without a sandbox around it).  The agent runs as a child
subreaper of the test, on unix sockets in a short temp directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from agent.api import API_VERSION, ops_pb, pb, present_session_key
from tests.prereq import skip_or_fail

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "sleep", "seq", "yes", "head", "true", "false", "id", "ls",
           "readlink", "hostname", "mkdir", "mount",
           "printf", "tty", "usleep", "touch", "kill", "mv")


def require_root_and_runc() -> str:
    """runc's path; skips loudly (or fails when CI=true) when the host cannot run containers."""
    runc = shutil.which("runc") or ("/usr/sbin/runc" if os.path.exists("/usr/sbin/runc") else None)
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (runc, cgroups, namespaces)"
    elif runc is None:
        reason = "runc is not installed (apt-get install runc)"
    elif not os.path.exists(BUSYBOX):
        reason = "busybox is not installed (apt-get install busybox-static)"
    if reason is not None:
        skip_or_fail(reason, what="agent")
    assert runc is not None
    return runc


def make_rootfs(root: Path) -> Path:
    """A minimal busybox root filesystem under *root*."""
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    return root


def make_spec(args: Sequence[str], cid: str, *, terminal: bool = False) -> dict[str, Any]:
    """A minimal OCI runtime spec (like ``runc spec``) running *args*."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": list(args),
            "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/", "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "keel-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ],
        "linux": {
            "cgroupsPath": f"/keel-agent-test/{cid}",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": ["/proc/kcore", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def spec_json(args: Sequence[str], cid: str, *, terminal: bool = False) -> bytes:
    return json.dumps(make_spec(args, cid, terminal=terminal)).encode()


def process_json(args: Sequence[str]) -> bytes:
    return json.dumps({"args": list(args), "cwd": "/", "env": ["PATH=/bin"],
                       "user": {"uid": 0, "gid": 0}}).encode()


class AgentProcess:
    """A keel-agent subprocess with its own state dir and sockets."""

    def __init__(self, runc: str, *extra: str, agent_fd: int | None = None,
                 agent_sock: Path | None = None, command: Sequence[str] = ()) -> None:
        """*agent_fd*: serve the agent channel on this inherited listening socket
        (bound at *agent_sock*) instead of a path of the agent's own.  *command*:
        the agent executable (a release's launcher, see :func:`make_release`)
        instead of this interpreter's ``-m agent``."""
        self.dir = Path(tempfile.mkdtemp(prefix="keel-at-"))  # short: sun_path is 108 bytes
        self.state_dir = self.dir / "state"
        self.agent_sock = agent_sock or self.dir / "agent.sock"
        self.ops_sock = self.dir / "ops.sock"
        self.runc = runc
        self.log_path = self.dir / "agent.log"
        argv = [*(command or (sys.executable, "-m", "agent")), "--state-dir", str(self.state_dir),
                *(["--listen-fd", f"agent={agent_fd}"] if agent_fd is not None
                  else ["--listen", f"agent=unix:{self.agent_sock}"]),
                "--listen", f"ops=unix:{self.ops_sock}", "--log-level", "debug", *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(runc).parent}:/usr/bin:/bin"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL,
                                         pass_fds=() if agent_fd is None else (agent_fd,))
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while "ready (boot" not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent not ready within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def runc_containers(self) -> list[str]:
        """Ids the runtime still knows under the agent's runc root."""
        root = self.state_dir / "runc"
        out = subprocess.run([self.runc, "--root", str(root), "list", "-q"], capture_output=True,
                             text=True, check=False)
        return out.stdout.split()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the agent (by pid) and wait; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent ignored SIGTERM:\n{self.log()}") from None
        return self.proc.returncode

    def cleanup(self) -> list[str]:
        """Stop the agent, force-delete leftover containers; returns the leftovers' ids."""
        self.stop()
        leftovers = self.runc_containers()
        for cid in leftovers:
            subprocess.run([self.runc, "--root", str(self.state_dir / "runc"), "delete",
                            "--force", cid], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        return leftovers


class Client:
    """Stubs of both channels of one agent; every call presents *session_key* if given."""

    def __init__(self, agent: AgentProcess, session_key: str = "") -> None:
        self._channels = [Channel(path=str(agent.agent_sock)), Channel(path=str(agent.ops_sock))]
        if session_key:
            for channel in self._channels:
                present_session_key(channel, session_key)
        self.agent = pb.AgentServiceStub(self._channels[0], timeout=30)
        self.ops = ops_pb.OpsServiceStub(self._channels[1], timeout=30)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


@contextlib.asynccontextmanager
async def connect(agent: AgentProcess, session_key: str = "",
                  api_version: int = API_VERSION) -> AsyncIterator[Client]:
    """A client that said Hello (presenting *session_key*, speaking *api_version*)."""
    client = Client(agent, session_key)
    try:
        await client.agent.hello(pb.HelloRequest(api_version=api_version, client_version="test",
                                                 session="pytest"))
        yield client
    finally:
        client.close()


async def expect_error(call: Awaitable[Any], status: Status, *needles: str) -> str:
    """Await *call*, which must fail with *status*; returns its message."""
    try:
        await call
    except GRPCError as exc:
        assert exc.status == status, f"expected {status.name}, got {exc.status.name}: {exc.message}"
        for needle in needles:
            assert needle in (exc.message or ""), f"{needle!r} not in {exc.message!r}"
        return exc.message or ""
    raise AssertionError(f"expected {status.name}, the call succeeded")


def stdio(*, stdin: bool = False, stdout: bool = True, stderr: bool = True,
          terminal: bool = False) -> pb.Stdio:
    return pb.Stdio(terminal=terminal, stdin=stdin, stdout=stdout, stderr=stderr)


async def read_stream(stub: pb.AgentServiceStub, cid: str, eid: str, stream: pb.OutputStream,
                      *, chunk: int = 64 * 1024, offset: int = 0) -> bytes:
    """Everything of one stream up to EOF, the way the shim's output pump reads it."""
    data = bytearray()
    while True:
        resp = await stub.read_output(pb.ReadOutputRequest(
            container_id=cid, exec_id=eid, stream=stream, offset=offset + len(data),
            max_bytes=chunk, wait_ms=5000))
        assert resp.offset == offset + len(data)
        data += resp.data
        if resp.eof:
            return bytes(data)


async def read_both(stub: pb.AgentServiceStub, cid: str, eid: str = "") -> tuple[bytes, bytes]:
    out, err = await asyncio.gather(read_stream(stub, cid, eid, pb.OutputStream.STDOUT),
                                    read_stream(stub, cid, eid, pb.OutputStream.STDERR))
    return out, err


# -- releases and in-place upgrades ---------------------------------------

#: Errors that mean "the connection to the agent went away", never "the call failed"
#: (what the shim retries on; an in-place upgrade drops every connection).
TRANSIENT = (OSError, StreamTerminatedError, ProtocolError, EOFError)


def make_release(root: Path, name: str, version: str, *, copy_code: bool = False,
                 patches: dict[str, str] | None = None, before_exec: str = "") -> Path:
    """A side-by-side "release" of the agent under *root*/*name*; returns its launcher.

    The release is a directory on PYTHONPATH (ahead of this checkout) holding a
    ``keel-<version>.dist-info`` (so ``agent_version()`` reports *version*)
    and, with *copy_code*, its own copy of the ``agent`` and ``upgrade``
    packages, to which *patches* (path -> code appended to that module) are
    applied: a release with a bug in it.  The launcher ``bin/keel-agent`` is a
    Python script (``-I``: the old image's PYTHONPATH does not leak in) that
    runs *before_exec* (Python; ``sys.argv`` holds the agent's arguments) and
    then execs this interpreter's ``-m agent``.  Not a shell script: a shell
    that runs anything before its ``exec`` may reap the agent's children
    (dash does), and a container process that exits during the upgrade
    would lose its exit status (see agent/PROTOCOL.md).
    """
    rel = root / name
    meta = rel / f"keel-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: keel\nVersion: {version}\n")
    if copy_code:
        for pkg in ("keel", "agent", "upgrade", "observability"):
            shutil.copytree(REPO / pkg, rel / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for module, code in (patches or {}).items():
        with open(rel / module, "a") as f:
            f.write("\n" + code)
    launcher = rel / "bin" / "keel-agent"
    launcher.parent.mkdir()
    launcher.write_text(
        f"#!{sys.executable} -I\n"
        "import os, sys\n"
        f"{before_exec}\n"
        f"os.environ['PYTHONPATH'] = {f'{rel}:{REPO}'!r}\n"
        "os.execv(sys.executable, [sys.executable, '-P', '-m', 'agent', *sys.argv[1:]])\n")
    launcher.chmod(0o755)
    return launcher


async def retrying(call: Callable[[], Awaitable[T]], *, timeout: float = 30.0) -> T:
    """``await call()`` until it does not fail with a lost connection (like the shim's retry)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return await call()
        except TRANSIENT:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


async def read_all(stub: pb.AgentServiceStub, cid: str, eid: str = "",
                   stream: pb.OutputStream = pb.OutputStream.STDOUT, *, offset: int = 0) -> bytes:
    """A stream from *offset* to EOF with long polls that survive agent upgrades
    (retried at the same offset when the connection drops)."""
    start = offset
    data = bytearray()
    while True:
        offset = start + len(data)
        req = pb.ReadOutputRequest(container_id=cid, exec_id=eid, stream=stream, offset=offset,
                                   max_bytes=65536, wait_ms=2000)
        resp = await retrying(functools.partial(stub.read_output, req), timeout=60)
        assert resp.offset == offset
        data += resp.data
        if resp.eof:
            return bytes(data)


def upgrade_gaps_ms(log: str) -> list[float]:
    """The gaps the agent logged, one per upgrade its new images served after."""
    return [float(m) for m in re.findall(r"gap ([0-9.]+) ms", log)]
