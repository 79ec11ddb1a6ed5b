"""Live upgrades of a VM sandbox's shim and agent while its container prints a sequence.

A ``ctr run --rm`` in the foreground runs a counter in a VM; ctr's stdout
is read by the test, so every number crosses the guest agent, the
virtio-serial port, the shim and containerd's fifos.  Shim handoffs (to
another release and back: releases built as in
tests/integration/test_live_upgrade.py; the new shim re-attaches to the
running qemu and dials the serial port the old one let go) alternate with
in-place agent upgrades (the agent, PID 1 of the guest, execs the release
the image installed under ``/opt/keel``, keeping its serial ports; the
shim redials and its pumps resume at their offsets).  The guest image
holds one release, the working tree's, so the agent "upgrades" to the
same code: what is tested is the hand-over, not a version change.  At the
end every number arrived exactly once and in order, the task kept its pid,
containerd never saw a disconnect, and the exit code is the container's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from grpclib.client import Channel

from agent.api import ops_pb
from shim.dirs import SandboxDir
from shim.vmm.qemu import image
from tests.containerd import Containerd, wait_for
from tests.integration.live_upgrade import make_release
from tests.vm.conftest import REPO
from tests.workloads import STOPPER, counter
from upgrade.releases import Release, ReleaseStore

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.requires_root]

BUSYBOX = "localhost/keel/busybox:test"
A, B = "0.1.1", "0.1.2"
#: Prints 0, 1, 2... every ~5 ms until STOPPER runs, then "end"; exits 7.
COUNTER = counter(5000)
BOOT_TIMEOUT_S = 240.0
T = TypeVar("T")


@pytest.fixture(scope="module")
def releases() -> Iterator[ReleaseStore]:
    with tempfile.TemporaryDirectory(prefix="keel-vm-releases-") as tmp:
        store = ReleaseStore(Path(tmp))
        for version in (A, B):
            make_release(store.root, version, REPO)
        yield store


class Counter:
    """The counter under ``ctr run --rm`` in the foreground, its output read by threads."""

    def __init__(self, ctd: Containerd, cid: str, release: Release) -> None:
        self.ctd, self.cid = ctd, cid
        self.proc = subprocess.Popen(
            [*ctd.ctr_prefix(), "run", "--rm", "--runtime", str(release.shim_path), BUSYBOX, cid,
             "sh", "-c", COUNTER],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=_drain, args=(f, buf), daemon=True)
                         for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()
        self.sandbox = SandboxDir.of(ctd.paths.tmp_root / "keel", cid)

    def lines(self) -> int:
        return self.out.count(b"\n")

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"ctr run exited with {self.proc.returncode}: {self.err.decode()}")

    def flows(self, more: int = 20, timeout: float = 60.0) -> None:
        target = self.lines() + more
        wait_for(lambda: self._check_running() or self.lines() >= target, timeout,
                 f"{more} more lines from {self.cid} (at {self.lines()})")

    def finish(self) -> int:
        res = self.ctd.ctr("tasks", "exec", "--exec-id", "stop", self.cid, *STOPPER,
                           timeout=120)
        assert res.returncode == 0, res
        rc = self.proc.wait(120)
        for t in self._readers:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.ctd.ctr("tasks", "kill", "-s", "SIGKILL", self.cid)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def numbers(self) -> list[str]:
        lines = self.out.decode().split("\n")
        assert lines[-2:] == ["end", ""], lines[-5:]
        return lines[:-2]


def _drain(f: Any, into: bytearray) -> None:
    while chunk := f.read1(65536):
        into += chunk


_task = Containerd.task


def _disconnects(ctd: Containerd, cid: str) -> list[str]:
    return [line for line in ctd.log_text().splitlines()
            if f"id={cid}" in line and ("shim disconnected" in line or "dead shim" in line)]


def _ops(c: Counter, call: Callable[[ops_pb.ShimOpsStub], Awaitable[T]]) -> T:
    async def go() -> T:
        channel = Channel(path=str(c.sandbox.ops_socket))
        try:
            return await call(ops_pb.ShimOpsStub(channel))
        finally:
            channel.close()
    return asyncio.run(go())


def _status(c: Counter) -> ops_pb.StatusResponse:
    return _ops(c, lambda s: s.status(ops_pb.StatusRequest(), timeout=30))


def test_shim_and_agent_upgrade_while_a_vm_container_prints(
        vm_containerd: Containerd, vm_image: image.Image, releases: ReleaseStore) -> None:
    ctd, cid = vm_containerd, f"vm-up-{os.getpid()}"
    rel = {v: releases.get(v) for v in (A, B)}
    guest_release = str(vm_image.manifest["agent_dir"])  # the guest path of the image's release
    c = Counter(ctd, cid, rel[A])
    try:
        def running() -> tuple[int, str] | None:
            c._check_running()
            task = _task(ctd, cid)
            return task if task is not None and task[1] == "RUNNING" else None

        pid = wait_for(running, BOOT_TIMEOUT_S, f"{cid} to run")[0]
        c.flows(timeout=BOOT_TIMEOUT_S)
        st = _status(c)
        assert (st.shim_version, st.backend) == (A, "qemu"), st
        assert st.accel in ("kvm", "tcg"), st  # what `opsctl ls` shows as qemu/<accel>
        agent_version = st.agent_version
        vm_pid = int((c.sandbox.root / "vmm.pid").read_text())

        freezes, gaps = [], []
        for to, frm in ((rel[B], A), (rel[A], B)):
            before = _status(c).shim_pid
            r = _ops(c, lambda s, to=to: s.upgrade_shim(  # type: ignore[misc]
                ops_pb.UpgradeShimRequest(shim_path=str(to.shim_path)), timeout=120))
            assert (r.from_version, r.to_version) == (frm, to.version), r
            assert r.new_shim_pid not in (0, before)
            freezes.append(r.freeze_ms)
            st = _status(c)
            assert (st.shim_version, st.shim_pid) == (to.version, r.new_shim_pid), st
            assert [(x.id, x.pid, x.status) for x in st.containers] == [(cid, pid, "running")], st
            c.flows()
            assert _task(ctd, cid) == (pid, "RUNNING")

            # The agent execs in place (same PID 1, same VM) under the new shim.
            a = _ops(c, lambda s: s.upgrade_agent(ops_pb.UpgradeAgentRequest(
                agent_path=guest_release), timeout=180))
            assert (a.from_version, a.to_version) == (agent_version, agent_version), a
            assert not a.rolled_back and a.message == "upgraded", a
            gaps.append(round(a.gap_s * 1000))
            st = _status(c)
            assert (st.shim_version, st.agent_version) == (to.version, agent_version), st
            assert [(x.id, x.pid, x.status) for x in st.containers] == [(cid, pid, "running")], st
            c.flows(timeout=120)
            assert _task(ctd, cid) == (pid, "RUNNING")
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
    numbers = c.numbers()
    bad = next((i for i, n in enumerate(numbers) if n != str(i)), None)
    assert bad is None, f"line {bad} is {numbers[bad]!r}: {numbers[max(bad - 3, 0):bad + 3]}"
    assert len(numbers) > 100, len(numbers)
    print(f"[vm] {len(numbers)} numbers arrived in order across the upgrades")
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"
