"""The Keel shim (`io.containerd.keel.v2`, process backend) under a real
containerd 1.6, driven with `ctr`.

The same scenarios as `test_runc_baseline.py` (which records what the
stock runc shim does), plus what only a shim can get wrong: grouping a pod
into one shim, containerd restarting under a running task, the shim dying
(containerd's `shim delete` cleanup), metrics and pause/resume, and bad
input.  Every test ends with the `container_ids` fixture's check that no
process, mount or socket of the private containerd is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.containerd import Containerd, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]

KEEL = "io.containerd.keel.v2"
POD_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# containerd's log lines when a task's shim cleanup went wrong (research
# containerd-shim.md 2.7, 5.2); "shim disconnected" itself is logged on
# every normal delete too, so only a disconnect of a *live* task counts.
CLEANUP_FAILED = ("failed to clean up after shim disconnected", "cleanup warnings")


# --- helpers --------------------------------------------------------------

_task = Containerd.task


def _status(ctd: Containerd, cid: str) -> str | None:
    task = _task(ctd, cid)
    return None if task is None else task[1]


def _listed(ctd: Containerd, kind: str, cid: str) -> bool:
    return cid in ctd.ctr(kind, "ls", "-q").stdout.split()


def _pids(ctd: Containerd, cid: str) -> list[int]:
    """The PIDs `ctr task ps` lists for `cid`."""
    res = ctd.ctr("tasks", "ps", cid)
    assert res.returncode == 0, res.stderr
    return [int(line.split()[0]) for line in res.stdout.splitlines()[1:] if line.strip()]


def _host_pids(ctd: Containerd, cmdline: str) -> list[int]:
    """Host PIDs of this containerd's processes whose command line is `cmdline`.

    (Task PIDs that ctr shows are the sandbox's own, as with a VM.)
    """
    return [pid for pid, cmd in ctd.leftovers().processes if cmd == cmdline]


def _disconnects(log: str) -> int:
    return log.count('msg="shim disconnected"')


def _bundle(ctd: Containerd, cid: str) -> Path:
    return ctd.paths.state / "io.containerd.runtime.v2.task" / ctd.namespace / cid


def _address(ctd: Containerd, cid: str) -> str:
    """The shim address containerd recorded for `cid` (the bundle's `address` file)."""
    return (_bundle(ctd, cid) / "address").read_text()


def _shim_pid(ctd: Containerd, cid: str) -> int:
    """PID of the shim daemon serving `cid`: the process listening on its address."""
    sock = _address(ctd, cid).removeprefix("unix://")
    inode = _socket_inode(sock)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
            for fd in fds:
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") == f"socket:[{inode}]":
                    return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no process listens on {sock}")


def _socket_inode(path: str) -> int:
    """The inode of the listening unix socket bound at `path` (from /proc/net/unix)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path:
                return int(fields[6])
    raise AssertionError(f"no unix socket bound at {path}")


def _sandbox_dirs(ctd: Containerd) -> list[str]:
    base = ctd.paths.tmp_root / "keel" / "sandboxes"
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def _run_detached(ctd: Containerd, image: str, cid: str, *args: str,
                  extra: tuple[str, ...] = ()) -> int:
    res = ctd.ctr("run", "-d", "--runtime", KEEL, *extra, image, cid, *args)
    assert res.returncode == 0, res.stderr
    task = _task(ctd, cid)
    assert task is not None and task[0] > 0 and task[1] == "RUNNING", task
    return task[0]


def _kill_and_remove(ctd: Containerd, cid: str, expect_status: int = 137) -> None:
    """SIGKILL task `cid`, wait for STOPPED, `task rm` and `container rm` it."""
    res = ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: _status(ctd, cid) == "STOPPED", 15, f"{cid} to stop")
    res = ctd.ctr("tasks", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert f"exit with non-zero exit code {expect_status}" in res.stderr, res.stderr
    assert not _listed(ctd, "tasks", cid)
    res = ctd.ctr("containers", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert not _listed(ctd, "containers", cid)


def _log_since(ctd: Containerd, offset: int) -> str:
    return ctd.log_text()[offset:]


def _no_cleanup_failures(log: str) -> None:
    bad = [line for line in log.splitlines() if any(m in line for m in CLEANUP_FAILED)]
    assert not bad, "\n".join(bad)


# --- 1. run --rm: output and exit code -------------------------------------

def test_run_rm_output_and_exit_code(containerd: Containerd, busybox: str,
                                     container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    start = len(containerd.log_text())
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, busybox, cid,
                         "sh", "-c", "echo hello; echo err >&2; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, "hello\n", "err\n")
    assert not _listed(containerd, "tasks", cid)
    assert not _listed(containerd, "containers", cid)
    log = _log_since(containerd, start)
    _no_cleanup_failures(log)
    # The only disconnect is the one of containerd's own delete.
    assert _disconnects(log) == 1, log


# --- 2. detached: exec, ps, kill, rm ---------------------------------------

def test_detached_exec_ps_kill_delete(containerd: Containerd, busybox: str,
                                      container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    start = len(containerd.log_text())
    pid = _run_detached(containerd, busybox, cid, "sleep", "1000")

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

    assert _disconnects(_log_since(containerd, start)) == 0
    _kill_and_remove(containerd, cid)
    log = _log_since(containerd, start)
    _no_cleanup_failures(log)
    assert _disconnects(log) == 1, log  # the one of `task rm`


# --- 3. stdin ---------------------------------------------------------------

def test_run_rm_stdin_reaches_the_process(containerd: Containerd, busybox: str,
                                          container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    data = "one\ntwo\nthree\n" * 1000
    res = containerd.ctr_feed("run", "--rm", "--runtime", KEEL, busybox, cid,
                              "sh", "-c", "wc -l -c; exit 6", input=data,
                              when=lambda: _status(containerd, cid) == "RUNNING")
    assert res.returncode == 6, res.stderr
    assert res.stdout.split() == ["3000", str(len(data))], res.stdout


def test_exec_stdin_reaches_the_process(containerd: Containerd, busybox: str,
                                        container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    _run_detached(containerd, busybox, cid, "sleep", "1000")
    # Fed once the exec runs (the init plus it in `task ps`), as for `ctr run`.
    res = containerd.ctr_feed("tasks", "exec", "--exec-id", "cat1", cid, "cat", input="echoed back\n",
                              when=lambda: len(_pids(containerd, cid)) == 2)
    assert (res.returncode, res.stdout) == (0, "echoed back\n"), res
    _kill_and_remove(containerd, cid)


def test_exec_stdin_given_at_once(containerd: Containerd, busybox: str,
                                  container_ids: Callable[[], str]) -> None:
    """Input and its EOF can reach the shim before the exec has started."""
    cid = container_ids()
    _run_detached(containerd, busybox, cid, "sleep", "1000")
    data = "x" * 100_000
    res = containerd.ctr("tasks", "exec", "--exec-id", "wc", cid, "wc", "-c", input=data, timeout=60)
    assert (res.returncode, res.stdout.strip()) == (0, str(len(data))), res
    _kill_and_remove(containerd, cid)


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
    _run_detached(containerd, busybox, cid, "sleep", "1000")
    res = containerd.ctr_pty("tasks", "exec", "-t", "--exec-id", "term", cid, "sh",
                             input="tty; exit 8\n", timeout=60)
    assert res.returncode == 8, res.output
    lines = res.output.replace("\r", "").splitlines()
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in lines), res.output
    _kill_and_remove(containerd, cid)


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
        assert not _listed(containerd, "tasks", cid)
    log = _log_since(containerd, start)
    _no_cleanup_failures(log)
    assert _disconnects(log) == len(cids), log  # one per `run --rm`'s delete


# --- 6. a pod's containers share one shim ------------------------------------

def test_grouped_containers_share_one_shim(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str]) -> None:
    first, second = container_ids(), container_ids()
    pod = f"pod-{first}"
    start = len(containerd.log_text())
    group = (f"--annotation={POD_ANNOTATION}={pod}",)
    _run_detached(containerd, busybox, first, "sleep", "1000", extra=group)
    _run_detached(containerd, busybox, second, "sleep", "1000", extra=group)

    assert _address(containerd, first) == _address(containerd, second)
    shim = _shim_pid(containerd, first)
    assert _shim_pid(containerd, second) == shim
    assert pod in _sandbox_dirs(containerd)
    assert first not in _sandbox_dirs(containerd) and second not in _sandbox_dirs(containerd)
    for cid in (first, second):
        res = containerd.ctr("tasks", "exec", "--exec-id", "who", cid, "sh", "-c", "echo $HOSTNAME-ok")
        assert (res.returncode, res.stdout.strip().endswith("-ok")) == (0, True), res

    _kill_and_remove(containerd, first)
    # The pod's shim and the other container go on.
    assert _status(containerd, second) == "RUNNING"
    assert _shim_pid(containerd, second) == shim
    res = containerd.ctr("tasks", "exec", "--exec-id", "after", second, "echo", "still-here")
    assert (res.returncode, res.stdout) == (0, "still-here\n"), res

    _kill_and_remove(containerd, second)
    wait_for(lambda: not _alive(shim), 15, "the pod's shim to exit")
    assert pod not in _sandbox_dirs(containerd)
    _no_cleanup_failures(_log_since(containerd, start))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- 7. containerd restarts under a running task -----------------------------

def test_containerd_restart_keeps_task(containerd: Containerd, busybox: str,
                                       container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    pid = _run_detached(containerd, busybox, cid, "sh", "-c", "trap 'exit 42' TERM; "
                        "while true; do sleep 0.1; done")
    shim = _shim_pid(containerd, cid)
    containerd.restart()
    start = len(containerd.log_text())

    assert _task(containerd, cid) == (pid, "RUNNING")
    assert _shim_pid(containerd, cid) == shim  # re-found through `address`, not restarted
    res = containerd.ctr("tasks", "exec", "--exec-id", "after-restart", cid, "echo", "reconnected")
    assert (res.returncode, res.stdout) == (0, "reconnected\n"), res

    res = containerd.ctr("tasks", "kill", "-s", "SIGTERM", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: _status(containerd, cid) == "STOPPED", 15, f"{cid} to stop")
    assert _disconnects(_log_since(containerd, start)) == 0
    res = containerd.ctr("tasks", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert "exit with non-zero exit code 42" in res.stderr, res.stderr
    assert containerd.ctr("containers", "rm", cid).returncode == 0
    _no_cleanup_failures(_log_since(containerd, start))


def test_attach_across_containerd_restart(containerd: Containerd, busybox: str,
                                          container_ids: Callable[[], str]) -> None:
    """After a restart, `ctr task attach` (Wait + the task's fifos) gets output and exit code."""
    cid = container_ids()
    _run_detached(containerd, busybox, cid, "sh", "-c",
                  "trap 'echo bye; exit 9' TERM; while true; do sleep 0.1; done")
    containerd.restart()
    assert _status(containerd, cid) == "RUNNING"

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
    assert not _listed(containerd, "tasks", cid)  # ctr attach deletes the task it waited for
    assert containerd.ctr("containers", "rm", cid).returncode == 0


# --- 8. the shim is SIGKILLed --------------------------------------------------

def test_shim_killed_is_cleaned_up(containerd: Containerd, busybox: str,
                                   container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    _run_detached(containerd, busybox, cid, "sleep", "1000")
    shim = _shim_pid(containerd, cid)
    # Everything of this containerd now: the shim, the agent, `sleep`.
    sandbox = [pid for pid, _ in containerd.leftovers().processes]
    assert shim in sandbox and len(sandbox) >= 3, sandbox
    start = len(containerd.log_text())
    os.kill(shim, signal.SIGKILL)

    # containerd sees the connection drop, runs `shim delete`, which kills
    # the container through the agent and stops the sandbox.
    wait_for(lambda: "shim disconnected" in _log_since(containerd, start), 15,
             "containerd to notice the dead shim")
    # containerd forgets the task (publishing exit 137 from `shim delete`'s answer).
    wait_for(lambda: _task(containerd, cid) is None, 30, f"{cid} to go away")
    wait_for(lambda: all(f"topic=/tasks/{e} " in _log_since(containerd, start)
                         for e in ("exit", "delete")), 15, "containerd's own exit and delete events")
    wait_for(lambda: not any(_alive(p) for p in sandbox), 15, "the sandbox's processes to die")
    _no_cleanup_failures(_log_since(containerd, start))
    res = containerd.ctr("containers", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert not _listed(containerd, "containers", cid)
    assert cid not in _sandbox_dirs(containerd)


def test_shim_died_while_containerd_was_down(containerd: Containerd, busybox: str,
                                            container_ids: Callable[[], str]) -> None:
    """containerd finds the shim unreachable when it loads its tasks and runs
    `shim delete` then, before its own sockets serve."""
    cid = container_ids()
    _run_detached(containerd, busybox, cid, "sleep", "1000")
    shim = _shim_pid(containerd, cid)
    sandbox = [pid for pid, _ in containerd.leftovers().processes]
    assert shim in sandbox and len(sandbox) >= 3, sandbox
    containerd.stop(leftover_grace=0)
    os.kill(shim, signal.SIGKILL)
    wait_for(lambda: not _alive(shim), 10, "the shim to die")
    start = len(containerd.log_text())
    containerd.start()

    assert _task(containerd, cid) is None
    wait_for(lambda: not any(_alive(p) for p in sandbox), 15, "the sandbox's processes to die")
    log = _log_since(containerd, start)
    assert "cleaning up dead shim" in log, log
    _no_cleanup_failures(log)
    assert containerd.ctr("containers", "rm", cid).returncode == 0
    assert cid not in _sandbox_dirs(containerd)


def test_grouped_shim_killed_is_cleaned_up(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str]) -> None:
    """Both tasks of a pod lose their shim at once: containerd runs two
    `shim delete`s concurrently, and together they must stop the sandbox."""
    first, second = container_ids(), container_ids()
    pod = f"pod-{first}"
    group = (f"--annotation={POD_ANNOTATION}={pod}",)
    _run_detached(containerd, busybox, first, "sleep", "1000", extra=group)
    _run_detached(containerd, busybox, second, "sleep", "1000", extra=group)
    shim = _shim_pid(containerd, first)
    sandbox = [pid for pid, _ in containerd.leftovers().processes]
    assert shim in sandbox and len(sandbox) >= 4, sandbox  # shim, agent, 2 x sleep
    start = len(containerd.log_text())
    os.kill(shim, signal.SIGKILL)

    wait_for(lambda: _task(containerd, first) is None and _task(containerd, second) is None, 30,
             "both tasks to go away")
    wait_for(lambda: not any(_alive(p) for p in sandbox), 15, "the sandbox's processes to die")
    _no_cleanup_failures(_log_since(containerd, start))
    for cid in (first, second):
        assert containerd.ctr("containers", "rm", cid).returncode == 0
    assert pod not in _sandbox_dirs(containerd)


# --- 9. metrics, pause / resume -----------------------------------------------

def test_metrics_pause_resume(containerd: Containerd, busybox: str,
                              container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    _run_detached(containerd, busybox, cid, "sleep", "1001")
    [host_pid] = _host_pids(containerd, "sleep 1001")

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
    assert _status(containerd, cid) == "PAUSED"
    assert _frozen(host_pid) is True
    assert containerd.ctr("tasks", "resume", cid).returncode == 0
    assert _status(containerd, cid) == "RUNNING"
    assert _frozen(host_pid) is False
    res = containerd.ctr("tasks", "exec", "--exec-id", "alive", cid, "echo", "thawed")
    assert (res.returncode, res.stdout) == (0, "thawed\n"), res
    _kill_and_remove(containerd, cid)


def _frozen(pid: int) -> bool:
    """Whether the freezer cgroup of host process `pid` is frozen (cgroup v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):  # v1
            return Path(f"/sys/fs/cgroup/freezer{path}/freezer.state").read_text().strip() == "FROZEN"
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():  # pure v2
            return "frozen 1" in Path(f"/sys/fs/cgroup{path}/cgroup.events").read_text()
    raise AssertionError(f"process {pid} is in no freezer cgroup")


# --- 10. bad input ---------------------------------------------------------------

def test_missing_binary_is_a_clear_error(containerd: Containerd, busybox: str,
                                         container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, busybox, cid, "/nonexistent")
    assert res.returncode != 0
    assert "/nonexistent" in res.stderr and "no such file" in res.stderr.lower(), res.stderr
    containerd.ctr("containers", "rm", cid)  # ctr leaves the record when create fails
    assert not _listed(containerd, "tasks", cid)
    assert not _listed(containerd, "containers", cid)
    assert cid not in _sandbox_dirs(containerd)


def test_bad_spec_is_a_clear_error(containerd: Containerd, busybox: str,
                                   container_ids: Callable[[], str], tmp_path: Path) -> None:
    # Well-formed for ctr and containerd (so it reaches the shim), invalid
    # for the OCI runtime: a relative working directory.
    cid = container_ids()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/true"], "cwd": "relative/dir", "env": ["PATH=/bin"]},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }))
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, "--config", str(spec), cid)
    assert res.returncode != 0
    assert "failed to create shim task" in res.stderr and "absolute path" in res.stderr, res.stderr
    containerd.ctr("containers", "rm", cid)
    assert not _listed(containerd, "tasks", cid)
    assert not _listed(containerd, "containers", cid)
    assert cid not in _sandbox_dirs(containerd)


@pytest.mark.parametrize(("config", "expect"), [
    ("", "does not exist"),  # a runtime config path that names no file
    ("bogus_option = 1\n", "unknown key 'bogus_option'"),
    ('backend = "hyperv"\n', "backend must be"),
])
def test_bad_runtime_options_are_a_clear_error(containerd: Containerd, busybox: str,
                                               container_ids: Callable[[], str],
                                               tmp_path: Path, config: str, expect: str) -> None:
    cid = container_ids()
    path = tmp_path / "keel.toml"
    if config:
        path.write_text(config)
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, "--runtime-config-path", str(path),
                         busybox, cid, "true")
    assert res.returncode != 0
    assert "failed to start shim" in res.stderr and str(path) in res.stderr, res.stderr
    assert expect in res.stderr, res.stderr
    containerd.ctr("containers", "rm", cid)
    assert not _listed(containerd, "tasks", cid)
    assert not _listed(containerd, "containers", cid)
    assert cid not in _sandbox_dirs(containerd)


def test_missing_oci_runtime_is_a_clear_error(containerd: Containerd, busybox: str,
                                              container_ids: Callable[[], str],
                                              tmp_path: Path) -> None:
    cid = container_ids()
    missing = tmp_path / "no-such-runc"
    config = tmp_path / "keel.toml"
    config.write_text(f'runtime = "{missing}"\n')
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, "--runtime-config-path", str(config),
                         busybox, cid, "true")
    assert res.returncode != 0
    assert str(missing) in res.stderr, res.stderr
    containerd.ctr("containers", "rm", cid)
    assert not _listed(containerd, "tasks", cid)
    assert not _listed(containerd, "containers", cid)
    assert cid not in _sandbox_dirs(containerd)
