"""Host namespaces through CRI: ``hostNetwork``, ``hostIPC`` and ``hostPID``
pods as the kubelet asks for them (NamespaceMode NODE in the pod's and the
container's security context).

runc and the ``process`` backend give the pod the node's namespaces (here:
the namespaces containerd runs in; its network namespace is the CRI node's
own); the ``qemu`` backend refuses the pod at RunPodSandbox with
InvalidArgument, because a VM cannot share the host's namespaces.  Nothing
degrades silently to a private namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from grpclib.const import Status

from tests.cri.client import error_of, pb
from tests.cri.kubelet import IDLE, POD_NAMESPACES, Kubelet, handlers

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

NODE = pb.NamespaceMode.NODE


def _node_ns(kubelet: Kubelet, kind: str) -> str:
    """The node's namespace of *kind*, as a container would read it (``kind:[inode]``)."""
    pid = kubelet.node.containerd.pid  # containerd runs in the node's namespaces
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _host_pod(kubelet: Kubelet, handler: str, **modes: pb.NamespaceMode
              ) -> tuple[pb.PodSandboxConfig, pb.NamespaceOption]:
    config = kubelet.pod_config("host")
    ns = pb.NamespaceOption(network=modes.get("network", POD_NAMESPACES.network),
                            pid=modes.get("pid", POD_NAMESPACES.pid),
                            ipc=modes.get("ipc", POD_NAMESPACES.ipc))
    config.linux.security_context.namespace_options = ns
    if ns.network == NODE:
        config.hostname = ""  # the kubelet names no hostname for a hostNetwork pod
    return config, ns


def _run_in(kubelet: Kubelet, config: pb.PodSandboxConfig, ns: pb.NamespaceOption) -> str:
    pod = kubelet.run_pod(config=config)
    cc = kubelet.container_config("app", IDLE,
                                  security=pb.LinuxContainerSecurityContext(namespace_options=ns))
    cid = kubelet.create(pod, "app", config=cc)
    kubelet.start(cid)
    return cid


def _refused(kubelet: Kubelet, config: pb.PodSandboxConfig, field: str) -> None:
    err = error_of(lambda: kubelet.run_pod(config=config))
    assert err.status is Status.INVALID_ARGUMENT, (err.status, err.message)
    message = err.message or ""
    assert field in message and "VM" in message, message


@pytest.mark.parametrize("handler", handlers())
def test_host_network_pod(kubelet: Kubelet, handler: str) -> None:
    """hostNetwork: the node's network namespace and, with it, its hostname."""
    config, ns = _host_pod(kubelet, handler, network=NODE)
    if handler == "keel-vm":
        _refused(kubelet, config, "network")
        return
    cid = _run_in(kubelet, config, ns)
    r = kubelet.exec_sync(cid, "readlink", "/proc/self/ns/net")
    assert r.stdout.decode().strip() == _node_ns(kubelet, "net"), r
    r = kubelet.exec_sync(cid, "hostname")
    assert r.stdout.decode().strip() == os.uname().nodename, r


@pytest.mark.parametrize("handler", handlers())
def test_host_ipc_pod(kubelet: Kubelet, handler: str) -> None:
    """hostIPC: the node's IPC namespace (a SysV segment of the node is visible)."""
    config, ns = _host_pod(kubelet, handler, ipc=NODE)
    if handler == "keel-vm":
        _refused(kubelet, config, "ipc")
        return
    cid = _run_in(kubelet, config, ns)
    r = kubelet.exec_sync(cid, "readlink", "/proc/self/ns/ipc")
    assert r.stdout.decode().strip() == _node_ns(kubelet, "ipc"), r


@pytest.mark.parametrize("handler", handlers())
def test_host_pid_pod(kubelet: Kubelet, handler: str) -> None:
    """hostPID: the node's PID namespace; the container sees containerd's pid."""
    config, ns = _host_pod(kubelet, handler, pid=NODE)
    if handler == "keel-vm":
        _refused(kubelet, config, "pid")
        return
    cid = _run_in(kubelet, config, ns)
    r = kubelet.exec_sync(cid, "readlink", "/proc/self/ns/pid")
    assert r.stdout.decode().strip() == _node_ns(kubelet, "pid"), r
    pid = kubelet.node.containerd.pid
    r = kubelet.exec_sync(cid, "cat", f"/proc/{pid}/comm")
    assert r.stdout == b"containerd\n", r
    assert Path(f"/proc/{pid}").exists()
