"""opsctl on a pseudo-terminal of its own, driven as a person types: what the
console tests (process backend and VM) share."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import termios
import time

from tests.opsd_harness import ENV, REPO


class Pty:
    """opsctl on a pseudo-terminal of its own (its controlling terminal)."""

    def __init__(self, *argv: str, rows: int = 30, cols: int = 100) -> None:
        self.master, slave = os.openpty()
        termios.tcsetwinsize(slave, (rows, cols))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opsd.cli", *argv], stdin=slave, stdout=slave, stderr=slave,
            env={**ENV, "TERM": "xterm"}, cwd=REPO, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.seen = bytearray()

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 30.0) -> bytes:
        """Read until *pattern* (a regex) matches what came since the last match."""
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.seen)):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {bytes(self.seen)[-500:]!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"opsctl ended before {pattern!r}: {bytes(self.seen)[-500:]!r}"
                self.seen += chunk
        del self.seen[:m.end()]
        return m.group(0)

    def resize(self, rows: int, cols: int) -> None:
        termios.tcsetwinsize(self.master, (rows, cols))  # opsctl gets SIGWINCH

    def close(self) -> int:
        try:
            rc = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)
        return rc
