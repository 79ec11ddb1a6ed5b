"""Shim configuration: a validated frozen dataclass loaded from TOML.

Looked up, first found wins: the ``config_path`` of the runtime options
containerd passes (``ctr run --runtime-config-path`` or the CRI runtime's
``options.ConfigPath``), ``$KEEL_CONFIG``, ``/etc/keel/config.toml``.  A
missing default file means defaults; a named file that is missing or
invalid is an error.

``$KEEL_STATE_ROOT`` overrides ``state_root`` (tests point it elsewhere;
containerd passes its whole environment to shims).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

from agent.errors import InvalidArgument

DEFAULT_PATH = Path("/etc/keel/config.toml")


@dataclasses.dataclass(frozen=True, slots=True)
class ShimConfig:
    #: Where sandbox directories live (``<root>/sandboxes/<id>``).
    state_root: Path = Path("/run/keel")
    #: VMM backend for new sandboxes: "process" or "qemu".
    backend: str = "process"
    #: OCI runtime the agent runs containers with.
    runtime: str = "runc"
    #: Command that starts the agent (argv prefix); default: this Python.
    agent_command: tuple[str, ...] = ()
    #: Output bytes the agent buffers per stream before it applies backpressure.
    output_buffer_bytes: int = 1 << 20
    #: Seconds to wait for the agent to answer after the sandbox starts.
    agent_timeout_s: float = 10.0
    #: Log level of the shim daemon.
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.backend not in ("process", "qemu"):
            raise InvalidArgument(f"config: backend must be 'process' or 'qemu', not {self.backend!r}")
        if self.output_buffer_bytes < 4096:
            raise InvalidArgument("config: output_buffer_bytes must be at least 4096")
        if self.agent_timeout_s <= 0:
            raise InvalidArgument("config: agent_timeout_s must be positive")


def load(path: str | Path | None = None) -> ShimConfig:
    """Load and validate the configuration; raise InvalidArgument on errors."""
    explicit = path or os.environ.get("KEEL_CONFIG")
    file = Path(explicit) if explicit else DEFAULT_PATH
    values: dict[str, object] = {}
    try:
        with file.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise InvalidArgument(f"config file {file} does not exist") from None
        raw = {}
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {file}: {exc}") from exc
    section = raw.get("shim", raw)
    known = {f.name: f for f in dataclasses.fields(ShimConfig)}
    for key, value in section.items():
        if key not in known:
            raise InvalidArgument(f"config file {file}: unknown key {key!r}")
        values[key] = _coerce(key, value, file)
    if root := os.environ.get("KEEL_STATE_ROOT"):
        values["state_root"] = Path(root)
    return ShimConfig(**values)  # type: ignore[arg-type]


def _coerce(key: str, value: object, file: Path) -> object:
    if key == "state_root":
        return Path(str(value))
    if key == "agent_command":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"config file {file}: agent_command must be a list of strings")
        return tuple(value)
    return value
