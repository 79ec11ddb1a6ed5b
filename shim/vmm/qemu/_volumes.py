"""A container's host bind mounts, made visible in the VM through the sandbox's share.

CRI (and ``ctr run --mount``) give a container bind mounts whose sources
are host paths: ``/etc/hosts``, ``/etc/resolv.conf``, ``/etc/hostname``,
volumes (hostPath, emptyDir, ConfigMap, Secret) and the pod's
``/dev/shm``.  The guest cannot see the host's files, so, as Kata's shared
directory does, each source is bind-mounted into the share at
``<shared>/<cid>/mounts/<n>`` and the spec's source becomes that path in
the guest (``/run/keel/shared/<cid>/mounts/<n>``):

- the mount points are made with ``_mounts``' rules (created and opened
  with ``O_NOFOLLOW`` from an fd of the share, bound through the fd,
  nodev,nosuid,noexec), read-only on the host side too when the spec
  mount is ``ro``, so not even root in the guest writes through it;
- their mount ids go into the container's record before anything else
  can fail, so ``_mounts.unshare`` detaches them even after the guest
  renamed the directories above;
- the share is mounted ``cache=none`` in the guest: a file the host
  rewrites later (a ConfigMap update) is read afresh;
- ``/dev/shm`` bound from the host (CRI's per-pod shm tmpfs) becomes a
  tmpfs in the guest of the host mount's size: shared memory stays in the
  guest's RAM and never crosses 9p.  Each container gets its own; the
  pod's containers do not share it yet (README, limits).

All functions block: call them in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keel.errors import InvalidArgument
from shim.vmm.qemu import _mounts
from shim.vmm.qemu._initramfs import GUEST_SHARED

SHM = "/dev/shm"
#: CRI's default pod shm size, when the host source says none.
DEFAULT_SHM_BYTES = 64 << 20


def is_bind(m: Mapping[str, Any]) -> bool:
    """True for a mount of a host path (OCI: type "bind" or a bind option)."""
    return m.get("type") == "bind" or bool({"bind", "rbind"} & set(m.get("options") or ()))


def share(shared: Path, marks: Path, cid: str, spec: dict[str, Any]) -> dict[str, Any]:
    """*spec* with every bind mount's source in the guest; binds what it shares.

    InvalidArgument for a source that is not an absolute, existing host path.
    """
    mounts = list(spec.get("mounts") or ())
    binds = [i for i, m in enumerate(mounts) if isinstance(m, dict) and is_bind(m)]
    if not binds:
        return spec
    fds = _mounts.walk(shared, cid, (cid, "mounts"))
    ids: list[int] = []
    try:
        for n, i in enumerate(binds):
            m = mounts[i]
            if m.get("destination") == SHM:
                mounts[i] = guest_shm(m)
                continue
            source = _source(m)
            opts = set(m.get("options") or ())
            ids.append(_mounts.bind_volume(fds[-1], str(n), source, readonly="ro" in opts,
                                           recursive="bind" not in opts))
            mounts[i] = {**m, "source": f"{GUEST_SHARED}/{cid}/mounts/{n}"}
    finally:
        if ids:
            _mounts.note_mounts(marks, cid, ids)
        for fd in fds:
            os.close(fd)
    return {**spec, "mounts": mounts}


def _source(m: Mapping[str, Any]) -> Path:
    source, dest = m.get("source"), m.get("destination")
    if not isinstance(source, str) or not os.path.isabs(source):
        raise InvalidArgument(f"mount {dest}: bind source {source!r} is not an absolute path")
    path = Path(source)
    if not path.exists():
        raise InvalidArgument(f"mount {dest}: bind source {source} does not exist on the host")
    return path


def guest_shm(m: Mapping[str, Any]) -> dict[str, Any]:
    """A guest tmpfs in place of a host ``/dev/shm`` bind, of the host's size."""
    size = shm_bytes(Path(str(m.get("source"))))
    options = ["nosuid", "noexec", "nodev", "mode=1777", f"size={size}"]
    if "ro" in (m.get("options") or ()):
        options.append("ro")
    return {"destination": SHM, "type": "tmpfs", "source": "shm", "options": options}


def shm_bytes(source: Path) -> int:
    """The size of the tmpfs mounted at *source*, or :data:`DEFAULT_SHM_BYTES`."""
    try:
        real = os.path.realpath(source)
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] != real:
                    continue
                after = fields[fields.index("-") + 1:]
                if after[0] == "tmpfs":
                    for opt in after[2].split(","):
                        if opt.startswith("size="):
                            return _bytes(opt[5:])
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_SHM_BYTES


def _bytes(value: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if value[-1:].lower() in units:
        return int(value[:-1]) * units[value[-1].lower()]
    return int(value)
