"""Smoke test of the benchmarks: `python -m bench.run --quick --only core --json FILE`
(and `--only console`).

Checks only that every core metric came out as a finite, positive number
for both keel and runc, in the table and in the JSON (the bench ran end to
end on its own private containerd); never how fast: timing targets are for
people reading the tables, not for assertions on a shared machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import run as bench_run

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]

METRICS = ("ctr run --rm median", "ctr task exec median", "stdout throughput median",
           "shim RSS")


def test_quick_core_bench_gives_figures_for_keel_and_runc(
        require_env: Callable[[str], None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    require_env("integration")
    out = tmp_path / "bench.json"
    assert bench_run.main(["--quick", "--only", "core", "--json", str(out)]) == 0
    core = json.loads(out.read_text())["core"]
    assert core["names"] == ["keel", "runc"]
    rows = core["rows"]
    for metric in METRICS:
        [row] = [r for r in rows if r["metric"].startswith(metric)]
        assert row["keel"] > 0 and row["runc"] > 0, row
    for row in rows:
        for name in ("keel", "runc"):
            value = row[name]
            assert isinstance(value, int | float) and math.isfinite(value) and value >= 0, row
    assert len(core["load_after"]) == 3
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert [c.strip() for c in header.split("|")][1:3] == ["keel", "runc"], header
    assert any(line.startswith("ctr run --rm median") for line in lines), lines


def test_quick_console_bench_gives_figures(require_env: Callable[[str], None],
                                           tmp_path: Path) -> None:
    """`--only console`: attach, keystroke echo and stdout figures for keel's
    console and runc's exec, every one finite and positive."""
    require_env("integration")
    out = tmp_path / "bench.json"
    assert bench_run.main(["--quick", "--only", "console", "--json", str(out)]) == 0
    console = json.loads(out.read_text())["console"]
    assert console["names"] == ["keel console", "runc exec"]
    metrics = [r["metric"] for r in console["rows"]]
    assert [m.split(" (")[0] for m in metrics[:4]] == [
        "attach median", "attach p99", "keystroke echo median", "keystroke echo p99"], metrics
    for row in console["rows"]:
        for name in console["names"]:
            assert math.isfinite(row[name]) and row[name] > 0, row
