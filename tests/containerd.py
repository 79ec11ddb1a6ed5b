"""A private containerd for tests and benchmarks.

Everything lives under a temp root the caller owns:

    <tmp>/config.toml        rendered with absolute paths (containerd does not expand env vars)
    <tmp>/root, <tmp>/state  containerd's root and state
    <tmp>/containerd.sock    gRPC (what ctr talks to); <tmp>/containerd.sock.ttrpc
    <tmp>/containerd.log     containerd's stdout+stderr, appended across restarts
    <tmp>/bin                first on containerd's PATH: put containerd-shim-keel-v2 here
    <tmp>/opt                the io.containerd.internal.v1.opt plugin's path

The CRI plugin is disabled (fast boot, no CNI), logging is at debug level,
and containerd runs with cwd = the temp root, so the only shims it finds are
the ones in `<tmp>/bin`, `<tmp>/opt/bin` and the system PATH (it resolves a
runtime name once and caches the answer for its lifetime: install the shim
before the first task that needs it).

Not isolated: the runc shim's sockets are hard-coded under
`/run/containerd/s`, ctr's fifos go to `/run/containerd/fifo`, and
containers land in the `/<namespace>/<id>` cgroups.  Use a namespace and
container ids no concurrent user shares.

Only processes this module started (containerd, ctr) are signalled, by PID.
`leftovers()` finds what outlived a test; `force_cleanup()` removes it: the
processes it names carry the temp root in their command line or
environment (containerd hands `TTRPC_ADDRESS=<tmp>/...` to every shim), so
they descend from this helper's containerd.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

NAMESPACE = "keel-test"
SHIM_NAME = "containerd-shim-keel-v2"
BOOTED = "containerd successfully booted"
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the NUL
_POLL_S = 0.02
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Snapshotters that only probe and log errors here; CRI is the heavy one.
_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ContainerdPaths:
    """Every path of one private containerd; all absolute, all under `tmp_root`."""

    tmp_root: Path
    config: Path
    root: Path
    state: Path
    grpc_socket: Path
    ttrpc_socket: Path
    log: Path
    bin_dir: Path
    opt_dir: Path

    @classmethod
    def under(cls, tmp_root: Path | str) -> ContainerdPaths:
        """The layout under `tmp_root` (made absolute); raises ValueError if sockets won't fit."""
        t = Path(os.path.abspath(tmp_root))
        paths = cls(tmp_root=t, config=t / "config.toml", root=t / "root", state=t / "state",
                    grpc_socket=t / "containerd.sock", ttrpc_socket=t / "containerd.sock.ttrpc",
                    log=t / "containerd.log", bin_dir=t / "bin", opt_dir=t / "opt")
        if len(os.fsencode(paths.ttrpc_socket)) > _SUN_PATH_MAX:
            raise ValueError(f"temp root {t} is too long for unix socket paths")
        return paths


@dataclass(frozen=True, slots=True)
class PtyResult:
    """What `ctr_pty` saw: the terminal output (a tty turns "\\n" into "\\r\\n") and ctr's exit code."""

    output: str
    returncode: int


@dataclass(frozen=True, slots=True)
class Leftovers:
    """Things under (or started from) a temp root that are still there."""

    mounts: tuple[str, ...] = ()
    processes: tuple[tuple[int, str], ...] = ()  # (pid, cmdline)
    sockets: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.mounts or self.processes or self.sockets)

    def __str__(self) -> str:
        if not self:
            return "no leftovers"
        lines = [f"mount {m}" for m in self.mounts]
        lines += [f"process {pid}: {cmd}" for pid, cmd in self.processes]
        lines += [f"socket {s}" for s in self.sockets]
        return "\n".join(lines)


def install_shim_wrapper(bin_dir: Path | str, venv_python: Path | str, *,
                         env: Mapping[str, str] | None = None, name: str = SHIM_NAME) -> Path:
    """Write `<bin_dir>/<name>`: `#!/bin/sh` + `exec <venv_python> -m shim "$@"`.

    `env` entries are exported before the exec (e.g. an absolute PYTHONPATH
    when the package is not installed in that venv: containerd runs shims
    with cwd = the bundle).  The file is replaced atomically and is 0755.
    Returns its path.
    """
    bin_path = Path(bin_dir)
    bin_path.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines.append(f'exec {shlex.quote(os.fspath(venv_python))} -m shim "$@"')
    target = bin_path / name
    tmp = bin_path / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


