"""Parts of the qemu backend that need no VM: the config file with a ``[qemu]``
table, the pod network's guest config and qemu arguments, the guest spec,
the guest vCPU onliner."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from agent import _vmguest
from agent.api import NET_SYSCTLS_ANNOTATION
from keel.errors import InvalidArgument
from shim import config
from shim._prelaunch import netns_path
from shim.dirs import SandboxDir
from shim.vmm import _sizing
from shim.vmm.qemu import _cmdline, _net
from shim.vmm.qemu import config as qemu_config
from shim.vmm.qemu._accel import Accel
from shim.vmm.qemu._sandbox import QemuSandbox


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_STATE_ROOT", raising=False)
    monkeypatch.delenv("KEEL_CONFIG", raising=False)


def test_shim_and_qemu_tables_in_one_file(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('[shim]\nbackend = "qemu"\n[qemu]\nmachine = "q35"\nvcpus = 2\nmemory_mib = 768\n'
                 'accel = "tcg"\nimage = "/srv/keel-image"\n')
    shim_cfg = config.load(f)
    assert shim_cfg.backend == "qemu"
    assert shim_cfg.agent_timeout_s == config.AGENT_TIMEOUT_S["qemu"] == 30.0
    q = qemu_config.load(f)
    assert (q.machine, q.vcpus, q.memory_mib, q.accel, q.image) == (
        "q35", 2, 768, "tcg", Path("/srv/keel-image"))


def test_agent_timeout_default_follows_the_backend(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('backend = "process"\n')  # top-level keys, no [shim] table
    assert config.load(f).agent_timeout_s == 10.0
    f.write_text('backend = "qemu"\n[qemu]\nvcpus = 1\n')
    assert config.load(f).agent_timeout_s == 30.0
    f.write_text('[shim]\nbackend = "qemu"\nagent_timeout_s = 90\n')
    assert config.load(f).agent_timeout_s == 90
    with pytest.raises(InvalidArgument, match="agent_timeout_s"):
        config.ShimConfig(agent_timeout_s=-1)
    assert config.load(f).agent_call_timeout_s == 90.0  # the default deadline of an agent call
    f.write_text('[shim]\nagent_call_timeout_s = 20\n')
    assert config.load(f).agent_call_timeout_s == 20
    with pytest.raises(InvalidArgument, match="agent_call_timeout_s must be positive"):
        config.ShimConfig(agent_call_timeout_s=0)


@pytest.mark.parametrize(("text", "match"), [
    ('[shim]\nbackend = "qemu"\n[qemu]\nmachnie = "q35"\n', "unknown key 'machnie'"),
    ('[shim]\nbackend = "qemu"\n[qemu]\nvcpus = "2"\n', "vcpus must be int"),
    ('[shim]\nbackend = "qemu"\n[xen]\nx = 1\n', "unknown key 'xen'"),
    ('[shim]\nbackend = "qemu"\nqemu = 3\n', "unknown key 'qemu'"),
    ('qemu = "q35"\n', r"\[qemu\] must be a table"),
])
def test_bad_files_fail_loudly(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "config.toml"
    f.write_text(text)
    with pytest.raises(InvalidArgument, match=match):
        config.load(f)


def test_parse_uevent() -> None:
    msg = (b"add@/devices/system/cpu/cpu3\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu3\0"
           b"SUBSYSTEM=cpu\0SEQNUM=1234\0")
    assert _vmguest.parse_uevent(msg) == {"ACTION": "add", "DEVPATH": "/devices/system/cpu/cpu3",
                                          "SUBSYSTEM": "cpu", "SEQNUM": "1234"}


def test_online_all_writes_only_offline_cpus(tmp_path: Path) -> None:
    for name, state in (("cpu0", None), ("cpu1", "1"), ("cpu2", "0"), ("cpu3", "0")):
        (tmp_path / name).mkdir()
        if state is not None:
            (tmp_path / name / "online").write_text(state)
    (tmp_path / "cpufreq").mkdir()
    assert _vmguest.online_all(tmp_path) == ["cpu2", "cpu3"]
    assert [(tmp_path / c / "online").read_text() for c in ("cpu1", "cpu2", "cpu3")] == ["1"] * 3


NIC = _net.PodNic(netns="/run/netns/pod", veth="eth0", mac="02:42:0a:00:00:02", mtu=1450,
                  addresses=("10.0.0.2/24",),
                  routes=(_net.Route("169.254.1.1/32", link_scope=True),
                          _net.Route("default", gateway="169.254.1.1")))


def test_pod_network_travels_to_the_guest_init() -> None:
    assert NIC.guest_config() == ("link 02:42:0a:00:00:02 eth0 1450\naddr 10.0.0.2/24\n"
                                  "route 169.254.1.1/32 scope link\nroute default via 169.254.1.1\n")
    line = _cmdline.kernel_cmdline(qemu_config.QemuConfig(), Accel("tcg", "test"), [],
                                   NIC.guest_config())
    word = next(w for w in line.split() if w.startswith("keel.net="))
    assert base64.b64decode(word.split("=", 1)[1]).decode() == NIC.guest_config()
    assert "keel.net=" not in _cmdline.kernel_cmdline(qemu_config.QemuConfig(), Accel("tcg", "t"), [])


@pytest.mark.parametrize(("machine", "device"), [("microvm", "virtio-net-device"),
                                                 ("q35", "virtio-net-pci")])
def test_tap_fd_and_mac_reach_qemu(tmp_path: Path, machine: str, device: str) -> None:
    cfg = qemu_config.QemuConfig(machine=machine)
    kw = dict(name="s", kernel=tmp_path / "k", initrd=tmp_path / "i", rootfs=tmp_path / "r",
              vcpus=1, memory_mib=512, cmdline="quiet")
    files = SandboxDir(tmp_path)
    argv = _cmdline.argv(cfg, Accel("tcg", "t"), files, tap=(7, NIC.mac), **kw)  # type: ignore[arg-type]
    i = argv.index("-netdev")
    assert argv[i:i + 4] == ["-netdev", "tap,id=net0,fd=7", "-device",
                             f"{device},netdev=net0,mac={NIC.mac}"]
    assert "-netdev" not in _cmdline.argv(cfg, Accel("tcg", "t"), files, **kw)  # type: ignore[arg-type]


def _spec(*namespaces: dict[str, str]) -> dict[str, object]:
    return {"ociVersion": "1.0.2", "process": {"args": ["true"]},
            "linux": {"namespaces": list(namespaces)}}


def test_guest_spec_drops_only_a_host_network_namespace_path() -> None:
    vm = QemuSandbox.__new__(QemuSandbox)  # guest_spec uses no state
    pod = _spec({"type": "pid"}, {"type": "network", "path": "/run/netns/pod"}, {"type": "mount"})
    assert netns_path(pod) == "/run/netns/pod"
    adapted = json.loads(vm.guest_spec(json.dumps(pod).encode()))
    assert adapted["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
    assert adapted["process"] == pod["process"]
    own = json.dumps(_spec({"type": "network"}, {"type": "mount"})).encode()
    assert vm.guest_spec(own) == own  # a namespace of its own: unchanged
    assert netns_path(json.loads(own)) is None


def test_guest_spec_moves_net_sysctls_of_the_pod_netns_to_the_agent() -> None:
    vm = QemuSandbox.__new__(QemuSandbox)
    pod = {**_spec({"type": "ipc"}, {"type": "network", "path": "/run/netns/pod"}),
           "annotations": {"io.kubernetes.cri.container-type": "sandbox"}}
    pod["linux"]["sysctl"] = {"kernel.shm_rmid_forced": "1",  # type: ignore[index]
                              "net.ipv4.ip_unprivileged_port_start": "1000"}
    adapted = json.loads(vm.guest_spec(json.dumps(pod).encode()))
    # runc still sets the IPC one; the agent sets the net one in the VM's namespace.
    assert adapted["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}
    assert adapted["annotations"] == {
        "io.kubernetes.cri.container-type": "sandbox",
        NET_SYSCTLS_ANNOTATION: '{"net.ipv4.ip_unprivileged_port_start": "1000"}'}
    # A namespace of its own: runc sets net sysctls there itself.
    own = _spec({"type": "network"})
    own["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}  # type: ignore[index]
    assert vm.guest_spec(json.dumps(own).encode()) == json.dumps(own).encode()
    # Only guest_spec writes the annotation the agent acts on.
    forged = {**_spec({"type": "network"}), "annotations": {NET_SYSCTLS_ANNOTATION: "{}"}}
    with pytest.raises(InvalidArgument, match="is Keel's own"):
        vm.guest_spec(json.dumps(forged).encode())


def _res(quota: int | None = None, period: int | None = None,
         limit: int | None = None) -> dict[str, object]:
    return {"linux": {"resources": {"cpu": {"quota": quota, "period": period},
                                    "memory": {"limit": limit}}}}


def test_workload_size_follows_the_kata_rule() -> None:
    assert _sizing.workload([]) == _sizing.Workload(0, 0)
    assert _sizing.workload([{"linux": {}}, _res()]) == _sizing.Workload(0, 0)
    assert _sizing.workload([_res(50000, 100000, 256 << 20)]) == _sizing.Workload(1, 256)
    # Fractions are summed, then rounded up once: 0.5 + 0.75 -> 2, not 1 + 1.
    both = [_res(50000, 100000, 100 << 20), _res(75000, 100000, (28 << 20) + 5)]
    assert _sizing.workload(both) == _sizing.Workload(2, 128)
    assert _sizing.workload([_res(300000, 100000)]) == _sizing.Workload(3, 0)
    assert _sizing.workload([_res(-1, 100000, -1)]) == _sizing.Workload(0, 0)


def _pod(**ann: str) -> dict[str, object]:
    """A CRI sandbox (pause) spec: its own resources tiny, the pod's in annotations."""
    keys = {"quota": _sizing.SANDBOX_CPU_QUOTA, "period": _sizing.SANDBOX_CPU_PERIOD,
            "memory": _sizing.SANDBOX_MEMORY}
    return {**_res(2000, 100000), "annotations": {keys[k]: v for k, v in ann.items()}}


