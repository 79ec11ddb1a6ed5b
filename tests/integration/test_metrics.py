"""opsd's Prometheus endpoint against a real pod: real containerd, the Keel
shim (process backend), a real opsd serving ``--metrics-address``, and
Debian's own ``promtool`` and ``prometheus`` server reading it.

Checked: the sandbox's series with their labels and sane values (one
container, uptime, host memory of its agent, the container's memory from
the agent's stats, the shim's and agent's version); ``promtool check
metrics`` accepts the text; a real Prometheus scraping every second
finds ``keel_sandbox_up`` at 1 and ``keel_sandbox_info``; a sandbox whose
ops.sock is a dead socket, and one whose shim never answers, are ``up 0``
and the scrape still answers within opsd's deadline.

Needs root and containerd (the ``integration`` marker) and Debian's
``prometheus`` package (skipped loudly without it, failed in CI).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keel import release
from opsd._metrics import DEADLINE_S
from tests import scrape
from tests.containerd import Containerd, wait_for
from tests.integration.keel_ctr import kill_and_remove, run_detached
from tests.opsd_harness import Opsd, running_opsd
from tests.prereq import skip_or_fail

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} missing (apt-get install prometheus)")
    assert path is not None
    return path


@pytest.fixture
def node(containerd: Containerd, container_ids: Callable[[], str]) -> Iterator[tuple[Opsd, str]]:
    """A real opsd serving metrics on a free port; (opsd, its metrics URL).  Stopped
    before the test's leftover check (its command line names the state root)."""
    address = f"127.0.0.1:{scrape.free_port()}"
    with tempfile.TemporaryDirectory(prefix="keel-met-rel-") as releases:
        with running_opsd("kmet-", Path(releases), containerd.paths.tmp_root / "keel",
                          {"status": 5}, extra=("--metrics-address", address)) as d:
            yield d, f"http://{address}/metrics"


@pytest.fixture
def pod(containerd: Containerd, busybox: str, container_ids: Callable[[], str]) -> Iterator[str]:
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "100000")
    try:
        yield cid
    finally:
        kill_and_remove(containerd, cid)


def test_series_of_a_real_sandbox_pass_promtool(containerd: Containerd, node: tuple[Opsd, str],
                                                pod: str) -> None:
    opsd, url = node
    assert f"serving metrics on {url}" in opsd.log()
    status, ctype, body = scrape.get(url)
    assert status == 200 and ctype.startswith("text/plain; version="), (status, ctype)
    samples = scrape.samples(body.decode())
    sb = {"sandbox": pod}
    assert scrape.of(samples, "keel_sandbox_up", **sb) == [
        ({**sb, "namespace": containerd.namespace, "backend": "process"}, 1.0)]
    version = release.version()
    assert scrape.of(samples, "keel_sandbox_info", **sb) == [
        ({**sb, "shim_version": version, "agent_version": version, "backend": "process"}, 1.0)]
    [(_, containers)] = scrape.of(samples, "keel_sandbox_containers", **sb)
    [(_, uptime)] = scrape.of(samples, "keel_sandbox_uptime_seconds", **sb)
    [(_, rss)] = scrape.of(samples, "keel_sandbox_vm_rss_bytes", **sb)
    [(_, pss)] = scrape.of(samples, "keel_sandbox_vm_pss_bytes", **sb)
    [(_, vcpus)] = scrape.of(samples, "keel_sandbox_vcpus", **sb)
    [(_, sessions)] = scrape.of(samples, "keel_sandbox_console_sessions", **sb)
    assert containers == 1 and 0 < uptime < 600 and vcpus == 0 and sessions == 0
    assert 1 << 20 < rss < 1 << 30 and 0 < pss <= rss, (rss, pss)  # the agent: an interpreter
    [(labels, memory)] = scrape.of(samples, "keel_container_memory_bytes", **sb)
    assert labels == {**sb, "container": pod} and memory > 0
    [(_, cpu)] = scrape.of(samples, "keel_container_cpu_seconds_total", **sb, container=pod)
    assert cpu >= 0
    assert scrape.of(samples, "keel_rollout_state", state="idle") == [({"state": "idle"}, 1.0)]
    assert scrape.of(samples, "keel_releases_installed") == [({}, 0.0)]
    assert scrape.of(samples, "keel_upgrades_total", component="shim") == [({"component": "shim"}, 0)]
    assert scrape.of(samples, "keel_sandbox_spans_dropped_total", **sb) == [(sb, 0.0)]

    lint = subprocess.run([_tool("promtool"), "check", "metrics"], input=body,
                          capture_output=True, timeout=60)
    assert lint.returncode == 0, (lint.stdout, lint.stderr, body.decode())

    status, _, text = scrape.get(url.removesuffix("/metrics") + "/other")
    assert (status, text) == (404, b"not found; metrics are at /metrics\n")


