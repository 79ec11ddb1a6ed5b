"""Issue 3 (live upgrade): freeze window, agent gap, a rolling upgrade against a restart.

Two releases of this checkout (bench.releases): A, the version the venv's
shim reports, and B, the next minor.  On a private containerd (process
backend):

* shim handoffs: one pod (`sleep`) is handed A -> B -> A ... over ShimOps
  `UpgradeShim` on `<sandbox>/ops.sock`; each reply carries the old shim's
  freeze window (freeze start to commit, shim/_handoff.py).  Next to it, the
  wall time of the call as opsd sees it (the new shim's start-up included);
* agent upgrades: the same pod's agent is exec'd A <-> B with
  `UpgradeAgent`.  The reply is sent before the exec, so the gap (last RPC
  served by the old image to the first served by the new one) is read from
  the agent's `state.json` (`last_upgrade.gap_s`), once the new image has
  served its first call;
* fleet: N pods (one `sleep` container each) upgraded A -> B, shim and agent,
  by opsctl/opsd in batches of K, against "what users do today": kill,
  delete and `ctr run -d` the same N pods again, K at a time.  Whether each
  container's process survived is counted from `ctr tasks ls` PIDs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from grpclib.client import Channel

from agent.api import ops_pb
from bench.common import Row, median, p99, pid_tree
from bench.releases import make_release, next_minor
from bench.stage import Opsd, Stage, progress
from shim import version as shim_version
from upgrade.releases import AGENT_ENTRY, SHIM_ENTRY

NAMES = ("keel live", "stop+start")


@dataclass(frozen=True, slots=True)
class UpgradeConfig:
    handoffs: int = 60
    agent_upgrades: int = 20
    pods: int = 50
    batch: int = 10
    #: How many `ctr run -d` run at once while the pods are set up.
    setup_parallel: int = 4

    @classmethod
    def quick(cls) -> UpgradeConfig:
        return cls(handoffs=3, agent_upgrades=2, pods=2, batch=2)

    def with_fleet(self, pods: int | None, batch: int | None) -> UpgradeConfig:
        return replace(self, pods=pods or self.pods, batch=batch or self.batch)


def run_upgrade(stage: Stage, cfg: UpgradeConfig) -> tuple[list[Row], dict[str, Any]]:
    a = shim_version()
    b = next_minor(a)
    releases = stage.tmp / "releases"
    for v in (a, b):
        make_release(releases, v)
    raw: dict[str, Any] = {"from": a, "to": b}
    rows: list[Row] = []
    with stage.container("keel", "upg", "sleep", "100000") as cid:
        progress(f"upgrade: {cfg.handoffs} shim handoffs {a} <-> {b}")
        freeze, call = asyncio.run(_handoffs(stage, cid, releases, (b, a), cfg.handoffs))
        _check_alive(stage, cid)
        progress(f"upgrade: {cfg.agent_upgrades} agent upgrades {a} <-> {b}")
        gaps = asyncio.run(_agent_upgrades(stage, cid, releases, (b, a), cfg.agent_upgrades))
        _check_alive(stage, cid)
    raw.update(freeze_ms=freeze, upgrade_shim_call_ms=call, agent_gap_ms=gaps)
    n = len(freeze)
    rows += [Row(f"shim freeze p50 (n={n})", median(freeze), None, "ms", 1),
             Row(f"shim freeze p99 (n={n})", p99(freeze), None, "ms", 1, "<= 50 ms"),
             Row("UpgradeShim call p50 (wall)", median(call), None, "ms", 0),
             Row(f"agent upgrade gap p50 (n={len(gaps)})", median(gaps), None, "ms", 0),
             Row(f"agent upgrade gap max (n={len(gaps)})", max(gaps), None, "ms", 0, "<= 1000 ms")]
    rows += _fleet(stage, cfg, releases, b, raw)
    return rows, raw


def _check_alive(stage: Stage, cid: str) -> None:
    """The pod still runs and still executes commands (the upgrades were real, not fatal)."""
    if stage.task_status(cid) != "RUNNING":
        raise RuntimeError(f"{cid} is no longer running after the upgrades")
    stage.ctr("tasks", "exec", "--exec-id", f"check-{time.monotonic_ns()}", cid, "true")


# --- ShimOps ----------------------------------------------------------------

async def _shim_ops(sock: Path, method: str, request: Any, timeout: float = 120.0) -> Any:
    """ShimOps `method(request)` on a fresh connection (a handoff replaces the server)."""
    channel = Channel(path=str(sock))
    try:
        return await getattr(ops_pb.ShimOpsStub(channel, timeout=timeout), method)(request)
    finally:
        channel.close()


async def _wait_status(sock: Path, ok: Callable[[ops_pb.StatusResponse], bool],
                       timeout: float = 30.0) -> ops_pb.StatusResponse:
    """Poll Status until `ok(reply)`; connection errors count as "not yet"."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                st = await _shim_ops(sock, "status", ops_pb.StatusRequest(), 5.0)
                if ok(st):
                    return st
            except (OSError, TimeoutError):
                pass  # the socket is being replaced: not yet
            await asyncio.sleep(0.02)


