"""One Kubernetes node as the kubelet sees it: a private containerd with the
CRI plugin, runtimes ``runc`` and ``keel``, a CNI bridge, and the images.

Layout under the temp root (see tests/containerd for containerd's own)::

    <tmp>/cni/conf/10-keel.conflist, <tmp>/cni/ipam   the pod network (tests/cri/network.py)
    <tmp>/keel.toml                                    the keel runtime's ConfigPath
    <tmp>/sandboxes, <tmp>/s, <tmp>/launcher           Keel's state (KEEL_STATE_ROOT = <tmp>)
    <tmp>/pods/<ns>_<name>_<uid>/<container>/0.log     container logs (kubelet's layout)

containerd runs in the network namespace `NetNs` ``kcri-<suffix>``;
its CRI stream server listens on 127.0.0.1 there (port 0: any free one),
pod network namespaces are mounted under its state directory
(``netns_mounts_under_state_dir``), and pods get the cgroup parent
``/kcri-<suffix>``, whose directories `stop_node` removes.

Keel's state root is the temp root itself, kept short (`MAX_ROOT` bytes,
``/tmp/kXXXXXXXX``) so that each sandbox directory, named by the
64-character CRI pod id, holds its own unix sockets as under Keel's
default root ``/run/keel``.  (Under a longer root the sockets move to a
short directory of their own: tests/integration/test_long_state_root.py.)

The ``keel`` runtime is the working tree's shim (`install_shim_wrapper`,
as tests/integration does for ctr), with the process backend named in
its config file, which CRI hands the shim as ``options.ConfigPath``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.containerd import (
    DISABLED_PLUGINS,
    Containerd,
    force_cleanup,
    install_shim_wrapper,
    leftovers,
    remove_root,
    wait_for,
)
from tests.cri import network
from tests.cri.client import CriClient, pb
from tests.cri.network import CniCache, NetNs
from tests.images.busybox import (
    BUSYBOX_REF,
    PAUSE_REF,
    build_image,
    build_pause_image,
    import_image,
)

REPO = Path(__file__).resolve().parents[2]
#: The only namespace CRI sees.
K8S_NAMESPACE = "k8s.io"
#: CRI runtime handlers: name -> runtime_type.
HANDLERS = {"runc": "io.containerd.runc.v2", "keel": "io.containerd.keel.v2",
            "keel-vm": "io.containerd.keel.v2"}
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
READY_TIMEOUT_S = 60.0
#: The longest temp root (= Keel state root) whose sandbox sockets stay in
#: the sandbox directories, as under /run/keel (<root>/sandboxes/<64 hex>/
#: ops.chan...): the layout this suite exercises.  A longer root moves them
#: to <root>/c/<hash>/ (tests/integration/test_long_state_root.py, and
#: test_pod_under_the_longest_state_root in tests/cri/test_pods.py).
MAX_ROOT = 14


def missing_prerequisites() -> list[str]:
    """What the CRI node needs beyond the `integration` marker's prerequisites."""
    return network.missing_prerequisites()


@dataclass(frozen=True, slots=True)
class CriNode:
    """A started node; `stop_node` takes it down."""

    containerd: Containerd
    client: CriClient
    netns: NetNs
    cni_cache: CniCache
    cgroup_parent: str
    pod_logs: Path
    keel_state: Path

    @property
    def tmp_root(self) -> Path:
        return self.containerd.paths.tmp_root


def start_node(tmp: Path, image_cache: Path, keel_state: Path | None = None) -> CriNode:
    """Build and start the node under `tmp` (a short, empty directory the
    caller owns); on any failure, undo what was done and re-raise.

    *keel_state* is Keel's state root (default `tmp` itself); a longer one
    moves the sandbox sockets to ``<root>/c/<hash>/``.
    """
    if len(os.fsencode(tmp)) > MAX_ROOT:
        raise ValueError(f"{tmp}: longer than {MAX_ROOT} bytes, Keel's sandbox sockets won't fit")
    name = f"kcri-{tmp.name[-8:]}"
    keel_state = keel_state or tmp
    keel_config = tmp / "keel.toml"
    keel_config.write_text(f'[shim]\nbackend = "process"\nstate_root = "{keel_state}"\n')
    (tmp / "pods").mkdir()
    ctd = Containerd(tmp, namespace=K8S_NAMESPACE, netns=NetNs(name).path,
                     env={"KEEL_STATE_ROOT": str(keel_state)},
                     disabled_plugins=[p for p in DISABLED_PLUGINS if p != CRI_PLUGIN],
                     extra_config=_cri_config(tmp, keel_config))
    install_shim_wrapper(ctd.paths.bin_dir, sys.executable, env={"PYTHONPATH": str(REPO)})
    network.write_conflist(tmp / "cni" / "conf", tmp / "cni" / "ipam", name)
    cni_cache = CniCache.before_start(name)
    netns = NetNs.add(name)
    client = None
    try:
        ctd.start()
        client = CriClient(ctd.paths.grpc_socket)
        _wait_ready(client)
        for tar in (build_pause_image(image_cache), build_image(image_cache)):
            import_image(ctd.ctr_prefix(), tar)
        for ref in (PAUSE_REF, BUSYBOX_REF):
            _wait_image(client, ref)
    except BaseException:
        if client is not None:
            client.close()
        if problems := _take_down(ctd, netns, cni_cache, f"/{name}"):
            print("CRI node cleanup after a failed start:\n" + "\n".join(problems),
                  file=sys.stderr)
        raise
    return CriNode(ctd, client, netns, cni_cache, f"/{name}", tmp / "pods", keel_state)


