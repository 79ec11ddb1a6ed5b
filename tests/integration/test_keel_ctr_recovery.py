"""The Keel shim under a real containerd 1.6 when something goes away:
containerd restarting under a running task (reconnect, attach), and the
shim SIGKILLed -- while containerd runs, while it is down, and the shim of
a pod of two -- after which containerd's `shim delete` must stop the
sandbox and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from tests.containerd import Containerd, alive, wait_for
from tests.integration.keel_ctr import (
    POD_ANNOTATION,
    disconnects,
    listed,
    log_since,
    no_cleanup_failures,
    run_detached,
    sandbox_dirs,
    shim_pid,
    status,
    task_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]


# --- 7. containerd restarts under a running task -----------------------------

def test_containerd_restart_keeps_task(containerd: Containerd, busybox: str,
                                       container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    pid = run_detached(containerd, busybox, cid, "sh", "-c", "trap 'exit 42' TERM; "
                        "while true; do sleep 0.1; done")
    shim = shim_pid(containerd, cid)
    containerd.restart()
    start = len(containerd.log_text())

    assert task_of(containerd, cid) == (pid, "RUNNING")
    assert shim_pid(containerd, cid) == shim  # re-found through `address`, not restarted
    res = containerd.ctr("tasks", "exec", "--exec-id", "after-restart", cid, "echo", "reconnected")
    assert (res.returncode, res.stdout) == (0, "reconnected\n"), res

    res = containerd.ctr("tasks", "kill", "-s", "SIGTERM", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: status(containerd, cid) == "STOPPED", 15, f"{cid} to stop")
    assert disconnects(log_since(containerd, start)) == 0
    res = containerd.ctr("tasks", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert "exit with non-zero exit code 42" in res.stderr, res.stderr
    assert containerd.ctr("containers", "rm", cid).returncode == 0
    no_cleanup_failures(log_since(containerd, start))


def test_attach_across_containerd_restart(containerd: Containerd, busybox: str,
                                          container_ids: Callable[[], str]) -> None:
    """After a restart, `ctr task attach` (Wait + the task's fifos) gets output and exit code."""
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sh", "-c",
                  "trap 'echo bye; exit 9' TERM; while true; do sleep 0.1; done")
    containerd.restart()
    assert status(containerd, cid) == "RUNNING"

    done: dict[str, object] = {}

    def attach() -> None:
        try:
            done["attach"] = containerd.ctr("tasks", "attach", cid, timeout=60)
        except Exception as exc:  # reported on the test's thread
            done["attach"] = exc

    waiter = threading.Thread(target=attach)
    waiter.start()
    # attach has its Wait in once it holds the fifos; a kill before that is fine
    # too (Wait of a stopped process returns at once), so no need to sync.
    assert containerd.ctr("tasks", "kill", cid).returncode == 0  # SIGTERM
    waiter.join(70)
    res = done.get("attach")
    assert isinstance(res, subprocess.CompletedProcess), res
    assert res.returncode == 9, res
    assert res.stdout == "bye\n", res
    assert not listed(containerd, "tasks", cid)  # ctr attach deletes the task it waited for
    assert containerd.ctr("containers", "rm", cid).returncode == 0


# --- 8. the shim is SIGKILLed --------------------------------------------------

