"""The mount(8) command line for one of containerd's rootfs mounts.

Both backends mount what containerd sends with the ``mount`` program:
the process backend inside the sandbox's mount namespace (``nsenter``),
the qemu backend on the host before it binds the result into the share.
"""

from __future__ import annotations

from pathlib import Path

from shim.vmm.api import MountSpec


def mount_argv(m: MountSpec, target: Path) -> list[str]:
    """``mount`` with *m*'s type, options and source, on *target*.  A bind
    mount without options is a plain ``-o bind``."""
    opts = ",".join(m.options)
    if m.type == "bind":
        return ["mount", "-o", opts or "bind", m.source, str(target)]
    return ["mount", "-t", m.type, *(["-o", opts] if opts else []), m.source, str(target)]
