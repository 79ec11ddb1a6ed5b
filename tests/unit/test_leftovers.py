"""The leftover scan sees what belongs to its own temp root, and nothing of a
neighbour's: two suites, each with a private containerd, share this host.

The processes here are stand-ins that look like Keel's (a ``keel-agent``
command line naming a state root, a shim's ``TTRPC_ADDRESS``, a sandbox's
mount namespace, a container on an overlay rootfs); each blocks reading
its stdin until the test closes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.containerd import leftovers, processes_of, wait_for
from tests.containerd.host import DEFAULT_PATH
from tests.images.busybox import BUSYBOX_PATH
from tests.prereq import skip_or_fail

#: A process that only waits for its stdin to close.
BLOCK = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
#: Prints the pid of a child (without the parent's argv or environment) that
#: blocks on the same stdin, then waits for it.
PARENT = [sys.executable, "-c",
          "import subprocess, sys\n"
          f"c = subprocess.Popen([{sys.executable!r}, '-c', 'import sys; sys.stdin.buffer.read()'],"
          " env={})\n"
          "print(c.pid, flush=True)\n"
          "c.wait()\n"]


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """Our temp root, and a neighbour's whose name starts with ours."""
    ours, theirs = tmp_path / "ctd", tmp_path / "ctd2"
    ours.mkdir()
    theirs.mkdir()
    return ours, theirs


@contextlib.contextmanager
def blocked(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            ready: bytes | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run *argv* until the block exits, with only PATH and *env* in its
    environment.  Yields once the last program of the chain has been
    exec'd: its command line starts with *ready* (by default: this
    interpreter, with *argv*'s last argument in the command line)."""
    def started(pid: int) -> bool:
        cmd = _cmdline(pid)
        if ready is not None:
            return cmd.startswith(ready)
        return cmd.startswith(os.fsencode(sys.executable) + b"\0") and os.fsencode(argv[-1]) in cmd

    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={"PATH": DEFAULT_PATH, **(env or {})})
    try:
        wait_for(lambda: proc.poll() is not None or started(proc.pid), 10, f"{argv[0]} to start")
        assert proc.poll() is None, proc.communicate()
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _cmdline(pid: int) -> bytes:
    return _read(f"/proc/{pid}/cmdline")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def found(root: Path) -> set[int]:
    return {pid for pid, _ in leftovers(root).processes}


def agent_argv(state_root: Path) -> list[str]:
    """A stand-in whose command line reads like a process agent of *state_root*."""
    return [*BLOCK, "keel-agent", "--state-dir", str(state_root / "keel" / "sandboxes" / "p"
                                                     / "agent")]


def test_a_command_line_naming_our_root_is_ours(roots: tuple[Path, Path]) -> None:
    ours, _ = roots
    with blocked(agent_argv(ours)) as proc:
        assert proc.pid in found(ours)
        [(_, cmd)] = [p for p in processes_of(str(ours)) if p[0] == proc.pid]
        assert "keel-agent" in cmd


def test_an_environment_naming_our_root_is_ours(roots: tuple[Path, Path]) -> None:
    ours, _ = roots
    env = {"TTRPC_ADDRESS": f"{ours}/containerd.sock.ttrpc"}
    with blocked([*BLOCK, "containerd-shim-keel-v2"], env=env) as proc:
        assert proc.pid in found(ours)


def test_a_neighbours_agent_and_shim_are_not_ours(roots: tuple[Path, Path]) -> None:
    """Its root is ours plus a suffix: a substring match would take it."""
    ours, theirs = roots
    env = {"TTRPC_ADDRESS": f"{theirs}/containerd.sock.ttrpc",
           "KEEL_STATE_ROOT": f"{theirs}/keel"}
    with blocked(agent_argv(theirs), env=env) as agent, \
            blocked([*BLOCK, "containerd-shim-keel-v2"], env=env) as shim:
        assert found(theirs) >= {agent.pid, shim.pid}
        assert not found(ours) & {agent.pid, shim.pid}


def test_descendants_of_ours_are_ours(roots: tuple[Path, Path]) -> None:
    """A child that names nothing (like a container process) goes with its parent."""
    ours, theirs = roots
    for root, expect in ((ours, True), (theirs, False)):
        with blocked([*PARENT, f"--root={root}"]) as parent:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())  # printed once the child has exec'd
            assert b"--root" not in _cmdline(child) and b"ctd" not in _read(f"/proc/{child}/environ")
            assert (child in found(ours)) is expect
            assert (parent.pid in found(ours)) is expect


# --- mount namespaces (root: unshare, mount) ---------------------------------

def _tools(*names: str) -> None:
    if missing := [n for n in names if shutil.which(n) is None]:
        skip_or_fail(f"{', '.join(missing)} not found (apt-get install util-linux coreutils)")


@pytest.mark.requires_root
def test_a_namespace_with_a_copy_of_our_mount_is_not_ours(roots: tuple[Path, Path]) -> None:
    """Another containerd's sandbox, unshared while one of our rootfs was
    mounted: its namespace keeps a copy of that mount, its root is the host's."""
    _tools("unshare", "mount", "nsenter")
    ours, theirs = roots
    (ours / "rootfs").mkdir()
    script = f'mount -t tmpfs keel-test {ours}/rootfs && exec "$@"'
    with blocked(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                  "sh", *agent_argv(theirs)]) as agent:
        mountinfo = Path(f"/proc/{agent.pid}/mountinfo").read_text()
        assert f"{ours}/rootfs" in mountinfo  # the copy is there...
        assert agent.pid not in found(ours)  # ...and does not make it ours
        assert agent.pid in found(theirs)
        # Something of ours that runs in that namespace makes it ours.
        with blocked(["nsenter", "-t", str(agent.pid), "-m", "--", *BLOCK, str(ours)]) as helper:
            assert {agent.pid, helper.pid} <= found(ours)


@pytest.mark.requires_root
def test_a_container_on_a_rootfs_of_ours_is_ours(roots: tuple[Path, Path]) -> None:
    """A process chrooted onto an overlay whose layers are under our root; its
    command line, environment and parent name nothing."""
    _tools("unshare", "mount", "chroot")
    if not Path(BUSYBOX_PATH).exists():
        skip_or_fail(f"{BUSYBOX_PATH} missing (apt-get install busybox-static)")
    ours, theirs = roots
    for root, expect in ((ours, True), (theirs, False)):
        layer = root / "lower" / "bin"
        layer.mkdir(parents=True)
        shutil.copy(BUSYBOX_PATH, layer / "busybox")
        for d in ("upper", "work", "merged"):
            (root / d).mkdir()
        opts = f"lowerdir={root}/lower,upperdir={root}/upper,workdir={root}/work"
        script = (f"mount -t overlay overlay -o {opts} {root}/merged"
                  f" && exec chroot {root}/merged /bin/busybox cat")
        with blocked(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                      script], ready=b"/bin/busybox\0cat\0") as container:
            assert (container.pid in found(ours)) is expect
