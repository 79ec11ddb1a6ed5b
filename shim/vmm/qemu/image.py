"""The guest image: build it from Debian packages, cache it, find it.

    python -m shim.vmm.qemu.image build [--out DIR] [--force] [--release DIR]
    python -m shim.vmm.qemu.image show [--out DIR]
    python -m shim.vmm.qemu.image prune [--out DIR] [--state-root DIR] [--releases DIR] [--dry-run]

An image is a PVH ``vmlinux``, an initramfs and a read-only root
(``_rootfs``), described by ``manifest.json`` in ``DIR/img-<id>/``;
``DIR/current`` points at the newest build.  ``DIR`` defaults to
``$KEEL_IMAGE_DIR`` or ``/var/cache/keel/image``.  ``build --release DIR``
also records the image in that installed release (``DIR/guest/image.json``):
that release's shims boot it (``_prune.release_image``).  ``prune`` removes
the images and parts nothing uses: see :mod:`shim.vmm.qemu._prune`.

Parts are cached by a hash of their inputs and rebuilt only when those
change: the kernel by its package version, the base root by the Debian
package versions and Python pins, the image by all of that plus the Keel
agent tree.  A rebuild after editing the agent takes seconds; the first
build (debootstrap) about a minute.  Needs root, apt (with current lists),
dpkg-deb, debootstrap, chroot, and pip for the running Python.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from keel import release
from keel.errors import Internal, NotFound
from shim.vmm.qemu import _initramfs, _kernel, _preload, _rootfs

DEFAULT_DIR = Path("/var/cache/keel/image")
REPO = Path(__file__).resolve().parents[3]
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
#: Bump when the layout or the build recipe changes.
FORMAT = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Image:
    """A built image; paths are absolute host paths."""

    id: str
    kernel: Path
    initrd: Path
    rootfs: Path
    manifest: dict[str, object]
    #: The ``img-<id>`` directory (its manifest.json).
    dir: Path


def default_dir() -> Path:
    return Path(os.environ.get("KEEL_IMAGE_DIR") or DEFAULT_DIR)


def load(path: Path | None = None) -> Image:
    """The image in *path* (an ``img-*`` dir, or a cache dir: its ``current``).

    Raises NotFound, naming the build command, when there is none.
    """
    base = path or default_dir()
    manifest_path = base / "manifest.json"
    if not manifest_path.exists():
        manifest_path = base / "current" / "manifest.json"
    try:
        doc = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no guest image in {base}: build one with "
                       f"`python -m shim.vmm.qemu.image build --out {base}`") from None
    except ValueError as exc:
        raise Internal(f"{manifest_path}: corrupt manifest: {exc}") from exc
    return Image(id=str(doc["id"]), kernel=Path(doc["kernel"]), initrd=Path(doc["initrd"]),
                 rootfs=Path(doc["rootfs"]), manifest=doc, dir=manifest_path.resolve().parent)


def _apt_show(packages: list[str]) -> dict[str, dict[str, str]]:
    out = _rootfs.run_tool(["apt-cache", "show", "--no-all-versions", *packages],
                       "apt-cache show (run apt-get update first?)")
    result: dict[str, dict[str, str]] = {}
    for stanza in out.strip().split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
        result.setdefault(fields.get("Package", ""), fields)
    return result


def _inputs(repo: Path) -> dict[str, object]:
    """Everything an image depends on, cheap to compute (apt metadata, hashes)."""
    meta = _apt_show([KERNEL_META, BUSYBOX, *_rootfs.PACKAGES])
    m = re.match(r"(linux-image-[^\s,]+)", meta[KERNEL_META].get("Depends", ""))
    if not m:
        raise Internal(f"cannot tell which kernel {KERNEL_META} depends on")
    kernel_pkg = m.group(1)
    kernel_ver = _apt_show([kernel_pkg])[kernel_pkg]["Version"]
    return {
        "format": FORMAT,
        "kernel": {"package": kernel_pkg, "version": kernel_ver, "modules": _kernel.GUEST_MODULES},
        "busybox": meta[BUSYBOX]["Version"],
        "base": {"suite": _rootfs.SUITE, "mirror": _rootfs.MIRROR,
                 "packages": {p: meta[p]["Version"] for p in _rootfs.PACKAGES},
                 "python": _rootfs.py_pins()},
        "keel_tree": _rootfs.keel_tree_hash(repo),
        # The release the agent reports: the image is this release's.
        "keel_release": release.version(),
        "init": hashlib.sha256(_initramfs._INIT.encode()).hexdigest(),
        "preload": hashlib.sha256(Path(_preload.__file__).read_bytes()).hexdigest(),
    }


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _deb_extract(package: str, version: str, debs: Path, dest: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    pattern = f"{package}_*{version.split(':')[-1]}_amd64.deb"
    if not any(debs.glob(pattern)):
        _rootfs.run_tool(["apt-get", "download", f"{package}={version}"],
                     f"apt-get download {package}", cwd=debs)
    deb = next(debs.glob(pattern))
    _rootfs.run_tool(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")


def _kernel_part(cache: Path, kernel: dict[str, str], say: Callable[[str], None]) -> Path:
    part = cache / f"kernel-{kernel['version']}-{_digest(kernel['modules'])[:8]}"
    if (part / ".complete").exists():
        return part
    say(f"kernel: extracting {kernel['package']} {kernel['version']}")
    shutil.rmtree(part, ignore_errors=True)
    (part / "modules").mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _deb_extract(kernel["package"], kernel["version"], cache / "debs", Path(tmp))
        vmlinuz = next(Path(tmp, "boot").glob("vmlinuz-*"))
        _kernel.extract_vmlinux(vmlinuz, part / "vmlinux")
        moddir = next(Path(tmp, "lib/modules").iterdir())
        index = _kernel.module_index(moddir)
        order = _kernel.insmod_order(index, kernel["modules"])
        (part / "modules.dep").write_text(_kernel.modules_dep(index, order, moddir))
        for name in order:
            shutil.copy2(index[name], part / "modules" / f"{name}.ko")
        (part / "order").write_text("\n".join(order) + "\n")
    (part / ".complete").touch()
    return part


def _busybox_part(cache: Path, version: str) -> Path:
    part = cache / f"busybox-{version.replace(':', '_')}"
    if not (part / "busybox").exists():
        part.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _deb_extract(BUSYBOX, version, cache / "debs", Path(tmp))
            shutil.copy2(Path(tmp, "bin/busybox"), part / "busybox.tmp")
        (part / "busybox.tmp").rename(part / "busybox")
    return part / "busybox"


def _base_part(cache: Path, base: dict[str, object], say: Callable[[str], None]) -> Path:
    part = cache / f"rootfs-{_digest(base)}"
    if (part / ".complete").exists():
        return part / "root"
    say("rootfs: debootstrap (the slow part: about a minute)")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    _rootfs.debootstrap(part / "root", cache / "debs")
    say("rootfs: installing the agent's Python dependencies")
    _rootfs.install_py_deps(part / "root", base["python"])  # type: ignore[arg-type]
    (part / ".complete").touch()
    return part / "root"


def build(out: Path | None = None, *, repo: Path = REPO, force: bool = False,
          say: Callable[[str], None] = print) -> Image:
    """Build (or reuse) the image for the current inputs; returns it.

    Reuses a complete image with the same input hash unless *force*.
    Raises Internal naming the failed step.
    """
    cache = (out or default_dir()).absolute()
    started = time.monotonic()
    with _locked(cache):
        inputs = _inputs(repo)
        image_dir = cache / f"img-{_digest(inputs)}"
        if (image_dir / "manifest.json").exists() and not force:
            _point_current(cache, image_dir)
            image = load(image_dir)
            say(f"image {image.id}: up to date ({image_dir}, checked in "
                f"{time.monotonic() - started:.1f}s)")
            return image
        kernel = _kernel_part(cache, inputs["kernel"], say)  # type: ignore[arg-type]
        busybox = _busybox_part(cache, str(inputs["busybox"]))
        root = _base_part(cache, inputs["base"], say)  # type: ignore[arg-type]
        agent_dir = _rootfs.install_agent(root, repo, str(inputs["keel_tree"]),
                                          str(inputs["keel_release"]))
        pythonpath = f"{agent_dir}:{_rootfs.DEPS_DIR}"
        say("preload archive: listing what the agent's Python loads")
        preload = _preload.build(root, agent_dir, pythonpath)
        init = _initramfs.init_script(_rootfs.GUEST_PYTHON, pythonpath, preload)
        order = (kernel / "order").read_text().split()
        cpio = _initramfs.build(busybox, [(n, kernel / "modules" / f"{n}.ko") for n in order],
                                init, (kernel / "modules.dep").read_text())
        image_dir.mkdir(parents=True, exist_ok=True)
        (image_dir / "initramfs.cpio").write_bytes(cpio)
        elapsed = time.monotonic() - started
        sizes = {"vmlinux": (kernel / "vmlinux").stat().st_size, "initramfs": len(cpio),
                 "preload": (root / preload.lstrip("/")).stat().st_size,
                 "rootfs": _rootfs.size_bytes(root)}
        manifest = {
            "id": image_dir.name[4:], "format": FORMAT, "inputs": inputs,
            "kernel": str(kernel / "vmlinux"), "initrd": str(image_dir / "initramfs.cpio"),
            "rootfs": str(root), "agent_dir": agent_dir, "preload": preload, "python": _rootfs.GUEST_PYTHON,
            "packages": _rootfs.dpkg_versions(root, [*_rootfs.PACKAGES, "libc6"]),
            "sizes": sizes, "build_seconds": round(elapsed, 1), "built_at": time.time(),
        }
        tmp = image_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(image_dir / "manifest.json")
        _point_current(cache, image_dir)
    mib = sum(sizes.values()) / (1 << 20)
    say(f"image {manifest['id']}: built in {elapsed:.1f}s, {mib:.0f} MiB "
        f"(vmlinux {sizes['vmlinux'] >> 20} MiB, initramfs {sizes['initramfs'] >> 10} KiB, "
        f"rootfs {sizes['rootfs'] >> 20} MiB) in {image_dir}")
    return load(image_dir)


def _point_current(cache: Path, image_dir: Path) -> None:
    link = cache / "current.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(image_dir.name)
    link.replace(cache / "current")


def main(argv: list[str] | None = None) -> int:
    from shim.vmm.qemu import _prune

    p = argparse.ArgumentParser(prog="python -m shim.vmm.qemu.image",
                                description="Build, show or prune the Keel guest images.")
    p.add_argument("action", choices=("build", "show", "prune"))
    p.add_argument("--out", type=Path, default=None,
                   help=f"cache/output directory (default: $KEEL_IMAGE_DIR or {DEFAULT_DIR})")
    p.add_argument("--force", action="store_true", help="rebuild the image even if it is cached")
    p.add_argument("--release", type=Path, default=None,
                   help="build: record the image in this installed release (its shims boot it)")
    p.add_argument("--state-root", type=Path,
                   default=Path(os.environ.get("KEEL_STATE_ROOT") or "/run/keel"),
                   help="prune: sandbox state root, for the VMs that run ($KEEL_STATE_ROOT or"
                        " /run/keel)")
    p.add_argument("--releases", type=Path, default=Path("/opt/keel/releases"),
                   help="prune: the releases root (default /opt/keel/releases)")
    p.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    ns = p.parse_args(argv)
    try:
        if ns.action == "prune":
            cache = (ns.out or default_dir()).absolute()
            with _locked(cache):
                removed, used = _prune.prune(cache, ns.state_root, ns.releases,
                                             dry_run=ns.dry_run)
            if used.blind:
                print(f"nothing removed: {used.blind}", file=sys.stderr)
                return 1
            for image_id, why in sorted(used.reasons.items()):
                print(f"kept {'img-' + image_id if image_id else '(parts)'}: {'; '.join(why)}")
            verb = "would remove" if ns.dry_run else "removed"
            print("\n".join(f"{verb} {name}" for name in removed) or "nothing to remove")
            return 0
        image = build(ns.out, force=ns.force) if ns.action == "build" else load(ns.out)
        if ns.action == "build" and ns.release is not None:
            _prune.record_release_image(ns.release, image.dir, image.id)
            print(f"release {ns.release.name} boots image {image.id}")
    except (Internal, NotFound, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if ns.action == "show":
        print(json.dumps(image.manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
