"""A release's guest agent: the bundle a VM receives to upgrade its agent.

    python -I -m shim.vmm.qemu.guest_release build OUT   (the release's own interpreter)
    python -m shim.vmm.qemu.guest_release show RELEASE_DIR

A VM's agent runs from the guest image, which holds one release.  To move
it to another installed release, the shim ships that release's agent code
into the guest over the sandbox's ops session (``StageRelease``), where
the agent verifies it by hash, unpacks it on its tmpfs and execs it
(agent/_stage.py).  A read-only share of the host's releases tree was the
other way; it is not taken because qemu cannot add a 9p share to a running
VM (a release installed after the VM booted would be out of reach), and
the guest, which is untrusted, would see every release on the host rather
than the one it was asked to run.

``opsctl release install`` has the new release's interpreter build the
bundle into ``<release>/guest/``:

- ``agent.tar``: the packages the agent runs (``_rootfs.KEEL_PACKAGES``),
  ``keel/RELEASE`` naming the release, and ``.pyc`` files compiled with
  ``unchecked-hash`` (the guest's root is read-only, and unpacked files
  get new mtimes); deterministic: sorted, no owners, mtime 0;
- ``agent.json``: what the agent needs from the guest image (the Python
  ``major.minor`` that compiled it, the versions of its dependencies as the
  release declares them, the lowest image format) and the tar's size and
  sha256.

Before anything freezes, :func:`problem` compares that with the manifest of
the image the VM booted; a mismatch is a refusal naming it.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import hashlib
import importlib
import io
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from py_compile import PycInvalidationMode

from agent.api import STAGE_MAX_BYTES
from keel import release as _release
from keel.errors import FailedPrecondition

KIND = "keel.guest-agent"
SCHEMA = 1
DIR = "guest"
TAR = "agent.tar"
MANIFEST = "agent.json"
#: The most a bundle may weigh (the agent refuses more; today's is ~0.9 MiB).
MAX_BYTES = STAGE_MAX_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class GuestRelease:
    version: str
    tar: Path
    size: int
    sha256: str
    #: ``major.minor`` of the interpreter that compiled the bundle.
    python: str
    #: Guest dependency -> the version specifier the release declares ("" = any).
    requires: dict[str, str]
    min_image_format: int


def bundle_dir(release_dir: Path) -> Path:
    return release_dir / DIR


def load(release_dir: Path) -> GuestRelease:
    """The guest bundle of *release_dir*; FailedPrecondition naming what is wrong."""
    return _read(bundle_dir(release_dir) / MANIFEST, release_dir.name)


def _read(path: Path, name: str) -> GuestRelease:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FailedPrecondition(
            f"release {name} has no guest agent ({path}): it was installed without"
            f" one; reinstall it with `opsctl release install --force`") from None
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"{path}: unreadable guest agent manifest: {exc}") from exc
    try:
        if doc["kind"] != KIND or doc["schema"] != SCHEMA:
            raise FailedPrecondition(f"{path}: a {doc['kind']!r} schema {doc['schema']!r}"
                                     f" manifest; this shim reads {KIND} schema {SCHEMA}")
        out = GuestRelease(
            version=str(doc["release"]), tar=path.with_name(TAR), size=int(doc["size"]),
            sha256=str(doc["sha256"]), python=str(doc["python"]),
            requires={str(k): str(v) for k, v in dict(doc["requires"]).items()},
            min_image_format=int(doc["min_image_format"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise FailedPrecondition(f"{path}: malformed guest agent manifest: {exc!r}") from exc
    if not re.fullmatch(r"[0-9a-f]{64}", out.sha256) or not 0 < out.size <= MAX_BYTES:
        raise FailedPrecondition(f"{path}: malformed guest agent manifest (size or sha256)")
    return out


def read_verified(bundle: GuestRelease) -> bytes:
    """The tar's bytes, checked against the manifest (a half-written or edited
    release is refused here, not in the guest)."""
    try:
        data = bundle.tar.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"release {bundle.version}: cannot read {bundle.tar}: {exc}") from exc
    if len(data) != bundle.size or hashlib.sha256(data).hexdigest() != bundle.sha256:
        raise FailedPrecondition(f"release {bundle.version}: {bundle.tar} does not match its"
                                 f" manifest (size or sha256): reinstall the release")
    return data


def image_python(manifest: dict[str, object]) -> str | None:
    """``major.minor`` of the image's python3 package (``3.11.2-1+b1`` -> ``3.11``)."""
    packages = manifest.get("packages")
    ver = packages.get("python3") if isinstance(packages, dict) else None
    m = re.match(r"(?:\d+:)?(\d+)\.(\d+)", ver) if isinstance(ver, str) else None
    return f"{m.group(1)}.{m.group(2)}" if m else None


