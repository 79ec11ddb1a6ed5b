"""Agent configuration: a validated frozen dataclass built from the command line.

The agent has no config file: everything it needs comes from its command
line, which the sandbox (the process backend, or the guest's init) writes.
An in-place upgrade rebuilds the command line from the config
(:meth:`AgentConfig.to_argv`), so a release must keep accepting the
options of the releases it can be upgraded from.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from keel.errors import InvalidArgument

#: Channel names the agent serves; each needs exactly one listener.
CHANNELS = ("agent", "ops")
#: How the agent starts: fresh, resuming an in-place upgrade's state, or
#: fresh after a failed upgrade whose state nobody could read (see __main__).
MODES = ("start", "resume", "recover")

_NAME = re.compile(r"^[a-z]+$")


@dataclasses.dataclass(frozen=True, slots=True)
class Listen:
    """Where one channel listens.

    *kind* is ``unix`` (address: a path), ``vsock`` (address: a port),
    ``serial`` (address: a virtio-serial port name), ``fd`` (address: an
    inherited listening socket's fd number) or ``serial-fd`` (address: an
    inherited virtio-serial port's fd number, what an in-place upgrade
    hands over for a ``serial`` channel).
    """

    channel: str
    kind: str
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class AgentConfig:
    state_dir: Path
    listens: tuple[Listen, ...]
    #: OCI runtime binary: a name looked up in PATH, or a path.
    runtime: str = "runc"
    #: Output bytes buffered per stream before the agent stops reading the pipe.
    output_buffer_bytes: int = 1 << 20
    #: Stdin bytes buffered per process before WriteStdin waits.
    stdin_buffer_bytes: int = 1 << 20
    #: Seconds one runtime command (runc create, start, ...) may take.
    runtime_timeout_s: float = 60.0
    log_level: str = "info"
    mode: str = "start"

    def __post_init__(self) -> None:
        names = [listen.channel for listen in self.listens]
        for channel in CHANNELS:
            if names.count(channel) != 1:
                raise InvalidArgument(f"need exactly one listener for channel {channel!r}")
        if self.output_buffer_bytes < 4096 or self.stdin_buffer_bytes < 4096:
            raise InvalidArgument("buffer sizes must be at least 4096 bytes")
        if logging.getLevelName(self.log_level.upper()) not in range(0, 60):
            raise InvalidArgument(f"unknown log level {self.log_level!r}")
        if self.mode not in MODES:
            raise InvalidArgument(f"unknown mode {self.mode!r}")

    def to_argv(self) -> list[str]:
        """The command-line arguments (without the mode flag) that give this config."""
        argv = ["--state-dir", str(self.state_dir)]
        for listen in self.listens:
            if listen.kind == "fd":
                argv += ["--listen-fd", f"{listen.channel}={listen.address}"]
            elif listen.kind == "serial-fd":
                argv += ["--listen-fd", f"{listen.channel}=serial:{listen.address}"]
            else:
                argv += ["--listen", f"{listen.channel}={listen.kind}:{listen.address}"]
        return argv + [
            "--runtime", self.runtime,
            "--output-buffer-bytes", str(self.output_buffer_bytes),
            "--stdin-buffer-bytes", str(self.stdin_buffer_bytes),
            "--runtime-timeout", repr(self.runtime_timeout_s),
            "--log-level", self.log_level,
        ]


def _channel(value: str) -> tuple[str, str]:
    channel, sep, rest = value.partition("=")
    if not sep or not _NAME.match(channel) or channel not in CHANNELS:
        raise InvalidArgument(f"bad listener {value!r}: expected one of {CHANNELS} then '='")
    return channel, rest


def _listen(value: str) -> Listen:
    """``CHANNEL=unix:PATH`` or ``CHANNEL=vsock:PORT``."""
    channel, rest = _channel(value)
    kind, sep, address = rest.partition(":")
    if not sep or kind not in ("unix", "vsock", "serial") or not address:  # serial: agent/_serial.py
        raise InvalidArgument(f"bad --listen {value!r}: expected CHANNEL=unix:PATH or CHANNEL=vsock:PORT")
    if kind == "vsock" and not address.isdigit():
        raise InvalidArgument(f"bad --listen {value!r}: vsock port must be a number")
    return Listen(channel, kind, address)


def _listen_fd(value: str) -> Listen:
    """``CHANNEL=FD``: an inherited listening socket; ``CHANNEL=serial:FD``: an
    inherited virtio-serial port (agent/_serial.py)."""
    channel, rest = _channel(value)
    kind = "fd"
    if rest.startswith("serial:"):
        kind, rest = "serial-fd", rest.removeprefix("serial:")
    if not rest.isdigit():
        raise InvalidArgument(f"bad --listen-fd {value!r}: expected CHANNEL=FD or CHANNEL=serial:FD")
    return Listen(channel, kind, rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="keel-agent",
        description="Keel guest agent: runs containers with an OCI runtime and serves the "
        "agent and ops channels (gRPC).  Logs go to stderr.",
    )
    p.add_argument("--state-dir", required=True, type=Path,
                   help="directory for state.json, bundles and the runtime's state")
    p.add_argument("--listen", action="append", default=[], metavar="CHANNEL=unix:PATH",
                   help="listen for a channel (agent, ops) on a unix socket path or vsock:PORT")
    p.add_argument("--listen-fd", action="append", default=[], metavar="CHANNEL=FD",
                   help="serve a channel on an inherited listening socket (CHANNEL=serial:FD: "
                   "an inherited virtio-serial port)")
    p.add_argument("--runtime", default="runc", help="OCI runtime binary (default: runc)")
    p.add_argument("--output-buffer-bytes", type=int, default=1 << 20,
                   help="output buffered per stream before backpressure (default 1 MiB)")
    p.add_argument("--stdin-buffer-bytes", type=int, default=1 << 20,
                   help="stdin buffered per process before WriteStdin waits (default 1 MiB)")
    p.add_argument("--runtime-timeout", type=float, default=60.0,
                   help="seconds one runtime command may take (default 60)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_const", dest="mode", const="resume",
                      default="start", help="resume from the state an in-place upgrade left "
                      "(listeners, pipes and ptys are inherited fds)")
    mode.add_argument("--recover", action="store_const", dest="mode", const="recover",
                      help="start fresh on inherited listeners after a failed upgrade; the "
                      "unreadable state file is kept aside")
    return p


def from_args(argv: Sequence[str] | None = None) -> AgentConfig:
    """Parse *argv*; argparse exits on syntax errors, InvalidArgument for the rest."""
    ns = parser().parse_args(argv)
    listens = tuple(map(_listen, ns.listen)) + tuple(map(_listen_fd, ns.listen_fd))
    return AgentConfig(
        state_dir=ns.state_dir.absolute(),
        listens=listens,
        runtime=ns.runtime,
        output_buffer_bytes=ns.output_buffer_bytes,
        stdin_buffer_bytes=ns.stdin_buffer_bytes,
        runtime_timeout_s=ns.runtime_timeout,
        log_level=ns.log_level,
        mode=ns.mode,
    )
