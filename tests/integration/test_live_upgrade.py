"""Live upgrade end to end: a real containerd, real ``ctr``, real releases side by side.

A container started by ``ctr run --rm`` in the foreground prints a sequence
number every ~2 ms; the test reads ctr's stdout, so every byte crosses
containerd's own stdio fifos.  While containerd's Wait on the task and an
exec (blocked reading its stdin) are pending, the shim and the agent are
upgraded back and forth between two releases through the sandbox's
ShimOps endpoint, and once through ``opsd`` + ``opsctl upgrade``.  Then
the sandbox must look as if nothing happened: containerd never logged a
disconnect, the task kept its pid, every number arrived exactly once and
in order, the exec still reads and answers, the exit code is the
container's.

Fault injection is in test_live_upgrade_faults.py, the upgrade from an
earlier release of this repository in test_live_upgrade_previous.py; the
releases and the ShimOps calls in live_upgrade.py, the workload in
tests/workloads.py.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable

import pytest

from tests.containerd import Containerd, wait_for
from tests.integration.live_upgrade import (
    READER,
    SWITCHES,
    A,
    B,
    assert_serving,
    opsctl,
    opsd,
    spread,
    status,
    task_of,
    upgrade_agent,
    upgrade_shim,
    workload,
)
from tests.workloads import disconnects
from upgrade.releases import ReleaseStore

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]


def test_upgrade_back_and_forth_under_load(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str],
                                           releases: ReleaseStore) -> None:
    cid = container_ids()
    rel = {v: releases.get(v) for v in (A, B)}
    with workload(containerd, cid, rel[A], busybox) as w:
        # A pending exec, blocked on its stdin (and containerd's Wait on it).
        reader = subprocess.Popen(
            [*containerd.ctr_prefix(), "tasks", "exec", "--exec-id", "reader", cid,
             "sh", "-c", READER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # And requests in flight at any moment: `ctr task ps` (containerd -> shim -> agent).
        stop_ps = threading.Event()
        ps_runs: list[subprocess.CompletedProcess[str]] = []
        ps = threading.Thread(target=_ps_loop, args=(containerd, cid, stop_ps, ps_runs),
                              daemon=True)
        try:
            wait_for(lambda: "reader" in status(w).containers[0].exec_ids, 30, "the exec")
            assert_serving(w, A, A)
            ps.start()
            freezes, gaps = [], []
            for i in range(SWITCHES):
                frm, to = (A, B) if i % 2 == 0 else (B, A)
                before = status(w).shim_pid
                r = upgrade_shim(w, rel[to].shim_path)
                assert (r.from_version, r.to_version) == (frm, to)
                assert r.new_shim_pid not in (0, before)
                assert_serving(w, to, frm, r.new_shim_pid)  # the new shim, the old agent
                freezes.append(r.freeze_ms)
                a = upgrade_agent(w, rel[to])
                assert (a.from_version, a.to_version, a.rolled_back) == (frm, to, False), a
                gaps.append(a.gap_s * 1000)
                assert_serving(w, to, to, r.new_shim_pid)
                w.untouched()
            stop_ps.set()
            ps.join(60)
            failed = [r for r in ps_runs if r.returncode != 0 or str(w.pid) not in r.stdout]
            assert len(ps_runs) > SWITCHES and not failed, (len(ps_runs), failed[:3])
            # The agent's own figure: its old image's last answer to the new one's first.
            inside = [float(g) for g in re.findall(r": gap ([0-9.]+) ms",
                                                   w.sandbox.agent_log.read_text())]
            assert len(inside) == SWITCHES, inside
            print(f"\n{SWITCHES} shim handoffs: freeze ms {spread(freezes)}; agent upgrades:"
                  f" gap ms seen by the shim {spread(gaps)}, by the agent {spread(inside)};"
                  f" {len(ps_runs)} `ctr task ps` meanwhile, all answered")

            # Once more through the operator's path: opsd and opsctl.
            with opsd(containerd, releases) as ctl:
                res = opsctl(ctl, "upgrade", "--to", B, "--sandbox", cid)
                assert res.returncode == 0, res
                assert f"{cid}: shim {A} -> {B}" in res.stdout and "succeeded" in res.stdout, res
                listed = opsctl(ctl, "ls")
                assert re.search(rf"^{re.escape(cid)}\s+{re.escape(B)}\s+{re.escape(B)}\s",
                                 listed.stdout, re.M), listed.stdout
            assert_serving(w, B, B)
            w.untouched()

            # The exec that waited through all of it still reads and answers.
            out, err = reader.communicate(b"hello\n", timeout=30)
            assert (reader.returncode, out, err) == (3, b"got:hello\n", b"")
            assert task_of(containerd, cid) == (w.pid, "RUNNING")
            assert not disconnects(containerd, cid), disconnects(containerd, cid)
            assert w.finish() == 7, w.err.decode()
        finally:
            stop_ps.set()
            if reader.poll() is None:
                reader.kill()
                reader.communicate()
        w.assert_sequence()


def _ps_loop(ctd: Containerd, cid: str, stop: threading.Event,
             runs: list[subprocess.CompletedProcess[str]]) -> None:
    while not stop.wait(0.05):
        runs.append(ctd.ctr("tasks", "ps", cid))
