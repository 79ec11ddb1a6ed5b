"""Whether the kernel OOM-killed something in a container (CRI's ``OOMKilled``).

The count is the container memory cgroup's ``oom_kill``: ``memory.events``
on cgroup v2 (a VM's guest), ``memory.oom_control`` on v1 (kernel 4.13 and
later).  It is read when the init's exit is reported, before ``runc
delete`` removes the cgroup.  The shim turns a non-zero count into
containerd's ``/tasks/oom`` event (shim/_exits.py), from which the CRI
plugin sets the reason, as it does for runc's shim.
"""

from __future__ import annotations

import json
from pathlib import Path

from keel import procfs


def cgroups_path(config: Path) -> str:
    """``linux.cgroupsPath`` of the bundle's config.json; "" when absent or unreadable."""
    try:
        spec = json.loads(config.read_bytes())
        path = (spec.get("linux") or {}).get("cgroupsPath") or ""
    except (OSError, ValueError, AttributeError):
        return ""
    return path if isinstance(path, str) else ""


def oom_kills(path: str) -> int | None:
    """OOM kills counted in cgroup *path* (absolute in its hierarchy); None
    when unknown (a systemd-style ``slice:prefix:name``, no such cgroup)."""
    if not path or ":" in path or ".." in Path(path).parts:
        return None
    rel = path.lstrip("/")
    candidates = []
    for m in procfs.mounts():
        if m.fstype == "cgroup2":
            candidates.append(Path(m.point, rel, "memory.events"))
        elif m.fstype == "cgroup" and "memory" in m.options:
            candidates.append(Path(m.point, rel, "memory.oom_control"))
    for file in candidates:
        try:
            text = file.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None
