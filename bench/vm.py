"""The qemu backend (KVM where usable, TCG otherwise) next to the runc shim.

* boot to agent ready: `QemuBackend.launch` until the guest agent answers
  Hello, without containerd (what every VM sandbox pays before its first
  container);
* `ctr run --rm IMG ID echo hi` with the shim's `backend = "qemu"`
  (`KEEL_CONFIG`), alternating with runc;
* host memory of an idle VM sandbox running `sleep`: VmRSS of the shim plus
  the qemu process, against the runc shim plus its container.

The guest image is built (or found up to date) with
`shim.vmm.qemu.image.build`, as the VM tests do.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, Sample, alternate, median, rss_kib, tree_rss_kib
from bench.stage import RUNTIMES, Stage, progress
from shim._agentconn import AgentConnection
from shim.vmm.api import LaunchSpec
from shim.vmm.qemu import QemuBackend, QemuConfig, _mounts, image

NAMES = ("keel qemu", "runc")
#: Seconds a TCG guest may take to answer: generous, a loaded 2-core host is slow.
AGENT_TIMEOUT_S = 120


@dataclass(frozen=True, slots=True)
class VmConfig:
    boots: int = 3
    run_rounds: int = 5
    rss_samples: int = 5

    @classmethod
    def quick(cls) -> VmConfig:
        return cls(boots=1, run_rounds=1, rss_samples=1)


def run_vm(cfg: VmConfig) -> tuple[list[Row], dict[str, Any]]:
    img = image.build(image.default_dir(), say=lambda line: progress(f"vm: image: {line}"))
    stage = Stage()
    probe = stage.tmp / "kvm-probe.json"
    qcfg = QemuConfig(image=img.initrd.parent, probe_cache=probe)
    config = stage.tmp / "keel.toml"
    config.write_text("\n".join([
        "[shim]", 'backend = "qemu"', f"agent_timeout_s = {AGENT_TIMEOUT_S}", "",
        "[qemu]", f'image = "{img.initrd.parent}"', f'probe_cache = "{probe}"', ""]))
    stage.shim_env["KEEL_CONFIG"] = str(config)
    with stage:
        progress(f"vm: {cfg.boots} boots to agent ready")
        boots, accel = [], ""
        for _ in range(cfg.boots):
            ready_s, accel = asyncio.run(_boot(qcfg, stage.tmp))
            boots.append(ready_s)
        raw: dict[str, Any] = {"image": img.id, "accel": accel, "boot_s": boots}
        progress(f"vm: ctr run --rm, {cfg.run_rounds} rounds per runtime")
        runs = alternate(cfg.run_rounds, {n: _run_rm(stage, rt) for n, rt in
                                          zip(NAMES, ("keel", "runc"), strict=True)})
        raw["run_rm_s"] = runs
        progress("vm: memory of idle sleep sandboxes")
        mem = _memory(stage, cfg.rss_samples)
    raw["rss_kib"] = mem
    rows = [Row(f"boot to agent ready median ({accel}, n={len(boots)})", median(boots) * 1e3,
                None, "ms", 0),
            Row(f"ctr run --rm median (n={cfg.run_rounds})", median(runs[NAMES[0]]) * 1e3,
                median(runs[NAMES[1]]) * 1e3, "ms", 0),
            Row("host RSS: shim + qemu / shim + ctr", (mem["shim"] + mem["vmm"]) / 1024,
                (mem["runc_shim"] + mem["runc_container"]) / 1024, "MiB", 1),
            Row("  of which qemu", mem["vmm"] / 1024, None, "MiB", 1)]
    return rows, raw


async def _boot(qcfg: QemuConfig, under: Path) -> tuple[float, str]:
    """Launch one VM in a new dir below `under`, wait for Hello, stop it;
    returns (seconds to ready, accelerator)."""
    root = Path(tempfile.mkdtemp(prefix="vm-", dir=under))
    backend = QemuBackend(qcfg)
    try:
        started = time.monotonic()
        vm = await backend.launch(LaunchSpec(sandbox_id=root.name, root=root, agent_command=(),
                                             agent_args=("--runtime", "runc")))
        conn = AgentConnection(vm.dialer("agent"), client_version="bench", session="bench",
                               timeout=30.0)
        try:
            await conn.wait_ready(AGENT_TIMEOUT_S, vm.alive)
            return time.monotonic() - started, str(vm.accel)
        finally:
            conn.close()
            await vm.stop()
            backend.close_fds(vm)
    finally:
        _mounts.unmount_under(root)  # never delete through a mount
        shutil.rmtree(root, ignore_errors=True)


def _run_rm(stage: Stage, runtime: str) -> Sample:
    def sample() -> float:
        cid = stage.new_id(f"vm-{runtime}")
        t0 = time.perf_counter()
        res = stage.ctr("run", "--rm", "--runtime", RUNTIMES[runtime], stage.image, cid,
                        "echo", "hi", timeout=300)
        elapsed = time.perf_counter() - t0
        if res.stdout != "hi\n":
            raise RuntimeError(f"{runtime}: ctr run printed {res.stdout!r}")
        return elapsed
    return sample


def _memory(stage: Stage, samples: int) -> dict[str, float]:
    with stage.container("keel", "vmrss", "sleep", "100000") as k, \
            stage.container("runc", "vmrss", "sleep", "100000") as r:
        shim = stage.shim_pid("keel", k)
        vmm = int((stage.sandbox_dir(k) / "vmm.pid").read_text().strip())
        runc_shim = stage.shim_pid("runc", r)
        task = stage.task(r)
        if task is None:
            raise RuntimeError(f"runc task {r} vanished")
        runc_init = task[0]
        parts = {"shim": lambda: rss_kib(shim), "vmm": lambda: tree_rss_kib(vmm),
                 "runc_shim": lambda: rss_kib(runc_shim),
                 "runc_container": lambda: tree_rss_kib(runc_init)}
        time.sleep(2.0)  # let the guest settle after start; nothing to poll for
        seen: dict[str, list[float]] = {p: [] for p in parts}
        for _ in range(samples):
            for part, measure in parts.items():
                seen[part].append(measure())
            time.sleep(0.2)
    return {part: median(v) for part, v in seen.items()}
