"""Issue 2 (core): keel (process backend) against the runc shim, same host, same minutes.

* `ctr run --rm IMG ID echo hi`: wall time of the whole command (create,
  start, output, exit, delete), median and p90;
* `ctr task exec` of `true` on a running `sleep` container, median and p90;
* stdout throughput: the container writes a marker line and then
  `head -c SIZE /dev/zero`; ctr's stdout is a pipe this process drains,
  and the rate is counted from the first byte to EOF (so it excludes
  container start-up);
* memory of an idle `sleep` container: VmRSS of the shim process, and for
  keel the sandbox's process tree (agent + container) separately.

Keel and runc alternate in every round (bench.common.alternate).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from bench.common import Row, Sample, alternate, median, p90, rss_kib, tree_rss_kib
from bench.stage import RUNTIMES, Stage, progress

NAMES = ("keel", "runc")
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class CoreConfig:
    run_rounds: int = 15
    exec_rounds: int = 20
    throughput_rounds: int = 3
    throughput_bytes: int = 256 * MIB
    rss_samples: int = 5
    warmup: int = 1

    @classmethod
    def quick(cls) -> CoreConfig:
        return cls(run_rounds=2, exec_rounds=3, throughput_rounds=1,
                   throughput_bytes=8 * MIB, rss_samples=2, warmup=0)


def run_core(stage: Stage, cfg: CoreConfig) -> tuple[list[Row], dict[str, Any]]:
    """Measure everything; returns the table rows and the raw samples."""
    raw: dict[str, Any] = {}
    rows: list[Row] = []

    progress(f"core: ctr run --rm, {cfg.run_rounds} rounds per runtime")
    runs = alternate(cfg.run_rounds, {n: run_rm(stage, n) for n in NAMES}, cfg.warmup)
    raw["run_rm_s"] = runs
    rows += _latency_rows("ctr run --rm", runs, "ratio <= 3x")

    progress(f"core: ctr task exec, {cfg.exec_rounds} rounds per runtime")
    with stage.container("keel", "exec", "sleep", "100000") as k, \
            stage.container("runc", "exec", "sleep", "100000") as r:
        execs = alternate(cfg.exec_rounds, {"keel": _exec(stage, k), "runc": _exec(stage, r)},
                          cfg.warmup)
    raw["exec_s"] = execs
    rows += _latency_rows("ctr task exec", execs, "")

    size = cfg.throughput_bytes
    progress(f"core: stdout throughput, {size // MIB} MiB x {cfg.throughput_rounds} per runtime")
    lost: dict[str, list[int]] = {n: [] for n in NAMES}
    rates = alternate(cfg.throughput_rounds,
                      {n: _throughput(stage, n, size, lost[n]) for n in NAMES})
    raw["stdout_mb_s"], raw["stdout_bytes_lost"] = rates, lost
    rows.append(Row(f"stdout throughput median ({size // MIB} MiB)", median(rates["keel"]),
                    median(rates["runc"]), "MB/s", 1, ">= 50 MB/s"))
    rows.append(Row(f"stdout runs short of bytes (of {cfg.throughput_rounds})",
                    sum(1 for x in lost["keel"] if x), sum(1 for x in lost["runc"] if x), "", 0,
                    "0: every byte arrives"))

    progress("core: RSS of idle sleep containers")
    rss = _rss(stage, cfg.rss_samples)
    raw["rss_kib"] = rss
    rows.append(Row("shim RSS (idle sleep)", rss["keel_shim"] / 1024, rss["runc_shim"] / 1024,
                    "MiB", 1, "<= 40 MiB"))
    rows.append(Row("sandbox tree RSS (agent+ctr)", rss["keel_sandbox"] / 1024,
                    rss["runc_container"] / 1024, "MiB", 1, "runc: the container alone"))
    return rows, raw


def _latency_rows(metric: str, samples: dict[str, list[float]], target: str) -> list[Row]:
    a, b = samples["keel"], samples["runc"]
    n = min(len(a), len(b))
    return [Row(f"{metric} median", median(a) * 1e3, median(b) * 1e3, "ms", 0, target),
            Row(f"{metric} p90 (n={n})", p90(a) * 1e3, p90(b) * 1e3, "ms", 0)]


def run_rm(stage: Stage, name: str, runtime: str | None = None) -> Sample:
    """One `ctr run --rm ... echo hi` with *runtime* (default: *name*'s), timed."""
    def sample() -> float:
        cid = stage.new_id(f"run-{name}")
        t0 = time.perf_counter()
        res = stage.ctr("run", "--rm", "--runtime", runtime or RUNTIMES[name], stage.image, cid,
                        "echo", "hi")
        elapsed = time.perf_counter() - t0
        if res.stdout != "hi\n":
            raise RuntimeError(f"{name}: ctr run printed {res.stdout!r}")
        return elapsed
    return sample


def _exec(stage: Stage, cid: str) -> Sample:
    ids = iter(range(1, 1 << 30))

    def sample() -> float:
        eid = f"e{next(ids)}"
        t0 = time.perf_counter()
        stage.ctr("tasks", "exec", "--exec-id", eid, cid, "true")
        return time.perf_counter() - t0
    return sample


def _throughput(stage: Stage, name: str, size: int, lost: list[int]) -> Sample:
    """Samples of MB/s (10^6 bytes per second) from the first byte to EOF.

    A run whose output arrives short (ctr exits 0 without all of it) is
    not an error of the bench: the missing byte count goes to `lost` and
    the rate counts what arrived.
    """
    def sample() -> float:
        cid = stage.new_id(f"tput-{name}")
        argv = stage.ctr_argv("run", "--rm", "--runtime", RUNTIMES[name], stage.image, cid,
                              "sh", "-c", f"echo go; head -c {size} /dev/zero")
        total, first_len = 0, 0
        t_first = t_end = 0.0
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 1 << 20):
                if not total:
                    t_first, first_len = time.perf_counter(), len(chunk)
                total += len(chunk)
            t_end = time.perf_counter()
            err = proc.stderr.read() if proc.stderr else b""
            rc = proc.wait(120)
        expected = size + len("go\n")
        if rc != 0 or total > expected:
            raise RuntimeError(f"{name}: ctr run rc={rc}, {total} bytes of {expected}: "
                               f"{err.decode(errors='replace')}")
        lost.append(expected - total)
        if total < expected:
            progress(f"core: {name}: ctr run --rm exited 0 with {expected - total} bytes "
                     f"of stdout missing")
        return (total - first_len) / (t_end - t_first) / 1e6
    return sample


def _rss(stage: Stage, samples: int) -> dict[str, float]:
    """Median VmRSS (KiB) of each part, sampled `samples` times 0.2 s apart once idle."""
    with stage.container("keel", "rss", "sleep", "100000") as k, \
            stage.container("runc", "rss", "sleep", "100000") as r:
        keel_shim, runc_shim = stage.shim_pid("keel", k), stage.shim_pid("runc", r)
        agent = stage.agent_pid(k)
        task = stage.task(r)
        if task is None:
            raise RuntimeError(f"runc task {r} vanished")
        runc_init = task[0]
        parts = {"keel_shim": lambda: rss_kib(keel_shim),
                 "keel_sandbox": lambda: tree_rss_kib(agent),
                 "runc_shim": lambda: rss_kib(runc_shim),
                 "runc_container": lambda: tree_rss_kib(runc_init)}
        seen: dict[str, list[float]] = {p: [] for p in parts}
        time.sleep(1.0)  # let start-up garbage settle; nothing to poll for
        for _ in range(samples):
            for part, measure in parts.items():
                seen[part].append(measure())
            time.sleep(0.2)
    return {part: median(v) for part, v in seen.items()}
