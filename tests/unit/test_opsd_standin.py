"""opsd's service, rollout and opsctl's output, with stand-in shims.

The sandboxes here are stand-ins, not shims: a real grpclib server per
sandbox implementing ShimOps on ``<state_root>/sandboxes/<id>/ops.sock``,
in this process (tests/opsd_harness.py ``Fleet``, an edge fake).  Each
keeps what a shim would report -- versions, its shim pid (a new one after
a shim upgrade), the release paths it runs from, containers -- and can
block, fail or lose a container on upgrade, which real shims cannot be
made to do on cue.  Releases are directories with the release layout (the
stand-ins never exec them).  opsd itself is real: a subprocess with a
real notify socket, driven by the real opsctl.  The same rollouts against
real shims under a real containerd: tests/integration/test_opsd_real.py.

Tests check outcomes: what the sandboxes report afterwards, the plan opsd
reports, opsctl's output and exit codes.  Needs root (opsd admits root
only): the ``requires_root`` marker skips loudly, or fails when CI=true.
"""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.opsd_harness import REPO, Fleet, Opsd, make_releases, opsctl, plan, sandboxes

pytestmark = pytest.mark.requires_root


@pytest.fixture
def fleet(short_tmp: Path) -> Iterator[Fleet]:
    with Fleet(short_tmp / "state") as f:
        yield f


@pytest.fixture
def opsd(short_tmp: Path, fleet: Fleet) -> Iterator[Opsd]:
    make_releases(short_tmp / "releases", "0.1.0", "0.2.0", "1.0.0")
    d = Opsd(short_tmp)
    d.start()
    yield d
    d.close()


def targets(sock: Path) -> dict[str, str]:
    """Each target's state in the plan opsd reports."""
    return {t["sandbox_id"]: t["state"] for t in plan(sock)["targets"]}


def test_ls_shows_sandboxes_containers_versions(opsd: Opsd, fleet: Fleet, short_tmp: Path) -> None:
    fleet.add("pod-a", containers={"web": "running", "sidecar": "running"})
    fleet.add("pod-b", agent="0.1.1", accel="tcg")
    dead = short_tmp / "state/sandboxes/pod-dead"
    dead.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead / "ops.sock"))  # a socket nobody listens on: connection refused
    s.close()
    r = opsctl(opsd.socket, "ls")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("pod-a") and " 0.1.0 " in ln and " standin " in ln
               and ln.endswith(" 2") for ln in lines)
    # A VM sandbox's accelerator shows in the BACKEND column.
    assert any(ln.startswith("pod-b") and "0.1.1" in ln and " standin/tcg " in ln for ln in lines)
    assert any(ln.startswith("pod-dead") and "unreachable" in ln for ln in lines)
    assert any("container web" in ln and "running" in ln for ln in lines)
    by_id = sandboxes(opsd.socket)
    assert by_id["pod-b"]["agent_version"] == "0.1.1" and by_id["pod-dead"]["error"]
    assert by_id["pod-b"]["accel"] == "tcg", by_id["pod-b"]
    assert by_id["pod-a"]["shim_pid"] == fleet["pod-a"].shim_pid


