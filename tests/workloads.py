"""Shell workloads shared by the tests that keep a container busy across an
upgrade, and :class:`CtrCounter`, the counter run by ``ctr`` under a private
containerd.

The counter prints 0, 1, 2... until an exec (``STOPPER``) creates
/tmp/stop, then prints "end" and exits 7.  It must not exit while the
stopper still runs: when a container's init exits, the kernel SIGKILLs
every process left in its PID namespace (pid_namespaces(7)), so a plain
``touch /tmp/stop`` that is descheduled between creating the file and
exiting ends with status 137.  Stock runc shows that under CPU load too.
So the stopper writes its own pid into the file (atomically, by rename),
and the counter waits for that process to be gone before it exits.
"""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path
from typing import Any

from shim.api import SandboxDir
from tests.containerd import Containerd, wait_for


def counter(interval_us: int = 2000) -> str:
    """``sh -c`` script: count every *interval_us* until stopped; exits 7."""
    return ("i=0; while [ ! -e /tmp/stop ]; do echo $i; i=$((i+1)); "
            f"usleep {interval_us}; done; "
            "read p < /tmp/stop; while [ -e /proc/$p ]; do usleep 1000; done; "
            "echo end; exit 7")


#: The exec that stops :func:`counter` (exits 0; the counter waits for it).
STOPPER = ("sh", "-c", "echo $$ > /tmp/stop.new && mv /tmp/stop.new /tmp/stop")


class CtrCounter:
    """``ctr run --rm`` of :func:`counter` in the foreground, ctr's stdout and
    stderr read by threads: every number crosses containerd's stdio fifos.

    *runtime* is what ``--runtime`` names (a release's shim path);
    *interval_us* the counter's pace; *more* how many new lines
    :meth:`flows` waits for unless told; *extra* more ``ctr run`` options.
    *timeout* bounds the wait for the
    task to run, the stopper's exec and ctr's exit; the waits for output
    and for a killed ctr get half of it.  :attr:`sandbox` is the Keel
    sandbox directory, under ``<containerd's temp root>/keel`` (where the
    containerd fixtures put KEEL_STATE_ROOT).
    """

    def __init__(self, ctd: Containerd, cid: str, runtime: str | Path, image: str, *,
                 interval_us: int = 2000, more: int = 20, timeout: float = 60.0,
                 extra: tuple[str, ...] = ()) -> None:
        self.ctd, self.cid = ctd, cid
        self.more, self.timeout = more, timeout
        self.state_root = ctd.paths.tmp_root / "keel"
        self.proc = subprocess.Popen(
            [*ctd.ctr_prefix(), "run", "--rm", "--runtime", str(runtime), *extra, image, cid,
             "sh", "-c", counter(interval_us)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=drain, args=(f, buf), daemon=True)
                         for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()
        self.pid = 0

    @property
    def sandbox(self) -> SandboxDir:
        return SandboxDir.of(self.state_root, self.cid)

    def lines(self) -> int:
        return self.out.count(b"\n")

    def _ended(self) -> bool:
        """False while ctr runs; raises once it exited (nothing left to wait for)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"ctr run {self.cid} exited with {self.proc.returncode}:"
                                 f" {self.err.decode(errors='replace')}")
        return False

    def running(self, timeout: float | None = None) -> int:
        """Wait for the task to run and print (up to *timeout* each, if given); its pid."""
        def run() -> tuple[int, str] | None:
            self._ended()
            task = self.ctd.task(self.cid)
            return task if task is not None and task[1] == "RUNNING" else None

        task = wait_for(run, timeout or self.timeout, f"task {self.cid} to run")
        assert task is not None
        self.pid = task[0]
        self.flows(timeout=timeout)
        return self.pid

    def flows(self, more: int | None = None, timeout: float | None = None) -> None:
        """The counter goes on printing through whoever serves now."""
        more = more or self.more
        target = self.lines() + more
        wait_for(lambda: self._ended() or self.lines() >= target, timeout or self.timeout / 2,
                 f"{more} more lines from {self.cid} (at {self.lines()})")

    def untouched(self) -> None:
        """Same pid, still running, output flowing, and containerd never lost its shim."""
        assert self.ctd.task(self.cid) == (self.pid, "RUNNING")
        self.flows()
        assert not disconnects(self.ctd, self.cid), disconnects(self.ctd, self.cid)

    def finish(self) -> int:
        """Stop the counter (an exec runs STOPPER); ctr's exit code."""
        res = self.ctd.ctr("tasks", "exec", "--exec-id", "stop", self.cid, *STOPPER,
                           timeout=self.timeout)
        assert res.returncode == 0, res
        rc = self.proc.wait(self.timeout)
        for t in self._readers:
            t.join(10)
        return rc

    def finish_in_order(self, at_least: int = 101) -> int:
        """:meth:`finish`, which must end with the container's own exit code 7,
        then :meth:`assert_sequence`; how many numbers."""
        assert self.finish() == 7, self.err.decode(errors="replace")
        return self.assert_sequence(at_least)

    def assert_sequence(self, at_least: int = 101) -> int:
        """Every number exactly once, in order, then "end", and at least *at_least*
        numbers; how many."""
        lines = self.out.decode().split("\n")
        assert lines[-2:] == ["end", ""], lines[-5:]
        numbers = lines[:-2]
        bad = next((i for i, n in enumerate(numbers) if n != str(i)), None)
        assert bad is None, (f"{self.cid}: line {bad} is {numbers[bad]!r}, around:"
                             f" {numbers[max(bad - 3, 0):bad + 3]}")
        assert len(numbers) >= at_least, len(numbers)
        return len(numbers)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.ctd.ctr("tasks", "kill", "-s", "SIGKILL", self.cid)
            try:
                self.proc.wait(self.timeout / 2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drain(f: Any, into: bytearray) -> None:
    """Append what *f* gives to *into* until end of file."""
    while chunk := f.read1(65536):
        into += chunk


def disconnects(ctd: Containerd, cid: str) -> list[str]:
    """containerd's log lines that say it lost the shim of *cid* ("shim disconnected",
    "cleaning up after shim disconnected"; the "cleaning up dead shim" that follows
    names no id)."""
    mine = re.compile(rf"\bid={re.escape(cid)}(\s|$)")
    return [line for line in ctd.log_text().splitlines()
            if "shim disconnected" in line and mine.search(line)]
