"""Shim configuration: a validated frozen dataclass loaded from TOML.

Looked up, first found wins: the ``config_path`` of the runtime options
containerd passes (``ctr run --runtime-config-path`` or the CRI runtime's
``options.ConfigPath``), ``$KEEL_CONFIG``, ``/etc/keel/config.toml``.  A
missing default file means defaults; a named file that is missing or
invalid is an error.

``$KEEL_STATE_ROOT`` overrides ``state_root`` (tests point it elsewhere;
containerd passes its whole environment to shims).

The file holds one table per component: ``[shim]`` (this class),
``[qemu]`` (``shim.vmm.qemu.config.QemuConfig``, validated here too so a bad
table fails the shim's start, not its first sandbox), ``[console]``,
``[tracing]`` (``observability.config``, with the ``OTEL_*`` variables; in
``ShimConfig.tracing``) and ``[metrics]`` (opsd's).  A file without a
``[shim]`` table may give the shim's keys at the top level.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from keel.errors import InvalidArgument
from observability.config import TracingConfig
from observability.config import from_table as tracing_from_table

DEFAULT_PATH = Path("/etc/keel/config.toml")
#: Seconds to wait for the agent by backend, when the file does not say:
#: a VM's agent starts seconds after qemu (tens of seconds under TCG on a
#: loaded host), the process backend's almost at once.
AGENT_TIMEOUT_S = {"process": 10.0, "qemu": 30.0}
#: Tables of the config file owned by other components.
OTHER_TABLES = ("qemu", "console", "tracing", "metrics")


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
    #: Seconds to wait for the agent to answer after the sandbox starts;
    #: 0 means the backend's default (``AGENT_TIMEOUT_S``).
    agent_timeout_s: float = 0.0
    #: Seconds an agent call may take in all, resends included (WaitProcess
    #: and a stdin write held by a full pipe have none); also how long an
    #: unanswered attempt waits before the call is resent, at most
    #: ``agent_timeout_s``.
    agent_call_timeout_s: float = 90.0
    #: Log level of the shim daemon.
    log_level: str = "info"
    #: Seconds the launcher (shim/_launcher.py: forks shim daemons and
    #: process agents from a warm interpreter) stays up without a request;
    #: 0: no launcher, every shim and agent is a fresh interpreter.
    launcher_idle_s: float = 600.0
    #: ``[console] enabled``: whether ``opsctl console`` may attach to new
    #: sandboxes (each can be switched live with ``opsctl console enable``).
    console_enabled: bool = False
    #: ``[tracing]`` with the ``OTEL_*`` variables (observability/config.py).
    tracing: TracingConfig = TracingConfig()

    def __post_init__(self) -> None:
        if self.backend not in ("process", "qemu"):
            raise InvalidArgument(f"config: backend must be 'process' or 'qemu', not {self.backend!r}")
        if self.output_buffer_bytes < 4096:
            raise InvalidArgument("config: output_buffer_bytes must be at least 4096")
        if self.launcher_idle_s < 0:
            raise InvalidArgument("config: launcher_idle_s must be 0 (off) or positive")
        if self.agent_timeout_s < 0:
            raise InvalidArgument("config: agent_timeout_s must be positive")
        if self.agent_call_timeout_s <= 0:
            raise InvalidArgument("config: agent_call_timeout_s must be positive")
        if not self.agent_timeout_s:
            object.__setattr__(self, "agent_timeout_s", AGENT_TIMEOUT_S[self.backend])


def read_file(path: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The config file (*path*, ``$KEEL_CONFIG`` or the default) and its
    tables, unchecked; no tables when the default file is missing.  Raises
    InvalidArgument when a named file is missing or the file is not TOML.
    Every component's ``load`` reads the file through this."""
    explicit = path or os.environ.get("KEEL_CONFIG")
    file = Path(explicit) if explicit else DEFAULT_PATH
    try:
        with file.open("rb") as f:
            return file, tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise InvalidArgument(f"config file {file} does not exist") from None
        return file, {}
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {file}: {exc}") from exc


def load(path: str | Path | None = None) -> ShimConfig:
    """Load and validate the configuration; raise InvalidArgument on errors."""
    file, raw = read_file(path)
    values: dict[str, object] = {}
    if "shim" in raw:
        section = raw["shim"]
    else:
        section = {k: v for k, v in raw.items() if k not in OTHER_TABLES}
    if not isinstance(section, dict):
        raise InvalidArgument(f"config file {file}: [shim] must be a table")
    _check_other_tables(raw, file)
    known = {f.name: f for f in dataclasses.fields(ShimConfig) if f.name != "tracing"}
    for key, value in section.items():
        if key not in known:
            raise InvalidArgument(f"config file {file}: unknown key {key!r}")
        values[key] = _coerce(key, value, file)
    if "console" in raw:
        values["console_enabled"] = _console_table(raw["console"], file)
    values["tracing"] = tracing_from_table(raw.get("tracing"), where=f"config file {file}")
    if root := os.environ.get("KEEL_STATE_ROOT"):
        values["state_root"] = Path(root)
    return ShimConfig(**values)  # type: ignore[arg-type]


def _console_table(table: object, file: Path) -> bool:
    if not isinstance(table, dict) or set(table) - {"enabled"}:
        raise InvalidArgument(f"config file {file}: [console] takes one key, enabled = true|false")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise InvalidArgument(f"config file {file}: [console] enabled must be true or false")
    return enabled


def _check_other_tables(raw: dict[str, object], file: Path) -> None:
    if "shim" in raw:
        for key in raw:
            if key != "shim" and key not in OTHER_TABLES:
                raise InvalidArgument(f"config file {file}: unknown key {key!r} (tables: shim, "
                                      f"{', '.join(OTHER_TABLES)})")
    if "qemu" in raw:
        from shim.vmm.qemu.config import QemuConfig

        table = raw["qemu"]
        if not isinstance(table, dict):
            raise InvalidArgument(f"config file {file}: [qemu] must be a table")
        try:
            QemuConfig.from_mapping(table)
        except InvalidArgument as exc:
            raise InvalidArgument(f"config file {file}: {exc}") from exc


def _coerce(key: str, value: object, file: Path) -> object:
    if key == "state_root":
        return Path(str(value))
    if key == "agent_command":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"config file {file}: agent_command must be a list of strings")
        return tuple(value)
    return value
