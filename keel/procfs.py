"""What /proc says about a process, and pidfds that cannot name another one.

A pid alone is not an identity: pids are reused.  Keel records a process
as (pid, start time) and opens its pidfd only after checking that pair,
so a recorded VMM or shim that died long ago is never mistaken for the
unrelated process that now has its pid.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def _stat_fields(pid: int | None) -> list[bytes]:
    """Fields of /proc/<pid>/stat after ``comm`` (which may hold spaces and
    parentheses): index 0 is the state, 19 the start time."""
    with open(f"/proc/{pid or 'self'}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int:
    """Start time of *pid* in clock ticks since boot.  Raises OSError if gone."""
    return int(_stat_fields(pid)[19])


def is_running(pid: int, started: int) -> bool:
    """True if *pid* runs and started at *started* (a zombie has exited)."""
    try:
        fields = _stat_fields(pid)
        return fields[0] not in (b"Z", b"X") and int(fields[19]) == started
    except (OSError, ValueError, IndexError):
        return False


def boot_uptime_s() -> float:
    """Seconds since the kernel booted (``/proc/uptime``)."""
    return float(Path("/proc/uptime").read_text().split()[0])


def uptime_s(pid: int | None = None) -> float:
    """Seconds since the process started; survives ``execve`` (same start time)."""
    ticks = int(_stat_fields(pid)[19])
    return max(0.0, boot_uptime_s() - ticks / os.sysconf("SC_CLK_TCK"))


def open_pidfd(pid: int, started: int | None = None) -> int:
    """A pidfd for *pid*; with *started*, only if it is still that process.

    The pidfd is opened first and the start time checked after, so the
    identity cannot change between check and open.  Raises
    ProcessLookupError when the process is gone or is another one.
    """
    fd = os.pidfd_open(pid)
    if started is not None and not is_running(pid, started):
        os.close(fd)
        raise ProcessLookupError(f"pid {pid} is no longer the recorded process")
    return fd


@dataclasses.dataclass(frozen=True, slots=True)
class Memory:
    """Host memory of one process, in bytes."""

    #: Resident pages, shared ones counted in full.
    rss: int
    #: Resident pages, each shared one divided among the processes that map it.
    pss: int


def memory(pid: int) -> Memory:
    """RSS and PSS of *pid* from ``/proc/<pid>/smaps_rollup`` (one read of the
    kernel's sums: cheaper than smaps, Linux 4.14+).  Raises OSError when the
    process is gone or not ours to read, ValueError when the file lacks them
    (a zombie's is empty)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            if key in (b"Rss", b"Pss"):
                found[key.decode()] = int(rest.split()[0]) * 1024  # the file says kB
    if len(found) != 2:
        raise ValueError(f"/proc/{pid}/smaps_rollup has no Rss and Pss lines")
    return Memory(rss=found["Rss"], pss=found["Pss"])


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    id: int
    #: Unescaped (the file writes a space in a path as ``\\040``).
    point: str
    fstype: str
    #: The superblock's options (``size=65536k`` of a tmpfs, ...).
    options: tuple[str, ...]


def mounts() -> list[Mount]:
    """This process's mounts, oldest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1:]
            found.append(Mount(int(fields[0]), _unescape(fields[4]), rest[0],
                               tuple(rest[2].split(",")) if len(rest) > 2 else ()))
    return found


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")
