"""What every part of the private-containerd harness needs from the host:
the tools it runs, and polling with a deadline."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: Searched after $PATH (runc and containerd live in /usr/sbin on Debian).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: How often `wait_for` and its kin look again.
POLL_S = 0.02

T = TypeVar("T")


def missing_prerequisites() -> list[str]:
    """Why a private containerd with runc cannot run on this host; empty if it can."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append(f"needs root (euid is {os.geteuid()})")
    for name in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        try:
            which(name)
        except FileNotFoundError as exc:
            reasons.append(str(exc))
    return reasons


def which(name: str) -> str:
    """The path of tool *name* on $PATH or DEFAULT_PATH; FileNotFoundError if neither has it."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":" + DEFAULT_PATH)
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH or in {DEFAULT_PATH}")
    return found


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns a truthy value and return that value.

    Raises TimeoutError naming `what` after `timeout` seconds; exceptions from
    `predicate` propagate.  The poll interval is 20 ms.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


def rss_mib(pid: int) -> int:
    """Resident memory of process *pid*, in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) >> 10
    raise AssertionError(f"no VmRSS for pid {pid}")