def test_upgrade_in_batches_plain_lines(opsd: Opsd, fleet: Fleet) -> None:
    for sid in ("sb0", "sb1", "sb2"):
        fleet.add(sid)
    shim_pids = {s: fleet[s].shim_pid for s in ("sb0", "sb1", "sb2")}
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--batch", "2", "--pause", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "[batch 1/2] sb0, sb1" in out and "[batch 2/2] sb2" in out
    assert "sb0: shim 0.1.0 -> 0.2.0" in out and "sb2: agent 0.1.0 -> 0.2.0" in out
    assert "\x1b[K" not in out  # no progress bar when stdout is not a terminal
    assert out.rstrip().endswith("succeeded: 3 sandboxes at 0.2.0")
    listed = sandboxes(opsd.socket)
    for s in ("sb0", "sb1", "sb2"):
        assert (listed[s]["shim_version"], listed[s]["agent_version"]) == ("0.2.0", "0.2.0")
        assert listed[s]["shim_pid"] != shim_pids[s]  # a new shim serves
        # ... started from the release's entry points
        assert fleet[s].shim_path.endswith("releases/0.2.0/bin/containerd-shim-keel-v2")
        assert fleet[s].agent_path.endswith("releases/0.2.0/bin/keel-agent")
    opsd.notify.wait_for("STATUS=upgrade")
    opsd.notify.wait_for("STATUS=idle; last upgrade")
    assert targets(opsd.socket) == dict.fromkeys(("sb0", "sb1", "sb2"), "healthy")
    st = opsctl(opsd.socket, "upgrade", "status")
    assert "state succeeded" in st.stdout and st.stdout.count("healthy") == 3


