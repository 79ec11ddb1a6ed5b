"""The launcher under a real containerd: shim daemons and process agents
forked from it look and behave as if exec'd; without it (off, or killed)
pods start the plain way and a new launcher takes over.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.containerd import Containerd, alive, keel_launchers, wait_for
from tests.integration.keel_ctr import KEEL, kill_and_remove, run_detached, shim_pid

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]


def _state_root(ctd: Containerd) -> Path:
    return ctd.paths.tmp_root / "keel"


def _warm(ctd: Containerd, busybox: str, cid: str) -> dict[int, Path]:
    """Start a pod (which starts a launcher if none runs) and wait for the launcher."""
    res = ctd.ctr("run", "--rm", "--runtime", KEEL, busybox, cid, "true")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: keel_launchers(_state_root(ctd)), 60, "a launcher to serve")
    return keel_launchers(_state_root(ctd))


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def _env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().rstrip(b"\0").decode()
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def _agent_pid(ctd: Containerd, sandbox: str) -> int:
    state_dir = str(_state_root(ctd) / "sandboxes" / sandbox / "agent")
    found = [pid for pid, _ in ctd.leftovers().processes
             if alive(pid) and "--state-dir" in (a := _argv(pid)) and state_dir in a]
    assert len(found) == 1, found
    return found[0]


def test_forked_daemon_and_agent_look_execd(containerd: Containerd, busybox: str,
                                            container_ids: Callable[[], str]) -> None:
    launchers = _warm(containerd, busybox, container_ids())
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000")
    shim = shim_pid(containerd, cid)
    argv = _argv(shim)
    # The command line the exec path gives it, NUL-separated, whole.
    assert argv[:3] == [sys.executable, "-m", "shim"], argv
    assert argv[argv.index("-id") + 1] == cid and argv[argv.index("-namespace") + 1] == containerd.namespace
    env = _env(shim)
    assert env.get("KEEL_LAUNCHER") in {str(s) for s in launchers.values()}, env  # forked, not exec'd
    assert "TTRPC_ADDRESS" in env
    # Reparented, not the launcher's child; in containerd's cgroup, not the launcher's.
    assert int(_status_field(shim, "PPid")) not in launchers
    assert Path(f"/proc/{shim}/cgroup").read_text() == Path(f"/proc/{containerd.pid}/cgroup").read_text()

    agent = _agent_pid(containerd, cid)
    assert _argv(agent)[:3] == [sys.executable, "-m", "agent"]
    assert "KEEL_LAUNCHER" in _env(agent)
    assert _status_field(agent, "NSpid").split()[-1] == "1"  # PID 1 of its own pid namespace
    # A fresh interpreter's signal dispositions, not the launcher's: SIGPIPE
    # ignored (a write to a closed socket raises instead of killing).
    for pid in (shim, agent):
        assert int(_status_field(pid, "SigIgn"), 16) & (1 << (signal.SIGPIPE - 1)), pid

    res = containerd.ctr("tasks", "exec", "--exec-id", "e1", cid, "echo", "from-exec")
    assert (res.returncode, res.stdout) == (0, "from-exec\n"), res.stderr
    kill_and_remove(containerd, cid)


def test_launcher_off_starts_the_plain_way(containerd: Containerd, busybox: str,
                                           container_ids: Callable[[], str], tmp_path: Path) -> None:
    _warm(containerd, busybox, container_ids())
    config = tmp_path / "keel.toml"
    config.write_text("launcher_idle_s = 0\n")
    cid = container_ids()
    run_detached(containerd, busybox, cid, "sleep", "1000",
                  extra=("--runtime-config-path", str(config)))
    shim = shim_pid(containerd, cid)
    assert "KEEL_LAUNCHER" not in _env(shim)
    assert _argv(shim)[:3] == [sys.executable, "-m", "shim"]
    assert "KEEL_LAUNCHER" not in _env(_agent_pid(containerd, cid))
    kill_and_remove(containerd, cid)


def test_a_killed_launcher_is_replaced(containerd: Containerd, busybox: str,
                                       container_ids: Callable[[], str]) -> None:
    before = _warm(containerd, busybox, container_ids())
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in before), 10, "the launcher to die")
    # Its socket is still there, with nobody behind it: start execs the
    # daemon itself, the pod runs, and a new launcher is started.
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, busybox, container_ids(), "echo", "hi")
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    wait_for(lambda: set(keel_launchers(_state_root(containerd))) - set(before), 60,
             "a new launcher")
    res = containerd.ctr("run", "--rm", "--runtime", KEEL, busybox, container_ids(), "echo", "again")
    assert (res.returncode, res.stdout) == (0, "again\n"), res.stderr


def test_a_stuck_launcher_costs_a_timeout_not_the_pod(containerd: Containerd, busybox: str,
                                                      container_ids: Callable[[], str]) -> None:
    """SIGSTOP the launcher: start gives up on it after its timeout and
    execs the daemon (saying so in the launcher's log, not on stderr, which
    containerd reads as the address).  Resumed, the launcher finds the
    abandoned request unacknowledged: the daemon it forked for it exits
    instead of serving a socket that another daemon serves."""
    launchers = _warm(containerd, busybox, container_ids())
    for pid in launchers:
        os.kill(pid, signal.SIGSTOP)
    try:
        res = containerd.ctr("run", "--rm", "--runtime", KEEL, busybox, container_ids(), "echo", "hi")
        assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
        cid = container_ids()
        run_detached(containerd, busybox, cid, "sleep", "1000")
        shim = shim_pid(containerd, cid)
        assert "KEEL_LAUNCHER" not in _env(shim)  # exec'd
    finally:
        for pid in launchers:
            os.kill(pid, signal.SIGCONT)
    logs = "".join(sock.with_suffix(".log").read_text() for sock in launchers.values())
    assert "exec'd the daemon" in logs, logs
    # The launcher gets to the two queued requests now; nothing it forks for
    # them may serve: one daemon per socket.  (Their callers are gone, so it
    # refuses them; a caller that is alive but gave up never acknowledges
    # the pid, and the child exits.)

    def dropped() -> int:
        text = "".join(sock.with_suffix(".log").read_text() for sock in launchers.values())
        return text.count("request refused") + text.count("left before it took")

    wait_for(lambda: dropped() >= 2, 30, "the launcher to drop the two abandoned requests")
    serving = [pid for pid, _ in containerd.leftovers().processes
               if alive(pid) and _argv(pid)[:3] == [sys.executable, "-m", "shim"]
               and cid in _argv(pid)]
    assert serving == [shim], serving
    res = containerd.ctr("tasks", "exec", "--exec-id", "e1", cid, "echo", "still-one")
    assert (res.returncode, res.stdout) == (0, "still-one\n"), res.stderr
    kill_and_remove(containerd, cid)
