"""Driving the Keel shim (`io.containerd.keel.v2`, process backend) with `ctr`:
what the test_keel_ctr*.py modules and test_launcher.py share (and the
runtime-neutral `status` and `listed`, test_runc_baseline.py too)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.containerd import Containerd, wait_for

KEEL = "io.containerd.keel.v2"
POD_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# containerd's log lines when a task's shim cleanup went wrong (research
# containerd-shim.md 2.7, 5.2); "shim disconnected" itself is logged on
# every normal delete too, so only a disconnect of a *live* task counts.
CLEANUP_FAILED = ("failed to clean up after shim disconnected", "cleanup warnings")

task_of = Containerd.task

def status(ctd: Containerd, cid: str) -> str | None:
    task = task_of(ctd, cid)
    return None if task is None else task[1]


def listed(ctd: Containerd, kind: str, cid: str) -> bool:
    return cid in ctd.ctr(kind, "ls", "-q").stdout.split()


def pids(ctd: Containerd, cid: str) -> list[int]:
    """The PIDs `ctr task ps` lists for `cid`."""
    res = ctd.ctr("tasks", "ps", cid)
    assert res.returncode == 0, res.stderr
    return [int(line.split()[0]) for line in res.stdout.splitlines()[1:] if line.strip()]


def host_pids(ctd: Containerd, cmdline: str) -> list[int]:
    """Host PIDs of this containerd's processes whose command line is `cmdline`.

    (Task PIDs that ctr shows are the sandbox's own, as with a VM.)
    """
    return [pid for pid, cmd in ctd.leftovers().processes if cmd == cmdline]


def disconnects(log: str) -> int:
    return log.count('msg="shim disconnected"')


def bundle(ctd: Containerd, cid: str) -> Path:
    return ctd.paths.state / "io.containerd.runtime.v2.task" / ctd.namespace / cid


def address(ctd: Containerd, cid: str) -> str:
    """The shim address containerd recorded for `cid` (the bundle's `address` file)."""
    return (bundle(ctd, cid) / "address").read_text()


def shim_pid(ctd: Containerd, cid: str) -> int:
    """PID of the shim daemon serving `cid`: the process listening on its address."""
    sock = address(ctd, cid).removeprefix("unix://")
    inode = socket_inode(sock)
    want = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:  # the process is gone, or not ours to look at
            continue
        for fd in fds:
            try:  # a busy shim opens and closes fds while we look: skip that fd, not the process
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") == want:
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError(f"no process listens on {sock}")


def socket_inode(path: str) -> int:
    """The inode of the listening unix socket bound at `path` (from /proc/net/unix)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path:
                return int(fields[6])
    raise AssertionError(f"no unix socket bound at {path}")


def sandbox_dirs(ctd: Containerd) -> list[str]:
    base = ctd.paths.tmp_root / "keel" / "sandboxes"
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def run_detached(ctd: Containerd, image: str, cid: str, *args: str,
                  extra: tuple[str, ...] = ()) -> int:
    res = ctd.ctr("run", "-d", "--runtime", KEEL, *extra, image, cid, *args)
    assert res.returncode == 0, res.stderr
    task = task_of(ctd, cid)
    assert task is not None and task[0] > 0 and task[1] == "RUNNING", task
    return task[0]


def kill_and_remove(ctd: Containerd, cid: str, expect_status: int = 137) -> None:
    """SIGKILL task `cid`, wait for STOPPED, `task rm` and `container rm` it."""
    res = ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: status(ctd, cid) == "STOPPED", 15, f"{cid} to stop")
    res = ctd.ctr("tasks", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert f"exit with non-zero exit code {expect_status}" in res.stderr, res.stderr
    assert not listed(ctd, "tasks", cid)
    res = ctd.ctr("containers", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert not listed(ctd, "containers", cid)


def log_since(ctd: Containerd, offset: int) -> str:
    return ctd.log_text()[offset:]


def no_cleanup_failures(log: str) -> None:
    bad = [line for line in log.splitlines() if any(m in line for m in CLEANUP_FAILED)]
    assert not bad, "\n".join(bad)
