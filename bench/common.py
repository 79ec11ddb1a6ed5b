"""Shared pieces for benchmarks: interleaved runs, summary statistics, RSS, tables.

Benchmarks compare candidates (typically keel vs runc) on the same host in
the same minutes.  `alternate()` interleaves them, A B A B ..., so drift
(page cache, CPU frequency, a noisy neighbour) hits both alike instead of
whichever ran second.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Sample = Callable[[], float | None]


def alternate(runs: int, fns: Mapping[str, Sample], warmup: int = 0) -> dict[str, list[float]]:
    """Call every candidate once per round, in mapping order, for `runs` rounds.

    A candidate returns its own measurement (a float, in whatever unit it
    chose) or None, in which case the wall time of the call, in seconds, is
    the sample.  `warmup` extra rounds run first and are discarded.
    Returns {name: [sample per round]} in the same order as `fns`.
    Exceptions propagate at once: a failed run is not a data point.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_no in range(warmup + runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            value = fn()
            elapsed = time.perf_counter() - t0
            if round_no >= warmup:
                samples[name].append(elapsed if value is None else float(value))
    return samples


def median(xs: Sequence[float]) -> float:
    """The median; raises ValueError on an empty sequence."""
    if not xs:
        raise ValueError("median of no samples")
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (0 < p <= 100): a value that was actually observed.

    With fewer than 100 samples p99 is simply the maximum; say so when
    reporting small runs.  Raises ValueError on an empty sequence.
    """
    if not xs:
        raise ValueError("percentile of no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} out of range (0, 100]")
    ordered = sorted(xs)
    return float(ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1])


def p99(xs: Sequence[float]) -> float:
    """`percentile(xs, 99)`."""
    return percentile(xs, 99)


def p90(xs: Sequence[float]) -> float:
    """`percentile(xs, 90)`."""
    return percentile(xs, 90)


# --- memory ---------------------------------------------------------------

def children_of() -> dict[int, list[int]]:
    """{ppid: [pids]} for every process visible in /proc right now."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def pid_tree(roots: int | Iterable[int]) -> list[int]:
    """`roots` and all their live descendants (by PPid), sorted, each once.

    A daemonized process (a shim reparented to init) is not a descendant of
    whoever started it: pass it as a root of its own.
    """
    tree = children_of()
    todo = [roots] if isinstance(roots, int) else list(roots)
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen or not Path(f"/proc/{pid}").exists():
            continue
        seen.add(pid)
        todo.extend(tree.get(pid, []))
    return sorted(seen)


def pids_where(match: Callable[[list[str]], bool]) -> list[int]:
    """Live processes whose argv (from /proc/<pid>/cmdline) satisfies `match`, sorted."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if raw and match(raw.rstrip(b"\0").decode(errors="replace").split("\0")):
            found.append(int(entry.name))
    return sorted(found)


def _proc_kib(pid: int, file: str, field: str) -> int:
    """The KiB figure after `field:` in /proc/<pid>/<file>; 0 if absent or vanished."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB; 0 for kernel threads, zombies and vanished pids."""
    return _proc_kib(pid, "status", "VmRSS")


def pss_kib(pid: int) -> int:
    """Pss of one process in KiB (its share of every page it maps); 0 if it vanished."""
    return _proc_kib(pid, "smaps_rollup", "Pss")


def tree_rss_kib(roots: int | Iterable[int]) -> int:
    """Sum of VmRSS over `pid_tree(roots)`, in KiB.

    Shared pages (libraries, the page cache of a shared image) count once
    per process, so this overstates what the tree really costs; use it to
    compare like with like.
    """
    return sum(rss_kib(pid) for pid in pid_tree(roots))


# --- tables ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Row:
    """One table line: a metric measured for both candidates, in `unit`.

    `b` is None when the second candidate has no such figure (printed "-").
    `precision` (decimals) overrides the table's default for this row;
    `target` is free text printed in a last column (e.g. "<= 3x runc").
    """

    metric: str
    a: float
    b: float | None
    unit: str = ""
    precision: int | None = None
    target: str = ""


def format_table(rows: Sequence[Row], names: tuple[str, str] = ("keel", "runc"),
                 precision: int = 3) -> str:
    """Rows side by side: `metric | <a> | <b> | ratio [| target]`.

    ratio = a / b ("-" when b is 0 or None); the target column appears only
    when some row has a target.
    """
    with_target = any(r.target for r in rows)
    header = ["metric", *names, "ratio", *(["target"] if with_target else [])]
    body = []
    for r in rows:
        unit = f" {r.unit}" if r.unit else ""
        ratio = f"{r.a / r.b:.2f}x" if r.b else "-"
        d = precision if r.precision is None else r.precision
        b = "-" if r.b is None else f"{r.b:.{d}f}{unit}"
        line = [r.metric, f"{r.a:.{d}f}{unit}", b, ratio]
        body.append(line + [r.target] if with_target else line)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        if with_target:  # free text reads better left-aligned
            rest[-1] = cells[-1].ljust(widths[-1])
        return " | ".join([first, *rest]).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def print_table(rows: Sequence[Row], names: tuple[str, str] = ("keel", "runc"),
                precision: int = 3) -> None:
    """Print `format_table(rows, names, precision)`."""
    print(format_table(rows, names, precision))


def summary_rows(metric: str, samples: Mapping[str, Sequence[float]], names: tuple[str, str],
                 unit: str = "") -> list[Row]:
    """Median and p99 rows for `metric` from `alternate()`'s result for the two `names`."""
    a, b = samples[names[0]], samples[names[1]]
    return [Row(f"{metric} median", median(a), median(b), unit),
            Row(f"{metric} p99 (n={min(len(a), len(b))})", p99(a), p99(b), unit)]
