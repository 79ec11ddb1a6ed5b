"""Live upgrades of a VM sandbox's shim and agent while its container prints a sequence.

A ``ctr run --rm`` in the foreground runs a counter in a VM
(tests/workloads.py ``CtrCounter``); ctr's stdout is read by the test, so
every number crosses the guest agent, the virtio-serial port, the shim and
containerd's fifos.  Shim handoffs (to another release and back: releases
built as in tests/integration/test_live_upgrade.py; the new shim
re-attaches to the running qemu and dials the serial port the old one let
go) alternate with in-place agent upgrades (the agent, PID 1 of the guest,
execs the release the image installed under ``/opt/keel``, keeping its
serial ports; the shim redials and its pumps resume at their offsets).
The guest image holds one release, the working tree's, so the agent
"upgrades" to the same code: what is tested is the hand-over, not a
version change.  At the end every number arrived exactly once and in
order, the task kept its pid, containerd never saw a disconnect, and the
exit code is the container's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import ops_pb
from shim.vmm.qemu import image
from tests.containerd import Containerd
from tests.integration.live_upgrade import make_release, shim_ops, status
from tests.vm.conftest import REPO
from tests.workloads import CtrCounter
from upgrade.releases import ReleaseStore

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.requires_root]

BUSYBOX = "localhost/keel/busybox:test"
A, B = "0.1.1", "0.1.2"
BOOT_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def releases() -> Iterator[ReleaseStore]:
    with tempfile.TemporaryDirectory(prefix="keel-vm-releases-") as tmp:
        store = ReleaseStore(Path(tmp))
        for version in (A, B):
            make_release(store.root, version, REPO)
        yield store


def _disconnects(ctd: Containerd, cid: str) -> list[str]:
    return [line for line in ctd.log_text().splitlines()
            if f"id={cid}" in line and ("shim disconnected" in line or "dead shim" in line)]


def test_shim_and_agent_upgrade_while_a_vm_container_prints(
        vm_containerd: Containerd, vm_image: image.Image, releases: ReleaseStore) -> None:
    ctd, cid = vm_containerd, f"vm-up-{os.getpid()}"
    rel = {v: releases.get(v) for v in (A, B)}
    guest_release = str(vm_image.manifest["agent_dir"])  # the guest path of the image's release
    c = CtrCounter(ctd, cid, rel[A].shim_path, BUSYBOX, interval_us=5000, timeout=120)
    try:
        pid = c.running(timeout=BOOT_TIMEOUT_S)
        st = status(c, timeout=30)
        assert (st.shim_version, st.backend) == (A, "qemu"), st
        assert st.accel in ("kvm", "tcg"), st  # what `opsctl ls` shows as qemu/<accel>
        agent_version = st.agent_version
        vm_pid = int((c.sandbox.root / "vmm.pid").read_text())

        freezes, gaps = [], []
        for to, frm in ((rel[B], A), (rel[A], B)):
            before = status(c, timeout=30).shim_pid
            r = shim_ops(c, lambda s, to=to: s.upgrade_shim(  # type: ignore[misc]
                ops_pb.UpgradeShimRequest(shim_path=str(to.shim_path)), timeout=120))
            assert (r.from_version, r.to_version) == (frm, to.version), r
            assert r.new_shim_pid not in (0, before)
            freezes.append(r.freeze_ms)
            st = status(c, timeout=30)
            assert (st.shim_version, st.shim_pid) == (to.version, r.new_shim_pid), st
            assert [(x.id, x.pid, x.status) for x in st.containers] == [(cid, pid, "running")], st
            c.flows()
            assert ctd.task(cid) == (pid, "RUNNING")

            # The agent execs in place (same PID 1, same VM) under the new shim.
            a = shim_ops(c, lambda s: s.upgrade_agent(ops_pb.UpgradeAgentRequest(
                agent_path=guest_release), timeout=180))
            assert (a.from_version, a.to_version) == (agent_version, agent_version), a
            assert not a.rolled_back and a.message == "upgraded", a
            gaps.append(round(a.gap_s * 1000))
            st = status(c, timeout=30)
            assert (st.shim_version, st.agent_version) == (to.version, agent_version), st
            assert [(x.id, x.pid, x.status) for x in st.containers] == [(cid, pid, "running")], st
            c.flows(timeout=120)
            assert ctd.task(cid) == (pid, "RUNNING")
        # The same VM served throughout.
        assert int((c.sandbox.root / "vmm.pid").read_text()) == vm_pid
        agent_log = (c.sandbox.root / "agent.log").read_text(errors="replace")
        assert agent_log.count("resumed and ready") == 2, agent_log[-3000:]
        print(f"\n[vm] 2 shim handoffs of a VM sandbox: freeze ms {freezes}; "
              f"2 agent upgrades over virtio-serial: gap ms {gaps}")

        assert not _disconnects(ctd, cid), _disconnects(ctd, cid)
        assert c.finish() == 7, c.err.decode()
    finally:
        c.kill()
    n = c.assert_sequence()
    print(f"[vm] {n} numbers arrived in order across the upgrades")
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"
