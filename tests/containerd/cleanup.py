"""What outlived a test, scoped to one temp root, and how to remove it.

Several suites (or a suite and a benchmark) may run their own private
containerd on one host at the same time; each looks only at what is its
own.  A process belongs to a temp root when

* its command line or environment names the root as a path (containerd
  starts every shim with ``-address <tmp>/containerd.sock`` and
  ``TTRPC_ADDRESS=<tmp>/...``; Keel's launcher children and agents carry
  the shim's environment) -- the root itself or a path below it, never a
  longer name that merely starts with it (``<tmp>2``);
* it shares a mount namespace with such a process (a process-backend
  sandbox: whatever runs in the agent's namespaces);
* its own root filesystem is a mount that names the root (a container
  on a rootfs from this containerd's snapshotter, whoever its parent is
  now); or
* it descends from one of the above.

Not: a process whose mount namespace merely holds a *copy* of one of our
mounts.  Every sandbox of another containerd whose namespace was unshared
while one of ours was mounted has such copies, and is not ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from keel import procfs
from tests.containerd.host import POLL_S, wait_for


@dataclass(frozen=True, slots=True)
class Leftovers:
    """Things under (or started from) a temp root that are still there."""

    mounts: tuple[str, ...] = ()
    processes: tuple[tuple[int, str], ...] = ()  # (pid, cmdline)
    sockets: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.mounts or self.processes or self.sockets)

    def __str__(self) -> str:
        if not self:
            return "no leftovers"
        lines = [f"mount {m}" for m in self.mounts]
        lines += [f"process {pid}: {cmd}" for pid, cmd in self.processes]
        lines += [f"socket {s}" for s in self.sockets]
        return "\n".join(lines)


def leftovers(tmp_root: Path | str, *, exclude_pids: Iterable[int] = (),
              exclude_paths: Iterable[Path | str] = ()) -> Leftovers:
    """Mounts, live processes and sockets that still belong to `tmp_root`.

    * mounts: mount points at or below it (from /proc/self/mountinfo);
    * processes: every live, non-zombie process that belongs to it (see
      the module docstring), other than this one, its ancestors and
      `exclude_pids`;
    * sockets: unix sockets below it, except `exclude_paths` (not descending
      into mount points).
    """
    root = os.path.realpath(tmp_root)
    skip_paths = {os.path.realpath(p) for p in exclude_paths}
    return Leftovers(
        mounts=tuple(_mounts_under(root)),
        processes=processes_of(root, skip=_self_and_ancestors() | set(exclude_pids)),
        sockets=tuple(s for s in _sockets_under(root) if os.path.realpath(s) not in skip_paths))


def wait_no_leftovers(tmp_root: Path | str, timeout: float, *, exclude_pids: Iterable[int] = (),
                      exclude_paths: Iterable[Path | str] = ()) -> Leftovers:
    """Poll `leftovers()` until it is empty or `timeout` passes; return the last result."""
    deadline = time.monotonic() + timeout
    pids, paths = list(exclude_pids), list(exclude_paths)
    while True:
        found = leftovers(tmp_root, exclude_pids=pids, exclude_paths=paths)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_S)


def force_cleanup(found: Leftovers, timeout: float = 10.0) -> None:
    """SIGKILL the listed processes, remove their now-empty cgroups, lazily unmount the mounts.

    Only for leftovers from `leftovers()` of a temp root this helper owns.
    Waits up to `timeout` for the processes to disappear.  Cgroups (e.g.
    runc's `/<namespace>/<id>`) are rmdir'ed leaf only and best effort: a
    cgroup that still has members, or is our own, is left alone.
    """
    pids = {pid for pid, _ in found.processes}
    cgroups = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            cgroups |= _cgroup_dirs(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not any(alive(p) for p in pids), timeout, "leftover processes to die")
    for d in sorted(cgroups - _cgroup_dirs(os.getpid()), key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)
    libc = ctypes.CDLL(None, use_errno=True)
    mnt_detach = 2
    for mount in sorted(found.mounts, key=lambda m: m.count("/"), reverse=True):
        libc.umount2(os.fsencode(mount), mnt_detach)


def keel_launchers(state_root: Path) -> dict[int, Path]:
    """The Keel launchers (shim/_launcher.py) serving under `state_root`:
    pid -> socket.  Each writes its pid into ``launcher/<key>.lock``; the pid
    counts only if its command line names that socket."""
    found = {}
    for lock in sorted((state_root / "launcher").glob("*.lock")):
        sock = lock.with_suffix(".sock")
        try:
            pid = int(lock.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if b"shim._launcher" in cmdline and os.fsencode(sock) in cmdline:
            found[pid] = sock
    return found


def stop_keel_launchers(state_root: Path, timeout: float = 10.0) -> list[int]:
    """SIGTERM the Keel launchers under `state_root` and wait until they are
    gone (they idle out on their own after minutes; a test's leftover scan
    must not wait for that).  Returns their pids."""
    pids = list(keel_launchers(state_root))
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout,
                 "the launchers to exit")
    return pids


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        return _state(pid) != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# --- processes ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Process:
    ppid: int
    mnt_ns: str
    cmdline: bytes
    named: bool  # its command line or environment names the root


def processes_of(root: str, *, skip: Iterable[int] = ()) -> tuple[tuple[int, str], ...]:
    """(pid, command line) of every live process that belongs to `root`
    (an absolute, resolved path; see the module docstring), less `skip`.

    A process in `skip` is neither reported nor followed to its
    descendants (this process and its ancestors, a containerd the caller
    still runs).
    """
    names = _path_pattern(root)
    own_ns = os.readlink("/proc/self/ns/mnt")
    procs = dict(_scan(names, set(skip)))
    ours = {pid for pid, p in procs.items() if p.named}
    # A sandbox's mount namespace is ours when one of ours runs in it.
    sandboxes = {procs[pid].mnt_ns for pid in ours} - {own_ns}
    ours |= {pid for pid, p in procs.items() if p.mnt_ns in sandboxes}
    # A container: a namespace of its own whose root is a mount of ours.
    rooted: dict[str, bool] = {}
    for pid, p in procs.items():
        if pid in ours or p.mnt_ns == own_ns:
            continue
        if p.mnt_ns not in rooted:
            rooted[p.mnt_ns] = _root_mount_names(pid, names)
        if rooted[p.mnt_ns]:
            ours.add(pid)
    # And whatever those started.
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)
    todo = list(ours)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in ours:
                ours.add(child)
                todo.append(child)
    return tuple((pid, procs[pid].cmdline.replace(b"\0", b" ").decode(errors="replace").strip())
                 for pid in sorted(ours))


def _path_pattern(root: str) -> re.Pattern[bytes]:
    """`root` as a whole path: followed by "/", the end, or a byte no file name in
    a command line, environment or mount option runs on with (NUL, space, =, :, ,)."""
    return re.compile(re.escape(os.fsencode(root)) + rb"(?=[/\0\s=:,;\"']|$)")


def _scan(names: re.Pattern[bytes], skip: set[int]) -> Iterator[tuple[int, _Process]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        try:
            state, ppid = _state_and_ppid(pid)
            if state == "Z":
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            named = (names.search(cmdline) is not None
                     or names.search(Path(f"/proc/{pid}/environ").read_bytes()) is not None)
            mnt_ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:  # gone, going, or not ours to read
            continue
        yield pid, _Process(ppid, mnt_ns, cmdline, named)


def _root_mount_names(pid: int, names: re.Pattern[bytes]) -> bool:
    """Whether the mount at `pid`'s "/" (source, root or options) names the root."""
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_bytes()
    except OSError:  # gone, or going (EINVAL on a dying task's mountinfo)
        return False
    for line in text.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4 and fields[4] == b"/":
            return names.search(line) is not None
    return False


def _state_and_ppid(pid: int) -> tuple[str, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _state(pid: int) -> str:
    return _state_and_ppid(pid)[0]


def _self_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:
            pid = _state_and_ppid(pid)[1]
        except (FileNotFoundError, ProcessLookupError):
            break
    return pids


# --- mounts, sockets, cgroups ------------------------------------------------

def _mounts_under(root: str) -> Iterator[str]:
    for m in procfs.mounts():
        if m.point == root or m.point.startswith(root + "/"):
            yield m.point


def _sockets_under(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    yield path


def _cgroup_dirs(pid: int) -> set[str]:
    """The non-root cgroup directories of `pid` that exist under /sys/fs/cgroup (v1 or v2)."""
    dirs = set()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if path in ("", "/"):
            continue
        if controllers:  # v1: the hierarchy is mounted under its controller list
            bases = [controllers.removeprefix("name=")]
        else:  # v2: hybrid hosts mount it at unified/
            bases = ["unified", ""]
        for base in bases:
            d = os.path.normpath(f"/sys/fs/cgroup/{base}/{path}")
            if os.path.isdir(d):
                dirs.add(d)
                break
    return dirs


def remove_root(tmp: Path, problems: list[str]) -> None:
    """Remove a test's temp root once all went well; never through a mount
    (then it is kept and *problems* says so)."""
    still = leftovers(tmp)
    if still.mounts:
        problems.append(f"could not unmount; kept {tmp}:\n{still}")
    elif not problems:
        shutil.rmtree(tmp, ignore_errors=True)
