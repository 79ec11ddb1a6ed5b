"""How big a VM a pod's OCI resources ask for (the Kata rule, DESIGN section 7).

vCPUs: the sum of the containers' CPU fractions (CFS quota / period),
rounded up once; memory: the sum of their limits in MiB (bytes >> 20).  A
backend adds these to its base size (the guest's own needs), so a pod
without limits gets the base and a limited one gets room for its limit.

A CRI sandbox (pause) container carries the whole pod's limits in its
annotations (:data:`SANDBOX_CPU_QUOTA`, :data:`SANDBOX_CPU_PERIOD`,
:data:`SANDBOX_MEMORY`; containerd 1.6 sets them from the pod's resources,
as Kata reads them): where present they size the pod instead of the pause
container's own (near empty) resources.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from keel import procfs
from shim.vmm.api import is_host_bind


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """Extra vCPUs and MiB a sandbox needs on top of its base."""

    vcpus: int = 0
    memory_mib: int = 0


def _fraction(cpu: Mapping[str, Any]) -> float:
    quota, period = cpu.get("quota") or 0, cpu.get("period") or 0
    return quota / period if quota > 0 and period > 0 else 0.0


SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"


def _annotation(annotations: Mapping[str, Any], key: str) -> int:
    value = annotations.get(key)
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def _pod(spec: Mapping[str, Any]) -> tuple[float, int] | None:
    """(CPUs, memory bytes) of a CRI sandbox spec's pod annotations, if it has any."""
    ann = spec.get("annotations") or {}
    if not isinstance(ann, Mapping) or not any(
            k in ann for k in (SANDBOX_CPU_QUOTA, SANDBOX_CPU_PERIOD, SANDBOX_MEMORY)):
        return None
    cpu = {"quota": _annotation(ann, SANDBOX_CPU_QUOTA),
           "period": _annotation(ann, SANDBOX_CPU_PERIOD)}
    return _fraction(cpu), _annotation(ann, SANDBOX_MEMORY)


def workload(specs: Iterable[Mapping[str, Any]]) -> Workload:
    """The size the ``linux.resources`` (or a CRI sandbox's pod annotations)
    of these OCI specs ask for; invalid values count 0."""
    cpus, mem = 0.0, 0
    for spec in specs:
        if (pod := _pod(spec)) is not None:
            cpus += pod[0]
            mem += pod[1] >> 20
            continue
        res = (spec.get("linux") or {}).get("resources") or {}
        cpus += _fraction(res.get("cpu") or {})
        limit = (res.get("memory") or {}).get("limit") or 0
        if isinstance(limit, int) and limit > 0:
            mem += limit >> 20
    return Workload(vcpus=math.ceil(round(cpus, 6)), memory_mib=mem)


def shm_source(spec: Mapping[str, Any]) -> str:
    """The host path *spec* binds at /dev/shm (CRI's pod shm tmpfs), or ""."""
    for m in spec.get("mounts") or ():
        if isinstance(m, Mapping) and m.get("destination") == "/dev/shm" and is_host_bind(m):
            return str(m.get("source") or "")
    return ""


def tmpfs_bytes(path: str) -> int:
    """The size limit of the tmpfs mounted at *path*, or 0 (none, unknown).
    Reads the mount table: call it only where the size is used."""
    try:
        real = os.path.realpath(path)
        for m in procfs.mounts():
            if m.point == real and m.fstype == "tmpfs":
                for opt in m.options:
                    if opt.startswith("size="):
                        return _bytes(opt[5:])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _bytes(value: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if value[-1:].lower() in units:
        return int(value[:-1]) * units[value[-1].lower()]
    return int(value)


def of_update(resources_json: bytes) -> Workload:
    """The size an Update's ``LinuxResources`` document asks for; a document
    that does not parse as an object asks for nothing (sizing is best effort:
    the agent reports the update's own errors)."""
    try:
        resources = json.loads(resources_json or b"{}")
    except ValueError:
        return Workload()
    if not isinstance(resources, dict):
        return Workload()
    return workload([{"linux": {"resources": resources}}])
