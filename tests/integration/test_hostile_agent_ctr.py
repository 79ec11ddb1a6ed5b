"""The real shim under a real containerd with a hostile agent
(tests/hostile/agent.py, the process backend's ``agent_command`` in a
config passed with ``ctr run --runtime-config-path``).

What containerd sees in each case, and that the shim stays small (RSS under
100 MiB) and leaves nothing behind:

* CreateContainer never answered: ``ctr run`` fails within the agent call
  deadline, naming the call; the sandbox is stopped.
* UpdateContainer never answered: Update fails with DeadlineExceeded; the
  task runs on and is killed and deleted as usual.
* ReadOutput answers over the 4 MiB cap, or at a wrong offset: the shim
  refuses them before delivering a byte and that stream stops; the task runs
  on and is killed and deleted as usual.  A wrong offset is the shim's own
  finding, published as a ``/keel/protocol-violation`` event
  (``keel.events.v1.ProtocolViolation``) that an event consumer decodes.
* A 10,000-character agent version with escapes: logged capped and escaped.
* Malformed spans from a clock an hour ahead (tracing on): the good span
  is exported on the host's clock, the others refused and counted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keel.errors import DeadlineExceeded
from shim._pb.keel.events.v1 import ProtocolViolation
from tests.containerd import Containerd, rss_mib, wait_for
from tests.containerd.events import EventWatch
from tests.integration.keel_ctr import KEEL, kill_and_remove, log_since, shim_pid

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]

#: The shim's whole-call deadline for agent calls in these tests.
CALL_S = 4
MAX_RSS_MIB = 100
VIOLATION = "/keel/protocol-violation"


def _config(tmp: Path, mode: str) -> Path:
    path = tmp / f"hostile-{mode}.toml"
    command = json.dumps([sys.executable, "-m", "tests.hostile.agent", "--mode", mode])
    path.write_text(f'[shim]\nbackend = "process"\nagent_command = {command}\n'
                    f"agent_timeout_s = 3\nagent_call_timeout_s = {CALL_S}\n")
    return path


def _run(ctd: Containerd, cid: str, busybox: str, config: Path, out: Path) -> None:
    res = ctd.ctr("run", "-d", "--runtime", KEEL, "--runtime-config-path", str(config),
                  "--log-uri", f"file://{out}", busybox, cid, "sleep", "1000", timeout=60)
    assert res.returncode == 0, res.stderr
    assert (ctd.task(cid) or (0, ""))[1] == "RUNNING"


def test_create_never_answered(containerd: Containerd, busybox: str,
                               container_ids: Callable[[], str], tmp_path: Path) -> None:
    cid = container_ids()
    start = len(containerd.log_text())
    t0 = time.monotonic()
    ctr = subprocess.Popen([*containerd.ctr_prefix(), "run", "-d", "--runtime", KEEL,
                            "--runtime-config-path", str(_config(tmp_path, "never-create")),
                            busybox, cid, "sleep", "1000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: _pid_of_shim(containerd, cid), 30, f"{cid}'s shim")
        rss = 0
        while ctr.poll() is None and time.monotonic() - t0 < 60:  # while the create waits
            try:
                rss = max(rss, rss_mib(pid))
            except (OSError, AssertionError):
                break  # the shim exited
            time.sleep(0.2)
        _, err = ctr.communicate(timeout=60)
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
    took = time.monotonic() - t0
    print(f"[hostile] create never answered: ctr failed after {took:.1f}s, shim RSS up to {rss} MiB: "
          f"{err.strip()}")
    assert ctr.returncode != 0
    assert f"agent did not answer CreateContainer within {CALL_S}s" in err, err
    assert took < 30 and rss < MAX_RSS_MIB
    assert containerd.task(cid) is None
    assert containerd.ctr("containers", "rm", cid).returncode == 0
    assert "Traceback" not in log_since(containerd, start)


def _pid_of_shim(ctd: Containerd, cid: str) -> int | None:
    try:
        return shim_pid(ctd, cid)
    except (AssertionError, OSError):
        return None


def test_update_never_answered(containerd: Containerd, busybox: str,
                               container_ids: Callable[[], str], tmp_path: Path) -> None:
    cid = container_ids()
    _run(containerd, cid, busybox, _config(tmp_path, "never-update"), tmp_path / "out")
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as err:  # the status containerd gets
        containerd.update_task(cid, {"memory": {"limit": 64 << 20}}, timeout=60)
    took = time.monotonic() - t0
    print(f"[hostile] update never answered: {err.value} after {took:.1f}s")
    assert f"agent did not answer UpdateContainer within {CALL_S}s" in str(err.value)
    assert took < 3 * CALL_S
    assert rss_mib(shim_pid(containerd, cid)) < MAX_RSS_MIB
    kill_and_remove(containerd, cid)


@pytest.mark.parametrize("mode, logged", [
    ("huge-output", "over the limit of 4194304"),
    ("wrong-offset", "the agent answered 6 bytes at offset 5 to a read of at most"),
])
def test_output_off_the_protocol_stops_that_stream(
        containerd: Containerd, busybox: str, container_ids: Callable[[], str], tmp_path: Path,
        mode: str, logged: str) -> None:
    cid = container_ids()
    start = len(containerd.log_text())
    out = tmp_path / "out"
    with EventWatch(containerd, 'topic~="/keel/"') as watch:
        _run(containerd, cid, busybox, _config(tmp_path, mode), out)
        wait_for(lambda: logged in log_since(containerd, start), 30,
                 f"the shim to refuse: {logged}")
        if mode == "wrong-offset":  # a violation the shim saw itself: published as an event
            [first, *_] = watch.wait_for(VIOLATION, ProtocolViolation, lambda evs: len(evs) >= 1)
            assert (first.sandbox_id, first.container_id, first.count) == (cid, cid, 1)
            assert logged.removeprefix("the agent ") in first.detail, first.detail
    time.sleep(2)  # the agent would go on answering, were the stream not stopped
    rss = rss_mib(shim_pid(containerd, cid))
    print(f"[hostile] {mode}: refused, shim RSS {rss} MiB, {out.stat().st_size} bytes delivered")
    assert rss < MAX_RSS_MIB
    assert out.stat().st_size == 0  # nothing of it reached containerd's log
    assert containerd.task(cid)[1] == "RUNNING"  # type: ignore[index]
    kill_and_remove(containerd, cid)


def test_huge_version_is_capped_and_escaped(containerd: Containerd, busybox: str,
                                            container_ids: Callable[[], str],
                                            tmp_path: Path) -> None:
    cid = container_ids()
    start = len(containerd.log_text())
    _run(containerd, cid, busybox, _config(tmp_path, "huge-version"), tmp_path / "out")
    ready = [line for line in log_since(containerd, start).splitlines()
             if f"sandbox {cid}: agent " in line and " ready " in line]
    assert len(ready) == 1, ready
    assert "(10005 characters)" in ready[0] and "\x1b" not in ready[0], ready[0]
    assert len(ready[0]) < 400, len(ready[0])
    kill_and_remove(containerd, cid)


def test_malformed_guest_spans_are_refused_and_counted(containerd: Containerd, busybox: str,
                                                       container_ids: Callable[[], str],
                                                       tmp_path: Path) -> None:
    """Tracing on, and the agent's TakeSpans answer holds one good span and
    four malformed ones (a 15-byte trace id, 40 attributes, an end before the
    start, a 1000-character name) from a clock an hour ahead: the good one
    is exported with its times moved onto the host's clock, the others are
    refused (one log line), and the pod runs on."""
    from tests.otlp import Receiver

    cid = container_ids()
    with Receiver() as rx:
        config = _config(tmp_path, "bad-spans")
        config.write_text(config.read_text()
                          + f'[tracing]\nenabled = true\nendpoint = "{rx.endpoint}"\n')
        start = len(containerd.log_text())
        _run(containerd, cid, busybox, config, tmp_path / "out")
        try:
            [ok] = rx.wait_for(lambda spans: [s for s in spans if s.service == "keel-agent"],
                               timeout=30)
            assert ok.name == "hostile.ok" and ok.attributes == {"k": "v", "keel.sandbox.id": cid}
            # Moved back onto the host's clock (the guest's runs an hour ahead).
            assert abs(ok.start_ns - time.time_ns()) < 60 * 10**9, ok
            assert ok.end_ns - ok.start_ns == 1_000_000
            wait_for(lambda: "refused a span from the agent" in log_since(containerd, start), 30,
                     "the shim's line about a refused span")
            log = log_since(containerd, start)
            assert log.count("refused a span from the agent") == 1, log[-3000:]
            assert (containerd.task(cid) or (0, ""))[1] == "RUNNING"
            # Counted: the 7 the agent says it dropped and the 4 refused.
            assert asyncio.run(_spans_dropped(containerd, cid)) == 7 + 4
        finally:
            kill_and_remove(containerd, cid)
    assert [s.name for s in rx.snapshot() if s.service == "keel-agent"] == ["hostile.ok"]


async def _spans_dropped(ctd: Containerd, cid: str) -> int:
    from grpclib.client import Channel

    from agent.api import ops_pb
    from shim.api import SandboxDir

    sock = SandboxDir.of(ctd.paths.tmp_root / "keel", cid).ops_socket
    channel = Channel(path=str(sock))
    try:
        return int((await ops_pb.ShimOpsStub(channel).metrics(ops_pb.MetricsRequest(),
                                                              timeout=10)).spans_dropped)
    finally:
        channel.close()
