"""Run the benchmarks and print keel's figures next to the baseline's, measured in the same run.

    python -m bench.run [--quick] [--only core|upgrade|vm|vm-upgrade|console|console-vm|tracing
                        ...] [--json FILE] [--pods N] [--batch K] [--trace-base REV]

* core (issue 2): keel (process backend) vs the runc shim: `ctr run --rm`,
  `ctr task exec`, stdout throughput, shim and sandbox memory;
* upgrade (issue 3): shim freeze window, agent upgrade gap, a rolling
  upgrade of N pods through opsd against stopping and starting them;
* vm: the qemu backend (TCG where KVM is missing): boot to agent ready,
  `ctr run --rm`, host memory per idle VM sandbox;
* vm-upgrade (issue 18): a VM sandbox's shim freeze window and agent
  upgrade gap next to the process backend's;
* console (issue 13): ``opsctl console`` attach and keystroke echo next to
  ``ctr task exec`` on runc, and a pod's stdout with a busy console session;
  console-vm: attach and echo into a VM pod.
* tracing (issue 14): `ctr run --rm` with tracing off and on (ratio 1.0,
  exporting to a live OTLP receiver), and at `--trace-base REV`, next to runc.

Needs root, containerd, ctr, runc and busybox-static (the same as the
integration tests).  Every benchmark runs on its own private containerd
under /tmp and removes what it started.  Progress goes to stderr, the
tables to stdout.  `--quick` is a smoke run: few iterations, figures only
good for "it works".  Numbers from a loaded machine are noisy: the load
average is printed with each table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, format_table
from bench.releases import REPO
from bench.stage import Stage, progress


@dataclass(frozen=True, slots=True)
class Result:
    """One benchmark's table and raw figures."""

    name: str
    title: str
    names: tuple[str, str]
    rows: list[Row]
    raw: dict[str, Any]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    wall_s: float

    def table(self) -> str:
        load = " ".join(f"{x:.2f}" for x in self.load_after)
        before = " ".join(f"{x:.2f}" for x in self.load_before)
        head = (f"== {self.title} ==  ({self.wall_s:.0f} s; load average {before} before, "
                f"{load} after)")
        return f"{head}\n{format_table(self.rows, self.names)}"

    def doc(self) -> dict[str, Any]:
        return {"title": self.title, "names": list(self.names), "wall_s": self.wall_s,
                "load_before": self.load_before, "load_after": self.load_after,
                "rows": [{"metric": r.metric, self.names[0]: r.a, self.names[1]: r.b,
                          "unit": r.unit, "target": r.target} for r in self.rows],
                "raw": self.raw}


Bench = Callable[[argparse.Namespace], tuple[str, tuple[str, str], list[Row], dict[str, Any]]]


def bench_core(args: argparse.Namespace) -> tuple[str, tuple[str, str], list[Row], dict[str, Any]]:
    from bench.core import NAMES, CoreConfig, run_core

    cfg = CoreConfig.quick() if args.quick else CoreConfig()
    with Stage() as stage:
        rows, raw = run_core(stage, cfg)
    return "issue 2: keel (process backend) vs runc shim", NAMES, rows, raw


def bench_upgrade(args: argparse.Namespace
                  ) -> tuple[str, tuple[str, str], list[Row], dict[str, Any]]:
    from bench.upgrade import NAMES, UpgradeConfig, run_upgrade

    cfg = UpgradeConfig.quick() if args.quick else UpgradeConfig()
    cfg = cfg.with_fleet(args.pods, args.batch)
    with Stage() as stage:
        rows, raw = run_upgrade(stage, cfg)
    return (f"issue 3: live upgrade ({cfg.pods} pods, batch {cfg.batch})", NAMES, rows, raw)


def bench_vm(args: argparse.Namespace) -> tuple[str, tuple[str, str], list[Row], dict[str, Any]]:
    from bench.vm import NAMES, VmConfig, run_vm

    cfg = VmConfig.quick() if args.quick else VmConfig()
    rows, raw = run_vm(cfg)
    return "qemu backend (boot, ctr run, memory)", NAMES, rows, raw


