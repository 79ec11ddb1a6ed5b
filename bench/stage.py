"""The stage every benchmark runs on: a private containerd with busybox and the Keel shim.

`Stage` wraps tests/containerd's `Containerd` in a temp root of its own
(`/tmp/keel-bench-*`), imports the busybox image built from the host's
busybox-static, and puts a `containerd-shim-keel-v2` wrapper (this
interpreter's `-m shim`, this checkout on PYTHONPATH) first on its PATH.
Keel's sandboxes live under `<tmp>/keel` (`KEEL_STATE_ROOT`).

On exit it removes every task and container, stops containerd, kills
whatever descends from it (shims, sandboxes: by PID, found by the temp root
in their command line or environment), unmounts what is left, and deletes
the temp root.  Helpers started by a benchmark (opsd) are that
benchmark's to stop.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import pids_where
from tests.containerd import Containerd, force_cleanup, install_shim_wrapper, leftovers, wait_for
from tests.images.busybox import build_image, import_image

REPO = Path(__file__).resolve().parents[1]
KEEL = "io.containerd.keel.v2"
RUNC = "io.containerd.runc.v2"
RUNTIMES = {"keel": KEEL, "runc": RUNC}
NAMESPACE = "keel-bench"
IMAGE_CACHE = Path(os.environ.get("KEEL_TEST_CACHE", "/var/tmp/keel-test-cache")) / "images"


def progress(msg: str) -> None:
    """A progress line on stderr (stdout is for the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Stage:
    """A private containerd ready to run busybox under keel and runc.

    Use as a context manager.  `ctd` is the underlying `Containerd`,
    `image` the busybox ref, `state_root` Keel's state root.  `shim_env`
    (exported by the shim wrapper, e.g. `KEEL_CONFIG`) may be changed until
    the stage is entered; the temp root `tmp` exists from construction on.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="keel-bench-", dir="/tmp"))
        self.state_root = self.tmp / "keel"
        self.ctd = Containerd(self.tmp, namespace=NAMESPACE, log_level="info",
                              env={"KEEL_STATE_ROOT": str(self.state_root), **(env or {})})
        self.image = ""
        self.shim_env = {"PYTHONPATH": str(REPO)}
        self._ids = itertools.count(1)

    def __enter__(self) -> Stage:
        install_shim_wrapper(self.ctd.paths.bin_dir, sys.executable, env=self.shim_env)
        try:
            self.ctd.start()
            self.image = import_image(self.ctd.ctr_prefix(), build_image(IMAGE_CACHE))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove everything this stage started; keep the temp root only if a mount is stuck."""
        if self.ctd.pid is not None:
            try:
                self.ctd.remove_all(timeout=120)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                progress(f"cleanup: {exc}")
        found = self.ctd.stop()
        if found:
            force_cleanup(found)
        still = leftovers(self.tmp)
        if still.mounts:
            progress(f"cleanup: mounts left, keeping {self.tmp}:\n{still}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- containers -------------------------------------------------------

    def new_id(self, tag: str) -> str:
        """A container id unique to this run."""
        return f"kb-{tag}-{os.getpid()}-{next(self._ids)}"

    def ctr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """`ctr` in the bench namespace; raises RuntimeError on a non-zero exit."""
        res = self.ctd.ctr(*args, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed (rc={res.returncode}):\n"
                               f"{res.stdout}{res.stderr}\n{self.ctd.log_tail(20)}")
        return res

    def ctr_argv(self, *args: str) -> list[str]:
        return [*self.ctd.ctr_prefix(), *args]

    def run_detached(self, runtime: str, cid: str, *argv: str) -> None:
        """`ctr run -d`: the task is RUNNING when this returns."""
        self.ctr("run", "-d", "--runtime", RUNTIMES[runtime], self.image, cid, *argv)

    def remove(self, cid: str, timeout: float = 60.0) -> None:
        """SIGKILL the task, wait until it stopped, delete task and container."""
        self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid)
        wait_for(lambda: self.task_status(cid) in ("STOPPED", None), timeout, f"{cid} to stop")
        self.ctr("tasks", "rm", "-f", cid)
        self.ctr("containers", "rm", cid)

    def task(self, cid: str) -> tuple[int, str] | None:
        """(pid, status) of task `cid` from `ctr tasks ls`, or None if it is not listed."""
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:  # TASK PID STATUS
            fields = line.split()
            if len(fields) >= 3 and fields[0] == cid:
                return int(fields[1]), fields[2]
        return None

    def task_status(self, cid: str) -> str | None:
        task = self.task(cid)
        return None if task is None else task[1]

    def running(self) -> set[str]:
        """Ids of the tasks that are RUNNING."""
        out = self.ctr("tasks", "ls").stdout.splitlines()[1:]
        return {f[0] for f in (line.split() for line in out) if len(f) >= 3 and f[2] == "RUNNING"}

    @contextmanager
    def container(self, runtime: str, tag: str, *argv: str) -> Iterator[str]:
        """A detached container for the duration of the block; yields its id."""
        cid = self.new_id(tag)
        self.run_detached(runtime, cid, *argv)
        try:
            yield cid
        finally:
            self.remove(cid)

    # --- processes --------------------------------------------------------

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.state_root / "sandboxes" / sandbox_id

    def shim_pid(self, runtime: str, cid: str) -> int:
        """PID of the shim serving container `cid` (one container per sandbox here)."""
        if runtime == "keel":
            def match(argv: list[str]) -> bool:
                return "shim" in argv and _flag(argv, "-id") == cid
        else:
            def match(argv: list[str]) -> bool:
                return argv[0].endswith("containerd-shim-runc-v2") and _flag(argv, "-id") == cid
        pids = pids_where(match)
        if len(pids) != 1:
            raise RuntimeError(f"expected one {runtime} shim for {cid}, found {pids}")
        return pids[0]

    def agent_pid(self, sandbox_id: str) -> int:
        """PID of the keel agent (process backend: the sandbox's first process)."""
        state_dir = str(self.sandbox_dir(sandbox_id) / "agent")
        pids = pids_where(lambda argv: "agent" in argv and _flag(argv, "--state-dir") == state_dir)
        if len(pids) != 1:
            raise RuntimeError(f"expected one agent for sandbox {sandbox_id}, found {pids}")
        return pids[0]


def _flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in argv, if any."""
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


#: opsd's environment: no NOTIFY_SOCKET (it is not under systemd here).
OPSD_ENV = {**{k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            "PYTHONPATH": str(REPO)}


class Opsd:
    """The real opsd over the stage's sandboxes and the releases under *releases*;
    opsctl against it."""

    def __init__(self, stage: Stage, releases: Path) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="opsd-", dir=stage.tmp))
        self.socket = self.base / "opsd.sock"
        self.log = self.base / "opsd.log"
        self._argv = [sys.executable, "-m", "opsd", "--socket", str(self.socket),
                      "--state-dir", str(self.base / "state"), "--releases", str(releases),
                      "--state-root", str(stage.state_root), "--metrics-address", "none"]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Opsd:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=OPSD_ENV, cwd=REPO)
        try:
            wait_for(lambda: self._exited() or self.opsctl("ls").returncode == 0, 60,
                     "opsd to answer")
            if self._exited():
                raise RuntimeError(f"opsd exited at start:\n{self.log_tail()}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def opsctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "opsd.cli", "--socket", str(self.socket),
                               *args], capture_output=True, text=True, env=OPSD_ENV,
                              cwd=REPO, timeout=600)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