def keel_launchers(state_root: Path) -> dict[int, Path]:
    """The Keel launchers (shim/_launcher.py) serving under `state_root`:
    pid -> socket.  Each writes its pid into ``launcher/<key>.lock``; the pid
    counts only if its command line names that socket."""
    found = {}
    for lock in sorted((state_root / "launcher").glob("*.lock")):
        sock = lock.with_suffix(".sock")
        try:
            pid = int(lock.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if b"shim._launcher" in cmdline and os.fsencode(sock) in cmdline:
            found[pid] = sock
    return found


def stop_keel_launchers(state_root: Path, timeout: float = 10.0) -> list[int]:
    """SIGTERM the Keel launchers under `state_root` and wait until they are
    gone (they idle out on their own after minutes; a test's leftover scan
    must not wait for that).  Returns their pids."""
    pids = list(keel_launchers(state_root))
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids


class Containerd:
    """One private containerd process; see the module docstring for the layout.

    Not started by the constructor: call `start()` (or use it as a context
    manager, which stops it on exit).  Not thread-safe.
    """

    def __init__(self, tmp_root: Path | str, *, namespace: str = NAMESPACE,
                 env: Mapping[str, str] | None = None, log_level: str = "debug",
                 extra_config: str = "", die_with_parent: bool = True) -> None:
        """`env` is added to containerd's (and so every shim's) environment.
        `extra_config` is appended to config.toml verbatim; it must not repeat
        a table this module writes ([grpc], [ttrpc], [debug], the opt plugin).
        `die_with_parent`: containerd gets SIGTERM if the thread that started
        it dies (PR_SET_PDEATHSIG via util-linux `setpriv`, when present), so
        a killed test run does not leave it behind; start it from a
        long-lived thread.  Shims are unaffected (they outlive containerd).
        """
        self.paths = ContainerdPaths.under(tmp_root)
        self.namespace = namespace
        self.containerd_bin = _which("containerd")
        self.ctr_bin = _which("ctr")
        self._extra_env = dict(env or {})
        self._log_level = log_level
        self._extra_config = extra_config
        setpriv = shutil.which("setpriv", path=_DEFAULT_PATH)
        self._launcher = [setpriv, "--pdeathsig", "TERM"] if die_with_parent and setpriv else []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # --- lifecycle ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """containerd's PID while it runs (as far as we know), else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 30.0) -> None:
        """Render the config, start containerd and wait until it has booted.

        Ready means: the gRPC socket exists and the log, since this start,
        contains "containerd successfully booted".  Raises RuntimeError if
        it is already running or exits early, TimeoutError (after killing
        it) if it is not ready within `timeout`; both carry the log.
        """
        if self.pid is not None:
            raise RuntimeError(f"containerd already running as pid {self.pid}")
        p = self.paths
        for d in (p.root, p.state, p.bin_dir, p.opt_dir):
            d.mkdir(parents=True, exist_ok=True)
        p.config.write_text(self.render_config())
        self._log_offset = p.log.stat().st_size if p.log.exists() else 0
        with open(p.log, "ab") as log:
            self._proc = subprocess.Popen(
                [*self._launcher, self.containerd_bin, "--config", str(p.config)],
                stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, cwd=p.tmp_root, env=self._env(),
                start_new_session=True)  # a ^C to pytest must not kill it mid-teardown
        try:
            wait_for(self._booted, timeout, "containerd to boot")
        except TimeoutError as exc:
            self._kill()
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None
        except BaseException:
            self._kill()
            raise

    def stop(self, timeout: float = 30.0, leftover_grace: float = 5.0) -> Leftovers:
        """SIGTERM containerd (by PID), wait for it to exit, report what is left.

        Shims and containers survive a containerd exit by design; this does
        not touch them (see `remove_all()` and `force_cleanup()`).  Leftovers
        are polled for up to `leftover_grace` seconds, since shims exit
        shortly after their last task is deleted.  Raises TimeoutError
        (after SIGKILLing it) if containerd outlives `timeout`.
        """
        self._stop(timeout)
        if root := self._extra_env.get("KEEL_STATE_ROOT"):
            stop_keel_launchers(Path(root))
        return wait_no_leftovers(self.paths.tmp_root, leftover_grace)

    def restart(self, timeout: float = 30.0) -> None:
        """`stop()` without the leftover scan, then `start()` with the same paths."""
        self._stop(timeout)
        self.start(timeout)

    def _stop(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"containerd (pid {proc.pid}) ignored SIGTERM for {timeout}s; "
                               f"killed\n{self.log_tail()}") from None
        finally:
            self._unlink_sockets()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._unlink_sockets()

    def _unlink_sockets(self) -> None:
        # containerd 1.6 removes its gRPC socket on exit but leaves the ttrpc
        # one (and both after SIGKILL); neither is a test's leftover.
        for sock in (self.paths.grpc_socket, self.paths.ttrpc_socket):
            sock.unlink(missing_ok=True)

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop(30.0)

    def _booted(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"containerd exited with {self._proc.returncode} while booting:\n"
                               f"{self.log_tail()}")
        return self.paths.grpc_socket.exists() and BOOTED in self.log_text(since_start=True)

    def render_config(self) -> str:
        """The config.toml text for these paths."""
        p = self.paths
        disabled = ", ".join(f'"{name}"' for name in _DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f'root = "{p.root}"\n'
            f'state = "{p.state}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f'  address = "{p.grpc_socket}"\n'
            "[ttrpc]\n"
            f'  address = "{p.ttrpc_socket}"\n'
            "[debug]\n"
            f'  level = "{self._log_level}"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{p.opt_dir}"\n'
            f"{self._extra_config}\n"
        )

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        path = env.get("PATH") or _DEFAULT_PATH
        for d in _DEFAULT_PATH.split(":"):  # runc lives in /usr/sbin
            if d not in path.split(":"):
                path += ":" + d
        env["PATH"] = f"{self.paths.bin_dir}:{path}"
        env.update(self._extra_env)
        return env

    def leftovers(self, grace: float = 0.0) -> Leftovers:
        """`leftovers()` of the temp root minus containerd itself, its two
        sockets, and Keel's launchers with theirs.

        With everything deleted this should be empty while containerd runs;
        polls for up to `grace` seconds for it to become empty.
        """
        # Keel's launchers outlive their pods on purpose, like containerd.
        launchers = keel_launchers(Path(root)) if (root := self._extra_env.get("KEEL_STATE_ROOT")) else {}
        return wait_no_leftovers(self.paths.tmp_root, grace,
                                 exclude_pids=[*([self.pid] if self.pid else []), *launchers],
                                 exclude_paths=[self.paths.grpc_socket, self.paths.ttrpc_socket,
                                                *launchers.values()])

    # --- logs ---------------------------------------------------------------

    def task(self, cid: str) -> tuple[int, str] | None:
        """(pid, status) of task *cid* from ``ctr task ls``, or None if it is not listed."""
        res = self.ctr("tasks", "ls")
        assert res.returncode == 0, res.stderr
        for line in res.stdout.splitlines()[1:]:  # header: TASK PID STATUS
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1]), fields[2]
        return None

    def log_text(self, since_start: bool = False) -> str:
        """containerd's log (all starts, or only the latest with `since_start`)."""
        try:
            with open(self.paths.log, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- ctr ----------------------------------------------------------------

    def ctr_prefix(self) -> list[str]:
        """`ctr --address <sock> --namespace <ns>`, to which a subcommand is appended."""
        return [self.ctr_bin, "--address", str(self.paths.grpc_socket),
                "--namespace", self.namespace]

    def ctr(self, *args: str, input: str | bytes | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ctr with `args`; never raises on a non-zero exit.

        stdin is `input` (or /dev/null), output is captured and decoded
        (undecodable bytes replaced).  On timeout ctr is killed and
        subprocess.TimeoutExpired propagates.  For `ctr run` with stdin use
        `ctr_feed`: with `input` here it can hang (see there).
        """
        data = input.encode() if isinstance(input, str) else input
        res = subprocess.run([*self.ctr_prefix(), *args], input=data, capture_output=True,
                             stdin=subprocess.DEVNULL if data is None else None,
                             timeout=timeout)
        return subprocess.CompletedProcess(res.args, res.returncode,
                                           res.stdout.decode(errors="replace"),
                                           res.stderr.decode(errors="replace"))

    def ctr_feed(self, *args: str, input: str | bytes, when: Callable[[], bool],
                 timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ctr, and write `input` to its stdin (then close it) only once `when()` is true.

        For `ctr run` with stdin: ctr 1.6 installs the hook that sends
        CloseIO on stdin EOF only after the task is created, so an input that
        hits EOF before that is never closed and the process waits forever.
        Pass e.g. "the task is RUNNING" as `when`.  `when` is polled until
        it is true or ctr exits; on timeout ctr is killed and
        subprocess.TimeoutExpired is raised.
        """
        data = input.encode() if isinstance(input, str) else input
        argv = [*self.ctr_prefix(), *args]
        deadline = time.monotonic() + timeout
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as proc:
            try:
                wait_for(lambda: proc.poll() is not None or when(), timeout,
                         f"the condition to feed {shlex.join(argv)}")
                out, err = proc.communicate(data, timeout=max(deadline - time.monotonic(), 0.1))
            except (TimeoutError, subprocess.TimeoutExpired):
                proc.kill()
                out, err = proc.communicate()
                raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
            except BaseException:
                proc.kill()
                raise
        return subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"),
                                           err.decode(errors="replace"))

    def ctr_pty(self, *args: str, input: str | bytes | None = None, timeout: float = 60.0,
                rows: int = 24, cols: int = 80) -> PtyResult:
        """Run ctr with stdin/stdout/stderr on a fresh pty (for `ctr run -t`).

        `input` is typed into the terminal once ctr runs.  Reads until ctr
        has exited and the terminal has drained.  On timeout ctr is killed
        (by PID) and TimeoutError carries the output seen so far.
        """
        return run_on_pty([*self.ctr_prefix(), *args], input=input, timeout=timeout,
                          rows=rows, cols=cols)

    def remove_all(self, timeout: float = 30.0) -> list[str]:
        """Kill and delete every task and container in the namespace; return their ids.

        Uses only ctr: `task kill -a -s SIGKILL`, `task rm -f`, `containers rm`.
        Raises RuntimeError if something is still listed afterwards.
        """
        tasks = self.ctr("tasks", "ls", "-q", timeout=timeout).stdout.split()
        for tid in tasks:
            self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", tid, timeout=timeout)
        for tid in tasks:
            self.ctr("tasks", "rm", "-f", tid, timeout=timeout)
        containers = self.ctr("containers", "ls", "-q", timeout=timeout).stdout.split()
        if containers:
            self.ctr("containers", "rm", *containers, timeout=timeout)
        left = (self.ctr("tasks", "ls", "-q").stdout.split()
                + self.ctr("containers", "ls", "-q").stdout.split())
        if left:
            raise RuntimeError(f"could not remove {left}:\n{self.log_tail()}")
        return sorted(set(tasks) | set(containers))


# --- pty ------------------------------------------------------------------

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


# --- leftovers ------------------------------------------------------------

def leftovers(tmp_root: Path | str, *, exclude_pids: Iterable[int] = (),
              exclude_paths: Iterable[Path | str] = ()) -> Leftovers:
    """Mounts, live processes and sockets that still belong to `tmp_root`.

    * mounts: mount points at or below it (from /proc/self/mountinfo);
    * processes: every live, non-zombie process other than this one, its
      ancestors and `exclude_pids` whose cmdline or environment mentions
      the temp root (shims are started with `-address <tmp>/containerd.sock`
      and `TTRPC_ADDRESS=<tmp>/...`, so a `containerd-shim-keel-v2` or
      `python -m shim` started through this helper's containerd is found
      whatever its argv), or that lives in another mount namespace whose
      mounts mention it (container processes on a rootfs from our
      snapshotter);
    * sockets: unix sockets below it, except `exclude_paths` (not descending
      into mount points).
    """
    root = os.path.realpath(tmp_root)
    skip = {os.path.realpath(p) for p in exclude_paths}
    return Leftovers(
        mounts=tuple(_mounts_under(root)),
        processes=tuple(_processes_of(root, _self_and_ancestors() | set(exclude_pids))),
        sockets=tuple(s for s in _sockets_under(root) if os.path.realpath(s) not in skip))


def wait_no_leftovers(tmp_root: Path | str, timeout: float, *, exclude_pids: Iterable[int] = (),
                      exclude_paths: Iterable[Path | str] = ()) -> Leftovers:
    """Poll `leftovers()` until it is empty or `timeout` passes; return the last result."""
    deadline = time.monotonic() + timeout
    pids, paths = list(exclude_pids), list(exclude_paths)
    while True:
        found = leftovers(tmp_root, exclude_pids=pids, exclude_paths=paths)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(_POLL_S)


def force_cleanup(found: Leftovers, timeout: float = 10.0) -> None:
    """SIGKILL the listed processes, remove their now-empty cgroups, lazily unmount the mounts.

    Only for leftovers from `leftovers()` of a temp root this helper owns.
    Waits up to `timeout` for the processes to disappear.  Cgroups (e.g.
    runc's `/<namespace>/<id>`) are rmdir'ed leaf only and best effort: a
    cgroup that still has members, or is our own, is left alone.
    """
    pids = {pid for pid, _ in found.processes}
    cgroups = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            cgroups |= _cgroup_dirs(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not any(_alive(p) for p in pids), timeout, "leftover processes to die")
    for d in sorted(cgroups - _cgroup_dirs(os.getpid()), key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)
    libc = ctypes.CDLL(None, use_errno=True)
    mnt_detach = 2
    for mount in sorted(found.mounts, key=lambda m: m.count("/"), reverse=True):
        libc.umount2(os.fsencode(mount), mnt_detach)


def _cgroup_dirs(pid: int) -> set[str]:
    """The non-root cgroup directories of `pid` that exist under /sys/fs/cgroup (v1 or v2)."""
    dirs = set()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if path in ("", "/"):
            continue
        if controllers:  # v1: the hierarchy is mounted under its controller list
            bases = [controllers.removeprefix("name=")]
        else:  # v2: hybrid hosts mount it at unified/
            bases = ["unified", ""]
        for base in bases:
            d = os.path.normpath(f"/sys/fs/cgroup/{base}/{path}")
            if os.path.isdir(d):
                dirs.add(d)
                break
    return dirs


def _mounts_under(root: str) -> Iterable[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mount(line.split()[4])
            if point == root or point.startswith(root + "/"):
                yield point


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _processes_of(root: str, skip: set[int]) -> Iterable[tuple[int, str]]:
    needle = os.fsencode(root)
    own_mnt_ns = os.readlink("/proc/self/ns/mnt")
    ns_mentions: dict[str, bool] = {}  # mount namespace -> its mounts mention root
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        try:
            if _state(pid) == "Z":
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            found = needle in cmdline or needle in Path(f"/proc/{pid}/environ").read_bytes()
            mnt_ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if not found and mnt_ns != own_mnt_ns:
                # A container process: its rootfs mount (overlay dirs, bind
                # source) names our temp root; argv and env are the image's.
                if mnt_ns not in ns_mentions:
                    ns_mentions[mnt_ns] = needle in Path(f"/proc/{pid}/mountinfo").read_bytes()
                found = ns_mentions[mnt_ns]
        except OSError:  # gone, going (EINVAL on a dying task's mountinfo) or not ours to read
            continue
        if found:
            yield pid, cmdline.replace(b"\0", b" ").decode(errors="replace").strip()


def _sockets_under(root: str) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    yield path


def _state(pid: int) -> str:
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line.rsplit(")", 1)[1].split()[0]


def _ppid(pid: int) -> int:
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return int(stat_line.rsplit(")", 1)[1].split()[1])


def _self_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:
            pid = _ppid(pid)
        except (FileNotFoundError, ProcessLookupError):
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        return _state(pid) != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# --- small helpers --------------------------------------------------------

def missing_prerequisites() -> list[str]:
    """Why a private containerd with runc cannot run on this host; empty if it can."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append(f"needs root (euid is {os.geteuid()})")
    for name in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        try:
            _which(name)
        except FileNotFoundError as exc:
            reasons.append(str(exc))
    return reasons


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":" + _DEFAULT_PATH)
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH or in {_DEFAULT_PATH}")
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
        time.sleep(_POLL_S)
