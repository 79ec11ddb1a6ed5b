"""Run a command on a fresh pseudo-terminal (for `ctr run -t` and `ctr task exec -t`)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shlex
import struct
import subprocess
import termios
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PtyResult:
    """What `ctr_pty` saw: the terminal output (a tty turns "\\n" into "\\r\\n") and ctr's exit code."""

    output: str
    returncode: int


def run_on_pty(argv: list[str], *, input: str | bytes | None = None, timeout: float = 60.0,
               rows: int = 24, cols: int = 80) -> PtyResult:
    """Run `argv` with fds 0-2 on a new pty of `rows`x`cols`; see `Containerd.ctr_pty`.

    The child gets its own session but no controlling terminal (ctr only
    needs isatty and termios on its fds).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    pending = input.encode() if isinstance(input, str) else (input or b"")
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        os.set_blocking(master, False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{shlex.join(argv)} still running after {timeout}s; "
                                   f"killed. Output so far:\n{out.decode(errors='replace')}")
            readable, writable, _ = select.select([master], [master] if pending else [], [],
                                                  min(left, 0.5))
            if writable:
                pending = pending[os.write(master, pending[:4096]):]
            if readable:
                try:
                    chunk = os.read(master, 65536)
                except OSError as exc:  # EIO: every slave fd is closed
                    if exc.errno != errno.EIO:
                        raise
                    chunk = b""
                if not chunk:
                    break
                out += chunk
        rc = proc.wait(max(deadline - time.monotonic(), 0.1))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return PtyResult(out.decode(errors="replace"), rc)


