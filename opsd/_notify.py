"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING) and logging.

Uses systemd-python (``systemd.daemon.notify``).  Without NOTIFY_SOCKET
every call is a no-op that returns False, so opsd runs the same outside
systemd.

Trap (research/libs.md section 5): ``notify(..., unset_environment=True)``
calls C ``unsetenv()`` but leaves ``os.environ`` alone, and every later
notify finds no socket.  opsd sends STATUS and WATCHDOG for its whole
life, so it never unsets; it also starts no child processes, which is the
only reason to hide NOTIFY_SOCKET (a child would inherit it).

Logging goes to the journal (``JournalHandler``) when stderr *is* the
journal stream (``$JOURNAL_STREAM`` names stderr's device:inode, which
systemd sets for services), to stderr otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from systemd import daemon

log = logging.getLogger("opsd.notify")


def under_journal() -> bool:
    """True when stderr is connected to journald (systemd.exec(5), $JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "info") -> None:
    handler: logging.Handler
    if under_journal():
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="opsd")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("opsd %(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Notifier:
    """Talks to the service manager for one opsd process."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_s = _watchdog_interval()
        self._last_status = ""

    def ready(self, status: str) -> None:
        """READY=1: the API socket listens.  Call once."""
        self._send(f"READY=1\nSTATUS={_line(status)}\nMAINPID={os.getpid()}")
        self._last_status = status

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={_line(text)}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    async def watchdog(self) -> None:
        """WATCHDOG=1 every half of WATCHDOG_USEC, from the event loop (so a
        stuck loop stops the pings and systemd restarts opsd).  Returns at
        once when no watchdog is set."""
        if self.watchdog_s is None:
            return
        log.info("systemd watchdog: pinging every %.1f s", self.watchdog_s)
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)

    def _send(self, message: str) -> None:
        if self.enabled and not daemon.notify(message):
            log.warning("sd_notify failed: %s", message.split("\n", 1)[0])


def _line(text: str) -> str:
    return text.replace("\n", " ")[:400]


def _watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC if it is meant for this process (WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
