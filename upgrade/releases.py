"""Releases side by side: ``<root>/<version>/`` and the ``current`` pointer.

Layout (DESIGN section 6), root default ``/opt/keel/releases``::

    <root>/<version>/                 a self-contained virtualenv with keel
    <root>/<version>/bin/containerd-shim-keel-v2, bin/keel-agent, bin/opsd ...
    <root>/<version>/keel-release.json  manifest (versioned, see MANIFEST_KIND)
    <root>/<version>/guest/agent.tar, agent.json   what a VM receives to run its agent
    <root>/<version>/guest/image.json   the guest image its install built (--guest-image)
    <root>/current -> <version>       what new sandboxes start
    <root>/.<version>.tmp/            an install in progress (never listed)

A directory counts as a release when its name is a version and it holds
the shim entry point; the manifest is optional (``deploy/install.sh``
writes none), so schema facts may be unknown (None).

Mutations (set_current, remove, an install's final rename) hold an
exclusive flock on ``<root>/.releases.lock``; an install also holds
``<root>/.<version>.lock`` while it builds, so installs of different
versions run in parallel.  Who may call them: root (the tree is root's).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from keel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from upgrade import _install as _build
from upgrade.store import StateStore, locked

DEFAULT_ROOT = Path("/opt/keel/releases")
SHIM_ENTRY = "bin/containerd-shim-keel-v2"
AGENT_ENTRY = "bin/keel-agent"
MANIFEST = "keel-release.json"
MANIFEST_KIND = "keel.release"
CURRENT = "current"

_VERSION = re.compile(
    r"^[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?$")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an install learnt about a release (schemas it reads, provenance)."""

    version: str
    installed_at: float
    source: str
    #: Highest shim sandbox-state schema the release reads (it migrates older ones).
    shim_state_schema: int | None
    agent_state_schema: int | None


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    path: Path
    is_current: bool
    manifest: Manifest | None = None

    @property
    def shim_path(self) -> Path:
        return self.path / SHIM_ENTRY

    @property
    def agent_path(self) -> Path:
        return self.path / AGENT_ENTRY


def check_version(version: str) -> str:
    """*version* if it is a (normalised PEP 440) Keel version; else InvalidArgument."""
    if not isinstance(version, str) or not _VERSION.match(version):
        raise InvalidArgument(f"{version!r} is not a Keel version (expected e.g. 0.2.0)")
    return version


def version_key(version: str) -> tuple[tuple[int, ...], int, str]:
    """Sort key: numeric release segment, pre/dev releases before finals."""
    m = re.match(r"[0-9]+(\.[0-9]+)*", version)
    nums = tuple(int(x) for x in m.group(0).split(".")) if m else ()
    rest = version[m.end():] if m else version
    rank = 2 if rest.startswith(".post") else 1 if rest == "" or rest[:1] == "+" else 0
    return nums, rank, rest


def incompatibility(from_version: str, to_version: str) -> str | None:
    """Why a sandbox at *from_version* cannot switch to *to_version*; None if it can.

    The rule (DESIGN section 4: releases N and N+-1 interoperate): both are
    Keel versions, the major numbers are equal and the minor numbers differ
    by at most one, in either direction (so a rollback is always allowed).
    Patch levels never matter.  Skipping a minor release means upgrading
    twice.
    """
    for v in (from_version, to_version):
        if not v or not _VERSION.match(v):
            return f"version {v!r} is unknown (not a Keel release version)"
    a, b = version_key(from_version)[0], version_key(to_version)[0]
    a_major, a_minor = a[0], (a[1] if len(a) > 1 else 0)
    b_major, b_minor = b[0], (b[1] if len(b) > 1 else 0)
    if a_major != b_major:
        return f"{from_version} -> {to_version} changes the major version"
    if abs(a_minor - b_minor) > 1:
        return f"{from_version} -> {to_version} skips a minor release (N+-1 only)"
    return None


