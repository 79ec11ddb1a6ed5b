"""opsd end to end: a real opsd process, real sockets, real opsctl.

opsd runs as a subprocess with a real notify socket (a SOCK_DGRAM socket
with SO_PASSCRED, as systemd binds it).  The sandboxes are stand-ins: a
real grpclib server per sandbox implementing ShimOps on
``<state_root>/sandboxes/<id>/ops.sock``, in this process (an edge fake:
they keep versions and containers and can block, fail or lose a
container on upgrade).  Releases are directories with the release layout
(the stand-ins never exec them; tests/unit/test_releases.py installs real
ones).  Needs root (peer credentials, setuid to nobody): the
``requires_root`` marker skips loudly, or fails when CI=true.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.opsd_harness import REPO, Fleet, Opsd, make_releases, opsctl

pytestmark = pytest.mark.requires_root


@pytest.fixture
def base() -> Iterator[Path]:
    """A short private directory (unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kopsd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fleet(base: Path) -> Iterator[Fleet]:
    with Fleet(base / "state") as f:
        yield f


@pytest.fixture
def opsd(base: Path, fleet: Fleet) -> Iterator[Opsd]:
    make_releases(base / "releases", "0.1.0", "0.2.0", "1.0.0")
    d = Opsd(base)
    d.start()
    yield d
    d.close()


def test_ready_status_watchdog_and_socket(opsd: Opsd) -> None:
    ready = opsd.notify.wait_for("READY=1")
    assert ready.pid == opsd.proc.pid  # SCM_CREDENTIALS: sent by opsd itself
    assert "STATUS=idle" in ready.text
    opsd.notify.wait_for("WATCHDOG=1")
    st = opsd.socket.stat()
    assert oct(st.st_mode & 0o777) == "0o600" and st.st_uid == 0
    assert "listening on" in opsd.log()


def test_logs_go_to_the_journal_under_systemd(base: Path, fleet: Fleet) -> None:
    """With $JOURNAL_STREAM naming its stderr, opsd logs through JournalHandler
    (journald is absent here, so the lines vanish) instead of writing stderr."""
    d = Opsd(base, env={"JOURNAL_STREAM": "<log>"})
    d.start()
    try:
        assert opsctl(d.socket, "ls").returncode == 0
    finally:
        d.close()
    assert "listening on" not in d.log() and "stopping" not in d.log()


def test_ls_shows_sandboxes_containers_versions(opsd: Opsd, fleet: Fleet, base: Path) -> None:
    fleet.add("pod-a", containers={"web": "running", "sidecar": "running"})
    fleet.add("pod-b", agent="0.1.1", accel="tcg")
    dead = base / "state/sandboxes/pod-dead"
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
    r = opsctl(opsd.socket, "ls", "--json")
    doc = json.loads(r.stdout)
    by_id = {s["id"]: s for s in doc["sandboxes"]}
    assert by_id["pod-b"]["agent_version"] == "0.1.1" and by_id["pod-dead"]["error"]
    assert by_id["pod-b"]["accel"] == "tcg", by_id["pod-b"]


def test_non_root_callers_are_refused(opsd: Opsd, base: Path) -> None:
    r = opsctl(opsd.socket, "ls", as_nobody=True)
    assert r.returncode == 1
    assert "permission denied on" in r.stderr and "must run as root" in r.stderr
    # Loosen the file mode: the peer-credential check is the second wall.
    open_dir = Path(tempfile.mkdtemp(prefix="kopsd-open-", dir="/tmp"))
    try:
        open_dir.chmod(0o755)
        exposed = open_dir / "opsd.sock"
        os.link(opsd.socket, exposed)
        exposed.chmod(0o666)
        r = opsctl(exposed, "ls", as_nobody=True)
        assert r.returncode == 1, r.stdout
        assert "opsd refuses uid 65534: only root may use it" in r.stderr
        assert "ListSandboxes from uid 65534" in opsd.log()
        assert opsctl(exposed, "ls").returncode == 0  # root still gets in
    finally:
        shutil.rmtree(open_dir)


def test_upgrade_in_batches_plain_lines(opsd: Opsd, fleet: Fleet) -> None:
    for sid in ("sb0", "sb1", "sb2"):
        fleet.add(sid)
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--batch", "2", "--pause", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "[batch 1/2] sb0, sb1" in out and "[batch 2/2] sb2" in out
    assert "sb0: shim 0.1.0 -> 0.2.0" in out and "sb2: agent 0.1.0 -> 0.2.0" in out
    assert "\x1b[K" not in out  # no progress bar when stdout is not a terminal
    assert out.rstrip().endswith("succeeded: 3 sandboxes at 0.2.0")
    assert all(fleet[s].versions() == ("0.2.0", "0.2.0") for s in ("sb0", "sb1", "sb2"))
    assert fleet["sb0"].paths[0].endswith("releases/0.2.0/bin/containerd-shim-keel-v2")
    assert fleet["sb0"].paths[1].endswith("releases/0.2.0/bin/keel-agent")
    opsd.notify.wait_for("STATUS=upgrade")
    opsd.notify.wait_for("STATUS=idle; last upgrade")
    st = opsctl(opsd.socket, "upgrade", "status")
    assert "state succeeded" in st.stdout and st.stdout.count("healthy") == 3


def test_failed_batch_rolls_back(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0")
    fleet.add("sb1", lose_container_on_agent="0.2.0")
    fleet.add("sb2")
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--batch", "2")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "containers no longer running: c1" in r.stdout
    assert "rolled-back" in r.stdout
    assert fleet["sb0"].versions() == fleet["sb1"].versions() == ("0.1.0", "0.1.0")
    assert fleet["sb2"].calls == []  # the next batch was never touched


def test_refusals_touch_nothing(opsd: Opsd, fleet: Fleet, base: Path) -> None:
    fleet.add("sb0")
    fleet.add("sb1", schema=2)
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
    assert fleet["sb0"].calls == fleet["sb1"].calls == []
    assert "no upgrade has run" in opsctl(opsd.socket, "upgrade", "status").stdout
    r = opsctl(base / "elsewhere.sock", "ls")
    assert r.returncode == 1
    assert f"cannot reach opsd at {base}/elsewhere.sock: is it running?" in r.stderr


def test_second_upgrade_refused_then_abort(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0", block=True)
    fleet.add("sb1")
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
    assert fleet["sb0"].versions() == ("0.2.0", "0.2.0")
    assert fleet["sb1"].calls == []


def test_sigkill_mid_rollout_resumes(opsd: Opsd, fleet: Fleet) -> None:
    fleet.add("sb0", block=True)
    fleet.add("sb1")
    r = opsctl(opsd.socket, "upgrade", "--to", "0.2.0", "--detach")
    assert r.returncode == 0, r.stderr
    plan_id = r.stdout.split()[1]
    assert fleet["sb0"].entered.wait(10)
    opsd.kill()
    plan = json.loads((opsd.base / "opsd-state/plan.json").read_text())
    assert plan["id"] == plan_id and plan["state"] == "running"
    assert plan["targets"][0]["state"] == "upgrading"  # killed mid-call
    fleet.release("sb0")  # the stand-in answers the call opsd will repeat
    opsd.start()
    assert f"resuming upgrade plan {plan_id}" in opsd.log()
    r = opsctl(opsd.socket, "upgrade", "status", "--follow")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"upgrade {plan_id} to 0.2.0: succeeded" in r.stdout
    assert fleet["sb0"].versions() == fleet["sb1"].versions() == ("0.2.0", "0.2.0")


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
    plan = json.loads((opsd.base / "opsd-state/plan.json").read_text())
    assert plan["state"] == "running"  # resumes at the next start
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


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("SKIPPED (environment): systemd-analyze missing (apt-get install systemd)")
    unit = (REPO / "deploy/systemd/keel-opsd.service").read_text()
    assert "ExecStart=/usr/local/bin/opsd " in unit
    launcher = tmp_path / "opsd"  # ExecStart must exist for verify: this tree's opsd
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m opsd \"$@\"\n")
    launcher.chmod(0o755)
    (tmp_path / "keel-opsd.service").write_text(unit.replace("/usr/local/bin/opsd", str(launcher)))
    r = subprocess.run([analyze, "verify", str(tmp_path / "keel-opsd.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "keel-opsd.service" not in r.stderr, r.stderr
    r = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--state-dir" in r.stdout