def test_shim_killed_is_cleaned_up(containerd: Containerd, busybox: str,
                                   container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000")
    shim = shim_pid(containerd, cid)
    # Everything of this containerd now: the shim, the agent, `sleep`.
    sandbox = [pid for pid, _ in containerd.leftovers().processes]
    assert shim in sandbox and len(sandbox) >= 3, sandbox
    start = len(containerd.log_text())
    os.kill(shim, signal.SIGKILL)

    # containerd sees the connection drop, runs `shim delete`, which kills
    # the container through the agent and stops the sandbox.
    wait_for(lambda: "shim disconnected" in log_since(containerd, start), 15,
             "containerd to notice the dead shim")
    # containerd forgets the task (publishing exit 137 from `shim delete`'s answer).
    wait_for(lambda: task_of(containerd, cid) is None, 30, f"{cid} to go away")
    wait_for(lambda: all(f"topic=/tasks/{e} " in log_since(containerd, start)
                         for e in ("exit", "delete")), 15, "containerd's own exit and delete events")
    wait_for(lambda: not any(alive(p) for p in sandbox), 15, "the sandbox's processes to die")
    no_cleanup_failures(log_since(containerd, start))
    res = containerd.ctr("containers", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert not listed(containerd, "containers", cid)
    assert cid not in sandbox_dirs(containerd)


def test_shim_died_while_containerd_was_down(containerd: Containerd, busybox: str,
                                            container_ids: Callable[[], str]) -> None:
    """containerd finds the shim unreachable when it loads its tasks and runs
    `shim delete` then, before its own sockets serve."""
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000")
    shim = shim_pid(containerd, cid)
    sandbox = [pid for pid, _ in containerd.leftovers().processes]
    assert shim in sandbox and len(sandbox) >= 3, sandbox
    containerd.stop(leftover_grace=0)
    os.kill(shim, signal.SIGKILL)
    wait_for(lambda: not alive(shim), 10, "the shim to die")
    start = len(containerd.log_text())
    containerd.start()

    assert task_of(containerd, cid) is None
    wait_for(lambda: not any(alive(p) for p in sandbox), 15, "the sandbox's processes to die")
    log = log_since(containerd, start)
    assert "cleaning up dead shim" in log, log
    no_cleanup_failures(log)
    assert containerd.ctr("containers", "rm", cid).returncode == 0
    assert cid not in sandbox_dirs(containerd)


def test_grouped_shim_killed_is_cleaned_up(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str]) -> None:
    """Both tasks of a pod lose their shim at once: containerd runs two
    `shim delete`s concurrently, and together they must stop the sandbox."""
    first, second = container_ids(), container_ids()
    pod = f"pod-{first}"
    group = (f"--annotation={POD_ANNOTATION}={pod}",)
    run_detached(containerd, busybox, first, "sleep", "1000", extra=group)
    run_detached(containerd, busybox, second, "sleep", "1000", extra=group)
    shim = shim_pid(containerd, first)
    sandbox = [pid for pid, _ in containerd.leftovers().processes]
    assert shim in sandbox and len(sandbox) >= 4, sandbox  # shim, agent, 2 x sleep
    start = len(containerd.log_text())
    os.kill(shim, signal.SIGKILL)

    wait_for(lambda: task_of(containerd, first) is None and task_of(containerd, second) is None, 30,
             "both tasks to go away")
    wait_for(lambda: not any(alive(p) for p in sandbox), 15, "the sandbox's processes to die")
    no_cleanup_failures(log_since(containerd, start))
    for cid in (first, second):
        assert containerd.ctr("containers", "rm", cid).returncode == 0
    assert pod not in sandbox_dirs(containerd)


# --- 9. the agent stops answering ------------------------------------------------

def test_sigkill_does_not_depend_on_a_stuck_agent(containerd: Containerd, busybox: str,
                                                  container_ids: Callable[[], str]) -> None:
    """The agent is frozen (SIGSTOP): ``ctr task kill -s SIGKILL`` still ends
    the pod.  The shim's signal call gets no answer within its deadline, so
    the shim stops the sandbox through its backend and reports the task
    killed (137); delete and container rm then work, and nothing is left."""
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000")
    state = json.loads((containerd.paths.tmp_root / "keel" / "sandboxes" / cid / "state.json")
                       .read_text())
    agent = int(state["vmm"]["pid"])
    start = len(containerd.log_text())
    os.kill(agent, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        res = containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, timeout=60)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: status(containerd, cid) == "STOPPED", 30, f"{cid} to stop")
        took = time.monotonic() - t0
    finally:
        if alive(agent):
            os.kill(agent, signal.SIGCONT)
    print(f"[recovery] SIGKILL with a frozen agent: STOPPED after {took:.1f}s")
    assert took < 25, took
    assert not alive(agent)
    assert "the agent did not take SIGKILL" in log_since(containerd, start)
    res = containerd.ctr("tasks", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert "exit with non-zero exit code 137" in res.stderr, res.stderr
    assert containerd.ctr("containers", "rm", cid).returncode == 0
    assert cid not in sandbox_dirs(containerd)
