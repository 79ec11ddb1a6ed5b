"""Drivers for the opsd tests, and stand-in sandboxes for the ones that use them.

- :class:`Fleet`: sandboxes' ops.sock endpoints served by real grpclib
  servers (ShimOpsBase) on a private event loop thread; each stand-in keeps
  what a shim would report (shim and agent versions, the shim's pid, the
  release paths it runs from, containers) and can block, fail or lose a
  container on upgrade.  An edge fake: opsd cannot tell it from a shim.
  Used by tests/unit/test_opsd_standin.py; tests/integration/test_opsd_real.py
  drives real shims instead.
- :class:`Notify`: a systemd-style notify socket (SOCK_DGRAM, SO_PASSCRED).
- :class:`Opsd`: the real opsd as a subprocess (log in ``<base>/opsd.log``).
- :func:`install_releases`: releases of this working tree (with another
  version, a module patched) installed by ``opsctl release install``.
- :func:`opsctl`: the real opsctl as a subprocess, optionally as nobody;
  :func:`sandboxes` and :func:`plan` read ``ls --json`` and
  ``upgrade status --json``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from agent.api import ops_pb
from upgrade.releases import AGENT_ENTRY, SHIM_ENTRY, Manifest, ReleaseStore, manifest_store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
#: Not copied into a release's source: VCS data, virtualenvs, caches, the tests.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv*", "__pycache__", "*.egg-info",
                                     "build", "dist", ".*_cache", ".hypothesis", "tests")


def release_source(tmp: Path, version: str, patch: tuple[str, str] | None = None) -> Path:
    """This working tree with *version* in pyproject.toml (and *patch* appended to a module)."""
    src = tmp / f"src-{version}"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    py = src / "pyproject.toml"
    py.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', py.read_text()))
    if patch is not None:
        with open(src / patch[0], "a") as f:
            f.write("\n" + patch[1])
    return src


def install_releases(tmp: Path, root: Path, state_root: Path,
                     versions: dict[str, tuple[str, str] | None], current: str,
                     options: dict[str, tuple[str, ...]] | None = None) -> ReleaseStore:
    """``opsctl release install`` of a source per version (*versions* maps each
    to its patch or None), in parallel, into *root*; *current* becomes current;
    *options* adds install options per version.  Each install must succeed."""
    sources = {v: release_source(tmp, v, patch) for v, patch in versions.items()}

    def install(version: str) -> subprocess.CompletedProcess[str]:
        return opsctl(tmp / "no-opsd.sock", "release", "--releases", str(root), "--state-root",
                      str(state_root), "install", str(sources[version]), "--no-build-isolation",
                      *(["--current"] if version == current else []),
                      *(options or {}).get(version, ()), timeout=600)

    with concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:
        done = dict(zip(sources, pool.map(install, sources), strict=True))
    for version, r in done.items():
        assert r.returncode == 0 and f"installed keel {version}" in r.stdout, r
    return ReleaseStore(root)


def make_releases(root: Path, *versions: str, shim_schema: int = 1) -> None:
    """Directories with the release layout and manifest (stand-ins never exec them)."""
    for v in versions:
        for entry in (SHIM_ENTRY, AGENT_ENTRY):
            (root / v / entry).parent.mkdir(parents=True, exist_ok=True)
            (root / v / entry).write_text("#!/bin/sh\nexit 1\n")
            (root / v / entry).chmod(0o755)
        manifest_store(root / v).save(Manifest(v, time.time(), "test", shim_schema, 1))


#: Fake shim pids: a shim upgrade starts a new shim, which has a new pid.
_PIDS = itertools.count(1_000_000)


class StandIn(ops_pb.ShimOpsBase):
    """One sandbox as its shim reports it.  A shim upgrade gives it a new
    shim pid (a new process serves), an agent upgrade keeps the pid (the
    agent execs in place); ``shim_path``/``agent_path`` are what it runs now."""

    def __init__(self, sid: str, *, shim: str = "0.1.0", agent: str = "0.1.0",
                 containers: dict[str, str] | None = None, schema: int = 1, block: bool = False,
                 lose_container_on_agent: str = "", fail_agent: str = "", accel: str = "") -> None:
        self.sid, self.shim, self.agent, self.schema = sid, shim, agent, schema
        self.accel = accel
        self.containers = dict(containers or {"c1": "running"})
        self.block, self.lose, self.fail_agent = block, lose_container_on_agent, fail_agent
        self.shim_pid = next(_PIDS)
        self.shim_path = self.agent_path = ""
        self.entered = threading.Event()
        self.unblocked = asyncio.Event()

    def versions(self) -> tuple[str, str]:
        return self.shim, self.agent

    def snapshot(self) -> tuple[str, str, int, dict[str, str]]:
        """Versions, shim pid and containers: unchanged means nothing touched it."""
        return self.shim, self.agent, self.shim_pid, dict(self.containers)

    async def status(self, status_request: ops_pb.StatusRequest) -> ops_pb.StatusResponse:
        return ops_pb.StatusResponse(
            sandbox_id=self.sid, shim_version=self.shim, shim_pid=self.shim_pid,
            agent_version=self.agent, backend="standin", namespace="test", state_schema=self.schema,
            accel=self.accel,
            containers=[ops_pb.ContainerInfo(id=c, pid=1, status=s)
                        for c, s in self.containers.items()])

    async def upgrade_shim(self, upgrade_shim_request: ops_pb.UpgradeShimRequest
                           ) -> ops_pb.UpgradeShimResponse:
        req = upgrade_shim_request
        if self.block:
            self.entered.set()
            await self.unblocked.wait()
        old, self.shim, self.shim_path = self.shim, req.to_version, req.shim_path
        self.shim_pid = next(_PIDS)
        return ops_pb.UpgradeShimResponse(old, req.to_version, self.shim_pid, 1.5)

    async def upgrade_agent(self, upgrade_agent_request: ops_pb.UpgradeAgentRequest
                            ) -> ops_pb.UpgradeAgentResponse:
        req = upgrade_agent_request
        if req.to_version == self.fail_agent:
            raise GRPCError(Status.FAILED_PRECONDITION, "stand-in: new agent refused")
        if req.to_version == self.lose:
            self.containers["c1"] = "stopped"
        old, self.agent, self.agent_path = self.agent, req.to_version, req.agent_path
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
        self.path.unlink(missing_ok=True)


#: Deadlines for stand-ins, which answer at once (seconds).
STANDIN_TIMEOUTS = {"gate": 3.0, "settle": 3.0, "status": 2.0}


class Opsd:
    """The real opsd under *base* (its socket, state dir and log), restartable.

    It serves the sandboxes under *state_root* and the releases under
    *releases* (default: ``<base>/state`` and ``<base>/releases``, where the
    stand-in tests put theirs); *timeouts* are its gate, settle and status
    deadlines in seconds.
    """

    def __init__(self, base: Path, *extra: str, env: dict[str, str] | None = None,
                 releases: Path | None = None, state_root: Path | None = None,
                 timeouts: dict[str, float] | None = None) -> None:
        self.base = base
        self.env = env or {}
        self.socket = base / "opsd.sock"
        self.releases = releases or base / "releases"
        self.state_root = state_root or base / "state"
        self.timeouts = {**STANDIN_TIMEOUTS, **(timeouts or {})}
        self.notify = Notify(base / "notify.sock")
        #: Metrics off unless asked for: the default port is one for the whole host.
        self.extra = extra if any(a.startswith("--metrics-address") for a in extra) else (
            *extra, "--metrics-address", "none")
        self.proc: subprocess.Popen[bytes] = None  # type: ignore[assignment]

    def start(self) -> None:
        env = {**ENV, "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": "1000000"}
        env.pop("WATCHDOG_PID", None)
        env.update(self.env)
        since = len(self.notify.messages)
        t = self.timeouts
        with open(self.base / "opsd.log", "ab") as log:
            if env.get("JOURNAL_STREAM") == "<log>":  # stderr *is* "the journal"
                st = os.fstat(log.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "opsd", "--socket", str(self.socket),
                 "--state-dir", str(self.base / "opsd-state"), "--releases", str(self.releases),
                 "--state-root", str(self.state_root), "--gate-timeout", f"{t['gate']:g}",
                 "--settle-timeout", f"{t['settle']:g}", "--status-timeout", f"{t['status']:g}",
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


@contextlib.contextmanager
def running_opsd(prefix: str, releases: Path, state_root: Path,
                 timeouts: dict[str, float], extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> Iterator[Opsd]:
    """A real opsd in a new directory under /tmp named *prefix*..., for the sandboxes
    under *state_root* and the releases under *releases*, with *extra* options;
    stopped at the end, and then nothing of it may be left under its directory."""
    from tests.containerd import leftovers

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d = Opsd(base, *extra, releases=releases, state_root=state_root, timeouts=timeouts, env=env)
    d.start()
    try:
        yield d
    finally:
        d.close()
        found = leftovers(base)
        shutil.rmtree(base, ignore_errors=True)
        assert not found, f"left behind by opsd:\n{found}"


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


def opsctl(sock: Path, *args: str, as_nobody: bool = False,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = ([sys.executable, "-c", _AS_NOBODY, str(sock), *args] if as_nobody else
            [sys.executable, "-m", "opsd.cli", "--socket", str(sock), *args])
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=timeout)


def _json_of(sock: Path, *args: str) -> dict[str, Any]:
    r = opsctl(sock, *args, "--json")
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def sandboxes(sock: Path) -> dict[str, dict[str, Any]]:
    """``opsctl ls --json``: sandbox id -> what its shim reported (fields left
    at their defaults, such as an empty ``accel``, are absent)."""
    return {sb["id"]: sb for sb in _json_of(sock, "ls").get("sandboxes", [])}


def plan(sock: Path) -> dict[str, Any]:
    """``opsctl upgrade status --json``: the running or last plan ({} if none);
    each target's ``batch`` is filled in (the JSON leaves out zeros)."""
    doc = _json_of(sock, "upgrade", "status")
    p: dict[str, Any] = doc.get("plan", {}) if doc.get("found") else {}
    for t in p.get("targets", []):
        t.setdefault("batch", 0)
    return p
