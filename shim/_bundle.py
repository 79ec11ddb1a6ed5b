"""What start and delete derive from a bundle: the sandbox (group) id and
the shim socket of that sandbox."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from keel import ids
from keel.errors import InvalidArgument

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


def socket_path(state_root: Path, address: str, namespace: str, sandbox: str) -> Path:
    """Where the sandbox's shim listens; short enough for sun_path (108)."""
    digest = hashlib.sha256(f"{address}/{namespace}/{sandbox}".encode()).hexdigest()[:32]
    return state_root / "s" / digest