def image_deps(manifest: dict[str, object]) -> dict[str, str]:
    inputs = manifest.get("inputs")
    base = inputs.get("base") if isinstance(inputs, dict) else None
    pins = base.get("python") if isinstance(base, dict) else None
    return {str(k): str(v) for k, v in pins.items()} if isinstance(pins, dict) else {}


def problem(bundle: GuestRelease, manifest: dict[str, object], image_id: str) -> str | None:
    """Why *bundle* cannot run in a VM booted from the image *manifest*, or None."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    fmt = manifest.get("format")
    if not isinstance(fmt, int) or fmt < bundle.min_image_format:
        return (f"release {bundle.version} needs guest image format {bundle.min_image_format}"
                f" or newer; this VM runs image {image_id} (format {fmt})")
    py = image_python(manifest)
    if py != bundle.python:
        return (f"release {bundle.version}'s agent is built for Python {bundle.python}; this VM's"
                f" image {image_id} has Python {py or 'of unknown version'}")
    have = image_deps(manifest)
    for name, spec in sorted(bundle.requires.items()):
        version = have.get(name)
        if version is None:
            return (f"release {bundle.version}'s agent needs {name}{spec}; this VM's image"
                    f" {image_id} does not have {name}")
        try:
            ok = Version(version) in SpecifierSet(spec, prereleases=True)
        except (InvalidSpecifier, InvalidVersion) as exc:
            return f"release {bundle.version}: cannot compare {name} {version} with {spec!r}: {exc}"
        if not ok:
            return (f"release {bundle.version}'s agent needs {name}{spec}; this VM's image"
                    f" {image_id} has {name} {version}")
    return None


# --- building (run by the release's own interpreter) ---------------------------

def _requires(deps: tuple[str, ...]) -> dict[str, str]:
    """The specifiers this release's metadata declares for *deps* ("" when unpinned)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    out = {name: "" for name in deps}
    try:
        declared = metadata.requires("keel") or []
    except metadata.PackageNotFoundError:
        declared = []
    for line in declared:
        req = Requirement(line)
        if req.marker is None and req.name in out:
            out[req.name] = str(req.specifier)
    return out


def _tar(tree: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(tree.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(tree)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir():
                tar.addfile(info)
    return buf.getvalue()


def build(out: Path, version: str | None = None) -> GuestRelease:
    """Write this interpreter's release's guest bundle into *out* (created).

    *version* names another release in ``keel/RELEASE`` (benchmarks and tests
    that dress this code up as two releases); default: this code's own."""
    from shim.vmm.qemu import _rootfs
    from shim.vmm.qemu import image as _image

    version = version or _release.version()
    with tempfile.TemporaryDirectory(prefix=".guest-") as tmp:
        tree = Path(tmp) / "tree"
        for pkg in _rootfs.KEEL_PACKAGES:
            src = Path(importlib.import_module(pkg).__file__ or "").parent
            shutil.copytree(src, tree / pkg,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", _release.MARKER))
        _release.write_marker(tree / "keel", version)
        # Names in the .pyc (tracebacks) are "keel-<version>/agent/...", not this
        # temporary directory: the same code gives the same bytes.
        if not compileall.compile_dir(str(tree), quiet=1, workers=1, stripdir=str(tree),
                                      prependdir=f"keel-{version}",
                                      invalidation_mode=PycInvalidationMode.UNCHECKED_HASH):
            raise FailedPrecondition("byte-compiling the guest agent failed")
        data = _tar(tree)
    if len(data) > MAX_BYTES:
        raise FailedPrecondition(f"the guest agent is {len(data)} bytes, over {MAX_BYTES}")
    out.mkdir(parents=True, exist_ok=True)
    (out / TAR).write_bytes(data)
    doc = {"kind": KIND, "schema": SCHEMA, "release": version, "size": len(data),
           "sha256": hashlib.sha256(data).hexdigest(),
           "python": f"{sys.version_info.major}.{sys.version_info.minor}",
           "requires": _requires(_rootfs.PY_DEPS), "min_image_format": _image.FORMAT}
    (out / MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return _read(out / MANIFEST, version)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shim.vmm.qemu.guest_release",
                                description="Build or show a release's guest agent bundle.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build this release's bundle").add_argument("out", type=Path)
    sub.add_parser("show", help="show a release's bundle").add_argument("release_dir", type=Path)
    ns = p.parse_args(argv)
    try:
        bundle = build(ns.out) if ns.cmd == "build" else load(ns.release_dir)
    except FailedPrecondition as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**dataclasses.asdict(bundle), "tar": str(bundle.tar)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
