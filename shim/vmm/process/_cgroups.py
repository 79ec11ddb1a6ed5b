"""Stopping a host-PID sandbox's processes without its agent: through their cgroups.

A process sandbox normally runs its agent as PID 1 of a PID namespace of
its own: when the agent dies, the kernel kills every process of the pod.
A pod with ``hostPID`` shares the host's PID namespace, so nothing would
stop its containers when the agent dies or the sandbox is stopped.  The
sandbox therefore records each container's cgroup (``linux.cgroupsPath``
of its spec, as runc uses it) and kills every process in it, on every
mounted hierarchy, until they are empty, as ``runc kill --all`` does.

cgroupfs paths are absolute (``/k8s.io/<id>``); systemd-driver paths
(``slice:prefix:name``) are expanded as runc does
(``kubepods-burstable.slice`` -> ``kubepods.slice/kubepods-burstable.slice``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from keel import procfs
from keel.errors import Internal, InvalidArgument


def resolve(cgroups_path: object) -> str:
    """The hierarchy-relative directory of an OCI ``cgroupsPath``.

    InvalidArgument for an empty or relative path (runc places those under
    its own cgroup, which the sandbox cannot know).
    """
    if not isinstance(cgroups_path, str) or not cgroups_path:
        raise InvalidArgument("a hostPID pod needs linux.cgroupsPath in each container's spec,"
                              " so that its processes can be stopped without the agent")
    if cgroups_path.startswith("/"):
        return _not_root(os.path.normpath(cgroups_path), cgroups_path)
    parts = cgroups_path.split(":")
    if len(parts) != 3:
        raise InvalidArgument(f"cgroupsPath {cgroups_path!r} is neither absolute nor"
                              " systemd's slice:prefix:name")
    slice_, prefix, name = parts
    unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return _not_root(f"/{expand_slice(slice_ or '-.slice')}/{unit}".replace("//", "/"),
                     cgroups_path)


def _not_root(path: str, given: str) -> str:
    # Killing "every process in /" would be every process of the host.
    if path == "/":
        raise InvalidArgument(f"cgroupsPath {given!r} names the root cgroup")
    return path


def expand_slice(slice_: str) -> str:
    """systemd's slice nesting: ``a-b-c.slice`` -> ``a.slice/a-b.slice/a-b-c.slice``."""
    if slice_ == "-.slice":
        return ""
    if not slice_.endswith(".slice") or "/" in slice_:
        raise InvalidArgument(f"invalid systemd slice {slice_!r}")
    stem = slice_.removesuffix(".slice")
    parts = stem.split("-")
    return "/".join("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))


def _hierarchies() -> list[Path]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy."""
    return [Path(m.point) for m in procfs.mounts() if m.fstype in ("cgroup", "cgroup2")]


def members(paths: Iterable[str]) -> set[int]:
    """Every pid in these cgroups and their children, on any hierarchy."""
    pids: set[int] = set()
    for root in _hierarchies():
        for rel in paths:
            top = root / rel.lstrip("/")
            if not top.is_dir():
                continue
            for procs in (top, *(p for p in top.rglob("*") if p.is_dir())):
                try:
                    pids.update(int(x) for x in (procs / "cgroup.procs").read_text().split())
                except (OSError, ValueError):
                    continue  # removed meanwhile
    pids.discard(os.getpid())
    return pids


def kill_all(paths: Iterable[str], timeout: float = 5.0) -> None:
    """SIGKILL every process in *paths* until none is left; Internal after *timeout*."""
    paths = list(paths)
    deadline = time.monotonic() + timeout
    while pids := members(paths):
        if time.monotonic() > deadline:
            raise Internal(f"processes {sorted(pids)} of cgroups {paths} survived SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)  # a forking process may add one more; the loop takes it
