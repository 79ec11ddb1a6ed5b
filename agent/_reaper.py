"""The one owner of ``waitpid``: reaps every child and orphan of the agent.

The agent is PID 1 of the sandbox or a child subreaper, so container
processes (grandchildren: runc forks them, then exits) are reparented to
it.  Exactly one piece of code may call ``waitpid(-1)``; anything else
that waits (asyncio's child watchers, ``Popen.wait``) would steal
statuses.  Hence: spawn with ``subprocess.Popen``, never call its
``wait``/``poll``, and await :meth:`Reaper.wait` instead.

A child can exit before anyone asks for it (a container process whose pid
we only learn from runc's pid file), so statuses nobody waits for yet are
kept, bounded, and matched later.  A kept status that is older than the
spawn it would be matched to belongs to an earlier process with a reused
pid and is discarded.

Across an in-place upgrade (execve, same PID) the reaper is stopped before
the state is written: children that exit meanwhile stay zombies of this
PID, and the new image's reaper collects them once the watchers of the
processes it resumed are in place.  Kept statuses travel in the state
(:meth:`Reaper.unclaimed`, :meth:`Reaper.restore_unclaimed`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger("keel.agent.reaper")

_PR_SET_CHILD_SUBREAPER = 36
#: Unclaimed statuses kept at most (orphans nobody will ever ask for).
MAX_UNCLAIMED = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    #: Exit code, or 128 + signal number for a process killed by a signal.
    status: int
    #: Wall clock (Unix ns) when the agent reaped it.
    exited_at_ns: int
    #: Monotonic ns when reaped, to tell stale statuses of reused pids.
    reaped_mono_ns: int


def exit_status(wait_status: int) -> int:
    """waitpid status -> shell-style exit status (128+sig when signalled)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


def become_subreaper() -> bool:
    """Make orphaned descendants reparent to us; True if it worked (or we are PID 1)."""
    if os.getpid() == 1:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.error("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


class Reaper:
    """Reaps on SIGCHLD and hands statuses to whoever waits for the pid."""

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[Exit]]] = {}
        self._watchers: dict[int, Callable[[Exit], None]] = {}
        self._unclaimed: collections.OrderedDict[int, Exit] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Install the SIGCHLD handler on the running loop and reap what is pending."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap_nowait)
        self.reap_nowait()

    def stop(self) -> None:
        """Stop reaping: SIGCHLD goes back to SIG_DFL, so exited children stay zombies."""
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def unclaimed(self) -> list[Exit]:
        """Statuses nobody has asked for yet, oldest first."""
        return list(self._unclaimed.values())

    def restore_unclaimed(self, exits: list[Exit]) -> None:
        """Keep statuses an earlier image reaped (call after the watches are in place)."""
        for exit in exits:
            self._unclaimed.setdefault(exit.pid, exit)

    def reap_nowait(self) -> None:
        """Collect every exited child without blocking and dispatch it."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._dispatch(Exit(pid, exit_status(wait_status), time.time_ns(), time.monotonic_ns()))

    def _dispatch(self, exit: Exit) -> None:
        watcher = self._watchers.pop(exit.pid, None)
        futures = self._waiters.pop(exit.pid, [])
        for fut in futures:
            if not fut.done():
                fut.set_result(exit)
        if watcher is not None:
            watcher(exit)
        elif not futures:
            self._unclaimed[exit.pid] = exit
            while len(self._unclaimed) > MAX_UNCLAIMED:
                self._unclaimed.popitem(last=False)

    def _claim(self, pid: int, since_mono_ns: int) -> Exit | None:
        kept = self._unclaimed.pop(pid, None)
        if kept is not None and kept.reaped_mono_ns < since_mono_ns:
            log.debug("dropping stale exit of pid %d (pid reused)", pid)
            return None
        return kept

    async def wait(self, pid: int, since_mono_ns: int = 0) -> Exit:
        """Wait for *pid*'s exit; *since_mono_ns*: when the process was spawned."""
        kept = self._claim(pid, since_mono_ns)
        if kept is not None:
            return kept
        fut: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(pid, []).append(fut)
        try:
            return await fut
        finally:
            waiters = self._waiters.get(pid)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[pid]

    def watch(self, pid: int, since_mono_ns: int, callback: Callable[[Exit], None]) -> None:
        """Call *callback(exit)* (from the loop) when *pid* exits, maybe right now.

        One watcher per pid: this is how long-lived container processes are
        followed without a task each.
        """
        kept = self._claim(pid, since_mono_ns)
        if kept is not None:
            callback(kept)
            return
        self._watchers[pid] = callback

    def unwatch(self, pid: int) -> None:
        self._watchers.pop(pid, None)