def _served_by(shim_pid: int = 0, shim: str = "", agent: str = ""
               ) -> Callable[[ops_pb.StatusResponse], bool]:
    """A Status check: these (non-empty) pid and versions answer."""
    def ok(st: ops_pb.StatusResponse) -> bool:
        return ((not shim_pid or st.shim_pid == shim_pid) and (not shim or st.shim_version == shim)
                and (not agent or st.agent_version == agent))
    return ok


async def _handoffs(stage: Stage, cid: str, releases: Path, order: tuple[str, str],
                    count: int) -> tuple[list[float], list[float]]:
    sock = stage.sandbox_dir(cid) / "ops.sock"
    freeze, call = [], []
    for i in range(count):
        to = order[i % 2]
        req = ops_pb.UpgradeShimRequest(shim_path=str(releases / to / SHIM_ENTRY), to_version=to)
        t0 = time.perf_counter()
        resp = await _shim_ops(sock, "upgrade_shim", req)
        call.append((time.perf_counter() - t0) * 1e3)
        freeze.append(resp.freeze_ms)
        await _wait_status(sock, _served_by(resp.new_shim_pid, to))
        if (i + 1) % 10 == 0:
            progress(f"upgrade: {i + 1}/{count} handoffs, last freeze {resp.freeze_ms:.1f} ms")
    return freeze, call


async def _agent_upgrades(stage: Stage, cid: str, releases: Path, order: tuple[str, str],
                          count: int) -> list[float]:
    sock = stage.sandbox_dir(cid) / "ops.sock"
    state = stage.sandbox_dir(cid) / "agent" / "state.json"
    gaps = []
    for i in range(count):
        to = order[i % 2]
        before = _last_upgrade(state)
        req = ops_pb.UpgradeAgentRequest(agent_path=str(releases / to / AGENT_ENTRY),
                                         to_version=to)
        resp = await _shim_ops(sock, "upgrade_agent", req)
        if resp.rolled_back:
            raise RuntimeError(f"agent upgrade to {to} rolled back: {resp.message}")
        await _wait_status(sock, _served_by(0, agent=to))
        last = await _wait_gap(state, before)
        gaps.append(last["gap_s"] * 1e3)
    return gaps


