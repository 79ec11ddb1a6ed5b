"""Guest spans: ``ctr run --rm`` through a qemu sandbox with tracing on, and
an OTLP/HTTP receiver decoding what the shim exports (its own spans and the
ones it took from the guest's agent over the ops session).

Checked: the sandbox's boot (launch, the guest kernel and the agent's
start as the guest's Hello tells them, agent ready) and the chain
Task.Create -> agent.CreateContainer (in the guest) -> runc create, with the
guest's spans inside their parents' time once the measured guest clock
offset is applied.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.vmm.qemu import image
from tests.containerd import Containerd, install_shim_wrapper
from tests.images.busybox import build_image, import_image
from tests.otlp import ReceivedSpan, Receiver, child
from tests.vm.conftest import (
    IMAGE_CACHE,
    KEEL_RUNTIME,
    REPO,
    _containerd_teardown,
    write_keel_config,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.requires_root]

BUSYBOX = "localhost/keel/busybox:test"
CTR_TIMEOUT_S = 240.0
#: How far a guest span may stick out of its parent: the offset estimate is
#: good to half a round trip of an ops call (milliseconds under TCG).
SLACK_NS = 25_000_000


@pytest.fixture
def traced(vm_image: image.Image, require_env: Callable[[str], None]
           ) -> Iterator[tuple[Containerd, Receiver]]:
    require_env("integration")
    with Receiver() as rx:
        tmp = Path(tempfile.mkdtemp(prefix="kctt-", dir="/tmp"))
        config = write_keel_config(tmp / "keel.toml", vm_image)
        with config.open("a") as f:
            f.write(f'\n[tracing]\nenabled = true\nendpoint = "{rx.endpoint}"\n')
        ctd = Containerd(tmp, namespace="keel-vm-trace",
                         env={"KEEL_STATE_ROOT": str(tmp / "keel"), "KEEL_CONFIG": str(config)})
        install_shim_wrapper(ctd.paths.bin_dir, sys.executable,
                             env={"PYTHONPATH": str(REPO), "KEEL_CONFIG": str(config)})
        ctd.start()
        try:
            import_image(ctd.ctr_prefix(), build_image(IMAGE_CACHE))
            yield ctd, rx
        finally:
            _containerd_teardown(ctd)


def test_guest_spans_nest_under_the_shim_with_sane_times(
        traced: tuple[Containerd, Receiver]) -> None:
    ctd, rx = traced
    cid = "vm-trace"
    r = ctd.ctr("run", "--rm", "--runtime", KEEL_RUNTIME, BUSYBOX, cid, "echo", "traced",
                timeout=CTR_TIMEOUT_S)
    assert r.returncode == 0 and r.stdout.strip() == "traced", r

    def chain(spans: list[ReceivedSpan]) -> object:
        create = next((s for s in spans if s.name == "Task.Create"
                       and s.attributes.get("keel.container.id") == cid), None)
        launch = create and child(spans, create, "sandbox launch")
        ready = create and child(spans, create, "agent ready")
        agent = create and child(spans, create, "agent.CreateContainer")
        runc = agent and child(spans, agent, "runc create")
        kernel = create and child(spans, create, "guest kernel boot")
        started = create and child(spans, create, "guest agent start")
        if not (runc and launch and ready and kernel and started):
            return None
        return create, launch, ready, agent, runc, kernel, started

    create, launch, ready, agent, runc, kernel, started = rx.wait_for(chain, timeout=60)
    # The boot's phases, from the guest's Hello: the kernel until the agent
    # ran, then the agent until it answered; after qemu was spawned, ending
    # with the agent's answer.
    assert launch.start_ns - SLACK_NS <= kernel.start_ns < kernel.end_ns == started.start_ns
    assert started.end_ns <= ready.end_ns + SLACK_NS
    assert create.attributes["keel.backend"] == "qemu"
    assert "accel=" in launch.attributes["keel.vm"], launch.attributes
    assert agent.service == runc.service == "keel-agent"
    for inner, outer in ((launch, create), (ready, create), (agent, create), (runc, agent)):
        assert outer.start_ns - SLACK_NS <= inner.start_ns <= inner.end_ns \
            <= outer.end_ns + SLACK_NS, (inner, outer)
    assert launch.end_ns <= ready.start_ns + SLACK_NS <= agent.start_ns + 2 * SLACK_NS
    print(f"[vm] guest spans: CreateContainer {(agent.end_ns - agent.start_ns) / 1e6:.1f} ms"
          f" inside Task.Create {(create.end_ns - create.start_ns) / 1e6:.1f} ms;"
          f" boot {(ready.end_ns - launch.start_ns) / 1e9:.1f} s")
