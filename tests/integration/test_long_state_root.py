"""A 64-character pod id under a long state root, as CRI names pods: the
sandbox's sockets do not fit under ``<root>/sandboxes/<id>/`` (unix socket
paths hold 107 bytes), so they live in ``<root>/c/<hash>/`` and the pod runs,
execs, stops and leaves nothing behind, as under a short root.

A containerd of its own: its ``KEEL_STATE_ROOT`` is the long one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.dirs import MAX_STATE_ROOT, SandboxDir
from tests.containerd import Containerd, wait_for
from tests.images.busybox import BUSYBOX_REF
from tests.integration.keel_ctr import KEEL, status, task_of

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]


def test_a_pod_with_a_64_character_id_under_a_long_state_root(
        long_root_containerd: tuple[Containerd, Path]) -> None:
    ctd, root = long_root_containerd
    assert len(str(root)) == MAX_STATE_ROOT
    cid = "f" * 63 + "1"
    sdir = SandboxDir.of(root, cid)
    assert sdir.sockets_dir != sdir.root  # the case at hand: sockets of their own
    res = ctd.ctr("run", "-d", "--runtime", KEEL, BUSYBOX_REF, cid, "sleep", "1000")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: status(ctd, cid) == "RUNNING", 30, f"{cid[:12]} to run")
    assert sdir.ops_socket.is_socket() and sdir.channel("agent").is_socket()
    res = ctd.ctr("tasks", "exec", "--exec-id", "e1", cid, "echo", "from a long root")
    assert (res.returncode, res.stdout) == (0, "from a long root\n"), res
    assert ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid).returncode == 0
    wait_for(lambda: status(ctd, cid) == "STOPPED", 30, f"{cid[:12]} to stop")
    assert ctd.ctr("tasks", "rm", cid).returncode == 0
    assert ctd.ctr("containers", "rm", cid).returncode == 0
    assert task_of(ctd, cid) is None
    wait_for(lambda: not sdir.root.exists() and not sdir.sockets_dir.exists(), 15,
             "the sandbox and its sockets directory to go")
    found = ctd.leftovers(grace=10.0)
    assert not found, f"left behind:\n{found}"
