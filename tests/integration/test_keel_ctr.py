"""The Keel shim (`io.containerd.keel.v2`, process backend) under a real
containerd 1.6, driven with `ctr`: normal operation.

The same scenarios as `test_runc_baseline.py` (which records what the
stock runc shim does) -- output and exit codes, exec, stdin, TTYs,
parallel containers -- plus a pod's containers sharing one shim, metrics
and pause/resume.  Containerd restarting and shims dying are in
`test_keel_ctr_recovery.py`, bad input in `test_keel_ctr_errors.py`.
Every test ends with the `container_ids` fixture's check that no process,
mount or socket of the private containerd is left.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.containerd import Containerd, alive, wait_for
from tests.integration.keel_ctr import (
    KEEL,
    POD_ANNOTATION,
    address,
    disconnects,
    host_pids,
    kill_and_remove,
    listed,
    log_since,
    no_cleanup_failures,
    pids,
    run_detached,
    sandbox_dirs,
    shim_pid,
    status,
)

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]


# --- 1. run --rm: output and exit code -------------------------------------

def test_run_rm_output_and_exit_code(containerd: Containerd, busybox: str,
                                     container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    start = len(containerd.log_text())
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, busybox, cid,
                         "sh", "-c", "echo hello; echo err >&2; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, "hello\n", "err\n")
    assert not listed(containerd, "tasks", cid)
    assert not listed(containerd, "containers", cid)
    log = log_since(containerd, start)
    no_cleanup_failures(log)
    # The only disconnect is the one of containerd's own delete.
    assert disconnects(log) == 1, log


# --- 2. detached: exec, ps, kill, rm ---------------------------------------

def test_detached_exec_ps_kill_delete(containerd: Containerd, busybox: str,
                                      container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    start = len(containerd.log_text())
    pid = run_detached(containerd, busybox, cid, "sleep", "1000")

    res = containerd.ctr("tasks", "exec", "--exec-id", "e1", cid,
                         "sh", "-c", "echo from-exec; echo $$; exit 4")
    assert res.returncode == 4, res.stderr
    out = res.stdout.splitlines()
    assert out[0] == "from-exec" and int(out[1]) > 1, res.stdout  # exec is not PID 1
    # The same exec id can be used again once the first one is gone.
    res = containerd.ctr("tasks", "exec", "--exec-id", "e1", cid, "cat", "/proc/1/cmdline")
    assert (res.returncode, res.stdout) == (0, "sleep\0001000\0"), res

    ps = containerd.ctr("tasks", "ps", cid)
    assert ps.returncode == 0, ps.stderr
    rows = ps.stdout.splitlines()
    assert rows[0].split()[0] == "PID" and len(rows) == 2, ps.stdout  # header + init
    assert int(rows[1].split()[0]) == pid, ps.stdout

    assert disconnects(log_since(containerd, start)) == 0
    kill_and_remove(containerd, cid)
    log = log_since(containerd, start)
    no_cleanup_failures(log)
    assert disconnects(log) == 1, log  # the one of `task rm`


# --- 3. stdin ---------------------------------------------------------------

def test_run_rm_stdin_reaches_the_process(containerd: Containerd, busybox: str,
                                          container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    data = "one\ntwo\nthree\n" * 1000
    res = containerd.ctr_feed("run", "--rm", "--runtime", KEEL, busybox, cid,
                              "sh", "-c", "wc -l -c; exit 6", input=data,
                              when=lambda: status(containerd, cid) == "RUNNING")
    assert res.returncode == 6, res.stderr
    assert res.stdout.split() == ["3000", str(len(data))], res.stdout


def test_exec_stdin_reaches_the_process(containerd: Containerd, busybox: str,
                                        container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000")
    # Fed once the exec runs (the init plus it in `task ps`), as for `ctr run`.
    res = containerd.ctr_feed("tasks", "exec", "--exec-id", "cat1", cid, "cat", input="echoed back\n",
                              when=lambda: len(pids(containerd, cid)) == 2)
    assert (res.returncode, res.stdout) == (0, "echoed back\n"), res
    kill_and_remove(containerd, cid)


def test_exec_stdin_given_at_once(containerd: Containerd, busybox: str,
                                  container_ids: Callable[[], str]) -> None:
    """Input and its EOF can reach the shim before the exec has started."""
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000")
    data = "x" * 100_000
    res = containerd.ctr("tasks", "exec", "--exec-id", "wc", cid, "wc", "-c", input=data, timeout=60)
    assert (res.returncode, res.stdout.strip()) == (0, str(len(data))), res
    kill_and_remove(containerd, cid)


# --- 4. TTY -------------------------------------------------------------------

def test_run_tty(containerd: Containerd, busybox: str,
                 container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr_pty("run", "--rm", "-t", "--runtime", KEEL, busybox, cid,
                             "sh", "-c", "tty; echo tty-ok; exit 5", timeout=60)
    lines = res.output.replace("\r", "").splitlines()
    assert res.returncode == 5, res.output
    assert lines == ["/dev/pts/0", "tty-ok"], res.output


def test_run_tty_interactive(containerd: Containerd, busybox: str,
                             container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr_pty("run", "--rm", "-t", "--runtime", KEEL, busybox, cid, "sh",
                             input="echo $((6*7)); exit 7\n", timeout=60)
    assert res.returncode == 7, res.output
    assert "42" in res.output.replace("\r", "").splitlines(), res.output


def test_exec_tty(containerd: Containerd, busybox: str,
                  container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000")
    res = containerd.ctr_pty("tasks", "exec", "-t", "--exec-id", "term", cid, "sh",
                             input="tty; exit 8\n", timeout=60)
    assert res.returncode == 8, res.output
    lines = res.output.replace("\r", "").splitlines()
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in lines), res.output
    kill_and_remove(containerd, cid)


# --- 5. parallel ----------------------------------------------------------------

def test_parallel_containers(containerd: Containerd, busybox: str,
                             container_ids: Callable[[], str]) -> None:
    cids = [container_ids() for _ in range(4)]
    results: dict[str, object] = {}
    start = len(containerd.log_text())

    def run(i: int, cid: str) -> None:
        try:
            results[cid] = containerd.ctr(
                "run", "--rm", "--runtime", KEEL, busybox, cid,
                "sh", "-c", f"echo out-{i}; echo err-{i} >&2; exit {10 + i}", timeout=120)
        except Exception as exc:  # reported below, on the test's thread
            results[cid] = exc

    threads = [threading.Thread(target=run, args=(i, cid)) for i, cid in enumerate(cids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    for i, cid in enumerate(cids):
        res = results.get(cid)
        assert isinstance(res, subprocess.CompletedProcess), (cid, res)
        assert (res.returncode, res.stdout, res.stderr) == (10 + i, f"out-{i}\n", f"err-{i}\n"), res
        assert not listed(containerd, "tasks", cid)
    log = log_since(containerd, start)
    no_cleanup_failures(log)
    assert disconnects(log) == len(cids), log  # one per `run --rm`'s delete


# --- 6. a pod's containers share one shim ------------------------------------

def test_grouped_containers_share_one_shim(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str]) -> None:
    first, second = container_ids(), container_ids()
    pod = f"pod-{first}"
    start = len(containerd.log_text())
    group = (f"--annotation={POD_ANNOTATION}={pod}",)
    run_detached(containerd, busybox, first, "sleep", "1000", extra=group)
    run_detached(containerd, busybox, second, "sleep", "1000", extra=group)

    assert address(containerd, first) == address(containerd, second)
    shim = shim_pid(containerd, first)
    assert shim_pid(containerd, second) == shim
    assert pod in sandbox_dirs(containerd)
    assert first not in sandbox_dirs(containerd) and second not in sandbox_dirs(containerd)
    for cid in (first, second):
        res = containerd.ctr("tasks", "exec", "--exec-id", "who", cid, "sh", "-c", "echo $HOSTNAME-ok")
        assert (res.returncode, res.stdout.strip().endswith("-ok")) == (0, True), res

    kill_and_remove(containerd, first)
    # The pod's shim and the other container go on.
    assert status(containerd, second) == "RUNNING"
    assert shim_pid(containerd, second) == shim
    res = containerd.ctr("tasks", "exec", "--exec-id", "after", second, "echo", "still-here")
    assert (res.returncode, res.stdout) == (0, "still-here\n"), res

    kill_and_remove(containerd, second)
    wait_for(lambda: not alive(shim), 15, "the pod's shim to exit")
    assert pod not in sandbox_dirs(containerd)
    no_cleanup_failures(log_since(containerd, start))


# --- 9. metrics, pause / resume -----------------------------------------------

def test_metrics_pause_resume(containerd: Containerd, busybox: str,
                              container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1001")
    [host_pid] = host_pids(containerd, "sleep 1001")

    res = containerd.ctr("tasks", "metrics", "--format", "json", cid)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["pids"]["current"] >= 1, metrics
    assert metrics["memory"]["usage"]["usage"] > 0, metrics
    assert metrics["cpu"]["usage"]["total"] > 0, metrics
    res = containerd.ctr("tasks", "metrics", cid)
    assert res.returncode == 0 and re.search(r"pids\.current\s+[1-9]", res.stdout), res

    assert _frozen(host_pid) is False
    assert containerd.ctr("tasks", "pause", cid).returncode == 0
    assert status(containerd, cid) == "PAUSED"
    assert _frozen(host_pid) is True
    assert containerd.ctr("tasks", "resume", cid).returncode == 0
    assert status(containerd, cid) == "RUNNING"
    assert _frozen(host_pid) is False
    res = containerd.ctr("tasks", "exec", "--exec-id", "alive", cid, "echo", "thawed")
    assert (res.returncode, res.stdout) == (0, "thawed\n"), res
    kill_and_remove(containerd, cid)


def _frozen(pid: int) -> bool:
    """Whether the freezer cgroup of host process `pid` is frozen (cgroup v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):  # v1
            return Path(f"/sys/fs/cgroup/freezer{path}/freezer.state").read_text().strip() == "FROZEN"
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():  # pure v2
            return "frozen 1" in Path(f"/sys/fs/cgroup{path}/cgroup.events").read_text()
    raise AssertionError(f"process {pid} is in no freezer cgroup")
