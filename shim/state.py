"""The shim's persisted sandbox state (``<sandbox>/state.json``), typed.

Enough to *resume* a sandbox in another shim process, not only to clean
it up: the VMM identity, every container with its bundle, rootfs mounts,
stdio endpoints, pids, states, exit statuses (and whether containerd was
told), and the stdio offsets the pumps reached.

Frozen dataclasses, one per level (sandbox, container, process, stdio,
offsets); ``encode``/``decode`` are the only places that know the JSON
layout.  The same document travels in a shim handoff (``upgrade/PROTOCOL.md``).

Schema history (a golden file under tests/unit/golden/ for each):
  1: first release.  The layout below is schema 1 exactly: releases that
     read only schema 1 must keep reading what this one writes, or a
     rollback would strand running sandboxes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from keel.errors import NotFound
from keel.lifecycle import State
from shim.dirs import SandboxDir
from upgrade.store import Doc, Migration, StateStore

SCHEMA_VERSION = 1
KIND = "keel.shim.sandbox"


@dataclasses.dataclass(frozen=True, slots=True)
class Stdio:
    """containerd's stdio endpoints of one process (fifo paths; "" for none)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Exit:
    status: int
    at_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class Offsets:
    """Where each stdio stream of a process stands, for a shim that resumes.

    ``stdout``/``stderr``: bytes delivered to containerd's fifo (the agent's
    absolute output offsets); ``stdin``: bytes the agent has taken.  The
    flags say a stream is finished and must not be reopened.
    """

    stdout: int = 0
    stderr: int = 0
    stdin: int = 0
    stdout_eof: bool = False
    stderr_eof: bool = False
    stdin_closed: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessRecord:
    exec_id: str
    stdio: Stdio
    pid: int
    state: State
    exit: Exit | None
    #: True once TaskExit was queued for containerd.
    exit_published: bool
    offsets: Offsets


