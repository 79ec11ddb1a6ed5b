"""Traces of real pods: real containerd (with its own OTLP tracing on), the
Keel shim (process backend), its agent and runc, a real opsd, and an OTLP/HTTP
receiver that decodes what arrives with ``opentelemetry-proto``.

Checked: a ``ctr run`` gives the chain Task.Create (shim) -> agent.CreateContainer
(agent) -> runc create, and the same for Start, each child inside its parent's
time; containerd 1.6's own spans reach the same receiver (separate traces:
1.6 passes no trace context to shims); ``opsctl trace on|off`` switches a
running sandbox that started with tracing off, and ``--follow`` prints its
spans as a tree; a collector that refuses connections or never answers
leaves ``ctr run`` working and its spans are counted as dropped.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import scrape
from tests.containerd import Containerd, install_shim_wrapper, wait_for
from tests.images.busybox import build_image, import_image
from tests.integration.conftest import IMAGE_CACHE, REPO, _teardown
from tests.integration.keel_ctr import KEEL, kill_and_remove, run_detached
from tests.opsd_harness import ENV, Opsd, install_releases, opsctl, running_opsd
from tests.otlp import ReceivedSpan, Receiver, child, refused_endpoint
from tests.workloads import CtrCounter

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

A, B = "0.1.1", "0.2.0"


def _containerd(tmp: Path, tracing: str, containerd_endpoint: str = "") -> Containerd:
    config = tmp / "keel.toml"
    config.write_text(f"[tracing]\n{tracing}\n")
    extra = ""
    if containerd_endpoint:
        extra = ('[plugins."io.containerd.tracing.processor.v1.otlp"]\n'
                 f'  endpoint = "{containerd_endpoint}"\n'
                 '[plugins."io.containerd.internal.v1.tracing"]\n'
                 '  sampling_ratio = 1.0\n  service_name = "containerd"\n')
    ctd = Containerd(tmp, env={"KEEL_STATE_ROOT": str(tmp / "keel"), "KEEL_CONFIG": str(config)},
                     extra_config=extra)
    install_shim_wrapper(ctd.paths.bin_dir, sys.executable, env={"PYTHONPATH": str(REPO)})
    return ctd


@pytest.fixture
def private(require_env: Callable[[str], None]) -> Iterator[Callable[..., Containerd]]:
    """Start a private containerd with a given [tracing] table; torn down and checked."""
    require_env("integration")
    started: list[Containerd] = []

    def start(tracing: str, containerd_endpoint: str = "") -> Containerd:
        tmp = Path(tempfile.mkdtemp(prefix="keel-trc-", dir="/tmp"))
        ctd = _containerd(tmp, tracing, containerd_endpoint)
        started.append(ctd)
        ctd.start()
        import_image(ctd.ctr_prefix(), build_image(IMAGE_CACHE))
        return ctd

    yield start
    for ctd in started:
        _teardown(ctd)


def _inside(inner: ReceivedSpan, outer: ReceivedSpan) -> None:
    slack = 2_000_000  # 2 ms: the two ends are different processes' clocks readings
    assert outer.start_ns - slack <= inner.start_ns <= inner.end_ns <= outer.end_ns + slack, \
        (inner, outer)


def test_ctr_run_spans_shim_agent_runc(private: Callable[..., Containerd],
                                                      busybox: str) -> None:
    with Receiver() as rx:
        ctd = private(f'enabled = true\nendpoint = "{rx.endpoint}"')
        cid = "trace-run"
        r = ctd.ctr("run", "--rm", "--runtime", KEEL, busybox, cid,
                    "echo", "traced")
        assert r.returncode == 0 and r.stdout.strip() == "traced", r

        def chain(spans: list[ReceivedSpan]) -> object:
            out = []
            for method, agent_rpc, runc in (("Create", "CreateContainer", "runc create"),
                                            ("Start", "StartProcess", "runc start")):
                task = next(
                    (s for s in spans if s.name == f"Task.{method}" and s.service == "keel-shim"
                     and s.attributes.get("keel.container.id") == cid), None)
                agent = task and child(spans, task, f"agent.{agent_rpc}")
                rc = agent and child(spans, agent, runc)
                if not rc:
                    return None
                out.append((task, agent, rc))
            return out

        for task, agent, rc in rx.wait_for(chain, timeout=60):
            assert agent.service == "keel-agent" and rc.service == "keel-agent"
            assert task.attributes["keel.backend"] == "process"
            assert task.attributes["keel.sandbox.id"] == cid
            assert task.resource["keel.sandbox.id"] == cid
            assert not task.error and not agent.error and not rc.error
            _inside(agent, task)
            _inside(rc, agent)
            assert abs(task.start_ns - time.time_ns()) < 300e9  # a sane wall clock time

        # Background calls (output pumps, exit watchers, span taking) are no
        # children of the call that started them.
        assert not [s for s in rx.snapshot() if s.name in ("agent.TakeSpans", "agent.ReadOutput")]


def test_containerd_spans_reach_the_same_receiver(private: Callable[..., Containerd],
                                                  busybox: str) -> None:
    with Receiver() as rx:
        ctd = private(f'enabled = true\nendpoint = "{rx.endpoint}"',
                      f"http://127.0.0.1:{rx.port}")
        plugins = ctd.ctr("plugins", "ls").stdout
        if "io.containerd.tracing.processor.v1" not in plugins:
            pytest.skip("this containerd is built without its OTLP span exporter (no"
                        " io.containerd.tracing.processor.v1 plugin in `ctr plugins ls`;"
                        " Debian's 1.6 package leaves it out)")
        r = ctd.ctr("run", "--rm", "--runtime", KEEL, busybox, "trace-ctd", "true")
        assert r.returncode == 0, r
        rx.wait_for(lambda spans: [s for s in spans if s.service == "containerd"], timeout=30)
        rx.wait_for(lambda spans: [s for s in spans if s.service == "keel-shim"], timeout=30)


def test_trace_on_off_follow_on_a_running_sandbox(private: Callable[..., Containerd],
                                                  busybox: str) -> None:
    with Receiver() as rx:
        ctd = private(f'enabled = false\nendpoint = "{rx.endpoint}"')
        cid = "trace-live"
        run_detached(ctd, busybox, cid, "sleep", "100000")
        with tempfile.TemporaryDirectory(prefix="keel-trc-rel-") as releases, \
                running_opsd("ktrc-", Path(releases), ctd.paths.tmp_root / "keel",
                             {"status": 5}) as node:
            try:
                _on_off_follow(ctd, node, rx, cid)
            finally:
                kill_and_remove(ctd, cid)


def _execs(spans: list[ReceivedSpan], eid: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == "Task.Exec" and s.attributes.get("keel.exec.id") == eid]


def _on_off_follow(ctd: Containerd, node: Opsd, rx: Receiver, cid: str) -> None:
    assert ctd.ctr("task", "exec", "--exec-id", "before", cid, "true").returncode == 0
    time.sleep(2.5)  # an export would have happened by now (batches every 2 s)
    assert rx.snapshot() == [], "spans exported while tracing is off"

    follow = subprocess.Popen([sys.executable, "-m", "opsd.cli", "--socket", str(node.socket),
                               "trace", cid, "--follow"], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = opsctl(node.socket, "trace", "on", cid)
        assert (r.returncode, r.stdout.strip()) == (0, f"{cid}: tracing on (ratio 1)"), r
        assert ctd.ctr("task", "exec", "--exec-id", "during", cid, "true").returncode == 0
        [span] = rx.wait_for(lambda spans: _execs(spans, "during"), timeout=30)
        rx.wait_for(lambda spans: child(spans, span, "agent.ExecProcess"), timeout=30)
        time.sleep(ORPHAN_WAIT)
    finally:
        follow.terminate()
        out, err = follow.communicate(timeout=30)
    lines = [line.split(" ", 1)[1] for line in out.splitlines()]  # without the time

    def subtree(name: str) -> list[str]:
        i = next((i for i, line in enumerate(lines)
                  if line.startswith(f"{name} ") and "exec=during" in line), None)
        assert i is not None, (name, out, err)
        assert "[keel-shim]" in lines[i] and " ms " in lines[i], lines[i]
        j = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), len(lines))
        return lines[i + 1:j]

    exec_tree, start_tree = subtree("Task.Exec"), subtree("Task.Start")
    assert any(line.startswith("  agent.ExecProcess ") and "[keel-agent]" in line
               for line in exec_tree), out
    assert any(line.startswith("  agent.StartProcess ") for line in start_tree), out
    assert any(line.startswith("    runc exec ") for line in start_tree), out

    r = opsctl(node.socket, "trace", "off", "--all")
    assert (r.returncode, r.stdout.strip()) == (0, f"{cid}: tracing off"), r
    seen = len(rx.snapshot())
    assert ctd.ctr("task", "exec", "--exec-id", "after", cid, "true").returncode == 0
    time.sleep(2.5)
    assert _execs(rx.snapshot(), "after") == [] and len(rx.snapshot()) == seen

    r = opsctl(node.socket, "trace", "on", cid, "--ratio", "2")
    assert r.returncode == 2 and "expected a ratio between 0 and 1" in r.stderr, r
    r = opsctl(node.socket, "trace", "on")
    assert r.returncode == 1 and "name the sandboxes, or --all" in r.stderr, r
    for verb in ("on", "off"):  # an unreachable shim is never reported as switched
        r = opsctl(node.socket, "trace", verb, "no-such-pod")
        assert r.returncode == 1 and r.stdout.startswith("no-such-pod: not changed: "), r
    r = opsctl(node.socket, "trace", "no-such-pod", "--follow")
    assert r.returncode == 1 and "no sandbox no-such-pod" in r.stderr, r


#: --follow prints a span whose parent is elsewhere after 2 s.
ORPHAN_WAIT = 3.0


@pytest.mark.parametrize("collector", ["refusing", "stalling"])
def test_a_broken_collector_never_holds_up_a_pod(private: Callable[..., Containerd], busybox: str,
                                                 collector: str) -> None:
    """Spans go to a collector that refuses connections, or accepts and never
    answers: ``ctr run --rm`` takes as long as with tracing off (within
    the noise of this host, far below the 5 s export bound), and the
    shim logs that spans were dropped."""
    off = private("enabled = false")
    with Receiver(stall=True) as stalled:
        endpoint = stalled.endpoint if collector == "stalling" else refused_endpoint()
        on = private(f'enabled = true\nendpoint = "{endpoint}"\nexport_timeout_s = 5.0')

        def run_ms(ctd: Containerd, n: int) -> float:
            times = []
            for i in range(n):
                t0 = time.monotonic()
                r = ctd.ctr("run", "--rm", "--runtime", KEEL, busybox,
                            f"broken-{collector}-{i}", "true")
                times.append((time.monotonic() - t0) * 1000)
                assert r.returncode == 0, r
            return statistics.median(times)

        run_ms(off, 1), run_ms(on, 1)  # warm both launchers
        base, traced = run_ms(off, 5), run_ms(on, 5)
        assert traced < base + 1500, f"ctr run: {traced:.0f} ms traced against {base:.0f} ms"
        # A pod that lives on: its shim says that the collector did not take its spans.
        cid = f"broken-{collector}-pod"
        run_detached(on, busybox, cid, "sleep", "100000")
        try:
            for i in range(3):
                assert on.ctr("task", "exec", "--exec-id", f"e{i}", cid, "true").returncode == 0
            wait_for(lambda: "did not take" in on.log_text(), timeout=60,
                     what="the shim's line about spans the collector did not take")
        finally:
            kill_and_remove(on, cid)
        if collector == "stalling":
            assert stalled.requests > 0  # the exporter did reach it


def _shim_logs(ctd: Containerd) -> str:
    logs = "".join(p.read_text(errors="replace")
                   for p in (ctd.paths.tmp_root / "keel" / "shim-logs").glob("*.log"))
    return ctd.log_text() + logs


def test_the_rollout_trace_holds_the_handoff_and_its_freeze_across_processes(
        private: Callable[..., Containerd], busybox: str) -> None:
    """``opsctl upgrade`` A -> B of a pod, with tracing on in the node config:
    one trace from opsd's plan span down to the old shim's handoff, its freeze
    window and phases, the new shim's restore (another process) and the agent
    upgrade; the pod's counter goes on untouched."""
    with Receiver() as rx:
        ctd = private(f'enabled = true\nendpoint = "{rx.endpoint}"')
        state_root = ctd.paths.tmp_root / "keel"
        tmp = Path(tempfile.mkdtemp(prefix="keel-trc-rel-", dir="/tmp"))
        try:
            store = install_releases(tmp, tmp / "releases", state_root, {A: None, B: None},
                                     current=A)
            pod = CtrCounter(ctd, "trace-up", store.get(A).shim_path, busybox,
                             interval_us=10_000, more=10)
            try:
                pod.running()
                port = scrape.free_port()
                with running_opsd("ktrc-", store.root, state_root, {"status": 5},
                                  ("--metrics-address", f"127.0.0.1:{port}"),
                                  env={"KEEL_CONFIG": ctd_config(ctd)}) as node:
                    r = opsctl(node.socket, "upgrade", "--to", B)
                    assert r.returncode == 0, r.stdout + r.stderr + node.log()
                    _check_upgrade_metrics(port)
                pod.untouched()
                _check_rollout_trace(rx, pod.cid)
            finally:
                pod.kill()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def ctd_config(ctd: Containerd) -> str:
    return str(ctd.paths.tmp_root / "keel.toml")


