"""Stand-ins and drivers for the opsd integration tests (tests/integration/test_opsd.py).

- :class:`Fleet`: sandboxes' ops.sock endpoints served by real grpclib
  servers (ShimOpsBase) on a private event loop thread; each stand-in keeps
  shim/agent versions and containers, and can block, fail or lose a
  container on upgrade.  An edge fake: opsd cannot tell it from a shim.
- :class:`Notify`: a systemd-style notify socket (SOCK_DGRAM, SO_PASSCRED).
- :class:`Opsd`: the real opsd as a subprocess (log in ``<base>/opsd.log``).
- :func:`opsctl`: the real opsctl as a subprocess, optionally as nobody.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from agent.api import ops_pb
from upgrade.releases import AGENT_ENTRY, SHIM_ENTRY, Manifest, manifest_store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def make_releases(root: Path, *versions: str, shim_schema: int = 1) -> None:
    """Directories with the release layout and manifest (stand-ins never exec them)."""
    for v in versions:
        for entry in (SHIM_ENTRY, AGENT_ENTRY):
            (root / v / entry).parent.mkdir(parents=True, exist_ok=True)
            (root / v / entry).write_text("#!/bin/sh\nexit 1\n")
            (root / v / entry).chmod(0o755)
        manifest_store(root / v).save(Manifest(v, time.time(), "test", shim_schema, 1))


class StandIn(ops_pb.ShimOpsBase):
    def __init__(self, sid: str, *, shim: str = "0.1.0", agent: str = "0.1.0",
                 containers: dict[str, str] | None = None, schema: int = 1, block: bool = False,
                 lose_container_on_agent: str = "", fail_agent: str = "", accel: str = "") -> None:
        self.sid, self.shim, self.agent, self.schema = sid, shim, agent, schema
        self.accel = accel
        self.containers = dict(containers or {"c1": "running"})
        self.block, self.lose, self.fail_agent = block, lose_container_on_agent, fail_agent
        self.calls: list[tuple[str, str]] = []
        self.paths: list[str] = []
        self.entered = threading.Event()
        self.unblocked = asyncio.Event()

    def versions(self) -> tuple[str, str]:
        return self.shim, self.agent

    async def status(self, status_request: ops_pb.StatusRequest) -> ops_pb.StatusResponse:
        return ops_pb.StatusResponse(
            sandbox_id=self.sid, shim_version=self.shim, shim_pid=os.getpid(),
            agent_version=self.agent, backend="standin", namespace="test", state_schema=self.schema,
            accel=self.accel,
            containers=[ops_pb.ContainerInfo(id=c, pid=1, status=s)
                        for c, s in self.containers.items()])

    async def upgrade_shim(self, upgrade_shim_request: ops_pb.UpgradeShimRequest
                           ) -> ops_pb.UpgradeShimResponse:
        req = upgrade_shim_request
        self.calls.append(("shim", req.to_version))
        self.paths.append(req.shim_path)
        if self.block:
            self.entered.set()
            await self.unblocked.wait()
        old, self.shim = self.shim, req.to_version
        return ops_pb.UpgradeShimResponse(old, req.to_version, os.getpid(), 1.5)

    async def upgrade_agent(self, upgrade_agent_request: ops_pb.UpgradeAgentRequest
                            ) -> ops_pb.UpgradeAgentResponse:
        req = upgrade_agent_request
        self.calls.append(("agent", req.to_version))
        self.paths.append(req.agent_path)
        if req.to_version == self.fail_agent:
            raise GRPCError(Status.FAILED_PRECONDITION, "stand-in: new agent refused")
        if req.to_version == self.lose:
            self.containers["c1"] = "stopped"
        old, self.agent = self.agent, req.to_version
        return ops_pb.UpgradeAgentResponse(old, req.to_version, False, "", 0.01)


class Fleet:
    """Stand-in sandboxes under ``<state_root>/sandboxes/<id>/ops.sock``."""

    def __init__(self, state_root: Path) -> None:
        self.state_root = state_root
        self.sandboxes: dict[str, StandIn] = {}
        self._servers: list[Server] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet", daemon=True)

    def __enter__(self) -> Fleet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __getitem__(self, sid: str) -> StandIn:
        return self.sandboxes[sid]

    def add(self, sid: str, **kw: Any) -> StandIn:
        return self._run(self._add(sid, **kw))

    def release(self, sid: str) -> None:
        """Let blocked (and later) upgrades of *sid* go on."""
        self._loop.call_soon_threadsafe(self.sandboxes[sid].unblocked.set)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _add(self, sid: str, **kw: Any) -> StandIn:
        d = self.state_root / "sandboxes" / sid
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        standin = StandIn(sid, **kw)
        server = Server([standin])
        old = os.umask(0o177)
        try:
            await server.start(path=str(d / "ops.sock"))
        finally:
            os.umask(old)
        self._servers.append(server)
        self.sandboxes[sid] = standin
        return standin

    async def _close(self) -> None:
        for s in self.sandboxes.values():
            s.unblocked.set()
        for server in self._servers:
            server.close()
            await server.wait_closed()


@dataclass(frozen=True)
class Msg:
    text: str
    pid: int


class Notify:
    """A notify socket like systemd's: datagrams with the sender's credentials.

    A thread drains it all the time, as systemd does: a unix datagram queue
    holds only net.unix.max_dgram_qlen (10) messages, and sd_notify blocks
    the sender when it is full.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[Msg] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._drain, name="notify", daemon=True).start()

    def _drain(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except OSError:
                return
            sender = next((struct.unpack("3i", d[:12])[0] for lvl, typ, d in anc
                           if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), -1)
            with self._cond:
                self.messages.append(Msg(data.decode(), sender))
                self._cond.notify_all()

    def wait_for(self, text: str, *, pid: int | None = None, since: int = 0,
                 timeout: float = 20.0) -> Msg:
        """The first message (from index *since*) containing *text*; fails after *timeout*."""
        found: list[Msg] = []

        def seen() -> bool:
            found[:] = [m for m in self.messages[since:]
                        if text in m.text and (pid is None or m.pid == pid)][:1]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(seen, timeout):
                raise AssertionError(f"no {text!r} on the notify socket; got {self.messages[-5:]}")
        return found[0]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Opsd:
    """The real opsd under *base* (state, releases, socket), restartable."""

    def __init__(self, base: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.env = env or {}
        self.socket = base / "opsd.sock"
        self.notify = Notify(base / "notify.sock")
        self.extra = extra
        self.proc: subprocess.Popen[bytes] = None  # type: ignore[assignment]

    def start(self) -> None:
        env = {**ENV, "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": "1000000"}
        env.pop("WATCHDOG_PID", None)
        env.update(self.env)
        since = len(self.notify.messages)
        with open(self.base / "opsd.log", "ab") as log:
            if env.get("JOURNAL_STREAM") == "<log>":  # stderr *is* "the journal"
                st = os.fstat(log.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "opsd", "--socket", str(self.socket),
                 "--state-dir", str(self.base / "opsd-state"), "--releases",
                 str(self.base / "releases"), "--state-root", str(self.base / "state"),
                 "--gate-timeout", "3", "--settle-timeout", "3", "--status-timeout", "2",
                 *self.extra], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=REPO)
        try:
            self.notify.wait_for("READY=1", pid=self.proc.pid, since=since)
        except AssertionError:
            self.stop()
            raise AssertionError(f"opsd did not get ready:\n{self.log()}") from None

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self.notify.close()

    def log(self) -> str:
        return (self.base / "opsd.log").read_text(errors="replace")


_AS_NOBODY = """
import contextlib, io, os, sys
import opsd.cli as cli
# Warm every code path up as root: after setuid the interpreter's own tree
# (under /root) is out of reach for nobody, so nothing may be imported later.
with contextlib.redirect_stderr(io.StringIO()):
    cli.main(["--socket", "/nonexistent/opsd.sock", "ls"])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(cli.main(["--socket", sys.argv[1], *sys.argv[2:]]))
"""


def opsctl(sock: Path, *args: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ([sys.executable, "-c", _AS_NOBODY, str(sock), *args] if as_nobody else
            [sys.executable, "-m", "opsd.cli", "--socket", str(sock), *args])
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