def bench_vm_upgrade(args: argparse.Namespace
                     ) -> tuple[str, tuple[str, str], list[Row], dict[str, Any]]:
    from bench.upgrade_vm import NAMES, VmUpgradeConfig, run_vm_upgrade

    cfg = VmUpgradeConfig.quick() if args.quick else VmUpgradeConfig()
    rows, raw = run_vm_upgrade(cfg)
    return (f"issue 18: live upgrade of a VM sandbox ({raw.get('accel') or '?'}) next to the"
            f" process backend", NAMES, rows, raw)


def bench_console(args: argparse.Namespace
                  ) -> tuple[str, tuple[str, str], list[Row], dict[str, Any]]:
    from bench.console import NAMES, ConsoleConfig, run_console

    cfg = ConsoleConfig.quick() if args.quick else ConsoleConfig()
    with Stage() as stage:
        rows, raw = run_console(stage, cfg)
    return "issue 13: opsctl console (process backend) vs ctr task exec on runc", NAMES, rows, raw


def bench_console_vm(args: argparse.Namespace
                     ) -> tuple[str, tuple[str, str], list[Row], dict[str, Any]]:
    from bench.console import NAMES, ConsoleConfig, run_console, vm_stage

    with vm_stage() as stage:
        rows, raw = run_console(stage, ConsoleConfig.vm(args.quick))
    return (f"issue 13: opsctl console into a VM pod ({raw.get('accel') or '?'}) vs ctr task exec"
            f" on runc", NAMES, rows, raw)


def bench_tracing(args: argparse.Namespace
                  ) -> tuple[str, tuple[str, str], list[Row], dict[str, Any]]:
    from bench.tracing import NAMES, TracingConfig, run_tracing

    cfg = (TracingConfig.quick(args.trace_base) if args.quick
           else TracingConfig(base=args.trace_base))
    rows, raw = run_tracing(cfg)
    return "issue 14: ctr run --rm with tracing off and on (process backend)", NAMES, rows, raw


BENCHES: dict[str, Bench] = {"core": bench_core, "upgrade": bench_upgrade, "vm": bench_vm,
                             "vm-upgrade": bench_vm_upgrade, "console": bench_console,
                             "console-vm": bench_console_vm, "tracing": bench_tracing}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few iterations")
    p.add_argument("--only", action="append", choices=sorted(BENCHES), metavar="NAME",
                   help=f"run only these ({', '.join(BENCHES)}); repeatable")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    p.add_argument("--pods", type=int, default=None, help="pods in the rolling upgrade")
    p.add_argument("--batch", type=int, default=None, help="opsctl upgrade --batch")
    p.add_argument("--trace-base", metavar="REV", default=None,
                   help="tracing: also measure this repository at REV (the code before tracing)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[list[Result], dict[str, str]]:
    """Run the selected benchmarks in order; print each table as it completes.

    A benchmark that fails is reported (on stdout, with the error) and the
    others still run.  Returns the results and {name: error} of the failures.
    """
    results, failed = [], {}
    for name in args.only or list(BENCHES):
        progress(f"{name}: starting (load average {_load()})")
        before, t0 = os.getloadavg(), time.monotonic()
        try:
            title, names, rows, raw = BENCHES[name](args)
        except Exception as exc:  # noqa: BLE001 - reported; the other benchmarks still run
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"== {name}: FAILED after {time.monotonic() - t0:.0f} s ==\n{failed[name]}\n",
                  flush=True)
            continue
        res = Result(name, title, names, rows, raw, before, os.getloadavg(),
                     time.monotonic() - t0)
        results.append(res)
        print(res.table() + "\n", flush=True)
    return results, failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    _byte_compile()
    print(f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.release()}; load average {_load()}; "
          f"{'QUICK smoke run, figures not meaningful' if args.quick else 'full run'}\n",
          flush=True)
    results, failed = run(args)
    if args.json:
        doc: dict[str, Any] = {r.name: r.doc() for r in results}
        doc.update({name: {"error": why} for name, why in failed.items()})
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        progress(f"figures written to {args.json}")
    return 1 if failed else 0


def _byte_compile() -> None:
    """Compile this checkout's modules, as installing a wheel does: a source
    tree run with PYTHONDONTWRITEBYTECODE set (or read-only) never gets .pyc
    files, and every shim and agent would compile its modules at start-up."""
    import compileall

    for pkg in ("keel", "shim", "agent", "upgrade", "observability", "opsd"):
        compileall.compile_dir(str(REPO / pkg), quiet=1)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
