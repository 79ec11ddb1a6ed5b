"""Which guest images are in use, and removing the others (``image prune``).

An image is kept when any of these names it:

- ``current`` in the image cache (what a shim without other orders boots);
- an installed release's ``guest/image.json`` (the image its install built
  or reused: what that release's shims boot, :func:`release_image`);
- a VM that runs: a sandbox under the state root whose record is a qemu
  VM with this image id and whose qemu process (pid and start time) is
  alive;
- a running process whose command line names the image (a VM still
  booting, before its sandbox has a record; a template build).

A VM reads its image's kernel, initramfs and root for as long as it runs;
removing a release therefore never removes an image, and pruning never
removes one a VM uses.  A sandbox whose record cannot be read (corrupt, or
written by a newer release) might run a VM: then nothing is removed.

What is left after the images are removed: the kernels and base roots no
kept image (and no running process) names, and the agent trees in a kept
base root that no kept image names.  The busybox parts, the package cache
(``debs``) and VM templates are left alone (a template whose image is gone
falls back to a cold boot).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from keel import procfs
from keel.errors import KeelError, NotFound
from shim.dirs import sandboxes
from shim.state import load_record

#: Where an installed release records the image its install built or reused.
RELEASE_IMAGE = Path("guest") / "image.json"


def release_image(prefix: Path | None = None) -> Path | None:
    """The image directory this release's install recorded (``<release>/guest/image.json``;
    the release is this interpreter's virtualenv), or None."""
    path = (prefix or Path(sys.prefix)) / RELEASE_IMAGE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    where = doc.get("dir") if isinstance(doc, dict) else None
    return Path(where) if isinstance(where, str) and where else None


def record_release_image(release: Path, image_dir: Path, image_id: str) -> None:
    path = release / RELEASE_IMAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"id": image_id, "dir": str(image_dir)}) + "\n")
    tmp.replace(path)


@dataclass(slots=True)
class Usage:
    """Why each image id is kept: the reasons, by image id; parts a running
    process names; and, when set, why nothing may be removed at all."""

    reasons: dict[str, list[str]] = field(default_factory=dict)
    parts: set[str] = field(default_factory=set)
    blind: str = ""

    def keep(self, image_id: str, why: str) -> None:
        self.reasons.setdefault(image_id, []).append(why)


def usage(cache: Path, state_root: Path, releases: Path) -> Usage:
    used = Usage()
    with contextlib.suppress(OSError, ValueError):
        used.keep(os.readlink(cache / "current").removeprefix("img-"), "current")
    if releases.is_dir():
        for rel in sorted(releases.iterdir()):
            where = release_image(rel) if not rel.is_symlink() else None
            if where is not None and where.parent.resolve() == cache.resolve():
                used.keep(where.name.removeprefix("img-"), f"release {rel.name}")
    for sdir in sandboxes(state_root):
        try:
            rec = load_record(sdir)
        except NotFound:
            continue  # a sandbox being created: its qemu, if any, is found below
        except KeelError as exc:  # corrupt, or a newer release's schema: it may run a VM
            used.blind = f"sandbox {sdir.id}: its state cannot be read ({exc})"
            continue
        vmm = rec.vmm
        image_id, pid = str(vmm.get("image", "")), vmm.get("pid")
        if rec.backend != "qemu" or not image_id or not isinstance(pid, int):
            continue
        if procfs.is_running(pid, int(vmm.get("start_time") or 0)):
            used.keep(image_id, f"VM of sandbox {rec.sandbox_id} (qemu pid {pid})")
    # Processes that name the cache (a VM still booting has no record yet; a
    # template build has none): what they name is in use.
    needles = {str(cache), str(cache.resolve())}
    named = re.compile("(?:" + "|".join(re.escape(n) for n in needles) + r")/"
                       r"(img-|kernel-|rootfs-)([^/\x00,]+)")
    for pid, cmdline in _processes_naming(needles):
        for kind, name in sorted(set(named.findall(cmdline))):
            if kind == "img-":
                used.keep(name, f"named by running pid {pid}")
            else:
                used.parts.add(kind + name)
    return used


def _processes_naming(needles: set[str]) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line names one of *needles*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
        if any(n in cmdline for n in needles):
            found.append((int(entry.name), cmdline))
    return found


def prune(cache: Path, state_root: Path, releases: Path, *, dry_run: bool = False
          ) -> tuple[list[str], Usage]:
    """Remove the images (and parts) nothing uses; (what was removed, why the rest stays).

    The caller holds the cache's lock (no build runs meanwhile)."""
    used = usage(cache, state_root, releases)
    removed: list[str] = []
    if used.blind:
        return removed, used
    kept_manifests: list[dict[str, object]] = []
    blind = False  # a kept image whose manifest cannot be read: its parts are unknown
    for img in sorted(cache.glob("img-*")):
        if img.name.removeprefix("img-") in used.reasons:
            try:
                doc = json.loads((img / "manifest.json").read_text())
            except (OSError, ValueError):
                doc = None
            if isinstance(doc, dict):
                kept_manifests.append(doc)
            else:
                blind = True
            continue
        removed.append(img.name)
        if not dry_run:
            shutil.rmtree(img)
    # A kernel is <cache>/kernel-*/vmlinux, a base root <cache>/rootfs-*/root.
    # (Compared by name: the manifests name them by absolute path, the cache
    # may be given through another one.)
    parts = {Path(str(m[k])).parent.name for m in kept_manifests for k in ("kernel", "rootfs")
             if m.get(k)} | used.parts
    agent_dirs = {str(m.get("agent_dir", "")) for m in kept_manifests}
    if blind:
        used.keep("", "a kept image's manifest is unreadable: its parts are kept too")
        return removed, used
    for part in sorted([*cache.glob("kernel-*"), *cache.glob("rootfs-*")]):
        if part.name not in parts:
            removed.append(part.name)
            if not dry_run:
                shutil.rmtree(part)
            continue
        for tree in sorted((part / "root" / "opt" / "keel").glob("agent-*")):
            if f"/opt/keel/{tree.name}" not in agent_dirs:
                removed.append(f"{part.name}/root/opt/keel/{tree.name}")
                if not dry_run:
                    shutil.rmtree(tree)
    return removed, used
