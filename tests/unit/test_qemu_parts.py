"""The qemu backend's pure parts: config, command lines, initramfs writer, QMP client."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from keel.errors import FailedPrecondition, InvalidArgument, Unavailable
from shim.dirs import SandboxDir
from shim.vmm.qemu import _cmdline, _initramfs, config, qmp
from shim.vmm.qemu._accel import Accel
from shim.vmm.qemu._initramfs import PORTS

TCG = Accel("tcg", "test")


def test_config_validation_and_toml(tmp_path: Path) -> None:
    assert config.QemuConfig().machine == "microvm" and not config.QemuConfig().hotplug
    for bad in ({"machine": "isapc"}, {"accel": "hvf"}, {"vcpus": 0}, {"vcpus": 8, "max_vcpus": 4},
                {"memory_mib": 64}, {"kernel_args": ("two words",)}, {"tcg_tb_mib": -1}):
        with pytest.raises(InvalidArgument):
            config.QemuConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="unknown key"):
        config.QemuConfig.from_mapping({"machnie": "q35"})
    with pytest.raises(InvalidArgument, match="vcpus must be int"):
        config.QemuConfig.from_mapping({"vcpus": "2"})
    f = tmp_path / "config.toml"
    f.write_text('[shim]\nbackend = "qemu"\n[qemu]\nmachine = "q35"\nstart_timeout_s = 5\n'
                 'kernel_args = ["keel.debug=1"]\nimage = "/srv/img"\n')
    cfg = config.load(f)
    assert (cfg.machine, cfg.hotplug, cfg.start_timeout_s, cfg.kernel_args, cfg.image) == (
        "q35", True, 5.0, ("keel.debug=1",), Path("/srv/img"))
    with pytest.raises(InvalidArgument, match="does not exist"):
        config.load(tmp_path / "absent.toml")


def test_kernel_cmdline_carries_agent_args() -> None:
    line = _cmdline.kernel_cmdline(config.QemuConfig(), TCG, ["--runtime", "crun", "a b"])
    words = line.split()
    assert "pci=off" in words and "memhp_default_state=online" not in words
    arg = next(w for w in words if w.startswith("keel.args="))
    assert base64.b64decode(arg.split("=", 1)[1]).decode() == "--runtime\ncrun\na b\n"
    q35 = _cmdline.kernel_cmdline(config.QemuConfig(machine="q35"), Accel("kvm", ""), [])
    assert "memhp_default_state=online" in q35 and "tsc_early_khz" not in q35
    with pytest.raises(InvalidArgument, match="newlines"):
        _cmdline.kernel_cmdline(config.QemuConfig(), TCG, ["a\nb"])


def _argv(cfg: config.QemuConfig, root: Path) -> list[str]:
    return _cmdline.argv(cfg, TCG, SandboxDir(root), name="s1", kernel=Path("/k"),
                         initrd=Path("/i"), rootfs=Path("/r"), vcpus=1, memory_mib=512,
                         cmdline="console=ttyS0")


def test_qemu_argv_per_machine() -> None:
    micro = " ".join(_argv(config.QemuConfig(), Path("/run/s1")))
    assert "microvm,isa-serial=on" in micro and "virtio-serial-device" in micro
    assert "-daemonize" in micro and "-pidfile /run/s1/vmm.pid" in micro
    assert "path=/run/s1/agent.chan,server=on,wait=off" in micro and "name=keel.agent" in micro
    assert "maxcpus" not in micro and "slots=" not in micro
    # TCG's translation cache is capped (an idle guest kept ~70 MiB of qemu's default resident).
    assert "-accel tcg,tb-size=32 " in micro
    assert "-accel tcg -cpu" in " ".join(_argv(config.QemuConfig(tcg_tb_mib=0), Path("/run/s1")))
    assert Accel("kvm", "").qemu_args(32) == ["-accel", "kvm", "-cpu", "host"]
    # Free page reporting (opt-in): the guest hands freed pages back (virtio-balloon).
    assert "balloon" not in micro
    fpr = " ".join(_argv(config.QemuConfig(free_page_reporting=True), Path("/run/s1")))
    assert "-device virtio-balloon-device,free-page-reporting=on" in fpr
    q35 = " ".join(_argv(config.QemuConfig(machine="q35", max_vcpus=4, free_page_reporting=True),
                         Path("/run/s1")))
    assert "-device virtio-balloon-pci,free-page-reporting=on" in q35
    assert "-M q35" in q35 and "virtio-9p-pci" in q35 and "-smp 1,maxcpus=4" in q35
    # More than one vCPU, now or by hotplug: single-threaded TCG (qemu 7.2
    # aborts adding a vCPU thread when multi-threaded TCG has no free
    # translation-cache region).
    assert "-accel tcg,tb-size=32,thread=single " in q35
    assert "thread=single" not in micro
    assert "thread=single" not in " ".join(_argv(config.QemuConfig(machine="q35", max_vcpus=1),
                                                 Path("/run/s1")))
    two = " ".join(_cmdline.argv(config.QemuConfig(), TCG, SandboxDir(Path("/run/s1")), name="s1",
                                 kernel=Path("/k"), initrd=Path("/i"), rootfs=Path("/r"),
                                 vcpus=2, memory_mib=768, cmdline="console=ttyS0"))
    assert "-accel tcg,tb-size=32,thread=single " in two and "-smp 2 " in two
    assert Accel("kvm", "").qemu_args(32, max_vcpus=4) == ["-accel", "kvm", "-cpu", "host"]
    # Once daemonized, qemu's stderr goes to its -D file, not /dev/null.
    assert "-D /run/s1/vmm.log" in micro
    assert "size=512M,slots=8,maxmem=4096M" in q35
    with pytest.raises(InvalidArgument, match="','"):
        _argv(config.QemuConfig(), Path("/run/a,b"))
    with pytest.raises(InvalidArgument, match="too long"):
        SandboxDir.of(Path("/" + "x" * 100), "pod").check_sockets(PORTS)


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        body = name_start + namesize + (-(name_start + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body:body + size])
        pos = body + size + (-(body + size) % 4)


def test_initramfs_layout(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF-busybox")
    ko = tmp_path / "virtio.ko"
    ko.write_bytes(b"module")
    init = _initramfs.init_script("/usr/bin/python3", "/opt/keel/agent-x:/opt/keel/deps",
                                  "/var/lib/keel/preload.tar")
    assert "@" not in init.replace("$@", "")
    assert "/newroot/var/lib/keel/preload.tar" in init
    data = _initramfs.build(busybox, [("virtio", ko)], init, "virtio.ko:\n")
    assert len(data) % 512 == 0
    entries = _parse_cpio(data)
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["init"][0] & 0o111
    # Modules live under /keel: a template unpacks the guest's lib -> usr/lib over /.
    assert entries["keel/modules/order"][1] == b"virtio\n"
    assert entries["keel/modules/virtio.ko"][1] == b"module"
    assert not any(name.startswith("lib/") for name in entries)
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert b"--listen agent=serial:keel.agent" in entries["init"][1]


Reply = Callable[[dict[str, Any]], list[dict[str, Any]]]


@asynccontextmanager
async def fake_qmp(reply: Reply) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A QMP server: greeting, then *reply*(command) lines for each command."""
    seen: list[dict[str, Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        while line := await reader.readline():
            cmd = json.loads(line)
            seen.append(cmd)
            for msg in reply(cmd):
                writer.write(json.dumps(msg).encode() + b"\n")
            await writer.drain()
        writer.close()

    with tempfile.TemporaryDirectory(prefix="keel-qmp-") as d:
        path = str(Path(d) / "qmp.sock")
        server = await asyncio.start_unix_server(handle, path)
        try:
            yield path, seen
        finally:
            server.close()
            await server.wait_closed()


def _q35(cmd: dict[str, Any]) -> list[dict[str, Any]]:
    name = cmd["execute"]
    if name == "query-hotpluggable-cpus":
        slots = [{"type": "max-x86_64-cpu", "props": {"socket-id": 0, "core-id": i, "thread-id": 0},
                  **({"qom-path": "/machine/unattached/device[0]"} if i == 0 else {})}
                 for i in (1, 0)]
        return [{"return": slots}]
    if name == "query-status":
        return [{"event": "RESUME"}, {"return": {"status": "running", "running": True}}]
    if name == "query-memory-devices":
        return [{"return": [{"type": "dimm", "data": {"id": "keel-dimm0"}}]}]
    if name == "device_add" and cmd["arguments"]["driver"] == "pc-dimm":
        return [{"error": {"class": "GenericError", "desc": "no free slot"}}]
    return [{"return": {}}]


def test_qmp_client_commands_and_errors() -> None:
    async def main() -> list[dict[str, Any]]:
        async with fake_qmp(_q35) as (path, seen):
            async with qmp.QmpClient.connect(path) as client:
                assert await qmp.status(client) == "running"
                assert client.events() == [{"event": "RESUME"}]
                assert await qmp.add_vcpu(client) == 2
                with pytest.raises(qmp.QmpError, match="GenericError: no free slot"):
                    await qmp.add_memory(client, 256)
                with pytest.raises(InvalidArgument):
                    await qmp.add_memory(client, 100)
            return seen

    seen = asyncio.run(main())
    assert seen[0] == {"execute": "qmp_capabilities"}
    plug = next(c for c in seen if c["execute"] == "device_add")
    assert plug["arguments"] == {"driver": "max-x86_64-cpu", "id": "keel-cpu-1-0-0",
                                 "socket-id": 0, "core-id": 1, "thread-id": 0}
    assert {"execute": "object-add", "arguments": {"qom-type": "memory-backend-ram",
                                                   "id": "keel-mem1", "size": 256 << 20}} in seen
    assert {"execute": "object-del", "arguments": {"id": "keel-mem1"}} in seen


def test_qmp_connection_reset_is_unavailable() -> None:
    """qemu aborting mid-command resets the connection: Unavailable, as for a
    closed one (the sandbox's stop() then still cleans up)."""
    class Reset:
        async def readline(self) -> bytes:
            raise ConnectionResetError(104, "Connection reset by peer")

    class Sink:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            pass

    client = qmp.QmpClient(Reset(), Sink())  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="connection lost"):
        asyncio.run(client.execute("device_add", {"driver": "max-x86_64-cpu"}))


def test_qmp_full_slots_and_absent_qemu() -> None:
    def full(cmd: dict[str, Any]) -> list[dict[str, Any]]:
        slot = {"type": "max-x86_64-cpu", "props": {"core-id": 0}, "qom-path": "/x"}
        return [{"return": [slot] if cmd["execute"] == "query-hotpluggable-cpus" else {}}]

    async def main() -> None:
        async with fake_qmp(full) as (path, _):
            async with qmp.QmpClient.connect(path) as client:
                with pytest.raises(FailedPrecondition, match="maxcpus"):
                    await qmp.add_vcpu(client)
        with pytest.raises(Unavailable, match="cannot connect"):
            async with qmp.QmpClient.connect("/nonexistent/qmp.sock"):
                pass

    asyncio.run(main())
