"""VM templates: the first sandbox builds a template, sandboxes are clones of
it (each reseeded: RNG, clock; its agent preloaded; its RAM a copy-on-write
mapping of the template's memory file); a clone's agent upgrades in place
from a release's staged bundle as a cold-booted VM's does; and a corrupt
template falls back to a cold boot and is discarded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from keel import release
from observability.spans import Tracer
from shim._agent_upgrade import upgrade_agent
from shim._agentconn import AgentConnection
from shim.vmm.qemu import QemuBackend, QemuSandbox, guest_release, image
from tests.vm.conftest import AGENT_TIMEOUT_S, config, connect, remove_tree, spec, vms_of
from tests.vm.helpers import make_rootfs, run_container

pytestmark = [pytest.mark.vm, pytest.mark.slow]

#: Prints the guest's boot id, its clock (unix s) and 16 fresh random bytes.
_PROBE = ["sh", "-c", "cat /proc/sys/kernel/random/boot_id; busybox date +%s; "
          "busybox head -c 16 /dev/urandom | busybox od -A n -t x1"]


@pytest.fixture
def work() -> Iterator[Path]:
    """Sandbox dirs, a busybox rootfs and (``tpl``) the template dir of one test.

    The template dir is on a tmpfs when the host has ``/dev/shm``, as in
    production (the template's RAM is a file there).
    """
    d = Path(tempfile.mkdtemp(prefix="ktpl-", dir="/tmp"))  # short: socket paths below it
    shm = Path("/dev/shm")
    tpl = Path(tempfile.mkdtemp(prefix="ktpl-", dir=shm)) if shm.is_dir() else d / "tpl-dir"
    (d / "tpl").symlink_to(tpl)
    yield d
    for pid in [p for sub in d.glob("s*") for p in vms_of(sub)]:
        print(f"[vm] teardown: killing leaked VM pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    remove_tree(d)
    shutil.rmtree(tpl, ignore_errors=True)


@contextlib.asynccontextmanager
async def started(backend: QemuBackend, root: Path) -> AsyncIterator[
        tuple[QemuSandbox, AgentConnection, float]]:
    """Launch a sandbox in *root*, wait for its agent: (sandbox, connection, launch-to-ready s)."""
    t0 = time.monotonic()
    vm = await backend.launch(spec(root))
    conn = connect(vm)
    try:
        await conn.wait_ready(AGENT_TIMEOUT_S, vm.alive)
        yield vm, conn, time.monotonic() - t0
    except BaseException:
        print(f"[vm] console of {root.name}:\n"
              f"{(root / 'agent.log').read_text(errors='replace')[-3000:]}")
        raise
    finally:
        conn.close()
        await vm.stop()
        backend.close_fds(vm)


async def _probe(vm: QemuSandbox, conn: AgentConnection, rootfs: Path) -> tuple[str, str]:
    """The guest's boot id and urandom bytes; checks its clock against the host's."""
    before = time.time()
    status, out, err = await run_container(vm, conn, "probe", _PROBE, rootfs)
    after = time.time()
    assert status == 0, err
    boot_id, clock, random_hex = out.decode().strip().split("\n", 2)
    # A clone's clock must be the host's, not its template's (which would be
    # behind by the template's age at the clone's start: tens of seconds for the
    # second clone under TCG).  Whole seconds in the guest, and a TCG guest
    # on a loaded host loses jiffies (cold boots too): allow some lag.
    print(f"[vm] {vm.files.root.name}: guest clock {float(clock) - before:+.1f}s from the host's "
          f"(probe {after - before:.1f}s long)")
    assert before - 10 <= float(clock) <= after + 2, (clock, before, after)
    return boot_id, random_hex.strip()


def _random_check(vm: QemuSandbox) -> str:
    """The agent's Python ``random`` sample its template clone logged on the console."""
    found = re.findall(r"clone \S+ resumed, .* random check ([0-9a-f]{8})",
                       vm.files.agent_log.read_text(errors="replace"))
    assert len(found) == 1, f"{vm.files.root.name}: no (single) clone line on the console"
    return found[0]


def _memory(pid: int) -> dict[str, int]:
    """Rss and Pss (MiB) of process *pid*."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) >> 10
    return {k: fields[k] for k in ("Rss", "Pss")}


def _release_with_bundle(root: Path) -> Path:
    """A release directory of this tree's version holding only what a VM agent
    upgrade reads: ``bin/keel-agent`` (a file) and the guest bundle."""
    rel = root / release.version()
    (rel / "bin").mkdir(parents=True)
    (rel / "bin" / "keel-agent").write_text("#!/bin/false\n")
    guest_release.build(rel / "guest")
    return rel


async def _upgrade_agent(vm: QemuSandbox, conn: AgentConnection, rel: Path) -> None:
    """The shim's agent upgrade (shim/_agent_upgrade.py) against *vm*: check, stage, exec."""
    sb = SimpleNamespace(id=vm.files.root.name, vm=vm, agent=conn, persist=lambda: None,
                         ops=None, session_key="", tracing=SimpleNamespace(tracer=Tracer("t")),
                         config=SimpleNamespace(agent_timeout_s=AGENT_TIMEOUT_S))
    r = await upgrade_agent(sb, str(rel / "bin" / "keel-agent"), rel.name)  # type: ignore[arg-type]
    assert (r.to_version, r.rolled_back, r.message) == (rel.name, False, "upgraded"), r
    log = vm.files.agent_log.read_text(errors="replace")
    staged = re.findall(r"staged release (\S+) \(\d+ bytes, sha256 \w+\) in (\S+)", log)
    assert staged and staged[-1][0] == rel.name, log[-3000:]
    assert staged[-1][1].startswith("/run/keel/agent/releases/"), staged
    assert log.count("resumed and ready") == 1, log[-3000:]
    print(f"[vm] clone {sb.id}: agent upgraded to the staged {staged[-1][1]} in place,"
          f" gap {r.gap_s * 1000:.0f} ms")


def test_template_clones(vm_image: image.Image, work: Path) -> None:
    rootfs = make_rootfs(work / "rootfs")
    backend = QemuBackend(config(vm_image, template=True, template_dir=work / "tpl",
                                 memory_mib=256))

    async def scenario() -> None:
        # The first sandbox builds the template (boot to its snapshot point) and is a clone.
        async with started(backend, work / "s1") as (vm1, conn1, first):
            built = [d for d in (work / "tpl").iterdir() if d.is_dir()]
            assert [d.name for d in built] == [vm1.info.get("template")], built
            size = (built[0] / "snapshot").stat().st_size
            print(f"[vm] template built + first clone ready in {first:.2f}s "
                  f"(snapshot {size >> 10} KiB)")
            # The RAM is not in the snapshot: clones map the template's memory file.
            assert size < 16 << 20, f"snapshot of {size >> 20} MiB holds the guest RAM"
            maps = Path(f"/proc/{vm1.pid}/maps").read_text()
            assert str((built[0] / "memory").resolve()) in maps, "the clone does not map the template's RAM"
            # A second clone while the first one runs: same template, its own guest.
            created = json.loads((built[0] / "template.json").read_text())["created"]
            async with started(backend, work / "s2") as (vm2, conn2, second):
                print(f"[vm] template start -> agent ready: {second:.2f}s (template "
                      f"{time.time() - second - created:.0f}s old at the start)")
                assert vm2.info.get("template") == vm1.info["template"]
                id1, rand1 = await _probe(vm1, conn1, rootfs)
                id2, rand2 = await _probe(vm2, conn2, rootfs)
                memory = {vm.pid: _memory(vm.pid) for vm in (vm1, vm2)}
                print(f"[vm] idle clones (256 MiB guests), qemu MiB: {memory}; "
                      f"load {os.getloadavg()[0]:.1f}")
                agents = [c.hello.boot_id if c.hello else "" for c in (conn1, conn2)]
                checks = [_random_check(vm) for vm in (vm1, vm2)]
            # A clone's agent upgrades as a cold-booted VM's does: a release's
            # bundle staged into the guest, exec'd in place, then serving.
            await _upgrade_agent(vm1, conn1, _release_with_bundle(work / "releases"))
            assert (await _probe(vm1, conn1, rootfs))[0] == id1  # the same guest
        print(f"[vm] clones: boot ids {id1} / {id2}, urandom {rand1} / {rand2}, agent boot ids "
              f"{agents}, agent random checks {checks}")
        assert id1 != id2, "clones share the template's boot id"
        assert rand1 != rand2, "clones share the template's RNG output"
        assert agents[0] != agents[1], "the clones' agents drew the same uuid"
        assert checks[0] != checks[1], "the clones' agents share Python's random state"

    asyncio.run(scenario())


def test_corrupt_template_falls_back_to_cold_boot(vm_image: image.Image, work: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rootfs = make_rootfs(work / "rootfs")
    backend = QemuBackend(config(vm_image, template=True, template_dir=work / "tpl"))

    async def scenario() -> None:
        async with started(backend, work / "s1") as (vm, _conn, _):
            key = vm.info["template"]
        # A clone alone on the host, to compare with the cold boot below.
        async with started(backend, work / "s3") as (vm, _conn, clone):
            assert vm.info.get("template") == key
        snapshot = work / "tpl" / key / "snapshot"
        size = snapshot.stat().st_size
        snapshot.write_bytes(b"not a migration stream\n" * 1000)
        with caplog.at_level(logging.WARNING, logger="keel.shim.qemu"):
            async with started(backend, work / "s2") as (vm, conn, cold):
                assert "template" not in vm.info, "a corrupt template was used"
                status, out, _ = await run_container(vm, conn, "c", ["echo", "cold"], rootfs)
                assert (status, out) == (0, b"cold\n")
        print(f"[vm] start -> agent ready, one VM at a time: template {clone:.2f}s, "
              f"cold boot (template fallback) {cold:.2f}s (snapshot {size >> 20} MiB)")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("template" in w and "cold boot" in w for w in warnings), warnings
        # The clone died loading it: the template is gone, the next launch rebuilds it.
        assert not snapshot.parent.exists(), "a template that cannot be restored was kept"

    asyncio.run(scenario())