@contextlib.contextmanager
def prometheus(target: str) -> Iterator[str]:
    """Debian's prometheus scraping *target* every second; yields its URL.  Its
    data and config live in a temp dir; it is stopped (by its pid) at the end."""
    binary = _tool("prometheus")
    work = Path(tempfile.mkdtemp(prefix="keel-prom-", dir="/tmp"))
    config = work / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "keel-opsd", "static_configs": [{"targets": [target]}]}],
    }))
    address = f"127.0.0.1:{scrape.free_port()}"
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address={address}"], stdin=subprocess.DEVNULL, stdout=log,
            stderr=log)
    try:
        yield f"http://{address}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _query(server: str, query: str) -> list[dict[str, Any]]:
    """The instant vector *query* gives ([] while the server is not up yet)."""
    try:
        status, _, body = scrape.get(f"{server}/api/v1/query?{urllib.parse.urlencode({'query': query})}",
                               timeout=5)
    except OSError:
        return []
    doc = json.loads(body) if status == 200 else {}
    result: list[dict[str, Any]] = doc.get("data", {}).get("result", [])
    return result


def test_prometheus_scrapes_opsd(node: tuple[Opsd, str], pod: str) -> None:
    _, url = node
    target = urllib.parse.urlsplit(url).netloc
    with prometheus(target) as server:
        up = wait_for(lambda: [r for r in _query(server, "keel_sandbox_up")
                               if r["metric"].get("sandbox") == pod and r["value"][1] == "1"],
                      60, "Prometheus to scrape keel_sandbox_up 1 from opsd")
        assert up[0]["metric"]["job"] == "keel-opsd" and up[0]["metric"]["backend"] == "process"
        [info] = [r for r in _query(server, "keel_sandbox_info") if r["metric"]["sandbox"] == pod]
        assert info["metric"]["shim_version"] == release.version() and info["value"][1] == "1"
        [scrape] = _query(server, f'up{{instance="{target}"}}')
        assert scrape["value"][1] == "1"


@contextlib.contextmanager
def fake_sandboxes(state_root: Path) -> Iterator[tuple[str, str]]:
    """Two sandbox directories whose shims are not there: one's ops.sock is a
    dead socket file (connecting is refused), the other's listens but never
    answers (a hung shim).  Removed at the end."""
    dirs = [state_root / "sandboxes" / name for name in ("metrics-dead", "metrics-hung")]
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for d in dirs:
            d.mkdir(mode=0o700, parents=True)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(dirs[0] / "ops.sock"))
        dead.close()
        hung.bind(str(dirs[1] / "ops.sock"))
        hung.listen(8)
        yield dirs[0].name, dirs[1].name
    finally:
        hung.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_unreachable_shims_are_down_and_the_scrape_still_answers(
        containerd: Containerd, node: tuple[Opsd, str], pod: str) -> None:
    _, url = node
    with fake_sandboxes(containerd.paths.tmp_root / "keel") as (dead, hung):
        t0 = time.monotonic()
        status, _, body = scrape.get(url)
        took = time.monotonic() - t0
    assert status == 200
    assert took < DEADLINE_S + 2, f"the scrape took {took:.1f} s"
    samples = scrape.samples(body.decode())
    for sid in (dead, hung):
        assert scrape.of(samples, "keel_sandbox_up", sandbox=sid) == [
            ({"sandbox": sid, "namespace": "", "backend": ""}, 0.0)]
        assert scrape.of(samples, "keel_sandbox_info", sandbox=sid) == []
    assert [v for _, v in scrape.of(samples, "keel_sandbox_up", sandbox=pod)] == [1.0]
