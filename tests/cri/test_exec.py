"""ExecSync, what the containers of one pod share, and container stats: the
same calls and the same expected answers for handler ``runc`` and handler
``keel``."""

from __future__ import annotations

import time

import pytest
from grpclib.const import Status

from tests.containerd import wait_for
from tests.cri.client import error_of, pb
from tests.cri.kubelet import IDLE, SERVER, Kubelet, handlers
from tests.cri.network import GATEWAY, POD_SUBNET

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

RUNNING = pb.ContainerState.CONTAINER_RUNNING


@pytest.mark.parametrize("handler", handlers())
def test_exec_sync_exit_code_and_output(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    cid = kubelet.run(pod, "app")
    r = kubelet.exec_sync(cid, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = kubelet.exec_sync(cid, "true")
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"", b"")
    # The pod's hostname and address, seen from inside.
    r = kubelet.exec_sync(cid, "sh", "-c", "hostname; ip -4 -o addr show dev eth0")
    hostname, addr = r.stdout.decode().splitlines()
    assert hostname == pod.config.hostname
    assert f" {kubelet.pod_status(pod.id).status.network.ip}/" in addr, addr
    # The routes CNI configured (a default route and one to the pod subnet,
    # which the connected route already covers) are the pod's.
    routes = kubelet.exec_sync(cid, "ip", "-4", "route").stdout.decode()
    assert f"default via {GATEWAY}" in routes and str(POD_SUBNET) in routes, routes
    # Output bigger than any pipe buffer comes through whole.
    r = kubelet.exec_sync(cid, "sh", "-c", "head -c 300000 /dev/zero | tr '\\0' y")
    assert (r.exit_code, len(r.stdout), set(r.stdout)) == (0, 300000, {ord("y")})


@pytest.mark.parametrize("handler", handlers())
def test_exec_sync_timeout(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    cid = kubelet.run(pod, "app")
    t0 = time.monotonic()
    err = error_of(lambda: kubelet.exec_sync(cid, "sleep", "31", timeout=1))
    took = time.monotonic() - t0
    assert err.status is Status.DEADLINE_EXCEEDED, (err.status, err.message)
    assert "timeout 1s exceeded" in (err.message or ""), err.message
    assert took < 10, f"ExecSync(timeout=1) took {took:.1f}s"
    # The container is unharmed and the command was killed.
    assert kubelet.status(cid).status.state == RUNNING
    r = kubelet.exec_sync(cid, "sh", "-c", "ps -o args | grep -c '^sleep 31$'")
    assert r.stdout == b"0\n", r.stdout


@pytest.mark.parametrize("handler", handlers())
def test_containers_of_a_pod_share_network_and_ipc(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    server = kubelet.run(pod, "server", SERVER)
    client = kubelet.run(pod, "client")

    def ns(cid: str, kind: str) -> bytes:
        r = kubelet.exec_sync(cid, "readlink", f"/proc/self/ns/{kind}")
        assert r.exit_code == 0, r.stderr
        return r.stdout

    assert ns(server, "net") == ns(client, "net")
    assert ns(server, "ipc") == ns(client, "ipc")
    # IPC: the pod's /dev/shm is one tmpfs.
    assert kubelet.exec_sync(server, "sh", "-c", "echo token > /dev/shm/keel").exit_code == 0
    r = kubelet.exec_sync(client, "cat", "/dev/shm/keel")
    assert (r.exit_code, r.stdout) == (0, b"token\n"), r.stderr
    # Network: the client reaches the server's port on localhost.

    def ask() -> bytes | None:
        r = kubelet.exec_sync(client, "sh", "-c", "echo ping | nc -w 2 127.0.0.1 8080",
                              timeout=10)
        return r.stdout if r.stdout else None  # refused until the server listens

    assert wait_for(ask, 30, "the server to answer on localhost:8080") == b"pong\n"
    got = wait_for(lambda: kubelet.exec_sync(server, "cat", "/tmp/got").stdout, 10,
                   "the server to record the request")
    assert got == b"ping\n"


@pytest.mark.parametrize("handler", handlers())
def test_each_container_has_its_own_pid_namespace(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    a = kubelet.run(pod, "a", (*IDLE[:2], IDLE[2] + " # a"))
    b = kubelet.run(pod, "b", (*IDLE[:2], IDLE[2] + " # b"))
    ns = {cid: kubelet.exec_sync(cid, "readlink", "/proc/self/ns/pid").stdout for cid in (a, b)}
    assert ns[a] != ns[b], ns
    # PID 1 of each is its own command.
    for cid, mark in ((a, b"# a"), (b, b"# b")):
        r = kubelet.exec_sync(cid, "cat", "/proc/1/cmdline")
        assert r.stdout.endswith(mark + b"\0"), r.stdout


@pytest.mark.parametrize("handler", handlers())
def test_container_stats(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    busy = ('i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done; '
            'trap "exit 0" TERM; while :; do sleep 1 & wait $!; done')
    cid = kubelet.run(pod, "app", ("sh", "-c", busy))

    def used_cpu() -> pb.ContainerStats | None:
        stats = kubelet.stats(cid)
        return stats if stats.cpu.usage_core_nano_seconds.value else None

    stats = wait_for(used_cpu, 30, "CPU usage to show")
    assert stats is not None
    assert (stats.attributes.id, stats.attributes.metadata.name) == (cid, "app")
    assert stats.cpu.timestamp > 0 and stats.memory.timestamp > 0
    assert stats.memory.working_set_bytes.value > 0
    listed = kubelet.list_stats(pod.id)
    assert [s.attributes.id for s in listed] == [cid]
    assert listed[0].cpu.usage_core_nano_seconds.value >= stats.cpu.usage_core_nano_seconds.value
