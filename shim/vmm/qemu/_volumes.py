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
  bind of the guest's own ``/dev/shm``, a tmpfs the guest init mounts at
  boot with the size of the first container's host mount (``keel.shm=``):
  shared memory stays in the guest's RAM, never crosses 9p, and the pod's
  containers share it as they share the pod's shm tmpfs on runc (one VM
  is one pod).

All functions block: call them in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keel.errors import InvalidArgument
from shim.vmm.api import is_host_bind
from shim.vmm.qemu import _mounts
from shim.vmm.qemu._initramfs import GUEST_SHARED

SHM = "/dev/shm"


def share(shared: Path, marks: Path, cid: str, spec: dict[str, Any]) -> dict[str, Any]:
    """*spec* with every bind mount's source in the guest; binds what it shares.

    InvalidArgument for a source that is not an absolute, existing host path.
    """
    mounts = list(spec.get("mounts") or ())
    binds = [i for i, m in enumerate(mounts) if isinstance(m, dict) and is_host_bind(m)]
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
    """What a host ``/dev/shm`` bind becomes: a bind of the guest's /dev/shm."""
    ro = ["ro"] if "ro" in (m.get("options") or ()) else []
    return {"destination": SHM, "type": "bind", "source": SHM,
            "options": ["rbind", "rprivate", "nosuid", "nodev", *ro]}
