"""Validation of what the shim sends, and the OCI bundles built from it.

Everything from the shim is checked here before it reaches the runtime:
ids, JSON documents (size, shape) and the root filesystem path.  Bundles
live in ``<state-dir>/bundles/<container-id>/``: ``config.json`` (the
shim's spec with ``root.path`` replaced), the init pid file, and one
process file and pid file per exec.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from keel.errors import FailedPrecondition, InvalidArgument

#: Largest spec, process or resources document accepted.
MAX_JSON_BYTES = 1 << 20


def parse_object(raw: object, what: str) -> dict[str, Any]:
    """Parse a JSON object of at most MAX_JSON_BYTES; InvalidArgument otherwise."""
    if not isinstance(raw, bytes | bytearray):
        raise InvalidArgument(f"{what} must be bytes")
    if len(raw) > MAX_JSON_BYTES:
        raise InvalidArgument(f"{what} is {len(raw)} bytes; at most {MAX_JSON_BYTES} are accepted")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {type(doc).__name__}")
    return doc


def _check_process(process: object, what: str) -> dict[str, Any]:
    if not isinstance(process, dict):
        raise InvalidArgument(f"{what} must be an OCI process object")
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(f"{what}.args must be a non-empty list of strings")
    return process


def container_spec(spec_json: object, rootfs: object, terminal: bool) -> dict[str, Any]:
    """The spec to write: root.path = *rootfs*, process.terminal = *terminal*."""
    spec = parse_object(spec_json, "spec_json")
    process = _check_process(spec.get("process"), "spec_json process")
    if not isinstance(rootfs, str) or not rootfs or not os.path.isabs(rootfs):
        raise InvalidArgument(f"rootfs must be an absolute path, not {rootfs!r}")
    if not os.path.isdir(rootfs):
        raise InvalidArgument(f"rootfs {rootfs} does not exist or is not a directory")
    root = spec.get("root")
    spec["root"] = {**(root if isinstance(root, dict) else {}), "path": rootfs}
    process["terminal"] = terminal
    return spec


def exec_process(process_json: object, terminal: bool) -> dict[str, Any]:
    """The OCI process document of an exec, with process.terminal = *terminal*."""
    process = _check_process(parse_object(process_json, "process_json"), "process_json")
    process["terminal"] = terminal
    process.setdefault("cwd", "/")
    return process


class Bundle:
    """Paths of one container's bundle directory."""

    def __init__(self, bundles_dir: Path, container_id: str) -> None:
        self.dir = bundles_dir / container_id
        self.config = self.dir / "config.json"
        self.init_pid_file = self.dir / "init.pid"

    def exec_files(self, exec_id: str) -> tuple[Path, Path]:
        """(process.json, pid file) of an exec."""
        return self.dir / f"exec-{exec_id}.json", self.dir / f"exec-{exec_id}.pid"

    def create(self, spec: dict[str, Any]) -> None:
        """Make the directory (replacing leftovers of a failed create) and write config.json."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700, parents=True)
        write_json(self.config, spec)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)


def read_pid(path: Path) -> int:
    """The pid the runtime wrote; FailedPrecondition if it wrote none."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"the runtime wrote no valid pid file {path}: {exc}") from exc
    if pid <= 0:
        raise FailedPrecondition(f"the runtime wrote pid {pid} to {path}")
    return pid
