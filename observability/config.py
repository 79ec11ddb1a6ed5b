"""Tracing configuration: the ``[tracing]`` table of the node config, then
the standard ``OTEL_*`` variables, which win (containerd passes its
environment to shims, so a unit's ``Environment=`` reaches every shim).

    [tracing]
    enabled = false        # off by default; `opsctl trace on` switches it live
    ratio = 1.0            # sampling ratio of new traces when on
    endpoint = "http://127.0.0.1:4318/v1/traces"   # OTLP/HTTP (protobuf)
    queue_size = 2048      # spans held for export; more are dropped and counted
    export_timeout_s = 5.0 # one export's bound, retries included

Variables read: ``OTEL_SDK_DISABLED=true`` (off), ``OTEL_TRACES_EXPORTER``
(``otlp`` switches on, ``none`` off), ``OTEL_TRACES_SAMPLER_ARG`` (ratio),
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (full URL) or
``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL; ``/v1/traces`` is added),
``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`` (ms).
Stdlib only: the shim reads this on every start.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from keel.errors import InvalidArgument

DEFAULT_ENDPOINT = "http://127.0.0.1:4318/v1/traces"


@dataclasses.dataclass(frozen=True, slots=True)
class TracingConfig:
    enabled: bool = False
    ratio: float = 1.0
    endpoint: str = DEFAULT_ENDPOINT
    queue_size: int = 2048
    export_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise InvalidArgument(f"tracing: ratio must be within 0 and 1, not {self.ratio}")
        if not self.endpoint.startswith(("http://", "https://")):
            raise InvalidArgument(f"tracing: endpoint must be an http(s) URL, not {self.endpoint!r}")
        if not 1 <= self.queue_size <= 1 << 20:
            raise InvalidArgument("tracing: queue_size must be within 1 and 1048576")
        if not 0 < self.export_timeout_s <= 300:
            raise InvalidArgument("tracing: export_timeout_s must be within 0 and 300")

    @property
    def start_ratio(self) -> float:
        """The ratio a process starts with (0 when tracing is off)."""
        return self.ratio if self.enabled else 0.0


def from_table(table: object, env: Mapping[str, str] | None = None,
               where: str = "config") -> TracingConfig:
    """The TracingConfig of a ``[tracing]`` *table* (None: defaults) and *env*."""
    env = os.environ if env is None else env
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise InvalidArgument(f"{where}: [tracing] must be a table")
    fields = {f.name: f for f in dataclasses.fields(TracingConfig)}
    values: dict[str, object] = {}
    for key, value in table.items():
        if key not in fields:
            raise InvalidArgument(f"{where}: unknown key {key!r} in [tracing]"
                                  f" (known: {', '.join(sorted(fields))})")
        values[key] = _coerce(key, value, fields[key].type, where)
    try:
        values.update(_from_env(env))
    except ValueError as exc:
        raise InvalidArgument(f"tracing: bad OTEL_* variable: {exc}") from None
    return TracingConfig(**values)  # type: ignore[arg-type]


def _coerce(key: str, value: object, typ: object, where: str) -> object:
    want = {"bool": bool, "float": float, "int": int, "str": str}[str(typ)]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise InvalidArgument(f"{where}: [tracing] {key} must be a {want.__name__}")
    return value


def _from_env(env: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "otlp":
        out["enabled"] = True
    elif exporter == "none":
        out["enabled"] = False
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        out["enabled"] = False
    if arg := env.get("OTEL_TRACES_SAMPLER_ARG", "").strip():
        out["ratio"] = float(arg)
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        out["endpoint"] = url
    elif url := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        out["endpoint"] = url.rstrip("/") + "/v1/traces"
    if size := env.get("OTEL_BSP_MAX_QUEUE_SIZE", "").strip():
        out["queue_size"] = int(size)
    if ms := env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "").strip():
        out["export_timeout_s"] = float(ms) / 1000
    return out
