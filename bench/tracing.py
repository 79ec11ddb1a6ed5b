"""Issue 14: what tracing costs ``ctr run --rm`` (process backend).

One private containerd, four runtimes alternating round by round
(bench.common.alternate), all with the launcher warm:

* keel with tracing off (no ``[tracing]``: the default);
* keel with tracing on at ratio 1.0, exporting every span to a live
  OTLP/HTTP receiver (tests/otlp.py) on loopback;
* with ``--trace-base REV``: keel as it was at commit REV (the code before
  tracing), from ``git archive`` of this repository;
* the runc shim.

Targets: off within 2% of the code before tracing; on at most 10% over off.
"""

from __future__ import annotations

import compileall
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, alternate, median, p90
from bench.core import run_rm
from bench.releases import REPO
from bench.stage import RUNC, Stage, progress
from tests.containerd import install_shim_wrapper
from tests.otlp import Receiver

NAMES = ("keel", "runc")
TRACED = "io.containerd.keeltraced.v2"
BASE = "io.containerd.keelbase.v2"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    rounds: int = 15
    warmup: int = 2
    base: str | None = None

    @classmethod
    def quick(cls, base: str | None = None) -> TracingConfig:
        return cls(rounds=2, warmup=1, base=base)


def run_tracing(cfg: TracingConfig) -> tuple[list[Row], dict[str, Any]]:
    with Receiver() as rx, Stage() as stage:
        bin_dir = stage.ctd.paths.bin_dir
        traced = stage.tmp / "traced.toml"
        traced.write_text(f'[tracing]\nenabled = true\nratio = 1.0\nendpoint = "{rx.endpoint}"\n')
        install_shim_wrapper(bin_dir, sys.executable, name="containerd-shim-keeltraced-v2",
                             env={"PYTHONPATH": str(REPO), "KEEL_CONFIG": str(traced)})
        runtimes = {"off": "io.containerd.keel.v2", "on": TRACED}
        if cfg.base:
            tree = _export(cfg.base, stage.tmp / "base")
            install_shim_wrapper(bin_dir, sys.executable, name="containerd-shim-keelbase-v2",
                                 env={"PYTHONPATH": str(tree)})
            runtimes["before"] = BASE
        runtimes["runc"] = RUNC
        progress(f"tracing: ctr run --rm, {cfg.rounds} rounds of {', '.join(runtimes)}")
        samples = alternate(cfg.rounds, {n: run_rm(stage, n, rt) for n, rt in runtimes.items()},
                            cfg.warmup)
        time.sleep(1.0)  # the last exports
        spans = len(rx.snapshot())
    ms = {n: median(s) * 1e3 for n, s in samples.items()}
    rows = [
        Row("ctr run --rm median, tracing off", ms["off"], ms["runc"], "ms", 0),
        Row("ctr run --rm median, tracing on (ratio 1.0)", ms["on"], ms["runc"], "ms", 0),
        Row(f"ctr run --rm p90 (n={cfg.rounds}), off | on", p90(samples["off"]) * 1e3,
            p90(samples["on"]) * 1e3, "ms", 0, "keel off | keel on"),
        Row("tracing on / off", ms["on"] / ms["off"], None, "x", 3, "<= 1.10"),
    ]
    if "before" in ms:
        rows.insert(0, Row(f"ctr run --rm median, before tracing ({cfg.base})", ms["before"],
                           ms["runc"], "ms", 0))
        rows.append(Row("tracing off / before tracing", ms["off"] / ms["before"], None, "x", 3,
                        "<= 1.02"))
    rows.append(Row("spans received (on)", spans, None, "", 0,
                    f"{spans / max(cfg.rounds + cfg.warmup, 1):.0f} per ctr run"))
    return rows, {"run_rm_s": samples, "spans": spans, "base": cfg.base}


def _export(rev: str, dest: Path) -> Path:
    """This repository's tree at *rev* under *dest*, byte-compiled (as installed code is)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    tar = dest / "tree.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    for pkg in ("keel", "shim", "agent", "upgrade", "observability"):
        if (dest / pkg).is_dir():
            compileall.compile_dir(str(dest / pkg), quiet=1)
    return dest
