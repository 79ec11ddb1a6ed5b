"""``ctr run --runtime io.containerd.keel.v2`` through a VM: a real containerd,
the real shim (``[shim] backend = "qemu"`` in its ``KEEL_CONFIG``), a real
qemu (KVM where usable, TCG here) and the agent in the guest.

Each test boots one VM; the ``vm_containerd`` fixture fails the module if a
shim, a qemu, a mount or a socket outlives the tests.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import version as shim_version
from shim.dirs import SandboxDir
from shim.vmm.qemu import image
from tests.containerd import Containerd, rss_mib, wait_for
from tests.vm.conftest import KEEL_RUNTIME, vms_of, write_keel_config

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.requires_root]

BUSYBOX = "localhost/keel/busybox:test"
#: A VM boots in ~5-10 s under TCG; a loaded 2-core host can take several times that.
CTR_TIMEOUT_S = 240.0
_ids = itertools.count(1)


def _cid(tag: str) -> str:
    return f"vm-{tag}-{os.getpid()}-{next(_ids)}"


def _guest_kernel(img: image.Image) -> str:
    """The kernel release of the guest image (``linux-image-<release>``)."""
    package = str(img.manifest["inputs"]["kernel"]["package"])  # type: ignore[index]
    return package.removeprefix("linux-image-")


_task = Containerd.task


def _sandbox_dir(ctd: Containerd, cid: str) -> Path:
    return ctd.paths.tmp_root / "keel" / "sandboxes" / cid


def _shim_log(ctd: Containerd, cid: str) -> str:
    """The shim's log lines about *cid*'s sandbox (the shim logs into containerd's log)."""
    return "\n".join(line for line in ctd.log_text().splitlines()
                     if "runtime=keel" in line and cid in line)


def _why(ctd: Containerd, cid: str) -> str:
    """What a failed run shows: the shim's log, the guest console (the agent's log) and qemu's."""
    sandbox = _sandbox_dir(ctd, cid)
    shown = [_shim_log(ctd, cid)[-3000:]]
    for name, what in (("agent.log", "guest console"), ("vmm.log", "qemu's log")):
        path = sandbox / name
        text = path.read_text(errors="replace")[-3000:] if path.exists() else "(none)"
        shown.append(f"--- {what} ---\n{text}")
    return "\n".join(shown)


def _no_leftovers(ctd: Containerd, what: str) -> None:
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind by {what}:\n{found}"


def test_run_rm_output_and_exit_code(vm_containerd: Containerd, vm_image: image.Image) -> None:
    ctd, cid = vm_containerd, _cid("rm")
    res = ctd.ctr("run", "--rm", "--runtime", KEEL_RUNTIME, BUSYBOX, cid, "sh", "-c",
                  "echo hello; echo err >&2; uname -r; exit 3", timeout=CTR_TIMEOUT_S)
    assert (res.returncode, res.stderr) == (3, "err\n"), (res, _why(ctd, cid))
    hello, kernel = res.stdout.splitlines()
    # The process ran on the guest's kernel, not the host's.
    assert (hello, kernel) == ("hello", _guest_kernel(vm_image)), res.stdout
    assert kernel != os.uname().release
    log = _shim_log(ctd, cid)
    accel = re.search(r"qemu pid \d+, microvm/(kvm|tcg)", log)
    assert accel, log[-3000:]
    # The agent in the VM names the release its image was built from: this one.
    release = shim_version()
    assert release != "0+unknown"
    assert re.search(rf"agent {re.escape(release)} ready \(API", log), log[-3000:]
    print(f"[vm] ctr run --rm through a microvm/{accel.group(1)} sandbox, agent {release}: ok")
    assert cid not in ctd.ctr("containers", "ls", "-q").stdout.split()
    _no_leftovers(ctd, "ctr run --rm")


@pytest.mark.parametrize("ask", [("--net-host",),
                                 ("--mount", "type=bind,src=/tmp,dst=/vol,options=rbind:rslave")],
                         ids=["host-network", "rslave-volume"])
def test_what_a_vm_cannot_give_is_refused(vm_containerd: Containerd, ask: tuple[str, ...]) -> None:
    """A pod asking to share the host's network or mounts gets a clear
    InvalidArgument, not a VM that quietly isolates it; nothing is left."""
    ctd, cid = vm_containerd, _cid("refused")
    res = ctd.ctr("run", "--rm", "--runtime", KEEL_RUNTIME, *ask, BUSYBOX, cid, "true",
                  timeout=CTR_TIMEOUT_S)
    assert res.returncode != 0
    assert ("a VM sandbox cannot share the host's namespaces" in res.stderr
            or "asks for rslave mount propagation" in res.stderr), res.stderr
    ctd.ctr("containers", "rm", cid)
    assert cid not in ctd.ctr("containers", "ls", "-q").stdout.split()
    _no_leftovers(ctd, f"a refused {' '.join(ask)}")


def test_detached_exec_rootfs_write_kill_delete(vm_containerd: Containerd, vm_image: image.Image,
                                                tmp_path: Path) -> None:
    ctd, cid = vm_containerd, _cid("d")
    # Free page reporting is opt-in; this sandbox has it (checked below).
    config = write_keel_config(tmp_path / "fpr.toml", vm_image, free_page_reporting=True)
    res = ctd.ctr("run", "-d", "--runtime", KEEL_RUNTIME, "--runtime-config-path", str(config),
                  BUSYBOX, cid, "sh", "-c",
                  "echo written-in-the-vm > /data.txt; exec sleep 1000", timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, (res, _why(ctd, cid))
    task = wait_for(lambda: _task(ctd, cid), 30, f"{cid} to be listed")
    assert task[0] > 0 and task[1] == "RUNNING", task
    sandbox = _sandbox_dir(ctd, cid)
    assert len(vms_of(sandbox)) == 1, "one qemu for the sandbox"

    res = ctd.ctr("tasks", "exec", "--exec-id", "e1", cid, "sh", "-c",
                  "echo from-exec; echo $$; exit 4", timeout=CTR_TIMEOUT_S)
    assert res.returncode == 4, res
    out = res.stdout.splitlines()
    assert out[0] == "from-exec" and int(out[1]) > 1, res.stdout  # exec is not PID 1
    # The container's write to its rootfs (9p share -> the host's snapshot) is
    # seen by a later exec, and on the host.
    res = ctd.ctr("tasks", "exec", "--exec-id", "e2", cid, "sh", "-c",
                  "for i in $(seq 100); do [ -s /data.txt ] && break; sleep 0.1; done; "
                  "cat /data.txt", timeout=CTR_TIMEOUT_S)
    assert (res.returncode, res.stdout) == (0, "written-in-the-vm\n"), res
    snapshots = ctd.paths.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    on_host = [p.read_text() for p in snapshots.glob("*/fs/data.txt")]
    assert on_host == ["written-in-the-vm\n"], on_host

    # Free page reporting (virtio-balloon, on for this sandbox): 60 MiB the
    # container writes to its /dev/shm (a 64 MiB tmpfs) and removes again go
    # back to the host.
    [qemu] = vms_of(sandbox)
    before = rss_mib(qemu)
    res = ctd.ctr("tasks", "exec", "--exec-id", "e3", cid, "sh", "-c",
                  "dd if=/dev/zero of=/dev/shm/big bs=1M count=60 2>/dev/null && "
                  "echo $(($(wc -c < /dev/shm/big) >> 20))", timeout=CTR_TIMEOUT_S)
    assert (res.returncode, res.stdout) == (0, "60\n"), res
    used = rss_mib(qemu)
    assert used >= before + 40, (before, used)  # the guest touched new pages for it
    res = ctd.ctr("tasks", "exec", "--exec-id", "e4", cid, "rm", "/dev/shm/big",
                  timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, res
    wait_for(lambda: rss_mib(qemu) < used - 40, 30,
             f"qemu's RSS to drop from {used} MiB (it is {rss_mib(qemu)} MiB)")
    print(f"[vm] qemu RSS: {before} MiB idle, {used} MiB with 60 MiB in the guest's tmpfs, "
          f"{rss_mib(qemu)} MiB after it was removed")

    res = ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: (_task(ctd, cid) or (0, ""))[1] == "STOPPED", 60, f"{cid} to stop")
    res = ctd.ctr("tasks", "rm", cid, timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0 and "exit with non-zero exit code 137" in res.stderr, res
    res = ctd.ctr("containers", "rm", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not vms_of(sandbox), 20, "the sandbox's qemu to exit")
    _no_leftovers(ctd, "run -d / exec / kill / rm")


def test_run_tty(vm_containerd: Containerd) -> None:
    ctd, cid = vm_containerd, _cid("tty")
    res = ctd.ctr_pty("run", "--rm", "-t", "--runtime", KEEL_RUNTIME, BUSYBOX, cid, "sh",
                      input="tty; echo $((6*7)); exit 7\n", timeout=CTR_TIMEOUT_S)
    lines = res.output.replace("\r", "").splitlines()
    assert res.returncode == 7, (res.output, _why(ctd, cid))
    assert "/dev/pts/0" in lines and "42" in lines, res.output
    _no_leftovers(ctd, "ctr run -t")


def test_vm_size_follows_the_cgroup_limits(vm_containerd: Containerd) -> None:
    """--cpus 0.5 --memory-limit 256 MiB: the base (1 vCPU, 512 MiB) plus one
    vCPU (0.5 rounded up) and 256 MiB, as the guest sees it."""
    ctd, cid = vm_containerd, _cid("size")
    res = ctd.ctr("run", "--rm", "--runtime", KEEL_RUNTIME, "--cpus", "0.5",
                  "--memory-limit", str(256 << 20), BUSYBOX, cid, "sh", "-c",
                  "cat /sys/devices/system/cpu/online; grep MemTotal /proc/meminfo",
                  timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, (res, _why(ctd, cid))
    online, meminfo = res.stdout.splitlines()
    mem_mib = int(meminfo.split()[1]) >> 10
    print(f"[vm] --cpus 0.5 --memory-limit 256M: guest CPUs {online}, MemTotal {mem_mib} MiB")
    assert online == "0-1", res.stdout
    # 768 MiB less what the guest kernel keeps; 512 MiB alone could not give this.
    assert 640 < mem_mib <= 768, res.stdout
    assert re.search(r"qemu pid \d+, microvm/\w+, 2 vCPU, 768 MiB", _shim_log(ctd, cid))
    _no_leftovers(ctd, "ctr run --cpus --memory-limit")


def _qmp_stop(qmp: Path) -> None:
    """Pause the VM's vCPUs over its QMP socket: a guest that answers nothing."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(qmp))
        replies = sock.makefile("rb")
        assert b"QMP" in replies.readline()  # the greeting
        for command in ("qmp_capabilities", "stop"):
            sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
            reply = json.loads(replies.readline())
            while "event" in reply:  # asynchronous events (STOP) come between replies
                reply = json.loads(replies.readline())
            assert "return" in reply, reply


def test_frozen_guest_is_killed_without_its_agent(vm_containerd: Containerd) -> None:
    """A guest that answers nothing (its vCPUs paused): SIGKILL still ends the
    task.  The shim's SignalProcess misses its deadline, the shim stops the VM
    through qemu, and the container is reported killed (137)."""
    ctd, cid = vm_containerd, _cid("frozen")
    res = ctd.ctr("run", "-d", "--runtime", KEEL_RUNTIME, BUSYBOX, cid, "sleep", "1000",
                  timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, (res, _why(ctd, cid))
    sandbox = _sandbox_dir(ctd, cid)
    try:
        wait_for(lambda: (_task(ctd, cid) or (0, ""))[1] == "RUNNING", 60, f"{cid} to run")
        _qmp_stop(SandboxDir(sandbox).qmp)
        res = ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid, timeout=60)
        assert res.returncode == 0, res
        try:
            wait_for(lambda: (_task(ctd, cid) or (0, "STOPPED"))[1] == "STOPPED", 60,
                     f"{cid} to stop")
        except TimeoutError as exc:
            raise AssertionError(_why(ctd, cid)) from exc
        log = _shim_log(ctd, cid)
        assert "the agent did not take SIGKILL" in log, log
        assert "reporting its processes as exited (137)" in log, log
        res = ctd.ctr("tasks", "rm", cid, timeout=CTR_TIMEOUT_S)
        assert res.returncode == 0 and "exit with non-zero exit code 137" in res.stderr, res
    finally:
        ctd.ctr("tasks", "rm", "-f", cid, timeout=CTR_TIMEOUT_S)
        ctd.ctr("containers", "rm", cid)
    wait_for(lambda: not vms_of(sandbox), 20, "the sandbox's qemu to exit")
    _no_leftovers(ctd, "run -d / frozen guest / kill / rm")


@pytest.fixture
def q35_config(vm_containerd: Containerd, vm_image: image.Image) -> Iterator[None]:
    """New sandboxes of ``vm_containerd`` are q35 VMs (hotplug) while the test runs."""
    path = vm_containerd.paths.tmp_root / "keel.toml"
    saved = path.read_text()
    write_keel_config(path, vm_image, machine="q35", max_vcpus=2, max_memory_mib=1024,
                      memory_slots=2)
    try:
        yield
    finally:
        path.write_text(saved)


def test_update_hotplugs_vcpus_and_memory(vm_containerd: Containerd, q35_config: None) -> None:
    ctd, cid = vm_containerd, _cid("upd")
    show = "cat /sys/devices/system/cpu/online; grep MemTotal /proc/meminfo"
    res = ctd.ctr("run", "-d", "--runtime", KEEL_RUNTIME, BUSYBOX, cid, "sleep", "1000",
                  timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, (res, _why(ctd, cid))
    try:
        wait_for(lambda: (_task(ctd, cid) or (0, ""))[1] == "RUNNING", 60, f"{cid} to run")
        before = ctd.ctr("tasks", "exec", "--exec-id", "b", cid, "sh", "-c", show,
                         timeout=CTR_TIMEOUT_S)
        assert before.returncode == 0, before
        assert before.stdout.split()[0] == "0", before.stdout

        ctd.update_task(cid, {"cpu": {"quota": 50000, "period": 100000},
                           "memory": {"limit": 256 << 20}})
        after = ""
        for i in range(30):  # the guest onlines the new CPU within seconds
            res = ctd.ctr("tasks", "exec", "--exec-id", f"a{i}", cid, "sh", "-c", show,
                          timeout=CTR_TIMEOUT_S)
            assert res.returncode == 0, res
            after = res.stdout
            if after.split()[0] == "0-1":
                break
        online = after.split()[0]
        assert online == "0-1", after
        grown = int(after.split()[-2]) - int(before.stdout.split()[-2])
        print(f"[vm] Update: vCPUs 0 -> {online}, MemTotal +{grown >> 10} MiB")
        assert 200 << 10 <= grown <= 256 << 10, (before.stdout, after)
        assert "grown to 2 vCPU / 768 MiB" in _shim_log(ctd, cid), _why(ctd, cid)
    except BaseException:
        print(_why(ctd, cid))  # the guest console: what the guest did after the hotplug
        raise
    finally:
        ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        wait_for(lambda: (_task(ctd, cid) or (0, "STOPPED"))[1] == "STOPPED", 60, f"{cid} to stop")
        ctd.ctr("tasks", "rm", cid, timeout=CTR_TIMEOUT_S)
        ctd.ctr("containers", "rm", cid)
    _no_leftovers(ctd, "run -d / Update / kill / rm")
