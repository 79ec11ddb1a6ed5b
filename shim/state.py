"""The shim's persisted sandbox state (``<sandbox>/state.json``).

Enough to *resume* a sandbox in another shim process, not only to clean
it up: the VMM identity, every container with its bundle, rootfs mounts,
stdio endpoints, pids, states, exit statuses (and whether containerd was
told), and the stdio offsets the pumps reached.

Schema history (add a golden file under tests/unit/golden/ for each):
  1: first release.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keel.errors import NotFound
from shim.dirs import SandboxDir
from upgrade.store import Doc, StateStore

SCHEMA_VERSION = 1
KIND = "keel.shim.sandbox"


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxRecord:
    sandbox_id: str
    namespace: str
    backend: str
    #: Backend-specific identity (``Sandbox.record()``).
    vmm: dict[str, Any]
    shim_version: str
    #: ``Container.record()`` dicts, in creation order.
    containers: tuple[dict[str, Any], ...] = ()


def encode(rec: SandboxRecord) -> Doc:
    doc = dataclasses.asdict(rec)
    doc["containers"] = list(rec.containers)
    return doc


def _decode(doc: Doc) -> SandboxRecord:
    return SandboxRecord(
        sandbox_id=str(doc["sandbox_id"]),
        namespace=str(doc["namespace"]),
        backend=str(doc["backend"]),
        vmm=dict(doc["vmm"]),
        shim_version=str(doc["shim_version"]),
        containers=tuple(dict(c) for c in doc["containers"]),
    )


#: Named migrations: MIGRATIONS[n] turns schema n into n+1.
MIGRATIONS: dict[int, Any] = {}


def load_record(sdir: SandboxDir) -> SandboxRecord:
    """The sandbox's record.  Raises NotFound without a state file,
    CorruptState or UnsupportedSchema for one this release cannot read."""
    rec = store(sdir).load()
    if rec is None:
        raise NotFound(f"sandbox {sdir.id} has no state file ({sdir.state})")
    return rec


def store(sdir: SandboxDir) -> StateStore[SandboxRecord]:
    return StateStore(sdir.state, kind=KIND, version=SCHEMA_VERSION,
                      encode=encode, decode=_decode, migrations=MIGRATIONS)
