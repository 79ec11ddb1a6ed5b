"""Issue 18: live upgrade of a VM sandbox next to the process backend's, in one run.

For each backend (qemu, TCG where KVM is missing; then process), on a
private containerd: one pod (`sleep`) on release A, then

* shim handoffs A <-> B over ShimOps `UpgradeShim`: each reply carries the
  old shim's freeze window (freeze start to commit, shim/_handoff.py); the
  old shim's log line splits it (quiesce, the new shim's restore);
* agent upgrades A <-> B over ShimOps `UpgradeAgent` with the release's
  host entry point, as opsd sends it: for the VM the shim checks and stages
  the release's guest bundle (shim/vmm/qemu/guest_release.py) before the
  agent execs it.  The gap is the shim's (`gap_s`: from the agent's answer,
  sent just before its exec, to the new agent's first Hello answered), the
  same measure on both backends.

Releases are this checkout dressed up as two versions (bench.releases),
each with a guest bundle naming its version.  The guest image is built (or
found up to date) as the VM tests build it.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from math import nan
from pathlib import Path
from typing import Any

from agent.api import ops_pb
from bench.common import Row, median
from bench.releases import make_release, next_minor
from bench.stage import Stage, progress
from bench.upgrade import _check_alive, _handoffs, _served_by, _shim_ops, _wait_status
from shim import version as shim_version
from shim.vmm.qemu import guest_release, image
from upgrade.releases import AGENT_ENTRY

NAMES = ("keel qemu", "keel process")
#: Seconds a TCG guest may take to answer.
AGENT_TIMEOUT_S = 120
_FREEZE_LINE = re.compile(r"freeze ([\d.]+) ms \(quiesce ([\d.]+) ms, new shim restore ([\d.]+) ms:"
                          r" state [\d.]+ ms, agent check ([\d.]+) ms")


@dataclass(frozen=True, slots=True)
class VmUpgradeConfig:
    handoffs: int = 20
    agent_upgrades: int = 6

    @classmethod
    def quick(cls) -> VmUpgradeConfig:
        return cls(handoffs=2, agent_upgrades=2)


def run_vm_upgrade(cfg: VmUpgradeConfig) -> tuple[list[Row], dict[str, Any]]:
    img = image.build(image.default_dir(), say=lambda line: progress(f"vm-upgrade: image: {line}"))
    a = shim_version()
    b = next_minor(a)
    raw: dict[str, Any] = {"from": a, "to": b, "image": img.id}
    for backend in ("qemu", "process"):
        raw[backend] = _one_backend(backend, img, (a, b), cfg)
    q, p = raw["qemu"], raw["process"]

    def both(metric: str, key: str, fn: Any, target: str = "") -> Row:
        return Row(metric, fn(q[key]), fn(p[key]), "ms", 0 if fn is max else 1, target)

    n, m = cfg.handoffs, cfg.agent_upgrades
    rows = [both(f"shim freeze p50 (n={n})", "freeze_ms", median),
            both(f"shim freeze max (n={n})", "freeze_ms", max, "p99 <= 50 ms"),
            both("  of which quiesce p50", "quiesce_ms", median),
            both("  of which new shim restore p50", "restore_ms", median),
            both("    of which the agent check (ops Health) p50", "agent_check_ms", median),
            both(f"agent upgrade gap p50 (n={m})", "gap_ms", median),
            both(f"agent upgrade gap max (n={m})", "gap_ms", max, "<= 2000 ms (TCG)"),
            both(f"UpgradeAgent call p50 (staging + preflight, n={m})", "agent_call_ms", median)]
    raw["accel"] = q.get("accel", "")
    return rows, raw


def _one_backend(backend: str, img: image.Image, versions: tuple[str, str],
                 cfg: VmUpgradeConfig) -> dict[str, Any]:
    a, b = versions
    stage = Stage()
    config = stage.tmp / "keel.toml"
    config.write_text("\n".join([
        "[shim]", f'backend = "{backend}"', f"agent_timeout_s = {AGENT_TIMEOUT_S}", "",
        "[qemu]", f'image = "{img.dir}"', f'probe_cache = "{stage.tmp / "kvm-probe.json"}"', ""]))
    stage.shim_env["KEEL_CONFIG"] = str(config)
    releases = stage.tmp / "releases"
    for v in versions:
        guest_release.build(make_release(releases, v) / guest_release.DIR, version=v)
    out: dict[str, Any] = {}
    with stage, stage.container("keel", f"upg{backend[:4]}", "sleep", "100000") as cid:
        sock = stage.sandbox_dir(cid) / "ops.sock"
        st = asyncio.run(_wait_status(sock, _served_by(agent=a), timeout=AGENT_TIMEOUT_S))
        out["accel"] = st.accel
        progress(f"vm-upgrade: {backend}: {cfg.handoffs} shim handoffs {a} <-> {b}")
        freeze, call = asyncio.run(_handoffs(stage, cid, releases, (b, a), cfg.handoffs))
        _check_alive(stage, cid)
        parts = [tuple(float(x) for x in m.groups())
                 for m in _FREEZE_LINE.finditer(stage.ctd.log_text())] or [(nan, nan, nan, nan)]
        progress(f"vm-upgrade: {backend}: {cfg.agent_upgrades} agent upgrades {a} <-> {b}")
        gaps, calls = asyncio.run(_agent_upgrades(sock, releases, (b, a), cfg.agent_upgrades))
        _check_alive(stage, cid)
    out.update(freeze_ms=freeze, upgrade_shim_call_ms=call, gap_ms=gaps, agent_call_ms=calls,
               quiesce_ms=[x[1] for x in parts], restore_ms=[x[2] for x in parts],
               agent_check_ms=[x[3] for x in parts])
    return out


async def _agent_upgrades(sock: Path, releases: Path, order: tuple[str, str],
                          count: int) -> tuple[list[float], list[float]]:
    gaps, calls = [], []
    for i in range(count):
        to = order[i % 2]
        req = ops_pb.UpgradeAgentRequest(agent_path=str(releases / to / AGENT_ENTRY),
                                         to_version=to)
        t0 = time.perf_counter()
        resp = await _shim_ops(sock, "upgrade_agent", req, timeout=300.0)
        if resp.rolled_back:
            raise RuntimeError(f"agent upgrade to {to} rolled back: {resp.message}")
        # The call returns once the new agent answered: what remains is the gap.
        calls.append((time.perf_counter() - t0) * 1e3 - resp.gap_s * 1e3)
        gaps.append(resp.gap_s * 1e3)
        await _wait_status(sock, _served_by(agent=to))
        progress(f"vm-upgrade: agent -> {to}: gap {gaps[-1]:.0f} ms")
    return gaps, calls