def test_a_cri_sandbox_is_sized_by_its_pod_annotations() -> None:
    # 1.5 CPUs and 512 MiB for the pod: 2 vCPUs, 512 MiB on top of the base.
    pod = _pod(quota="150000", period="100000", memory=str(512 << 20))
    assert _sizing.workload([pod]) == _sizing.Workload(2, 512)
    assert _sizing.workload([_pod(memory=str(256 << 20))]) == _sizing.Workload(0, 256)
    # Not numbers: nothing asked (the pause container's own 0.02 CPU does not count).
    assert _sizing.workload([_pod(quota="-1", period="x", memory="")]) == _sizing.Workload(0, 0)
    # Without the annotations the container's resources count, as before.
    assert _sizing.workload([_res(2000, 100000)]) == _sizing.Workload(1, 0)


def test_launch_spec_of_a_cri_sandbox_carries_the_pods_size(tmp_path: Path) -> None:
    from shim._prelaunch import launch_spec
    from shim.config import ShimConfig

    pod = _pod(quota="250000", period="100000", memory=str(1 << 30))
    spec = launch_spec("p1", ShimConfig(state_root=tmp_path), tmp_path, pod)
    assert (spec.workload_vcpus, spec.workload_memory_mib) == (3, 1024)


def test_guest_network_lines_carry_ipv6_and_metrics() -> None:
    nic = _net.PodNic(netns="/run/netns/pod", veth="eth0", mac="02:42:0a:00:00:02", mtu=1500,
                      addresses=("10.0.0.2/24", "fd00::2/64"),
                      routes=(_net.Route("10.0.0.0/24", gateway="10.0.0.1"),
                              _net.Route("default", gateway="fd00::1", ipv6=True, metric=1024)))
    assert nic.guest_config().splitlines()[1:] == [
        "addr 10.0.0.2/24", "addr6 fd00::2/64", "route 10.0.0.0/24 via 10.0.0.1",
        "route6 default via fd00::1 metric 1024"]
