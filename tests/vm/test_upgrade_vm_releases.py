"""Live upgrade of a VM sandbox between installed releases, driven by opsd.

As an operator runs it: releases of this working tree are installed by
``opsctl release install`` (real virtualenvs, each with its guest agent
bundle), a real opsd serves the private containerd's Keel state root, and
``opsctl upgrade`` moves a VM pod's shim and agent.  The pod is a ``ctr
run --rm`` in the foreground of a counter printing a number every 10 ms
(tests/workloads.py ``CtrCounter``), read from ctr's stdout, so every
number crosses the guest agent, the virtio-serial port, the shim and
containerd's fifos.

Releases: A is the image's own release (the guest image is built from
this tree, so the VM boots A's agent), B the next minor, BROKEN one whose
agent crashes while resuming, NEWIMG one that needs a guest image format
the image does not have.  The agent of each upgrade is B's or A's code
shipped into the guest (StageRelease) and exec'd there in place.

A second pod is a template clone (its own runtime config turns templates
on): its shim and agent go A -> B -> A the same way, on the clone's qemu.

What is checked: NEWIMG is refused before anything moves (by opsd's
preflight, and by the shim itself when asked directly); A -> B -> A
round trips of shim and agent with ``opsctl ls`` naming each version, the
same task pid and the same qemu; BROKEN's agent fails in the guest and
the sandbox comes back on A; at the end no shim disconnect in
containerd's log, every number once and in order, the container's own
exit code, nothing left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from agent.api import ops_pb
from shim.vmm.qemu import image
from tests.console_pty import Pty
from tests.containerd import Containerd
from tests.integration.live_upgrade import shim_ops
from tests.opsd_harness import Opsd, install_releases, opsctl, plan, running_opsd, sandboxes
from tests.vm.conftest import write_keel_config
from tests.workloads import CtrCounter, disconnects
from upgrade.releases import ReleaseStore, version_key

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.requires_root,
              # Four release installs, a boot, and agents that import from 9p under TCG.
              pytest.mark.timeout(1500)]

BUSYBOX = "localhost/keel/busybox:test"
BOOT_TIMEOUT_S = 240.0
#: A -> B -> A round trips of shim and agent.
ROUNDS = int(os.environ.get("KEEL_TEST_VM_UPGRADE_ROUNDS", "2"))
BROKEN_PATCH = ("agent/_resume.py",
                "_real_load = load\n"
                "def load(config, fds):\n"
                "    _real_load(config, fds)\n"
                "    raise RuntimeError('simulated crash while resuming')\n")
NEWIMG_PATCH = ("shim/vmm/qemu/image.py", "FORMAT = 99\n")


def _versions(image_release: str) -> dict[str, str]:
    major, minor = version_key(image_release)[0][:2]
    return {"A": image_release, "B": f"{major}.{minor + 1}.0",
            "BROKEN": f"{major}.{minor + 1}.1", "NEWIMG": f"{major}.{minor + 1}.2"}


@pytest.fixture(scope="module")
def versions(vm_image: image.Image) -> dict[str, str]:
    inputs = vm_image.manifest["inputs"]
    assert isinstance(inputs, dict)
    return _versions(str(inputs["keel_release"]))


@pytest.fixture(scope="module")
def releases(vm_containerd: Containerd, versions: dict[str, str]) -> Iterator[ReleaseStore]:
    tmp = Path(tempfile.mkdtemp(prefix="keel-vm-rel-", dir="/tmp"))
    v = versions
    try:
        yield install_releases(
            tmp, tmp / "releases", vm_containerd.paths.tmp_root / "keel",
            {v["A"]: None, v["B"]: None, v["BROKEN"]: BROKEN_PATCH, v["NEWIMG"]: NEWIMG_PATCH},
            current=v["A"], options={v["B"]: ("--guest-image", str(image.default_dir()))})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def node(vm_containerd: Containerd, releases: ReleaseStore) -> Iterator[Opsd]:
    # Agent upgrades under TCG take seconds (the new agent starts under emulation).
    with running_opsd("kopsv-", releases.root, vm_containerd.paths.tmp_root / "keel",
                      {"gate": 120, "settle": 120, "status": 10}) as d:
        yield d


def _at(node: Opsd, c: CtrCounter, version: str) -> dict[str, Any]:
    """``opsctl ls --json`` says *c*'s sandbox runs *version* (shim and agent) on
    qemu, its container with the pid it started with; that entry."""
    sb = sandboxes(node.socket)[c.cid]
    assert (sb.get("shim_version"), sb.get("agent_version"), sb.get("backend")) == (
        version, version, "qemu"), sb
    assert [(x["id"], x["pid"], x["status"]) for x in sb["containers"]] == [
        (c.cid, c.pid, "running")], sb
    return sb


def _upgrade(node: Opsd, c: CtrCounter, to: str) -> str:
    r = opsctl(node.socket, "upgrade", "--to", to, "--sandbox", c.cid, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr + node.log()[-3000:] + "\n--- guest console:\n"
                               + c.sandbox.agent_log.read_text(errors="replace")[-6000:])
    assert r.stdout.rstrip().endswith(f"succeeded: 1 sandboxes at {to}"), r.stdout
    return r.stdout


def test_a_release_install_builds_or_reuses_its_guest_image(
        vm_image: image.Image, releases: ReleaseStore, versions: dict[str, str]) -> None:
    """B was installed with ``--guest-image``: it recorded an image of its own
    release, built on the cached base root (the same as the test image's), and
    B's own interpreter resolves that image as the one its shims boot."""
    b = releases.get(versions["B"])
    recorded = json.loads((b.path / "guest" / "image.json").read_text())
    img = image.load(Path(recorded["dir"]))
    assert img.id == recorded["id"] != vm_image.id
    inputs = img.manifest["inputs"]
    assert isinstance(inputs, dict) and inputs["keel_release"] == b.version, inputs
    assert img.rootfs == vm_image.rootfs and img.kernel == vm_image.kernel  # parts reused
    r = subprocess.run([str(b.path / "bin/python"), "-I", "-c",
                        "from shim.vmm.qemu import _prune; print(_prune.release_image())"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert (r.returncode, r.stdout.strip()) == (0, str(img.dir)), r
    # Pruning keeps the image a release names.
    p = subprocess.run([sys.executable, "-m", "shim.vmm.qemu.image", "prune", "--dry-run",
                        "--releases", str(releases.root)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, p
    assert re.search(rf"(?m)^kept img-{img.id}: .*\brelease {re.escape(b.version)}\b", p.stdout), p


def _console_in_the_guest(node: Opsd, c: CtrCounter) -> None:
    """``opsctl console`` reaches the guest: its kernel and root, and with
    ``--container`` the container's pid namespace, not the guest's."""
    r = opsctl(node.socket, "console", c.cid, "--", "true")
    assert r.returncode == 1 and "is disabled" in r.stderr, r
    assert opsctl(node.socket, "console", "enable", c.cid).returncode == 0
    r = opsctl(node.socket, "console", c.cid, "--", "sh", "-c",
               "uname -r; cat /proc/cmdline; readlink /proc/self/ns/pid; exit 4")
    assert r.returncode == 4, r
    _kernel, cmdline, guest_ns = r.stdout.splitlines()
    assert "console=ttyS0 panic=-1" in cmdline, r.stdout  # the guest kernel's, not the host's
    r = opsctl(node.socket, "console", c.cid, "--container", c.cid, "--",
               "readlink", "/proc/self/ns/pid")
    assert r.returncode == 0 and r.stdout.strip() not in ("", guest_ns), (r, guest_ns)
    # Interactive, on a terminal: the guest's shell, a resize, Ctrl-C, its exit status.
    t = Pty("--socket", str(node.socket), "console", c.cid, "--", "/bin/sh", "-i")
    try:
        t.expect(rb"# ", timeout=60)
        t.type(b"stty size\n")
        t.expect(rb"\r\n30 100\r\n", timeout=60)
        t.resize(40, 120)
        time.sleep(2)  # opsctl -> opsd -> shim -> the guest's agent, under emulation
        t.type(b"stty size\n")
        t.expect(rb"\r\n40 120\r\n", timeout=60)
        t.type(b"sleep 100; echo not-interrupted\n")
        time.sleep(2)
        t.type(b"\x03")
        t.type(b"echo rc=$?\n")
        assert b"not-interrupted\r\n" not in t.expect(rb"rc=130", timeout=60)
        t.type(b"exit 3\n")
    finally:
        rc = t.close()
    assert rc == 3


def test_opsctl_moves_a_vm_pod_between_installed_releases(
        vm_containerd: Containerd, releases: ReleaseStore, versions: dict[str, str],
        node: Opsd) -> None:
    ctd, cid = vm_containerd, f"vm-rel-{os.getpid()}"
    a, b, broken, newimg = (versions[k] for k in ("A", "B", "BROKEN", "NEWIMG"))
    c = CtrCounter(ctd, cid, releases.get(a).shim_path, BUSYBOX, interval_us=10_000,
                   timeout=180)
    try:
        pid = c.running(timeout=BOOT_TIMEOUT_S)
        shim_pid = _at(node, c, a)["shim_pid"]
        vm_pid = int((c.sandbox.root / "vmm.pid").read_text())

        # A release that needs a newer guest image: refused before anything moves.
        r = opsctl(node.socket, "upgrade", "--to", newimg, "--sandbox", cid)
        assert r.returncode != 0, r.stdout
        assert "upgrade refused, no sandbox touched" in r.stderr, r.stderr
        assert f"release {newimg} needs guest image format 99 or newer" in r.stderr, r.stderr
        # The shim refuses it too when asked directly, before the agent freezes.
        with pytest.raises(GRPCError) as exc:
            shim_ops(c, lambda s: s.upgrade_agent(ops_pb.UpgradeAgentRequest(
                agent_path=str(releases.get(newimg).agent_path), to_version=newimg),
                timeout=60))
        assert exc.value.status is Status.FAILED_PRECONDITION, exc.value
        assert "needs guest image format 99" in str(exc.value.message), exc.value
        assert _at(node, c, a)["shim_pid"] == shim_pid
        agent_log = c.sandbox.agent_log.read_text(errors="replace")
        assert "passed its preflight" not in agent_log, agent_log[-2000:]
        c.flows()
        _console_in_the_guest(node, c)

        seen = []
        for _ in range(ROUNDS):
            for to, frm in ((b, a), (a, b)):
                out = _upgrade(node, c, to)
                # opsd saw the agent's version right after the shim's handoff.
                assert f"agent {frm} -> {to}" in out, out
                sb = _at(node, c, to)
                seen.append((to, sb["shim_pid"], [ln.strip() for ln in out.splitlines()
                                                  if " -> " in ln]))
                assert ctd.task(cid) == (pid, "RUNNING")
                c.flows(timeout=120)
        assert len({s[1] for s in seen}) == len(seen), seen  # a new shim each time
        print(f"\n[vm] {len(seen)} upgrades between installed releases {a} and {b}:")
        for to, spid, lines in seen:
            print(f"[vm]   -> {to} (shim pid {spid}): {'; '.join(lines)}")

        # BROKEN's agent crashes in the guest while resuming: it goes back to A.
        r = opsctl(node.socket, "upgrade", "--to", broken, "--sandbox", cid, timeout=600)
        assert r.returncode == 3, r.stdout + r.stderr + node.log()[-3000:]
        assert f"to {broken}: rolled-back" in r.stdout, r.stdout
        done = plan(node.socket)
        assert [t["state"] for t in done["targets"]] == ["rolled-back"], done
        assert f"agent {broken} failed and went back to {a}" in done["targets"][0]["message"]
        _at(node, c, a)
        agent_log = c.sandbox.agent_log.read_text(errors="replace")
        assert "simulated crash while resuming" in agent_log, agent_log[-3000:]
        c.flows(timeout=120)

        # After the handoffs the new shims relay console sessions too.
        r = opsctl(node.socket, "console", cid, "--", "echo", "after-upgrades")
        assert (r.returncode, r.stdout) == (0, "after-upgrades\n"), r
        # The same VM and task served throughout.
        assert int((c.sandbox.root / "vmm.pid").read_text()) == vm_pid
        assert ctd.task(cid) == (pid, "RUNNING")
        assert not disconnects(ctd, cid), disconnects(ctd, cid)
        assert c.finish() == 7, c.err.decode()
    finally:
        c.kill()
    n = c.assert_sequence()
    print(f"[vm] {n} numbers arrived in order across the upgrades")
    node.stop()  # its command line names the state root: not a leftover of the pod
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"


def test_a_template_clone_moves_between_releases(
        vm_containerd: Containerd, vm_image: image.Image, releases: ReleaseStore,
        versions: dict[str, str], node: Opsd, tmp_path: Path) -> None:
    """A pod started from a VM template (the first start builds it, the pod is
    its first clone) is handed between shims and agents like a cold-booted one:
    the new shim restores the clone's VMM record, the agent is staged and exec'd
    in the clone's guest."""
    ctd, cid = vm_containerd, f"vm-clone-{os.getpid()}"
    a, b = versions["A"], versions["B"]
    tpl = Path(tempfile.mkdtemp(prefix="keel-tpl-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                else None))
    cfg = write_keel_config(tmp_path / "clone.toml", vm_image, template=True,
                            template_dir=str(tpl))
    c = CtrCounter(ctd, cid, releases.get(a).shim_path, BUSYBOX, interval_us=10_000,
                   timeout=180, extra=("--runtime-config-path", str(cfg)))
    try:
        pid = c.running(timeout=BOOT_TIMEOUT_S)
        record = json.loads(c.sandbox.state.read_text())
        assert record["vmm"].get("template"), record["vmm"]  # a clone, not a cold boot
        vm_pid = int((c.sandbox.root / "vmm.pid").read_text())
        _at(node, c, a)
        for to, frm in ((b, a), (a, b)):
            out = _upgrade(node, c, to)
            assert f"agent {frm} -> {to}" in out, out
            _at(node, c, to)
            assert ctd.task(cid) == (pid, "RUNNING")
            c.flows(timeout=120)
        assert int((c.sandbox.root / "vmm.pid").read_text()) == vm_pid
        assert not disconnects(ctd, cid), disconnects(ctd, cid)
        assert c.finish() == 7, c.err.decode()
    finally:
        c.kill()
        shutil.rmtree(tpl, ignore_errors=True)
    print(f"\n[vm] template clone: {c.assert_sequence()} numbers in order across "
          f"{a} -> {b} -> {a}")
    node.stop()  # its command line names the state root: not a leftover of the pod
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"
