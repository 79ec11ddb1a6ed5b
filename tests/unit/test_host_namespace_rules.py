"""Host namespaces and mount propagation: what a spec asks for, and who refuses it.

The end-to-end cases (runc next to Keel's process backend under containerd)
are in tests/integration/test_host_namespaces.py; here the rules, and the
qemu backend's refusals, which come before anything boots.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.api import NET_SYSCTLS_ANNOTATION
from keel.errors import InvalidArgument
from shim._launcher_server import _check as check_launcher_request
from shim._launcher_wire import LauncherError
from shim._prelaunch import host_namespaces, launch_spec
from shim.config import ShimConfig
from shim.dirs import SandboxDir
from shim.vmm.api import LaunchSpec, check_propagation
from shim.vmm.process._cgroups import resolve as resolve_cgroup
from shim.vmm.process._nsinit import parse_share
from shim.vmm.qemu import QemuBackend
from shim.vmm.qemu._sandbox import QemuSandbox
from shim.vmm.qemu.config import QemuConfig

ALL = ("pid", "ipc", "uts", "mount", "network")


def _spec(*listed: str, mounts: tuple[dict[str, Any], ...] = (),
          rootfs_propagation: str = "") -> dict[str, Any]:
    linux: dict[str, Any] = {"namespaces": [{"type": t} for t in listed]}
    if rootfs_propagation:
        linux["rootfsPropagation"] = rootfs_propagation
    return {"linux": linux, "mounts": list(mounts)}


@pytest.mark.parametrize(("listed", "shared"), [
    (ALL, set()),
    (("pid", "ipc", "uts", "mount"), {"network"}),  # hostNetwork (CRI drops uts too: below)
    (("pid", "ipc", "mount"), {"network", "uts"}),
    (("pid", "uts", "mount", "network"), {"ipc"}),  # hostIPC
    (("ipc", "uts", "mount", "network"), {"pid"}),  # hostPID
    ((), {"network", "ipc", "uts", "pid"}),
])
def test_unlisted_namespace_types_are_the_hosts(listed: tuple[str, ...], shared: set[str]) -> None:
    assert host_namespaces(_spec(*listed)) == shared


def test_a_namespace_with_a_path_is_listed_not_shared() -> None:
    spec = _spec("pid", "ipc", "uts", "mount")
    spec["linux"]["namespaces"].append({"type": "network", "path": "/run/netns/pod"})
    assert host_namespaces(spec) == frozenset()


def test_launch_spec_carries_them(tmp_path: Path) -> None:
    spec = launch_spec("s1", ShimConfig(state_root=tmp_path), tmp_path, _spec("pid", "mount"))
    assert spec.host_namespaces == {"network", "ipc", "uts"}
    assert launch_spec("s1", ShimConfig(state_root=tmp_path), tmp_path).host_namespaces == set()


@pytest.mark.parametrize("option", ["rprivate", "private", "rbind", "ro"])
def test_private_mounts_pass_everywhere(option: str) -> None:
    spec = _spec(*ALL, mounts=({"destination": "/v", "options": ["rbind", option]},))
    check_propagation(spec, allowed=(), why="-")


@pytest.mark.parametrize(("spec", "what"), [
    (_spec(*ALL, mounts=({"destination": "/data", "options": ["rbind", "rshared"]},)),
     "mount /data asks for rshared"),
    (_spec(*ALL, rootfs_propagation="rslave"), "the root filesystem asks for rslave"),
])
def test_propagation_outside_allowed_is_refused_by_name(spec: dict[str, Any], what: str) -> None:
    with pytest.raises(InvalidArgument, match=what + " mount propagation.*because"):
        check_propagation(spec, allowed=("slave",), why="because")


def test_process_backend_allows_rslave_and_refuses_rshared() -> None:
    vm = _process_sandbox()
    slave = _spec(*ALL, mounts=({"destination": "/v", "options": ["rbind", "rslave"]},),
                  rootfs_propagation="rslave")
    assert vm.guest_spec(json.dumps(slave).encode()) == json.dumps(slave).encode()
    shared = _spec(*ALL, mounts=({"destination": "/v", "options": ["rbind", "rshared"]},))
    with pytest.raises(InvalidArgument, match="mount /v asks for rshared.*slave of the host"):
        vm.guest_spec(json.dumps(shared).encode())


def test_process_backend_refuses_the_agents_own_annotation() -> None:
    spec = {**_spec(*ALL), "annotations": {NET_SYSCTLS_ANNOTATION: '{"net.ipv4.ip_forward": "1"}'}}
    with pytest.raises(InvalidArgument, match=f"annotation {NET_SYSCTLS_ANNOTATION} is Keel's"):
        _process_sandbox().guest_spec(json.dumps(spec).encode())


@pytest.mark.parametrize(("given", "path"), [
    ("/k8s.io/abc", "/k8s.io/abc"),
    ("/default/../default/c1", "/default/c1"),
    ("kubepods-besteffort-pod12.slice:cri-containerd:abc",
     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/"
     "cri-containerd-abc.scope"),
    ("system.slice:docker:x", "/system.slice/docker-x.scope"),
])
def test_cgroups_paths_resolve_as_runc_places_them(given: str, path: str) -> None:
    assert resolve_cgroup(given) == path


@pytest.mark.parametrize("given", ["", None, "relative/c1", "/", "/a/..", "a:b", "x.scope:p:n"])
def test_a_cgroup_a_stop_cannot_reach_safely_is_refused(given: object) -> None:
    with pytest.raises(InvalidArgument):
        resolve_cgroup(given)


def test_process_backend_records_a_host_pid_pods_cgroups(tmp_path: Path) -> None:
    from shim.vmm.process import ProcessSandbox

    vm = ProcessSandbox(LaunchSpec(sandbox_id="s1", root=tmp_path, agent_command=()), 0, -1,
                        host_pid=True)
    spec = {"linux": {"cgroupsPath": "/default/c1"}}
    asyncio.run(vm.share_volumes("c1", json.dumps(spec).encode()))
    assert vm.record()["cgroups"] == {"c1": "/default/c1"} and vm.record()["host_pid"]
    with pytest.raises(InvalidArgument, match="needs linux.cgroupsPath"):
        asyncio.run(vm.share_volumes("c2", b"{}"))


@pytest.mark.parametrize("shared", [{"network"}, {"ipc"}, {"pid"}, {"network", "uts"}])
def test_qemu_refuses_host_namespaces_before_starting_anything(tmp_path: Path,
                                                               shared: set[str]) -> None:
    spec = LaunchSpec(sandbox_id="s1", root=tmp_path, agent_command=(),
                      host_namespaces=frozenset(shared))
    with pytest.raises(InvalidArgument, match="a VM sandbox cannot share the host's namespaces"):
        asyncio.run(QemuBackend(QemuConfig()).launch(spec))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["rslave", "rshared", "slave", "shared"])
def test_qemu_refuses_any_propagation(option: str, tmp_path: Path) -> None:
    vm = QemuSandbox(SandboxDir(tmp_path), 0, -1, {})
    spec = _spec(*ALL, mounts=({"destination": "/v", "options": ["rbind", option]},))
    with pytest.raises(InvalidArgument, match=f"mount /v asks for {option}.*VM has a mount tree"):
        vm.guest_spec(json.dumps(spec).encode())


def test_nsinit_share_argument() -> None:
    assert parse_share("-") == frozenset()
    assert parse_share("ipc,network,pid") == {"ipc", "network", "pid"}
    with pytest.raises(ValueError, match="mount"):
        parse_share("mount")  # the sandbox always has a mount namespace of its own


@pytest.mark.parametrize(("share", "ok"), [([], True), (["network", "uts"], True),
                                           (["pid"], True), (["mount"], False),
                                           ("network", False)])
def test_launcher_checks_what_an_agent_may_share(share: Any, ok: bool) -> None:
    req = {"op": "agent", "argv": [], "env": {}, "cwd": "/", "hostname": "h", "log": "/l",
           "share": share}
    if ok:
        assert check_launcher_request(req, []) == "agent"
    else:
        with pytest.raises(LauncherError, match="share must list"):
            check_launcher_request(req, [])


def _process_sandbox() -> Any:
    from shim.vmm.process import ProcessSandbox

    return ProcessSandbox(LaunchSpec(sandbox_id="s1", root=Path("/nonexistent"),
                                     agent_command=()), 0, -1)