def compatible(from_version: str, to_version: str) -> bool:
    return incompatibility(from_version, to_version) is None


def manifest_store(release_dir: Path) -> StateStore[Manifest]:
    return StateStore(release_dir / MANIFEST, kind=MANIFEST_KIND, version=1,
                      encode=lambda m: {f: getattr(m, f) for f in Manifest.__slots__},
                      decode=lambda d: Manifest(**{f: d[f] for f in Manifest.__slots__}))


class ReleaseStore:
    """The releases under *root*.  Methods are synchronous (file system work)."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def list(self) -> list[Release]:
        """Installed releases, oldest version first; [] when root is missing."""
        if not self.root.is_dir():
            return []
        current = self._current_name()
        found = []
        for p in self.root.iterdir():
            if (p.name.startswith(".") or p.name == CURRENT or p.is_symlink()
                    or not _VERSION.match(p.name) or not (p / SHIM_ENTRY).exists()):
                continue
            found.append(Release(p.name, p, p.name == current, self._manifest(p)))
        return sorted(found, key=lambda r: version_key(r.version))

    def get(self, version: str) -> Release:
        """The installed release *version*; InvalidArgument or NotFound."""
        check_version(version)
        for r in self.list():
            if r.version == version:
                return r
        have = ", ".join(r.version for r in self.list()) or "none"
        raise NotFound(f"release {version} is not installed under {self.root} (installed: {have});"
                       f" install it with: opsctl release install <wheel|sdist|dir>")

    def current(self) -> Release | None:
        return next((r for r in self.list() if r.is_current), None)

    def set_current(self, version: str) -> Release:
        """Point ``current`` at *version* (atomic symlink swap); NotFound if absent."""
        with self._lock():
            release = self.get(version)
            tmp = self.root / f".{CURRENT}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(version, tmp)  # relative: the tree can move
            os.replace(tmp, self.root / CURRENT)
            _fsync_dir(self.root)
        return Release(release.version, release.path, True, release.manifest)

    def remove(self, version: str,
               in_use: Mapping[str, Collection[str]] | Collection[str] = ()) -> None:
        """Delete release *version*.

        Refuses (FailedPrecondition) the current release and any version in
        *in_use* (a set of versions, or version -> users such as sandbox
        ids, for the message); NotFound if it is not installed.
        """
        with self._lock():
            release = self.get(version)
            if release.is_current:
                raise FailedPrecondition(
                    f"release {version} is current (new sandboxes start it); point current at"
                    f" another release first: opsctl release current <version>")
            _refuse_in_use(version, in_use, "remove")
            doomed = self.root / f".{version}.removing.{os.getpid()}"
            os.rename(release.path, doomed)
            _fsync_dir(self.root)
            shutil.rmtree(doomed)

    def install(self, source: Path, *, force: bool = False,
                in_use: Mapping[str, Collection[str]] | Collection[str] = (),
                no_deps: bool = False, build_isolation: bool = True,
                python: str | None = None, pip_args: tuple[str, ...] = (),
                progress: Progress = print) -> Release:
        """Install *source* (wheel, sdist or project directory) as a release.

        Builds a wheel (unless given one) to learn the version, then builds
        the virtualenv in ``<root>/.<version>.tmp`` and renames it into
        place, so a crash leaves no half release.  Refuses an installed
        version (AlreadyExists) unless *force*, and never replaces one in
        *in_use*.  *python* makes the venv (default: this interpreter's
        base); *no_deps* skips dependencies (tests).  Pip failures raise
        FailedPrecondition with pip's last lines.
        """
        source = Path(source).resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        with _build.workdir(self.root) as work:
            wheel = _build.wheel_of(source, work, build_isolation, progress)
            version = check_version(_build.wheel_version(wheel))
            final = self.root / version
            with self._lock(f".{version}"):  # one install per version; others run in parallel
                self._check_replace(final, force, in_use)
                stage = self.root / f".{version}.tmp"
                shutil.rmtree(stage, ignore_errors=True)  # a crashed earlier install
                try:
                    self._populate(stage, final, wheel, no_deps, python, pip_args, progress)
                    with self._lock():
                        self._check_replace(final, force, in_use)
                        _swap_in(stage, final, self.root)
                finally:
                    shutil.rmtree(stage, ignore_errors=True)
        progress(f"installed keel {version} at {final}")
        return next(r for r in self.list() if r.version == version)

    def _check_replace(self, final: Path, force: bool,
                       in_use: Mapping[str, Collection[str]] | Collection[str]) -> None:
        if final.exists() and not force:
            raise AlreadyExists(f"release {final.name} is already installed at {final};"
                                f" --force reinstalls it")
        if final.exists():
            _refuse_in_use(final.name, in_use, "reinstall")

    def _populate(self, stage: Path, final: Path, wheel: Path, no_deps: bool,
                  python: str | None, pip_args: tuple[str, ...], progress: Progress) -> None:
        base = python or str(getattr(sys, "_base_executable", sys.executable))
        version = _build.wheel_version(wheel)
        progress(f"creating virtualenv for {version} ({base} -m venv)")
        _build.run([base, "-m", "venv", str(stage)])
        progress(f"pip install {wheel.name}{' (no dependencies)' if no_deps else ''}")
        _build.run([str(stage / "bin/python"), "-m", "pip", "install", "--no-input",
                    "--disable-pip-version-check", *(["--no-deps"] if no_deps else []),
                    *pip_args, str(wheel)])
        facts = _build.probe(stage / "bin/python", progress, no_deps=no_deps)
        if facts.get("version") != version:
            raise FailedPrecondition(f"{wheel.name} installed keel {facts.get('version')!r}")
        for entry in (SHIM_ENTRY, AGENT_ENTRY):
            if not (stage / entry).exists():
                raise FailedPrecondition(f"{wheel.name} has no {entry} entry point")
        _build.check_shim_runs(stage / SHIM_ENTRY, version)
        _build.guest_agent(stage / "bin/python", stage, progress, no_deps=no_deps)
        _build.relocate(stage, final)
        manifest_store(stage).save(Manifest(
            version=version, installed_at=time.time(), source=str(wheel.name),
            shim_state_schema=facts.get("shim_state"), agent_state_schema=facts.get("agent_state")))

    def build_guest_image(self, version: str, out: Path | None = None,
                          progress: Progress = lambda _line: None) -> None:
        """Have release *version* build or reuse its guest image (``out``: the
        image cache, default ``$KEEL_IMAGE_DIR`` or /var/cache/keel/image) and
        record it in ``<release>/guest/image.json``: its shims boot that image."""
        _build.guest_image(self.get(version).path, out, progress)

    def _current_name(self) -> str | None:
        try:
            return Path(os.readlink(self.root / CURRENT)).name
        except OSError:
            return None

    def _manifest(self, path: Path) -> Manifest | None:
        try:
            return manifest_store(path).load()
        except FailedPrecondition:  # unreadable manifest: the release still counts
            return None

    def _lock(self, name: str = ".releases") -> contextlib.AbstractContextManager[None]:
        """flock on ``<root>/<name>.lock``: the tree (default) or one version's install."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        return locked(self.root / name)


def _refuse_in_use(version: str, in_use: Mapping[str, Collection[str]] | Collection[str],
                   action: str) -> None:
    if version not in in_use:
        return
    users = sorted(in_use[version]) if isinstance(in_use, Mapping) else []
    who = f" by {', '.join(users)}" if users else ""
    raise FailedPrecondition(f"cannot {action} release {version}: it is in use{who}")


def _swap_in(stage: Path, final: Path, root: Path) -> None:
    """Rename *stage* to *final*, replacing an existing *final* (--force)."""
    old = None
    if final.exists():
        old = root / f".{final.name}.old.{os.getpid()}"
        os.rename(final, old)
    os.rename(stage, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

