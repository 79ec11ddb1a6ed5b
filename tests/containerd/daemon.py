"""One private containerd process: its paths, its config, starting and
stopping it, and running ``ctr`` against it (see the package docstring)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.containerd.cleanup import (
    Leftovers,
    keel_launchers,
    stop_keel_launchers,
    wait_no_leftovers,
)
from tests.containerd.host import DEFAULT_PATH, wait_for, which
from tests.containerd.terminal import PtyResult, run_on_pty

NAMESPACE = "keel-test"
SHIM_NAME = "containerd-shim-keel-v2"
BOOTED = "containerd successfully booted"
SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the NUL
# Snapshotters that only probe and log errors here; CRI is the heavy one.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)



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
        if len(os.fsencode(paths.ttrpc_socket)) > SUN_PATH_MAX:
            raise ValueError(f"temp root {t} is too long for unix socket paths")
        return paths


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


class Containerd:
    """One private containerd process; see the module docstring for the layout.

    Not started by the constructor: call `start()` (or use it as a context
    manager, which stops it on exit).  Not thread-safe.
    """

    def __init__(self, tmp_root: Path | str, *, namespace: str = NAMESPACE,
                 env: Mapping[str, str] | None = None, log_level: str = "debug",
                 extra_config: str = "", die_with_parent: bool = True,
                 disabled_plugins: Sequence[str] = DISABLED_PLUGINS,
                 netns: Path | str | None = None) -> None:
        """`env` is added to containerd's (and so every shim's) environment.
        `extra_config` is appended to config.toml verbatim; it must not repeat
        a table this module writes ([grpc], [ttrpc], [debug], the opt plugin).
        `disabled_plugins` replaces `DISABLED_PLUGINS` (the CRI suite enables
        the CRI plugin).  `netns`: the path of a network namespace (e.g.
        ``/run/netns/<name>``) that containerd runs in, entered with
        ``nsenter --net`` (which, unlike ``ip netns exec``, leaves the mount
        namespace and so ``/sys/fs/cgroup`` alone); containerd keeps its PID.
        `die_with_parent`: containerd gets SIGTERM if the thread that started
        it dies (PR_SET_PDEATHSIG via util-linux `setpriv`, when present), so
        a killed test run does not leave it behind; start it from a
        long-lived thread.  Shims are unaffected (they outlive containerd).
        """
        self.paths = ContainerdPaths.under(tmp_root)
        self.namespace = namespace
        self.containerd_bin = which("containerd")
        self.ctr_bin = which("ctr")
        self._extra_env = dict(env or {})
        self._log_level = log_level
        self._extra_config = extra_config
        self._disabled_plugins = tuple(disabled_plugins)
        setpriv = shutil.which("setpriv", path=DEFAULT_PATH)
        self._launcher = [setpriv, "--pdeathsig", "TERM"] if die_with_parent and setpriv else []
        if netns is not None:  # nsenter execs containerd: the PID stays containerd's
            self._launcher += [which("nsenter"), f"--net={os.fspath(netns)}", "--"]
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
        disabled = ", ".join(f'"{name}"' for name in self._disabled_plugins)
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
        path = env.get("PATH") or DEFAULT_PATH
        for d in DEFAULT_PATH.split(":"):  # runc lives in /usr/sbin
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

    def update_task(self, cid: str, resources: dict[str, object], timeout: float = 120) -> None:
        """containerd's Task.Update on *cid*'s shim (ctr 1.6 has no ``task update``);
        raises the KeelError of a refused call."""
        import asyncio
        import json

        from betterproto.lib.google.protobuf import Any as PbAny
        from betterproto.lib.google.protobuf import Empty

        from shim._pb.containerd.task.v2 import UpdateTaskRequest
        from shim.ttrpc import TtrpcClient

        address = (self.paths.state / "io.containerd.runtime.v2.task" / self.namespace / cid
                   / "address").read_text()

        async def call() -> None:
            client = await TtrpcClient.connect(address)
            try:
                req = UpdateTaskRequest(id=cid, resources=PbAny(
                    type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                    value=json.dumps(resources).encode()))
                await client.call("containerd.task.v2.Task", "Update", req, Empty, timeout=timeout)
            finally:
                await client.aclose()

        asyncio.run(call())

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