def test_failed_batch_rolls_back(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0")
    fleet.add("sb1", lose_container_on_agent="0.2.0")
    fleet.add("sb2")
    untouched = fleet["sb2"].snapshot()
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--batch", "2")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "containers no longer running: c1" in r.stdout
    assert "rolled-back" in r.stdout
    assert fleet["sb0"].versions() == fleet["sb1"].versions() == ("0.1.0", "0.1.0")
    assert fleet["sb2"].snapshot() == untouched  # the next batch was never touched
    assert plan(opsd.socket)["state"] == "rolled-back"
    assert targets(opsd.socket) == {"sb0": "rolled-back", "sb1": "rolled-back", "sb2": "pending"}


def test_refusals_touch_nothing(opsd: Opsd, fleet: Fleet, short_tmp: Path) -> None:
    fleet.add("sb0")
    fleet.add("sb1", schema=2)
    before = {s: fleet[s].snapshot() for s in ("sb0", "sb1")}
    cases = [
        (["--to", "latest!"], "'latest!' is not a Keel version"),
        (["--to", "0.9.0"], "release 0.9.0 is not installed under"),
        (["--to", "0.2.0", "--sandbox", "nope"], "no sandbox nope on this node"),
        (["--to", "1.0.0", "--sandbox", "sb0"], "0.1.0 -> 1.0.0 changes the major version"),
        (["--to", "0.2.0"], "sb1: incompatible state schema"),
        (["--to", "0.2.0", "--components", "kernel"], "unknown component 'kernel'"),
    ]
    for args, text in cases:
        r = opsctl(opsd.socket, "upgrade", *args)
        assert r.returncode == 1 and text in r.stderr, (args, r.stdout, r.stderr)
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--sandbox", "sb0", "--dry-run")
    assert r.returncode == 0 and "dry run: nothing was touched" in r.stdout
    assert "sb0" in r.stdout and "-> 0.2.0  pending" in r.stdout
    assert {s: fleet[s].snapshot() for s in ("sb0", "sb1")} == before
    assert "no upgrade has run" in opsctl(opsd.socket, "upgrade", "status").stdout
    assert plan(opsd.socket) == {}
    r = opsctl(short_tmp / "elsewhere.sock", "ls")
    assert r.returncode == 1
    assert f"cannot reach opsd at {short_tmp}/elsewhere.sock: is it running?" in r.stderr


def test_second_upgrade_refused_then_abort(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0", block=True)
    fleet.add("sb1")
    untouched = fleet["sb1"].snapshot()
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--detach")
    assert r.returncode == 0 and "started" in r.stdout, r.stderr
    assert fleet["sb0"].entered.wait(10)
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0")
    assert r.returncode == 1 and "is running" in r.stderr and "opsctl upgrade abort" in r.stderr
    r = opsctl(opsd.socket, "upgrade", "abort")
    assert r.returncode == 0, r.stderr
    fleet.release("sb0")
    r = opsctl(opsd.socket, "upgrade", "status", "--follow")
    assert r.returncode == 5, r.stdout + r.stderr
    assert "aborted: 1 of 2 sandboxes upgraded; batches 2-2 untouched" in r.stdout
    assert fleet["sb0"].versions() == ("0.2.0", "0.2.0")  # the batch in flight finished
    assert fleet["sb1"].snapshot() == untouched
    assert targets(opsd.socket) == {"sb0": "healthy", "sb1": "pending"}


def test_sigkill_mid_rollout_resumes(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0", block=True)
    fleet.add("sb1")
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--detach")
    assert r.returncode == 0, r.stderr
    plan_id = r.stdout.split()[1]
    assert fleet["sb0"].entered.wait(10)
    opsd.kill()
    saved = json.loads((opsd.base / "opsd-state/plan.json").read_text())
    assert saved["id"] == plan_id and saved["state"] == "running"
    assert saved["targets"][0]["state"] == "upgrading"  # killed mid-call
    fleet.release("sb0")  # the stand-in finishes the switch opsd was waiting for
    opsd.start()
    assert f"resuming upgrade plan {plan_id}" in opsd.log()
    r = opsctl(opsd.socket, "upgrade", "status", "--follow")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"upgrade {plan_id} to 0.2.0: succeeded" in r.stdout
    assert fleet["sb0"].versions() == fleet["sb1"].versions() == ("0.2.0", "0.2.0")
    assert targets(opsd.socket) == {"sb0": "healthy", "sb1": "healthy"}


def test_sigterm_mid_rollout_stops_and_keeps_the_plan(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0", block=True)
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--detach")
    assert r.returncode == 0, r.stderr
    assert fleet["sb0"].entered.wait(10)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    watcher = subprocess.Popen([sys.executable, "-m", "opsd.cli", "--socket", str(opsd.socket),
                                "upgrade", "status", "--follow"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    assert watcher.stdout is not None
    ready, _, _ = select.select([watcher.stdout], [], [], 20)
    assert ready
    assert "plan " in watcher.stdout.readline()  # it is streaming
    opsd.proc.terminate()
    assert opsd.proc.wait(10) == 0, opsd.log()
    opsd.notify.wait_for("STOPPING=1")
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 1 and "opsd closed the connection" in err, err
    saved = json.loads((opsd.base / "opsd-state/plan.json").read_text())
    assert saved["state"] == "running"  # resumes at the next start
    assert not opsd.socket.exists()


def test_progress_bar_on_a_terminal(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0")
    fleet.add("sb1")
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "opsd.cli", "--socket", str(opsd.socket),
                             "upgrade", "--to", "0.2.0", "--components", "shim"],
                            stdout=follower, stderr=subprocess.PIPE, env=env, cwd=REPO)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the writer closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    text = out.decode()
    assert "\x1b[K[" in text and "2/2 sandboxes  batch 2/2" in text
    assert "[##############################] 2/2" in text
    assert fleet["sb1"].versions() == ("0.2.0", "0.1.0")


def test_a_corrupt_plan_is_reported_not_forgotten(opsd: Opsd, fleet: Fleet) -> None:
    """An unreadable plan.json: status says so (not "no upgrade has run"), and
    a new upgrade is refused until an operator repairs or removes it."""
    fleet.add("sb0")
    opsd.stop()
    plan = opsd.base / "opsd-state/plan.json"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text('{"schema_version": 1, "kind": "keel-opsd-plan", "id": ')  # cut short
    opsd.start()
    r = opsctl(opsd.socket, "upgrade", "status")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no upgrade has run" not in r.stdout
    assert "the upgrade plan cannot be read" in r.stderr and str(plan) in r.stderr, r.stderr
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0")
    assert r.returncode != 0 and "upgrades are disabled" in r.stderr, r.stdout + r.stderr
    assert fleet["sb0"].versions() == ("0.1.0", "0.1.0")
