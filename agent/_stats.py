"""Container statistics from ``runc events --stats`` (cgroup v1 and v2 shapes).

Missing sections (no limit set, a controller not mounted) read as zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: runc reports "no limit" as the largest page-aligned int64.
_UNLIMITED = 0x7FFFFFFFFFFFF000


@dataclasses.dataclass(frozen=True, slots=True)
class CgroupStats:
    """Mirrors the wire message ``CgroupStats`` field for field."""

    cpu_usage_ns: int = 0
    cpu_user_ns: int = 0
    cpu_kernel_ns: int = 0
    cpu_per_cpu_ns: tuple[int, ...] = ()
    cpu_throttled_periods: int = 0
    cpu_throttled_time_ns: int = 0
    cpu_periods: int = 0
    memory_usage: int = 0
    memory_limit: int = 0
    memory_max_usage: int = 0
    memory_failcnt: int = 0
    memory_cache: int = 0
    memory_rss: int = 0
    pids_current: int = 0
    pids_limit: int = 0
    oom_kills: int = 0


def _get(doc: Mapping[str, Any], *path: str) -> Any:
    value: Any = doc
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _int(value: Any) -> int:
    """A non-negative integer clamped to uint64, or 0 when not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return min(int(value), (1 << 64) - 1)


def _num(doc: Mapping[str, Any], *path: str) -> int:
    return _int(_get(doc, *path))


def from_runc_events(data: Mapping[str, Any]) -> CgroupStats:
    """Map the ``data`` object of a runc ``stats`` event."""
    percpu = _get(data, "cpu", "usage", "percpu")
    limit = _num(data, "memory", "usage", "limit")
    return CgroupStats(
        cpu_usage_ns=_num(data, "cpu", "usage", "total"),
        cpu_user_ns=_num(data, "cpu", "usage", "user"),
        cpu_kernel_ns=_num(data, "cpu", "usage", "kernel"),
        cpu_per_cpu_ns=tuple(_int(v) for v in percpu) if isinstance(percpu, list) else (),
        cpu_throttled_periods=_num(data, "cpu", "throttling", "throttledPeriods"),
        cpu_throttled_time_ns=_num(data, "cpu", "throttling", "throttledTime"),
        cpu_periods=_num(data, "cpu", "throttling", "periods"),
        memory_usage=_num(data, "memory", "usage", "usage"),
        memory_limit=0 if limit >= _UNLIMITED else limit,
        memory_max_usage=_num(data, "memory", "usage", "max"),
        memory_failcnt=_num(data, "memory", "usage", "failcnt"),
        memory_cache=_num(data, "memory", "cache"),
        memory_rss=_num(data, "memory", "raw", "rss") or _num(data, "memory", "raw", "anon"),
        pids_current=_num(data, "pids", "current"),
        pids_limit=_num(data, "pids", "limit"),
        # cgroup v2 reports it in memory.events (runc passes it in raw); v1 has no counter.
        oom_kills=_num(data, "memory", "raw", "oom_kill"),
    )
