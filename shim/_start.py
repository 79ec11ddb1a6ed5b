"""``containerd-shim-keel-v2 start``: start or join the sandbox's shim.

Prints only ``unix://<socket>`` and exits at once (containerd reads our
combined stdout+stderr until EOF: research containerd-shim.md 2.3).  The
daemon inherits the listening socket (its number in $KEEL_LISTEN_FD), and /dev/null for stdio, so
it never holds containerd's pipe.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

from shim._bundle import note_config, sandbox_id, socket_path
from shim._flags import Flags
from shim.config import ShimConfig
from shim.dirs import SandboxDir

#: glibc malloc settings for the daemon and what it starts (the process
#: backend's agent inherits them).  The output path allocates buffers of up to
#: 1 MiB per chunk; with glibc's defaults those come from fresh mmaps or a
#: heap trimmed after every free, so each chunk pays ~256 page faults and
#: zeroing.  Serving them from a heap kept up to 8 MiB cut the CPU per byte of
#: both shim and agent by ~30%.  Set in the environment wins.
_MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20), "MALLOC_TRIM_THRESHOLD_": str(8 << 20)}

#: Seconds ``start`` waits for the launcher before it execs the daemon itself.
LAUNCHER_TIMEOUT_S = 3.0


def _read_options() -> str:
    """config_path from the runtimeoptions.v1.Options Any on stdin, if any."""
    try:
        data = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    except (OSError, ValueError):
        return ""
    if not data:
        return ""
    from betterproto.lib.google.protobuf import Any as PbAny

    from shim._pb.runtimeoptions import v1 as ro

    any_ = PbAny().parse(data)
    if any_.type_url.rsplit("/", 1)[-1] != "runtimeoptions.v1.Options":
        return ""
    return ro.Options().parse(any_.value).config_path


def _listen(path: Path) -> socket.socket | None:
    """A listener at *path*, or None when a live shim already listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            sock.close()
            return None  # grouped: the sandbox's shim is alive
        except OSError:
            path.unlink(missing_ok=True)  # stale socket of a dead shim
            sock.bind(str(path))
        finally:
            probe.close()
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _write_address(bundle: Path, address: str) -> None:
    tmp = bundle / ".address"
    tmp.write_text(address)
    os.replace(tmp, bundle / "address")


def _spawn_daemon(cfg: ShimConfig, argv: list[str], env: dict[str, str], bundle: Path,
                  listener: socket.socket) -> None:
    """Fork the daemon from this release's launcher; without one, exec it
    (and start a launcher for the next pods)."""
    if cfg.launcher_idle_s:
        from shim import _launcher

        # A config that traces gets a launcher that has the exporter warm.
        tracing = cfg.tracing.start_ratio > 0
        sock = _launcher.socket_path(cfg.state_root,
                                     _launcher.release_key() + ("-traced" if tracing else ""))
        try:
            env["KEEL_LAUNCHER"] = str(sock)
            _launcher.request(sock, {"op": "shim", "argv": argv, "env": env, "cwd": str(bundle)},
                              [listener.fileno()], timeout=LAUNCHER_TIMEOUT_S)
            return
        except (_launcher.LauncherError, OSError) as exc:
            env.pop("KEEL_LAUNCHER", None)
            if _launcher.needs_spawn(sock):
                _launcher.spawn(sock, cfg.launcher_idle_s, {**_MALLOC_TUNING, **os.environ},
                                tracing=tracing)
            elif not isinstance(exc, _launcher.NotRunning):
                # Not on stderr: containerd reads it with stdout as our address.
                _launcher.note(sock, f"start (pid {os.getpid()}): {exc}; exec'd the daemon")
    env["KEEL_LISTEN_FD"] = str(listener.fileno())
    subprocess.Popen([sys.executable, "-m", "shim", *argv], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     pass_fds=(listener.fileno(),), cwd=bundle, env=env, process_group=0)


def start(flags: Flags) -> int:
    from shim import config as config_mod

    bundle = Path.cwd()
    config_path = ""
    try:
        config_path = _read_options()
        cfg = config_mod.load(config_path or None)
        sandbox = sandbox_id(bundle, flags.id)
        SandboxDir.of(cfg.state_root, sandbox).check_fits()
        path = socket_path(cfg.state_root, flags.address, flags.namespace, sandbox)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        address = f"unix://{path}"
        lock = os.open(path.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # two starts of one pod must not race
        listener = _listen(path)
        if listener is not None:
            env = {**_MALLOC_TUNING, **os.environ}
            if config_path:
                env["KEEL_CONFIG"] = config_path
            flags_argv = ["-namespace", flags.namespace, "-address", flags.address,
                          "-publish-binary", flags.publish_binary, "-id", flags.id,
                          "-sandbox-id", sandbox, "-socket", str(path)]
            if flags.debug:
                flags_argv.append("-debug")
            _spawn_daemon(cfg, flags_argv, env, bundle, listener)
            listener.close()
        note_config(bundle, config_path)
        _write_address(bundle, address)
    except Exception as exc:  # containerd shows this text in its error
        where = f" (runtime config {config_path})" if config_path and config_path not in str(exc) else ""
        # No trailing newline: containerd appends ": exit status 1" to the text.
        sys.stdout.write(f"keel shim start failed{where}: {exc}")
        sys.stdout.flush()
        return 1
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0