def _last_upgrade(state: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(state.read_text())
    except (OSError, ValueError):  # mid-rename: read again
        return None
    last = doc.get("last_upgrade")
    return last if isinstance(last, dict) else None


async def _wait_gap(state: Path, before: dict[str, Any] | None,
                    timeout: float = 30.0) -> dict[str, Any]:
    """The agent's new `last_upgrade` record once its gap is known (set on the first call served)."""
    async with asyncio.timeout(timeout):
        while True:
            last = _last_upgrade(state)
            if last and last != before and last.get("gap_s", 0) > 0:
                return last
            await asyncio.sleep(0.02)


# --- fleet ------------------------------------------------------------------

def _fleet(stage: Stage, cfg: UpgradeConfig, releases: Path, to: str,
           raw: dict[str, Any]) -> list[Row]:
    pods = [stage.new_id("pod") for _ in range(cfg.pods)]
    progress(f"upgrade: starting {cfg.pods} pods")
    _parallel(cfg.setup_parallel, pods, lambda c: stage.run_detached("keel", c, "sleep", "100000"))
    before = _pids(stage, pods)
    progress(f"upgrade: opsctl upgrade --to {to} --batch {cfg.batch} ({cfg.pods} pods)")
    live_s, at_target = _live_upgrade(stage, releases, to, cfg.batch, raw)
    kept_live = _kept(stage, before)
    progress(f"upgrade: live upgrade {live_s:.1f} s; restarting the {cfg.pods} pods")
    t0 = time.perf_counter()
    _parallel(cfg.batch, pods, lambda c: _restart(stage, c))
    restart_s = time.perf_counter() - t0
    kept_restart = _kept(stage, before)
    raw.update(live_s=live_s, restart_s=restart_s, at_target=at_target)
    progress(f"upgrade: restart {restart_s:.1f} s; removing the pods")
    _parallel(cfg.batch, pods, stage.remove)
    n = cfg.pods
    return [Row(f"{n} pods to {to}, batch {cfg.batch}: wall", live_s, restart_s, "s", 1,
                f"<= 60 s for 50 (opsctl: {at_target}/{n} at {to})"),
            Row("container processes kept", kept_live, kept_restart, f"of {n}", 0)]


def _live_upgrade(stage: Stage, releases: Path, to: str, batch: int,
                  raw: dict[str, Any]) -> tuple[float, int]:
    """`opsctl upgrade --to TO --batch K` through a real opsd; (seconds, sandboxes at TO)."""
    with Opsd(stage, releases) as opsd:
        t0 = time.perf_counter()
        res = opsd.opsctl("upgrade", "--to", to, "--batch", str(batch))
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"opsctl upgrade failed (rc={res.returncode}):\n{res.stdout}"
                               f"{res.stderr}\n--- opsd log ---\n{opsd.log_tail()}")
        listed = json.loads(opsd.opsctl("ls", "--json").stdout)["sandboxes"]
    raw["opsctl_output"] = res.stdout.splitlines()[-3:]
    return elapsed, sum(1 for s in listed if s.get("shim_version") == to == s.get("agent_version"))


def _restart(stage: Stage, cid: str) -> None:
    """What users do today: kill, delete and run the pod again."""
    stage.remove(cid)
    stage.run_detached("keel", cid, "sleep", "100000")


def _parallel(workers: int, items: Iterable[str], fn: Callable[[str], None]) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, items):  # re-raises the first failure
            pass


def _pids(stage: Stage, cids: list[str]) -> dict[str, tuple[int, int]]:
    """{pod: (host pid, start time)} of each pod's container process.

    Not `ctr tasks ls`: keel reports the PID inside the sandbox's pid
    namespace, which a fresh sandbox hands out again.
    """
    return {cid: _container_process(stage, cid) for cid in cids}


def _container_process(stage: Stage, cid: str) -> tuple[int, int]:
    for pid in pid_tree(stage.agent_pid(cid)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0] == b"sleep":
                stat = Path(f"/proc/{pid}/stat").read_text()
                return pid, int(stat.rsplit(")", 1)[1].split()[19])
        except (FileNotFoundError, ProcessLookupError):
            continue
    raise RuntimeError(f"pod {cid}: no container process under its agent")


def _kept(stage: Stage, before: dict[str, tuple[int, int]]) -> int:
    """How many pods still run their original container process."""
    kept = 0
    for cid, ident in before.items():
        try:
            kept += _container_process(stage, cid) == ident
        except RuntimeError:
            pass
    return kept
