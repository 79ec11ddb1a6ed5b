"""What start and delete derive from a bundle: the sandbox (group) id and
the shim socket of that sandbox."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from keel import ids
from keel.errors import InvalidArgument, NotFound

#: Annotations that put a container into an existing sandbox, first wins.
GROUP_ANNOTATIONS = ("io.kubernetes.cri.sandbox-id", "io.containerd.runc.v2.group")


def sandbox_id(bundle: Path, task_id: str) -> str:
    """The sandbox a task belongs to: its pod's sandbox id, else itself."""
    try:
        spec = json.loads((bundle / "config.json").read_bytes())
    except FileNotFoundError:
        return task_id
    except ValueError as exc:
        raise InvalidArgument(f"{bundle}/config.json is not valid JSON: {exc}") from exc
    annotations = spec.get("annotations") or {}
    for key in GROUP_ANNOTATIONS:
        value = annotations.get(key)
        if value:
            if not ids.valid(value):
                raise InvalidArgument(f"annotation {key}={value!r} is not a valid sandbox id")
            return str(value)
    return task_id


def read_spec(bundle: Path) -> tuple[bytes, dict[str, Any]]:
    """The bundle's OCI spec, raw and parsed; NotFound or InvalidArgument."""
    path = bundle / "config.json"
    try:
        raw = path.read_bytes()
        spec = json.loads(raw)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: not a valid OCI spec: {exc}") from exc
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path}: not a valid OCI spec: not a JSON object")
    return raw, spec


def socket_path(state_root: Path, address: str, namespace: str, sandbox: str) -> Path:
    """Where the sandbox's shim listens; short enough for sun_path (108)."""
    digest = hashlib.sha256(f"{address}/{namespace}/{sandbox}".encode()).hexdigest()[:32]
    return state_root / "s" / digest


#: In a task's bundle: the runtime config file ``start`` was given (CRI's
#: ``ConfigPath``, ``ctr --runtime-config-path``).  ``delete`` gets no runtime
#: options from containerd, and must clean up under that config's state root.
CONFIG_NOTE = "keel-config"


def note_config(bundle: Path, config_path: str) -> None:
    """Record *config_path* in *bundle* for a later ``delete`` (nothing when empty)."""
    if not config_path:
        return
    tmp = bundle / f".{CONFIG_NOTE}"
    tmp.write_text(config_path)
    tmp.replace(bundle / CONFIG_NOTE)


def noted_config(bundle: Path) -> str | None:
    """The config path ``start`` recorded in *bundle*, or None."""
    try:
        text = (bundle / CONFIG_NOTE).read_text().strip()
    except OSError:
        return None
    return text or None