@dataclasses.dataclass(frozen=True, slots=True)
class MountRecord:
    """One rootfs mount as containerd sent it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerRecord:
    id: str
    bundle: str
    mounts: tuple[MountRecord, ...]
    init: ProcessRecord
    execs: tuple[ProcessRecord, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ShimIdentity:
    """The shim process that owns the sandbox (containerd's ``delete`` asks)."""

    pid: int
    start_time: int


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxRecord:
    sandbox_id: str
    namespace: str
    backend: str
    #: The backend's own identity of the sandbox (``Sandbox.record()``): the
    #: backend that wrote it is the only reader, so it stays a JSON object.
    vmm: Mapping[str, Any]
    shim: ShimIdentity | None
    shim_version: str
    #: In creation order.
    containers: tuple[ContainerRecord, ...] = ()
    #: The key this shim session presents to the agent (agent/_session.py);
    #: "" for a sandbox an older release started (then nothing is checked).
    session_key: str = ""
    #: The console switch set live (``opsctl console enable|disable``);
    #: None: the config's ``[console] enabled`` decides.
    console: bool | None = None
    #: The trace sampling ratio set live (``opsctl trace on|off``); None:
    #: the config's ``[tracing]`` decides.
    trace_ratio: float | None = None
    #: When the sandbox started (wall clock, ns since the epoch), for its
    #: uptime; 0 for a sandbox an older release started (then the age of its
    #: VMM process stands in: shim/_metrics.py).
    created_at_ns: int = 0


# -- JSON layout (schema 1) ---------------------------------------------------
# The shim's identity lives inside "vmm" in schema 1; the typed record keeps
# it apart.


def encode(rec: SandboxRecord) -> Doc:
    vmm = dict(rec.vmm)
    if rec.shim is not None:
        vmm["shim"] = dataclasses.asdict(rec.shim)
    return {"sandbox_id": rec.sandbox_id, "namespace": rec.namespace, "backend": rec.backend,
            "vmm": vmm, "shim_version": rec.shim_version,
            "containers": [_encode_container(c) for c in rec.containers],
            "session_key": rec.session_key, "console": rec.console,
            "trace_ratio": rec.trace_ratio, "created_at_ns": rec.created_at_ns}


def _encode_container(c: ContainerRecord) -> Doc:
    return {"id": c.id, "bundle": c.bundle,
            "mounts": [{"type": m.type, "source": m.source, "options": list(m.options)}
                       for m in c.mounts],
            "init": _encode_process(c.init), "execs": [_encode_process(p) for p in c.execs]}


def _encode_process(p: ProcessRecord) -> Doc:
    return {"exec_id": p.exec_id, "stdio": dataclasses.asdict(p.stdio), "pid": p.pid,
            "state": p.state.value, "exit": dataclasses.asdict(p.exit) if p.exit else None,
            "exit_published": p.exit_published, "offsets": dataclasses.asdict(p.offsets)}


def decode(doc: Doc) -> SandboxRecord:
    """The record of a schema-1 document; KeyError/TypeError/ValueError on a bad shape."""
    vmm = dict(_obj(doc["vmm"]))
    shim = vmm.pop("shim", None)
    return SandboxRecord(
        sandbox_id=_str(doc["sandbox_id"]), namespace=_str(doc["namespace"]),
        backend=_str(doc["backend"]), vmm=vmm,
        shim=ShimIdentity(int(shim["pid"]), int(shim["start_time"])) if shim else None,
        shim_version=_str(doc["shim_version"]),
        containers=tuple(_decode_container(_obj(c)) for c in doc["containers"]),
        session_key=_str(doc.get("session_key", "")),
        console=_opt_bool(doc.get("console")),
        trace_ratio=_opt_ratio(doc.get("trace_ratio")),
        created_at_ns=_int(doc.get("created_at_ns", 0)))


def _decode_container(doc: Doc) -> ContainerRecord:
    cid = _str(doc["id"])
    return ContainerRecord(
        id=cid, bundle=_str(doc["bundle"]),
        mounts=tuple(MountRecord(_str(m["type"]), _str(m["source"]),
                                 tuple(_str(o) for o in m["options"])) for m in doc["mounts"]),
        init=_decode_process(_obj(doc["init"])),
        execs=tuple(_decode_process(_obj(e)) for e in doc["execs"]))


def _decode_process(doc: Doc) -> ProcessRecord:
    exit = doc.get("exit")
    offsets = _obj(doc.get("offsets") or {})
    fields = {f.name for f in dataclasses.fields(Offsets)}
    return ProcessRecord(
        exec_id=_str(doc["exec_id"]), stdio=Stdio(**_obj(doc["stdio"])), pid=int(doc["pid"]),
        state=State(doc["state"]),
        exit=Exit(int(exit["status"]), int(exit["at_ns"])) if exit else None,
        exit_published=bool(doc.get("exit_published")),
        offsets=Offsets(**{k: v for k, v in offsets.items() if k in fields}))


def _obj(value: Any) -> Doc:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _opt_bool(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"expected true, false or null, got {type(value).__name__}")
    return value


def _opt_ratio(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"expected a ratio within 0 and 1 or null, got {value!r}")
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


#: Named migrations: MIGRATIONS[n] turns schema n into n+1.
MIGRATIONS: dict[int, Migration] = {}


def store(sdir: SandboxDir) -> StateStore[SandboxRecord]:
    return StateStore(sdir.state, kind=KIND, version=SCHEMA_VERSION,
                      encode=encode, decode=decode, migrations=MIGRATIONS)


def load_record(sdir: SandboxDir) -> SandboxRecord:
    """The sandbox's record.  Raises NotFound without a state file,
    CorruptState or UnsupportedSchema for one this release cannot read."""
    rec = store(sdir).load()
    if rec is None:
        raise NotFound(f"sandbox {sdir.id} has no state file ({sdir.state})")
    return rec


def document(rec: SandboxRecord) -> Doc:
    """The whole state document (with its envelope), as a handoff sends it."""
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, **encode(rec)}
