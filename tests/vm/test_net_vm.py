"""Pod networking of a VM sandbox, through containerd.

The test plays CNI: two network namespaces of its own, "pod" and "peer",
joined by a veth pair with 10.211.0.2/24 (pod) and 10.211.0.1/24 (peer),
plus fd00:211::2/64 and fd00:211::1/64 with an IPv6 default route,
a default route in "pod" via the peer (plus, as CNI adds it, a route to the
pod's own subnet via the peer next to the connected one), and 10.212.0.1/32 on the peer's
loopback (reachable from the pod only through that route).  The container
runs with ``ctr run --with-ns network:<pod>``; the shim bridges the pod's
veth to a tap (tc mirred) and the guest takes over the veth's MAC,
address and routes.  All traffic stays inside the two namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keel.errors import FailedPrecondition, Internal
from shim.vmm.qemu import _net
from tests.containerd import Containerd, wait_for
from tests.prereq import skip_or_fail
from tests.vm.conftest import KEEL_RUNTIME

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.requires_root]

BUSYBOX = "localhost/keel/busybox:test"
CTR_TIMEOUT_S = 240.0
POD_IP, PEER_IP, PEER_FAR_IP = "10.211.0.2", "10.211.0.1", "10.212.0.1"
SUBNET = "10.211.0.0/24"
POD_IP6, PEER_IP6 = "fd00:211::2", "fd00:211::1"


@dataclass(frozen=True)
class Pod:
    netns: str  # name under /run/netns
    peer: str
    mac: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"


def _ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr}"
    return res.stdout


def _in(netns: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def pod() -> Iterator[Pod]:
    if shutil.which("ip") is None:
        skip_or_fail("iproute2 `ip` is needed to set up the test's network namespaces"
                     " (apt-get install iproute2)", what="vm")
    tag = f"{os.getpid()}"
    pod_ns, peer_ns = f"keel-pod-{tag}", f"keel-peer-{tag}"
    _ip("netns", "add", pod_ns)
    try:
        _ip("netns", "add", peer_ns)
        _ip("-n", pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", peer_ns)
        _ip("-n", pod_ns, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        _ip("-n", peer_ns, "addr", "add", f"{PEER_IP}/24", "dev", "eth0")
        # Dual stack, as a CNI result with an IPv6 range gives it.
        _ip("-n", pod_ns, "addr", "add", f"{POD_IP6}/64", "dev", "eth0", "nodad")
        _ip("-n", peer_ns, "addr", "add", f"{PEER_IP6}/64", "dev", "eth0", "nodad")
        _ip("-n", peer_ns, "addr", "add", f"{PEER_FAR_IP}/32", "dev", "lo")
        for ns in (pod_ns, peer_ns):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", pod_ns, "route", "add", "default", "via", PEER_IP)
        _ip("-n", pod_ns, "-6", "route", "add", "default", "via", PEER_IP6)
        # As CNI's IPAM adds {"dst": <the pod subnet>} (without NLM_F_EXCL): it
        # sits beside the connected route of the address.
        _ip("-n", pod_ns, "route", "prepend", SUBNET, "via", PEER_IP, "dev", "eth0")
        mac = _ip("-n", pod_ns, "-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
        yield Pod(pod_ns, peer_ns, mac)
    finally:
        for ns in (pod_ns, peer_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def peer_http(pod: Pod) -> Iterator[str]:
    """busybox httpd in the peer namespace serving hello.txt; yields its content."""
    www = Path(tempfile.mkdtemp(prefix="keel-www-"))
    (www / "hello.txt").write_text("hello from the peer\n")
    proc = subprocess.Popen(["ip", "netns", "exec", pod.peer, "busybox", "httpd", "-f",
                             "-p", "8080", "-h", str(www)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ":1F90 " in _in(pod.peer, "cat", "/proc/net/tcp", "/proc/net/tcp6").stdout
                 or proc.poll() is not None, 10, "httpd in the peer namespace to listen on 8080")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield "hello from the peer\n"
    finally:
        proc.kill()  # our child, by pid
        proc.wait()
        shutil.rmtree(www, ignore_errors=True)


def _redirects(pod: Pod) -> str:
    return _in(pod.netns, "tc", "filter", "show", "dev", "eth0", "ingress").stdout


def test_pod_network_reaches_the_peer_and_back(vm_containerd: Containerd, pod: Pod,
                                                peer_http: str) -> None:
    ctd, cid = vm_containerd, f"vm-net-{os.getpid()}"
    serve = ("mkdir -p /www && echo served-by-the-guest > /www/index.html && "
             "exec httpd -f -p 8081 -h /www")
    res = ctd.ctr("run", "-d", "--runtime", KEEL_RUNTIME, "--with-ns", f"network:{pod.path}",
                  BUSYBOX, cid, "sh", "-c", serve, timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, (res, ctd.log_tail(40))
    try:
        # The shim bridged the veth to its tap, both ways.
        assert "mirred (Egress Redirect to device tap0_keel)" in _redirects(pod), _redirects(pod)
        # The guest NIC carries the veth's name, MAC and address, and its routes.
        res = ctd.ctr("tasks", "exec", "--exec-id", "cfg", cid, "sh", "-c",
                      "cat /sys/class/net/eth0/address; ip -o addr show dev eth0; ip route;"
                      " ip -6 route", timeout=CTR_TIMEOUT_S)
        assert res.returncode == 0, res
        assert res.stdout.splitlines()[0] == pod.mac, res.stdout
        assert f"inet {POD_IP}/24" in res.stdout, res.stdout
        assert f"default via {PEER_IP} dev eth0" in res.stdout, res.stdout
        assert f"{SUBNET} via {PEER_IP} dev eth0" in res.stdout, res.stdout
        assert f"{SUBNET} dev eth0" in res.stdout, res.stdout  # the connected route stays
        assert f"inet6 {POD_IP6}/64" in res.stdout, res.stdout
        assert f"default via {PEER_IP6} dev eth0" in res.stdout, res.stdout

        # Container -> peer: ICMP on the link, HTTP to an address behind the default
        # route (nc: a static busybox's wget needs NSS modules the image lacks).
        res = ctd.ctr("tasks", "exec", "--exec-id", "out", cid, "sh", "-c",
                      f"ping -c 1 -W 10 {PEER_IP} >/dev/null && echo ping-ok; "
                      f"printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {PEER_FAR_IP} 8080",
                      timeout=CTR_TIMEOUT_S)
        assert res.returncode == 0, res
        reply = res.stdout.replace("\r", "")
        assert reply.startswith("ping-ok\nHTTP/1.1 200 OK\n"), reply
        assert reply.endswith("\n\n" + peer_http), reply

        # IPv6, both ways.
        res = ctd.ctr("tasks", "exec", "--exec-id", "out6", cid, "ping6", "-c", "1", "-W", "10",
                      PEER_IP6, timeout=CTR_TIMEOUT_S)
        assert res.returncode == 0, res
        ping6 = _in(pod.peer, "busybox", "ping6", "-c", "1", "-W", "10", POD_IP6)
        assert ping6.returncode == 0, ping6

        # Peer -> container: the pod's address now answers from inside the VM.
        ping = _in(pod.peer, "busybox", "ping", "-c", "1", "-W", "10", POD_IP)
        assert ping.returncode == 0, ping
        got = _in(pod.peer, "sh", "-c", "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | "
                  f"busybox nc -w 20 {POD_IP} 8081")
        assert got.returncode == 0, got
        assert got.stdout.replace("\r", "").endswith("\n\nserved-by-the-guest\n"), got
    finally:
        ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        wait_for(lambda: "STOPPED" in ctd.ctr("tasks", "ls").stdout or
                 cid not in ctd.ctr("tasks", "ls").stdout, 60, f"{cid} to stop")
        ctd.ctr("tasks", "rm", cid, timeout=CTR_TIMEOUT_S)
        ctd.ctr("containers", "rm", cid)
    # The VM is gone, and so are its tap and the veth's redirect.
    wait_for(lambda: "tap0_keel" not in _ip("-n", pod.netns, "link"), 20, "the tap to go")
    assert "mirred" not in _redirects(pod), _redirects(pod)
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"


def test_attach_needs_an_interface_and_a_namespace() -> None:
    """No VM: a namespace with only loopback has nothing to bridge (the backend
    then starts the VM without a NIC); a missing namespace is an error."""
    ns = f"keel-empty-{os.getpid()}"
    _ip("netns", "add", ns)
    try:
        with pytest.raises(FailedPrecondition, match="no interface"):
            _net.attach(f"/run/netns/{ns}")
        assert "tap0_keel" not in _ip("-n", ns, "link")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    with pytest.raises(Internal, match="No such file"):
        _net.attach(f"/run/netns/{ns}")
