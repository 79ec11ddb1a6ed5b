"""What a pod's and a container's config ask of the runtime, seen from inside
the container: a read-only rootfs, the user and group, masked and read-only
paths, pod sysctls, resources updated while running, the log reopened after a
rotation, and an OOM kill.  The same calls and the same expected answers for
handler ``runc``, ``keel`` and ``keel-vm``."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from tests.containerd import wait_for
from tests.cri.client import pb
from tests.cri.kubelet import IDLE, POD_NAMESPACES, Kubelet, handlers

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

RUNNING = pb.ContainerState.CONTAINER_RUNNING
EXITED = pb.ContainerState.CONTAINER_EXITED
MIB = 1 << 20
#: One CRI log line: RFC 3339 time, stream, P(artial) or F(ull), content.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d) "
                      r"(stdout|stderr) ([PF]) (.*)")
#: Prints "<file> <value>" for the memory limit and "<file> <quota> <period>"
#: for the CFS quota of the cgroup the process is in, found the way a
#: cgroup-aware workload (a JVM, Go's automaxprocs) finds it: its path in
#: /proc/self/cgroup, below the root of the cgroup mount in mountinfo.  A v1
#: hierarchy shows memory.limit_in_bytes and cpu.cfs_{quota,period}_us, a v2
#: one memory.max and cpu.max.
CGROUP_LIMITS = r"""
cgfile() {  # $1: v1 controller, $2: its file, $3: the v2 file
  awk -v ctl="$1" -v f1="$2" -v f2="$3" '
    FILENAME == "/proc/self/cgroup" {
      split($0, p, ":"); if (("," p[2] ",") ~ ("," ctl ",")) v1 = p[3]; if (p[1] == "0") v2 = p[3]
      next }
    { for (i = 7; $i != "-"; i++) ; fs = $(i + 1); opts = "," $(i + 3) ","
      if (fs == "cgroup" && opts ~ ("," ctl ",")) { r1 = $4; m1 = $5 }
      if (fs == "cgroup2") { r2 = $4; m2 = $5 } }
    END { if (r1 == "/") r1 = ""; if (r2 == "/") r2 = ""
          if (m1 != "") print m1 substr(v1, length(r1) + 1) "/" f1
          else if (m2 != "") print m2 substr(v2, length(r2) + 1) "/" f2 }
  ' /proc/self/cgroup /proc/self/mountinfo
}
m=$(cgfile memory memory.limit_in_bytes memory.max)
c=$(cgfile cpu cpu.cfs_quota_us cpu.max)
echo "$m $(cat "$m")"
case $c in
  */cpu.max) echo "$c $(cat "$c")" ;;
  *) echo "$c $(cat "$c") $(cat "${c%/*}/cpu.cfs_period_us")" ;;
esac
"""


def security(**fields: Any) -> pb.LinuxContainerSecurityContext:
    """A container's security context as the kubelet sends it, plus `fields`."""
    return pb.LinuxContainerSecurityContext(namespace_options=POD_NAMESPACES, **fields)


def sh(kubelet: Kubelet, cid: str, script: str) -> pb.ExecSyncResponse:
    return kubelet.exec_sync(cid, "sh", "-c", script, timeout=60)


def log_lines(path: str) -> list[str]:
    """The stdout contents of a CRI log file; asserts every line's format."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    matches = [LOG_LINE.fullmatch(line) for line in lines]
    assert all(matches), f"not CRI log lines: {lines!r}"
    return [m[3] for m in matches if m and m[1] == "stdout" and m[2] == "F"]


def cgroup_limits(kubelet: Kubelet, cid: str) -> tuple[int, int, int]:
    """(memory limit, CFS quota, CFS period) as the container reads them from its cgroup."""
    r = sh(kubelet, cid, CGROUP_LIMITS)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    (memory_file, memory), (_, quota, period) = (line.split() for line in
                                                  r.stdout.decode().splitlines())
    assert os.path.basename(memory_file) in ("memory.limit_in_bytes", "memory.max"), memory_file
    return int(memory), int(quota), int(period)


@pytest.mark.parametrize("handler", handlers())
def test_readonly_rootfs(kubelet: Kubelet, handler: str) -> None:
    """readonly_rootfs: no write lands on the image's filesystem, /tmp (part of
    it in this image) included; the pod's /dev/shm tmpfs stays writable."""
    pod = kubelet.run_pod()
    config = kubelet.container_config("app", IDLE, security=security(readonly_rootfs=True))
    cid = kubelet.create(pod, "app", config=config)
    kubelet.start(cid)
    for path in ("/probe", "/tmp/probe", "/etc/probe"):
        r = sh(kubelet, cid, f"touch {path}")
        assert (r.exit_code, r.stderr) == (1, f"touch: {path}: Read-only file system\n".encode())
    r = sh(kubelet, cid, "echo data > /dev/shm/probe && cat /dev/shm/probe")
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"data\n", b"")
    r = sh(kubelet, cid, "awk '$2 == \"/\" { print $4 }' /proc/mounts")
    assert r.stdout.decode().split(",")[0] == "ro", r.stdout


@pytest.mark.parametrize("handler", handlers())
def test_run_as_user_and_group(kubelet: Kubelet, handler: str) -> None:
    """run_as_user/run_as_group: the container's own process and an exec in it
    run as 1234:5678, with 5678 as their only group."""
    pod = kubelet.run_pod()
    config = kubelet.container_config(
        "app", ("sh", "-c", "echo ids $(id -u) $(id -g) $(id -G); " + IDLE[2]),
        security=security(run_as_user=pb.Int64Value(value=1234),
                          run_as_group=pb.Int64Value(value=5678)))
    cid = kubelet.create(pod, "app", config=config)
    kubelet.start(cid)
    log_path = kubelet.status(cid).status.log_path
    logged = wait_for(lambda: [line for line in log_lines(log_path) if line.startswith("ids ")],
                      30, "the container to log its ids")
    assert logged == ["ids 1234 5678 5678"]
    r = sh(kubelet, cid, "id -u; id -g; id -G")
    assert (r.exit_code, r.stdout) == (0, b"1234\n5678\n5678\n"), r.stderr
    # PID 1 (the container's command), real, effective, saved and fs ids.
    r = sh(kubelet, cid, "grep -E '^(Uid|Gid):' /proc/1/status")
    assert r.stdout == b"Uid:\t1234\t1234\t1234\t1234\nGid:\t5678\t5678\t5678\t5678\n", r.stdout


@pytest.mark.parametrize("handler", handlers())
def test_masked_and_readonly_paths(kubelet: Kubelet, handler: str) -> None:
    """masked_paths: a file reads empty (it is /dev/null), a directory is an
    empty read-only tmpfs; readonly_paths: writes under them fail, while the
    rest of the (writable) rootfs takes them."""
    pod = kubelet.run_pod()
    config = kubelet.container_config("app", IDLE, security=security(
        masked_paths=["/proc/keys", "/etc/group", "/usr"],
        readonly_paths=["/proc/sys", "/var"]))
    cid = kubelet.create(pod, "app", config=config)
    kubelet.start(cid)
    r = sh(kubelet, cid, "stat -c '%n %F %t,%T' /proc/keys /etc/group; cat /etc/group")
    assert (r.exit_code, r.stdout) == (0, b"/proc/keys character special file 1,3\n"
                                          b"/etc/group character special file 1,3\n"), r.stderr
    r = sh(kubelet, cid, "stat -f -c %T /usr; ls -A /usr; touch /usr/probe")
    assert (r.exit_code, r.stdout, r.stderr) == (
        1, b"tmpfs\n", b"touch: /usr/probe: Read-only file system\n")
    r = sh(kubelet, cid, "echo keel > /proc/sys/kernel/domainname")
    assert (r.exit_code, r.stderr) == (
        1, b"sh: can't create /proc/sys/kernel/domainname: Read-only file system\n")
    r = sh(kubelet, cid, "touch /var/probe")
    assert (r.exit_code, r.stderr) == (1, b"touch: /var/probe: Read-only file system\n")
    # Only those paths: the rootfs beside them is writable, /proc/sys readable.
    r = sh(kubelet, cid, "touch /home/probe && cat /proc/sys/kernel/hostname")
    assert (r.exit_code, r.stdout) == (0, f"{pod.config.hostname}\n".encode()), r.stderr


@pytest.mark.parametrize("handler", handlers())
def test_pod_sysctls(kubelet: Kubelet, handler: str) -> None:
    """Namespaced pod sysctls (an IPC one and a network one, both off their
    defaults 0 and 1024) are what the pod's containers read in /proc/sys."""
    config = kubelet.pod_config()
    config.linux.sysctls = {"kernel.shm_rmid_forced": "1",
                            "net.ipv4.ip_unprivileged_port_start": "1000"}
    pod = kubelet.run_pod(config=config)
    cid = kubelet.run(pod, "app")
    r = sh(kubelet, cid, "cat /proc/sys/kernel/shm_rmid_forced"
                         " /proc/sys/net/ipv4/ip_unprivileged_port_start")
    assert (r.exit_code, r.stdout) == (0, b"1\n1000\n"), r.stderr


@pytest.mark.parametrize("handler", handlers())
def test_update_container_resources(kubelet: Kubelet, handler: str) -> None:
    """UpdateContainerResources on a running container: the workload reads the
    new memory limit and CFS quota from its cgroup, stays running, and
    ContainerStats measures memory against the new limit."""
    pod = kubelet.run_pod()
    config = kubelet.container_config("app", IDLE, resources=pb.LinuxContainerResources(
        memory_limit_in_bytes=64 * MIB, cpu_period=100_000, cpu_quota=50_000))
    cid = kubelet.create(pod, "app", config=config)
    kubelet.start(cid)
    assert cgroup_limits(kubelet, cid) == (64 * MIB, 50_000, 100_000)

    kubelet.update_resources(cid, pb.LinuxContainerResources(
        memory_limit_in_bytes=96 * MIB, cpu_period=100_000, cpu_quota=20_000))
    assert cgroup_limits(kubelet, cid) == (96 * MIB, 20_000, 100_000)
    assert kubelet.status(cid).status.state == RUNNING
    stats = kubelet.stats(cid)
    memory = stats.memory
    assert 0 < memory.working_set_bytes.value < 96 * MIB
    # containerd's available_bytes: the limit less the working set.
    assert memory.available_bytes.value + memory.working_set_bytes.value == 96 * MIB
    assert stats.cpu.usage_core_nano_seconds.value > 0
    # Still a working container.
    assert sh(kubelet, cid, "echo ok").stdout == b"ok\n"


@pytest.mark.parametrize("handler", handlers())
def test_reopen_container_log(kubelet: Kubelet, handler: str) -> None:
    """ReopenContainerLog after a rotation (the log renamed, as logrotate
    does): new lines go to a new file at the log path, the lines before stay
    in the renamed one, none is lost or written twice."""
    pod = kubelet.run_pod()
    writer = ('trap "exit 0" TERM; i=0; '
              'while :; do i=$((i+1)); echo "line $i"; sleep 0.1 & wait $!; done')
    cid = kubelet.run(pod, "writer", ("sh", "-c", writer))
    log_path = kubelet.status(cid).status.log_path

    wait_for(lambda: len(log_lines(log_path)) >= 3, 30, "three lines in the log")
    rotated = log_path + ".1"
    os.rename(log_path, rotated)
    kubelet.reopen_log(cid)
    wait_for(lambda: os.path.exists(log_path) and len(log_lines(log_path)) >= 3, 30,
             "three lines in the reopened log")
    kubelet.stop(cid, timeout=10)

    old, new = log_lines(rotated), log_lines(log_path)
    numbers = [int(line.removeprefix("line ")) for line in old + new]
    assert numbers == list(range(1, len(numbers) + 1)), (old, new)
    assert len(old) >= 3 and len(new) >= 3
    assert kubelet.status(cid).status.log_path == log_path


@pytest.mark.parametrize("handler", handlers())
def test_oom_killed(kubelet: Kubelet, handler: str) -> None:
    """A container that touches 200 MiB under a 32 MiB limit is killed by the
    kernel's OOM killer, and CRI reports it as OOMKilled with exit code 137
    (Keel: the agent reads the cgroup's oom_kill count, agent/_oom.py, and the
    shim publishes /tasks/oom before the exit)."""
    pod = kubelet.run_pod()
    config = kubelet.container_config(
        "hog", ("sh", "-c", "echo allocating; exec dd if=/dev/zero of=/dev/null bs=200M count=1"),
        resources=pb.LinuxContainerResources(memory_limit_in_bytes=32 * MIB))
    cid = kubelet.create(pod, "hog", config=config)
    kubelet.start(cid)
    status = kubelet.wait_state(cid, EXITED, timeout=60)
    assert log_lines(status.log_path) == ["allocating"]  # dd never finished its read
    assert status.exit_code == 137, status
    assert status.reason == "OOMKilled", status
