"""The qemu backend (KVM where usable, TCG otherwise) next to the runc shim.

* boot to agent ready: `QemuBackend.launch` until the guest agent answers
  Hello, without containerd (what every VM sandbox pays before its first
  container), cold and from a template (`template = true`; the template is
  built once, first, in a directory under /dev/shm);
* `ctr run --rm IMG ID echo hi` with the shim's `backend = "qemu"`
  (`KEEL_CONFIG`), cold and from the template, alternating with runc;
* host memory of idle VM sandboxes running `sleep`: VmRSS and Pss of the
  shim plus the qemu process, per sandbox, against the runc shim plus its
  container: one cold-booted sandbox, and `VmConfig.template_pods` cloned
  from the template at once (Pss is each one's fair share of what they
  share: the template's RAM file, qemu's and Python's libraries).

Every guest has `VmConfig.memory_mib` (256 MiB).

The guest image is built (or found up to date) with
`shim.vmm.qemu.image.build`, as the VM tests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, Sample, alternate, median, pss_kib, rss_kib, tree_rss_kib
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
    template_boots: int = 5
    #: Idle sandboxes cloned from the template at once for the memory figures.
    template_pods: int = 4
    run_rounds: int = 5
    rss_samples: int = 5
    #: Guest memory of every VM here (the issue's memory goal is for 256 MiB guests).
    memory_mib: int = 256

    @classmethod
    def quick(cls) -> VmConfig:
        return cls(boots=1, template_boots=1, template_pods=2, run_rounds=1, rss_samples=1)


def run_vm(cfg: VmConfig) -> tuple[list[Row], dict[str, Any]]:
    img = image.build(image.default_dir(), say=lambda line: progress(f"vm: image: {line}"))
    stage = Stage()
    probe = stage.tmp / "kvm-probe.json"
    # Templates on a tmpfs as in production: their guest RAM is a file there.
    shm = Path("/dev/shm")
    tpl_dir = Path(tempfile.mkdtemp(prefix="keel-bench-tpl-", dir=shm if shm.is_dir() else stage.tmp))
    cold = QemuConfig(image=img.initrd.parent, probe_cache=probe, memory_mib=cfg.memory_mib)
    warm = dataclasses.replace(cold, template=True, template_dir=tpl_dir)
    config = stage.tmp / "keel.toml"

    def use(template: bool) -> None:
        """Point the shims started from now on at the cold or the template config."""
        config.write_text("\n".join([
            "[shim]", 'backend = "qemu"', f"agent_timeout_s = {AGENT_TIMEOUT_S}", "",
            "[qemu]", f'image = "{img.initrd.parent}"', f'probe_cache = "{probe}"',
            f"memory_mib = {cfg.memory_mib}", f"template = {str(template).lower()}",
            f'template_dir = "{tpl_dir}"', ""]))

    use(template=False)
    stage.shim_env["KEEL_CONFIG"] = str(config)
    try:
        with stage:
            progress(f"vm: {cfg.boots} cold boots to agent ready")
            boots, accel = [], ""
            for _ in range(cfg.boots):
                ready_s, accel = asyncio.run(_boot(cold, stage.tmp))
                boots.append(ready_s)
            progress("vm: template build (boot, preload, snapshot) + its first clone")
            build_s, _ = asyncio.run(_boot(warm, stage.tmp))
            progress(f"vm: {cfg.template_boots} starts from the template")
            clones = [asyncio.run(_boot(warm, stage.tmp))[0] for _ in range(cfg.template_boots)]
            raw: dict[str, Any] = {"image": img.id, "accel": accel, "memory_mib": cfg.memory_mib,
                                   "boot_s": boots, "template_build_s": build_s,
                                   "template_boot_s": clones}
            progress(f"vm: ctr run --rm, cold boot, {cfg.run_rounds} rounds per runtime")
            runs = alternate(cfg.run_rounds, {n: _run_rm(stage, rt) for n, rt in
                                              zip(NAMES, ("keel", "runc"), strict=True)})
            raw["run_rm_s"] = runs
            progress("vm: memory of an idle cold-booted sleep sandbox")
            mem_cold = _memory(stage, cfg.rss_samples)
            use(template=True)
            progress(f"vm: ctr run --rm, from the template, {cfg.run_rounds} rounds per runtime")
            runs_tpl = alternate(cfg.run_rounds, {n: _run_rm(stage, rt) for n, rt in
                                                  zip(NAMES, ("keel", "runc"), strict=True)})
            raw["run_rm_template_s"] = runs_tpl
            progress(f"vm: memory of {cfg.template_pods} idle sleep sandboxes cloned from the template")
            mem = _memory(stage, cfg.rss_samples, cfg.template_pods)
            raw["template_memory_file_kib"] = sum(
                f.stat().st_blocks // 2 for f in tpl_dir.glob("*/memory"))
    finally:
        shutil.rmtree(tpl_dir, ignore_errors=True)
    raw["rss_kib"], raw["rss_kib_cold"] = mem, mem_cold
    runc_mib = (mem["runc_shim"] + mem["runc_container"]) / 1024
    guest = f"{cfg.memory_mib} MiB guest"
    rows = [Row(f"cold boot to agent ready median ({accel}, n={len(boots)})", median(boots) * 1e3,
                None, "ms", 0, "<= 8000 ms (TCG)"),
            Row(f"template start to agent ready median (n={len(clones)})", median(clones) * 1e3,
                None, "ms", 0, "<= 1500 ms (TCG)"),
            Row("template build + first clone (once per template)", build_s * 1e3, None, "ms", 0),
            Row(f"ctr run --rm median, cold boot (n={cfg.run_rounds})",
                median(runs[NAMES[0]]) * 1e3, median(runs[NAMES[1]]) * 1e3, "ms", 0),
            Row(f"ctr run --rm median, template (n={cfg.run_rounds})",
                median(runs_tpl[NAMES[0]]) * 1e3, median(runs_tpl[NAMES[1]]) * 1e3, "ms", 0),
            Row(f"host RSS, cold boot: shim + qemu / shim + ctr ({guest})",
                (mem_cold["shim"] + mem_cold["vmm"]) / 1024, runc_mib, "MiB", 1),
            Row(f"host RSS per clone, {cfg.template_pods} idle: shim + qemu / shim + ctr ({guest})",
                (mem["shim"] + mem["vmm"]) / 1024, runc_mib, "MiB", 1),
            Row(f"host PSS per clone, {cfg.template_pods} idle: shim + qemu",
                (mem["shim_pss"] + mem["vmm_pss"]) / 1024, None, "MiB", 1, "<= 160 MiB"),
            Row("  of which qemu PSS", mem["vmm_pss"] / 1024, None, "MiB", 1),
            Row("  of which shim PSS", mem["shim_pss"] / 1024, None, "MiB", 1),
            Row("template RAM file in /dev/shm (once per template)",
                raw["template_memory_file_kib"] / 1024, None, "MiB", 1)]
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


def _memory(stage: Stage, samples: int, sandboxes: int = 1) -> dict[str, float]:
    """RSS and PSS of idle `sleep` sandboxes: *sandboxes* keel pods at once
    (PSS splits what they share -- the template's RAM file, libraries --
    among them, so with several it is each one's fair share) and one runc
    container.  Keel figures are per sandbox (median over the pods)."""
    with contextlib.ExitStack() as stack:
        pods = [stack.enter_context(stage.container("keel", "vmrss", "sleep", "100000"))
                for _ in range(sandboxes)]
        r = stack.enter_context(stage.container("runc", "vmrss", "sleep", "100000"))
        keel = [(stage.shim_pid("keel", k),
                 int((stage.sandbox_dir(k) / "vmm.pid").read_text().strip())) for k in pods]
        runc_shim = stage.shim_pid("runc", r)
        task = stage.task(r)
        if task is None:
            raise RuntimeError(f"runc task {r} vanished")
        runc_init = task[0]
        parts: dict[str, Callable[[], float]] = {
            "shim": lambda: median([rss_kib(s) for s, _ in keel]),
            "vmm": lambda: median([tree_rss_kib(v) for _, v in keel]),
            "shim_pss": lambda: median([pss_kib(s) for s, _ in keel]),
            "vmm_pss": lambda: median([pss_kib(v) for _, v in keel]),
            "runc_shim": lambda: rss_kib(runc_shim),
            "runc_container": lambda: tree_rss_kib(runc_init)}
        time.sleep(2.0)  # let the guests settle after start; nothing to poll for
        seen: dict[str, list[float]] = {p: [] for p in parts}
        for _ in range(samples):
            for part, measure in parts.items():
                seen[part].append(measure())
            time.sleep(0.2)
    return {part: median(v) for part, v in seen.items()}
