"""OpsService.StageRelease: receive another release's agent code, verify it, unpack it.

A VM's image holds one release; to exec another (agent/_upgrade.py), the
shim sends that release's guest bundle (shim/vmm/qemu/guest_release.py: a
tar of the agent's packages) in chunks.  The agent keeps one bundle in
flight, written where the last chunk ended, and refuses a chunk anywhere
else.  When the bundle is whole its sha256 must be the one announced; then
it is unpacked, regular files and directories only, every name relative
and inside, into ``<state_dir>/releases/<version>-<sha256[:16]>/``, and
its ``keel/RELEASE`` must name the announced version.  That directory is
what UpgradeAgent then runs.  Staging a bundle removes the other staged
trees except the one this agent runs from.  Nothing here trusts the
sender's sizes: the bundle is capped at :data:`MAX_BYTES`, a chunk at
:data:`MAX_CHUNK`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from agent.api import STAGE_MAX_BYTES, STAGE_MAX_CHUNK
from keel import release as _release
from keel.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("keel.agent.stage")

MAX_BYTES = STAGE_MAX_BYTES
MAX_CHUNK = STAGE_MAX_CHUNK
MAX_MEMBERS = 10_000
_VERSION = re.compile(r"[0-9A-Za-z.+-]{1,64}")
_SHA = re.compile(r"[0-9a-f]{64}")
COMPLETE = ".complete"


class Stager:
    """One bundle in flight at a time; owned by the daemon, used by OpsService."""

    def __init__(self, root: Path, running_tree: Path) -> None:
        self._root = root
        self._running = running_tree.resolve()
        self._partial: tuple[str, str, int] | None = None  # version, sha256, size
        self._received = 0
        self._lock = asyncio.Lock()

    def _final(self, version: str, sha: str) -> Path:
        return self._root / f"{version}-{sha[:16]}"

    @property
    def _part(self) -> Path:
        return self._root / ".partial"

    async def stage(self, version: str, sha: str, size: int, offset: int,
                    data: bytes) -> tuple[int, str]:
        """Take one chunk: (bytes held, the tree's path once complete, else "")."""
        if not _VERSION.fullmatch(version) or version.startswith("."):
            raise InvalidArgument(f"version {version[:64]!r} is not a release version")
        if not _SHA.fullmatch(sha):
            raise InvalidArgument("sha256 must be 64 lower-case hex digits")
        if not 0 < size <= MAX_BYTES:
            raise InvalidArgument(f"a bundle of {size} bytes: the limit is {MAX_BYTES}")
        if len(data) > MAX_CHUNK:
            raise InvalidArgument(f"a chunk of {len(data)} bytes: the limit is {MAX_CHUNK}")
        async with self._lock:
            final = self._final(version, sha)
            if (final / COMPLETE).exists():
                return size, str(final)
            if offset == 0:
                self._start(version, sha, size)
            elif self._partial != (version, sha, size) or offset != self._received:
                raise FailedPrecondition(
                    f"chunk at {offset} of {version} ({sha[:12]}): expected "
                    + (f"offset {self._received}" if self._partial == (version, sha, size)
                       else "offset 0 (no such bundle in flight)"))
            if offset + len(data) > size:
                self._drop()
                raise InvalidArgument(f"chunk ends at {offset + len(data)}, past the bundle's"
                                      f" {size} bytes")
            with open(self._part, "ab") as f:
                f.write(data)
            self._received += len(data)
            if self._received < size:
                return self._received, ""
            try:
                await asyncio.to_thread(_unpack, self._part, sha, version, final)
            finally:
                self._drop()
            self._prune(keep=final)
            log.info("staged release %s (%d bytes, sha256 %s) in %s", version, size, sha[:12],
                     final)
            return size, str(final)

    def _start(self, version: str, sha: str, size: int) -> None:
        self._drop()
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._part.write_bytes(b"")
        self._partial, self._received = (version, sha, size), 0

    def _drop(self) -> None:
        self._partial, self._received = None, 0
        self._part.unlink(missing_ok=True)

    def _prune(self, keep: Path) -> None:
        """Remove staged trees but *keep* and the one running (with its previous releases'
        trees gone, a rollback execs the running tree, which stays)."""
        for entry in self._root.iterdir():
            if entry.name == self._part.name or entry.resolve() in (keep.resolve(), self._running):
                continue
            if self._running.is_relative_to(entry.resolve()):
                continue
            shutil.rmtree(entry, ignore_errors=True)


def _unpack(part: Path, sha: str, version: str, final: Path) -> None:
    """Check *part* against *sha*, unpack it into *final*; FailedPrecondition if it is not
    a bundle of release *version*.  Blocking: runs in a thread."""
    h = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if h.hexdigest() != sha:
        raise FailedPrecondition(f"the bundle of {version} does not match its sha256"
                                 f" ({h.hexdigest()[:12]} received, {sha[:12]} announced)")
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(part, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise FailedPrecondition(f"the bundle has {len(members)} entries (at most"
                                         f" {MAX_MEMBERS})")
            # A sparse member's declared size is what it unpacks to, whatever
            # its bytes: none is accepted, and the sizes may not sum past the cap.
            if sum(m.size for m in members) > MAX_BYTES:
                raise FailedPrecondition(f"the bundle unpacks to more than {MAX_BYTES} bytes")
            for m in members:
                _extract(tar, m, tmp)
        got = (tmp / "keel" / _release.MARKER)
        named = got.read_text().strip() if got.is_file() else None
        if not (tmp / "agent" / "__init__.py").is_file() or named != version:
            raise FailedPrecondition(f"the bundle is not release {version}'s agent (it names"
                                     f" {named!r})")
        (tmp / COMPLETE).touch()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except tarfile.TarError as exc:
        raise FailedPrecondition(f"the bundle of {version} is not a tar: {exc}") from exc
    except OSError as exc:  # a name given twice, a full tmpfs
        raise FailedPrecondition(f"cannot unpack the bundle of {version}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, dest: Path) -> None:
    name = PurePosixPath(m.name)
    if name.is_absolute() or ".." in name.parts or not name.parts or name.parts[0] == ".":
        raise FailedPrecondition(f"the bundle names {m.name[:200]!r}, outside its tree")
    target = dest.joinpath(*name.parts)
    if m.issparse():
        raise FailedPrecondition(f"the bundle holds {m.name[:200]!r} as a sparse file")
    if m.isdir():
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
    elif m.isfile():
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        src = tar.extractfile(m)
        assert src is not None  # a regular file always has data
        with src, open(target, "xb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(target, 0o644)
    else:
        raise FailedPrecondition(f"the bundle holds {m.name[:200]!r}, which is not a regular"
                                 f" file or a directory")
