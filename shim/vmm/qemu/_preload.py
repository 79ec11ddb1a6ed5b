"""The template preload archive: what the agent's Python loads, as one tar in the guest root.

A template VM (``_template``) unpacks it into its initramfs, unmounts the
9p root (a mounted share blocks migration) and runs the agent from that
copy, so the agent's imports are done before the snapshot.  The list of
files comes from the guest's own interpreter: at image build time it runs
``agent._vmguest.preload()`` in the guest root (chroot, with ``/proc`` in
a private mount namespace) and reports the files of every module it
imported and every file mapped into it (interpreter, ``ld.so``, shared
libraries, extension modules).

Paths are stored as the guest resolves them: the guest root is merged-/usr
(``lib -> usr/lib``), and the initramfs keeps busybox in a real ``/bin``,
so a path through ``bin`` is stored by its target only.  A module missing
from the archive is not an error: after ``go`` the agent switches to the
9p root, where every path is the same, and imports it from there.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tarfile
from pathlib import Path, PurePosixPath

from shim.vmm.qemu._rootfs import GUEST_PYTHON, run_tool

#: The archive in the guest root, per agent tree (``/opt/keel/agent-<hash>``).
NAME = "preload.tar"

_LIST = r"""
import json, sys
from agent._vmguest import preload
preload()
files = set()
for m in list(sys.modules.values()):
    for attr in ("__file__", "__cached__"):
        f = getattr(m, attr, None)
        if isinstance(f, str) and f.startswith("/"):
            files.add(f)
with open("/proc/self/maps") as maps:
    for line in maps:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            files.add(parts[5].strip())
files.add(sys.executable)
print(json.dumps(sorted(files)))
"""

#: Top-level names the initramfs owns (a guest symlink there would replace them).
_INITRAMFS_DIRS = frozenset({"bin", "dev", "proc", "sys", "newroot", "keel", "init"})


def guest_files(root: Path, pythonpath: str) -> list[str]:
    """Guest paths of the files the agent's interpreter has loaded after ``preload()``."""
    script = ('mount -t proc proc "$1/proc" && exec chroot "$1" "$2" -S -c "$3"')
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1"}
    out = run_tool(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                    str(root), GUEST_PYTHON, _LIST], "listing the agent's files in the guest root",
                   env=env)
    return list(json.loads(out.strip().splitlines()[-1]))


def elf_interpreter(path: Path) -> str | None:
    """The ``PT_INTERP`` of the ELF64 executable *path* (its dynamic loader), if any."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    return None


def _walk(root: Path, guest: str, entries: dict[str, os.stat_result], depth: int = 0) -> None:
    """Add *guest* (absolute) to *entries*: parent dirs, symlinks on the way, the file."""
    if depth > 16:
        raise OSError(f"too many symlinks resolving {guest}")
    parts = PurePosixPath(guest).parts[1:]
    cur = PurePosixPath("/")
    for i, part in enumerate(parts):
        cur = cur / part
        rel = str(cur)[1:]
        st = os.lstat(root / rel)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(root / rel)
            if i > 0 or part not in _INITRAMFS_DIRS:
                entries[rel] = st
            resolved = (cur.parent / target) if not target.startswith("/") else PurePosixPath(target)
            rest = PurePosixPath(*parts[i + 1:]) if i + 1 < len(parts) else None
            full = os.path.normpath(str(resolved / rest if rest else resolved))
            _walk(root, full, entries, depth + 1)
            return
        entries[rel] = st


def _add_sonames(root: Path, entries: dict[str, os.stat_result]) -> None:
    """Add the symlinks next to each shared library that point to it: the maps name
    ``libz.so.1.2.13``, the loader looks for its soname ``libz.so.1``."""
    libs = [rel for rel, st in entries.items() if stat.S_ISREG(st.st_mode) and ".so" in rel]
    for parent in {os.path.dirname(rel) for rel in libs}:
        names = {os.path.basename(rel) for rel in libs if os.path.dirname(rel) == parent}
        with os.scandir(root / parent) as it:
            for entry in it:
                if entry.is_symlink() and os.path.basename(os.readlink(entry.path)) in names:
                    entries[f"{parent}/{entry.name}"] = entry.stat(follow_symlinks=False)


def build(root: Path, agent_dir: str, pythonpath: str) -> str:
    """Write the archive for the agent in *agent_dir* into *root*; returns its guest path."""
    guest = f"{agent_dir}/{NAME}"
    dest = root / guest.lstrip("/")
    wanted = guest_files(root, pythonpath)
    # The kernel loads the interpreter's loader by the path in its ELF header, not
    # the resolved one the maps show (lib64 -> usr/lib64 on a merged-/usr root).
    python = root / os.path.realpath(root / GUEST_PYTHON.lstrip("/")).removeprefix(str(root)).lstrip("/")
    if loader := elf_interpreter(python):
        wanted.append(loader)
    # The whole agent tree too (its lazily imported modules are small), and the
    # packages' metadata (importlib.metadata reads versions at import time).
    for dirpath, _dirs, names in os.walk(root / agent_dir.lstrip("/")):
        wanted += [f"/{Path(dirpath, n).relative_to(root)}" for n in names if n.endswith(".pyc")]
    for entry in pythonpath.split(":"):
        for meta in (root / entry.lstrip("/")).glob("*.dist-info/*"):
            wanted.append(f"/{meta.relative_to(root)}")
    entries: dict[str, os.stat_result] = {}
    for path in wanted:
        try:
            _walk(root, os.path.normpath(path), entries)
        except FileNotFoundError:
            continue  # e.g. a module's __file__ whose source is not shipped
    _add_sonames(root, entries)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for rel in sorted(entries):
            st = entries[rel]
            info = tarfile.TarInfo(rel)
            info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(root / rel)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                with open(root / rel, "rb") as f:
                    tar.addfile(info, f)
    tmp = dest.with_name(NAME + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(dest)
    return guest
