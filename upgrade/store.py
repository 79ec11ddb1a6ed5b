"""Versioned, atomically written JSON state files.

Every persisted document is a JSON object with ``schema_version`` and
``kind``.  Writes go to a temp file in the same directory, are fsynced,
renamed over the target and the directory is fsynced, all under an
exclusive ``flock`` on a sibling lock file, so a reader never sees half a
file and two writers never interleave.

Readers migrate older versions forward through named functions
(``migrations[n]`` turns version n into n+1).  A newer version than the
reader knows, or a file that does not parse, raises and deletes nothing:
the operator (or a newer release) decides what to do with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from upgrade.errors import CorruptState, UnsupportedSchema

T = TypeVar("T")
Doc = dict[str, Any]
Migration = Callable[[Doc], Doc]


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace *path* with *data* so that readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # A full disk (ENOSPC) or any other failure: the old file stands, no temp file stays.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` for the block."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class StateStore(Generic[T]):
    """One state file of one *kind* at schema *version*.

    *encode* turns the in-memory value into a JSON-able dict (without the
    envelope keys); *decode* does the reverse for a current-version dict.
    """

    def __init__(
        self,
        path: Path,
        *,
        kind: str,
        version: int,
        encode: Callable[[T], Doc],
        decode: Callable[[Doc], T],
        migrations: Mapping[int, Migration] | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.version = version
        self._encode = encode
        self._decode = decode
        self._migrations = dict(migrations or {})

    def save(self, value: T) -> None:
        doc = {"schema_version": self.version, "kind": self.kind, **self._encode(value)}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        with locked(self.path):
            atomic_write(self.path, data)

    def load(self) -> T | None:
        """The stored value, migrated to this version; None if no file.

        Raises CorruptState or UnsupportedSchema; never deletes the file.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return self.decode_checked(self.migrate(self.parse(raw)))

    def parse(self, raw: bytes) -> Doc:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptState(f"{self.path}: not valid JSON: {exc}") from exc
        return self.parse_doc(doc)

    def parse_doc(self, doc: Any) -> Doc:
        """Check the envelope of an already decoded document."""
        if not isinstance(doc, dict):
            raise CorruptState(f"{self.path}: expected a JSON object")
        if doc.get("kind", self.kind) != self.kind:
            raise CorruptState(f"{self.path}: holds {doc.get('kind')!r}, expected {self.kind!r}")
        version = doc.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptState(f"{self.path}: missing or invalid schema_version")
        return doc

    def migrate(self, doc: Doc) -> Doc:
        """Run named migrations until *doc* is at this store's version."""
        version = doc["schema_version"]
        if version > self.version:
            raise UnsupportedSchema(
                f"{self.path}: schema_version {version} is newer than this release reads "
                f"(up to {self.version}); upgrade Keel or roll the sandbox back"
            )
        while version < self.version:
            step = self._migrations.get(version)
            if step is None:
                raise UnsupportedSchema(f"{self.path}: no migration from schema_version {version}")
            doc = step(dict(doc))
            version += 1
            doc["schema_version"] = version
        try:
            return {k: v for k, v in doc.items() if k not in ("schema_version", "kind")}
        except AttributeError as exc:  # a migration returned garbage
            raise CorruptState(f"{self.path}: migration produced {type(doc)}") from exc

    def decode_checked(self, doc: Doc) -> T:
        """Decode, turning shape errors in a hand-edited file into CorruptState."""
        try:
            return self._decode(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptState(f"{self.path}: {type(exc).__name__}: {exc}") from exc