def _check_rollout_trace(rx: Receiver, cid: str) -> None:
    def tree(spans: list[ReceivedSpan]) -> object:
        plan = next((s for s in spans if s.service == "opsd" and s.name.startswith("upgrade plan")),
                    None)
        batch = plan and child(spans, plan, "batch 1/1")
        sandbox = batch and child(spans, batch, f"sandbox {cid}")
        switch_shim = sandbox and child(spans, sandbox, "switch shim")
        handoff = switch_shim and child(spans, switch_shim, "shim handoff")
        freeze = handoff and child(spans, handoff, "handoff freeze")
        restore = freeze and child(spans, freeze, "new shim restore")
        switch_agent = sandbox and child(spans, sandbox, "switch agent")
        agent = switch_agent and child(spans, switch_agent, "agent upgrade")
        if not (restore and agent):
            return None
        return plan, handoff, freeze, restore, agent

    plan, handoff, freeze, restore, agent = rx.wait_for(tree, timeout=60)
    spans = rx.snapshot()
    assert plan.attributes["keel.to_version"] == B and not plan.error
    assert handoff.service == restore.service == "keel-shim"
    assert handoff.attributes["keel.shim.pid"] != restore.attributes["keel.shim.pid"]
    assert handoff.attributes["keel.shim.from"] == A and handoff.attributes["keel.shim.to"] == B
    for phase in ("quiesce", "transfer and restore", "commit"):
        _inside(child(spans, freeze, phase) or pytest.fail(f"no {phase} span"), freeze)
    _inside(freeze, handoff)
    _inside(restore, freeze)
    assert float(freeze.attributes["keel.freeze_ms"]) == pytest.approx(
        (freeze.end_ns - freeze.start_ns) / 1e6, abs=5)
    for phase in ("drain and answer", "exec until ready"):
        assert child(spans, agent, phase), phase
    assert agent.attributes["keel.agent.now"] == B


def _check_upgrade_metrics(port: int) -> None:
    """The upgrade as opsd's metrics show it: one shim and one agent switch,
    the freeze window and the agent gap in their histograms."""
    status, _, body = scrape.get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples = scrape.samples(body.decode())
    for component in ("shim", "agent"):
        assert scrape.of(samples, "keel_upgrades_total", component=component)[0][1] == 1
        assert scrape.of(samples, "keel_upgrades_failed_total", component=component)[0][1] == 0
    for name in ("keel_upgrade_freeze_seconds", "keel_upgrade_agent_gap_seconds"):
        [(_, count)] = scrape.of(samples, f"{name}_count")
        [(_, total)] = scrape.of(samples, f"{name}_sum")
        assert count == 1 and 0 < total < 30, (name, count, total)
    assert scrape.of(samples, "keel_rollout_state", state="succeeded")[0][1] == 1
