"""Every file descriptor the agent holds open on purpose, in one table.

Listeners, stdio pipe ends and pty masters are registered here under a
role (``listener:agent``, ``stdout:<cid>/<eid>``, ``pty:<cid>/<eid>``...)
and closed through it.  An in-place agent upgrade (execve of a new
release, DESIGN section 6) needs exactly this list: it clears
``FD_CLOEXEC`` on these fds and writes the role -> fd map into the state
file so the new image can adopt them.  Short-lived fds (pid files, runc
log files, the console socket) are not registered.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("keel.agent.fds")


class FdTable:
    """Owner of long-lived fds.  Not thread-safe: used from the event loop."""

    def __init__(self) -> None:
        self._by_fd: dict[int, str] = {}

    def add(self, fd: int, role: str) -> int:
        """Record *fd* (which the caller just opened) under *role*; return it."""
        if fd in self._by_fd:
            raise RuntimeError(f"fd {fd} registered twice ({self._by_fd[fd]}, {role})")
        self._by_fd[fd] = role
        return fd

    def close(self, fd: int) -> None:
        """Close a registered fd; closing an unknown or closed fd is a no-op."""
        role = self._by_fd.pop(fd, None)
        if role is None:
            return
        try:
            os.close(fd)
        except OSError as exc:  # EBADF would mean someone closed it behind our back
            log.warning("closing fd %d (%s) failed: %s", fd, role, exc)

    def adopt(self, fd: int, role: str) -> int:
        """Record an fd inherited across an upgrade's execve; OSError if it is not open.

        It stays inheritable until :meth:`set_inheritable` (the commit): a
        failing resume must hand it back to the previous release.
        """
        os.fstat(fd)
        return self.add(fd, role)

    def set_inheritable(self, inheritable: bool) -> None:
        """Clear (True) or set (False) FD_CLOEXEC on every registered fd."""
        for fd in self._by_fd:
            os.set_inheritable(fd, inheritable)

    def forget(self, fd: int) -> None:
        """Stop tracking *fd* without closing it (its new owner closes it)."""
        self._by_fd.pop(fd, None)

    def snapshot(self) -> dict[str, int]:
        """Role -> fd for everything open now (for the upgrade handoff)."""
        return {role: fd for fd, role in sorted(self._by_fd.items())}

    def __len__(self) -> int:
        return len(self._by_fd)
