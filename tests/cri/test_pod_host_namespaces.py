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


#: The CRI field -> the name of the namespace under /proc/<pid>/ns.
PROC_NS = {"network": "net", "ipc": "ipc", "pid": "pid"}


@pytest.mark.parametrize("kind", list(PROC_NS))
@pytest.mark.parametrize("handler", handlers())
def test_host_namespace_pod(kubelet: Kubelet, handler: str, kind: str) -> None:
    """hostNetwork (with the node's hostname), hostIPC, hostPID (the
    container sees containerd's pid): the node's namespace, or a refusal."""
    config, ns = _host_pod(kubelet, handler, **{kind: NODE})
    if handler == "keel-vm":
        _refused(kubelet, config, kind)
        return
    cid = _run_in(kubelet, config, ns)
    r = kubelet.exec_sync(cid, "readlink", f"/proc/self/ns/{PROC_NS[kind]}")
    assert r.stdout.decode().strip() == _node_ns(kubelet, PROC_NS[kind]), r
    if kind == "network":
        r = kubelet.exec_sync(cid, "hostname")
        assert r.stdout.decode().strip() == os.uname().nodename, r
    if kind == "pid":
        pid = kubelet.node.containerd.pid
        r = kubelet.exec_sync(cid, "cat", f"/proc/{pid}/comm")
        assert r.stdout == b"containerd\n", r