def stop_node(node: CriNode) -> list[str]:
    """Stop containerd (by PID), delete the namespace, the CNI cache entries
    and the cgroups, remove the temp root; return what went wrong (empty: clean).

    Pods are not this function's to remove (the per-test `Kubelet` does);
    whatever is still running is killed and reported.
    """
    node.client.close()
    return _take_down(node.containerd, node.netns, node.cni_cache, node.cgroup_parent)


def _take_down(ctd: Containerd, netns: NetNs, cni_cache: CniCache,
               cgroup_parent: str) -> list[str]:
    problems = []
    try:
        found = ctd.stop()
    except TimeoutError as exc:
        problems.append(str(exc))
        found = leftovers(ctd.paths.tmp_root)
    if found:
        problems.append(f"left behind after containerd stopped:\n{found}")
        force_cleanup(found)
    netns.delete()
    cni_cache.remove()
    problems += [f"cgroup not removed: {d}" for d in remove_cgroups(cgroup_parent)]
    remove_root(ctd.paths.tmp_root, problems)
    return problems


def remove_cgroups(parent: str) -> list[str]:
    """rmdir `parent` (an absolute cgroup path) and everything below it, deepest
    first, in every hierarchy under /sys/fs/cgroup; return the dirs still there."""
    left = []
    base = Path("/sys/fs/cgroup")
    hierarchies = [base] + [d for d in base.iterdir() if d.is_dir() and not d.is_symlink()]
    for hierarchy in hierarchies:
        top = hierarchy / parent.lstrip("/")
        if not top.is_dir() or top == hierarchy:
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: len(Path(w[0]).parts),
                                    reverse=True):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(dirpath)
    return left


def _wait_ready(client: CriClient) -> None:
    """Until CRI reports RuntimeReady and NetworkReady (the CNI config is loaded)."""
    def ready() -> bool:
        status = client.call(client.runtime.status(pb.StatusRequest())).status
        return all(c.status for c in status.conditions) and len(status.conditions) >= 2

    wait_for(ready, READY_TIMEOUT_S, "CRI RuntimeReady and NetworkReady")


def _wait_image(client: CriClient, ref: str) -> None:
    """Until CRI lists `ref` (it learns of `ctr images import` from events)."""
    def listed() -> bool:
        answer = client.call(client.images.image_status(
            pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))))
        return bool(answer.image.id)

    wait_for(listed, READY_TIMEOUT_S, f"CRI to list image {ref}")


def vm_config_path(tmp: Path) -> Path:
    """The ``keel-vm`` handler's Keel config (the qemu backend)."""
    return tmp / "keel-vm.toml"


def _cri_config(tmp: Path, keel_config: Path) -> str:
    cri = f'[plugins."{CRI_PLUGIN}"]'
    runtimes = f'[plugins."{CRI_PLUGIN}".containerd.runtimes'
    lines = [
        cri,
        f'  sandbox_image = "{PAUSE_REF}"',  # imported, never pulled
        "  disable_apparmor = true",
        "  restrict_oom_score_adj = true",
        "  enable_selinux = false",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  netns_mounts_under_state_dir = true",
        f'[plugins."{CRI_PLUGIN}".containerd]',
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"{runtimes}.runc]",
        f'  runtime_type = "{HANDLERS["runc"]}"',
        f"{runtimes}.runc.options]",
        "  SystemdCgroup = false",
        f"{runtimes}.keel]",
        f'  runtime_type = "{HANDLERS["keel"]}"',
        f"{runtimes}.keel.options]",
        f'  ConfigPath = "{keel_config}"',
        # The qemu backend: its config is written once the guest image is
        # built (`vm_config`), before the first pod of a `vm` case.
        f"{runtimes}.keel-vm]",
        f'  runtime_type = "{HANDLERS["keel-vm"]}"',
        f"{runtimes}.keel-vm.options]",
        f'  ConfigPath = "{vm_config_path(tmp)}"',
        f'[plugins."{CRI_PLUGIN}".cni]',
        f'  bin_dir = "{network.CNI_BIN_DIR}"',
        f'  conf_dir = "{tmp / "cni" / "conf"}"',
        "  max_conf_num = 1",
    ]
    return "\n".join(lines) + "\n"
