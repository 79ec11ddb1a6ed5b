"""Container root filesystems on the host, and their bind mounts into the 9p share.

The per-sandbox share (``<sandbox>/shared``) is writable by the guest, and
the guest is untrusted: it can rename directories and plant symlinks there
at any time.  So nothing here resolves a path inside the share by name:

* the mount point is created and opened component by component with
  ``O_NOFOLLOW`` from an fd of the share, and the bind mount targets that
  fd (``/proc/self/fd/N``);
* the mount's id is recorded, and unmounting opens the mount point, checks
  through ``/proc/self/fdinfo`` that the fd is on exactly that mount, and
  detaches it through the fd.

Each container has a host-only record (``rootfs-mounts/<id>``, outside the
share) written *before* anything is mounted, so an unshare or stop after a
crash still finds what to undo.  All functions block: call them in a thread.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from keel import procfs
from keel.errors import Internal
from shim.vmm._mountcmd import mount_argv
from shim.vmm.api import MountSpec

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_BIND, MS_REC = 0x1000, 0x4000
#: qemu's 9p (security_model=none, running as root) applies the guest's
#: mknod, chown and chmod to the share: mounted nodev,nosuid,noexec, a device
#: node or setuid file the guest makes there is inert on the host, and qemu
#: cannot be made to open a host device through it.
_SEALED = MS_NODEV | MS_NOSUID | MS_NOEXEC
MNT_DETACH = 2
_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, flags: int, what: str) -> None:
    rc = _libc.mount(source.encode() if source else None, target.encode(), None, flags, None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _sealed_bind(source: str, parent_fd: int, name: str, *, directory: bool = True,
                 readonly: bool = False, recursive: bool = True) -> int:
    """Bind *source* on *name* of *parent_fd* (a directory, or a file when not
    *directory*), make it nodev,nosuid,noexec (and read-only if asked).

    Returns an O_PATH fd of the new mount's root (the caller closes it).
    """
    how = _O_DIR if directory else _O_FILE
    target = os.open(name, how, dir_fd=parent_fd)
    try:
        _mount(source, f"/proc/self/fd/{target}", MS_BIND | (MS_REC if recursive else 0),
               f"bind mount {source}")
    finally:
        os.close(target)
    mounted = os.open(name, how, dir_fd=parent_fd)  # now crosses into the new mount
    try:
        _mount(None, f"/proc/self/fd/{mounted}",
               MS_REMOUNT | MS_BIND | _SEALED | (MS_RDONLY if readonly else 0),
               f"remount {source} nodev,nosuid,noexec{',ro' if readonly else ''}")
    except BaseException:
        os.close(mounted)
        raise
    return mounted


def seal_share(shared: Path) -> None:
    """Make *shared* its own nodev,nosuid,noexec mount (before qemu exports it)."""
    parent = os.open(shared.parent, _O_DIR)
    try:
        os.close(_sealed_bind(str(shared), parent, shared.name))
    finally:
        os.close(parent)


def _mnt_id(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    raise Internal("no mnt_id in fdinfo")


def mounts_under(prefix: Path) -> list[tuple[int, str]]:
    """(mount id, mount point) of every mount at or below *prefix*, newest first."""
    base = str(prefix)
    return [(m.id, m.point) for m in reversed(procfs.mounts())
            if m.point == base or m.point.startswith(base + "/")]


def _detach(mount_id: int, point: str) -> bool:
    """Detach mount *mount_id* at *point* if *point* still opens onto it."""
    try:
        fd = os.open(point, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if _mnt_id(fd) != mount_id:
            return False  # moved or raced: the caller rescans
        if _libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {point}: {os.strerror(err)}")
        return True
    finally:
        os.close(fd)


def unmount_under(prefix: Path, attempts: int = 20) -> None:
    """Detach every mount at or below *prefix*; Internal if some stay."""
    for _ in range(attempts):
        mounts = mounts_under(prefix)
        if not mounts:
            return
        for mount_id, point in mounts:
            _detach(mount_id, point)
    raise Internal(f"mounts left under {prefix}: {[p for _, p in mounts_under(prefix)]}")


def _record(marks: Path, cid: str) -> Path:
    marks.mkdir(mode=0o700, exist_ok=True)
    return marks / cid


def mount_rootfs(marks: Path, cid: str, mounts: Sequence[MountSpec], host_path: Path) -> None:
    """Record *cid*, then mount containerd's *mounts* on *host_path* (host mount namespace)."""
    _record(marks, cid).write_text(json.dumps({"host_path": str(host_path), "mounted": bool(mounts)}))
    for m in mounts:
        res = subprocess.run(mount_argv(m, host_path), capture_output=True, text=True, timeout=30,
                             check=False)
        if res.returncode != 0:
            raise Internal(f"mount {m.type} rootfs of {cid}: {res.stderr.strip()}")


def bind_into_share(shared: Path, marks: Path, cid: str, source: Path) -> str:
    """Bind *source* at ``<shared>/<cid>/rootfs``; returns the path relative to *shared*.

    The bind mount's id goes into *cid*'s record: the guest may rename the
    directories above it, the id still finds it.
    """
    fds = walk(shared, cid, (cid, "rootfs"))
    try:
        mounted = _sealed_bind(str(source), fds[-2], "rootfs")
        fds.append(mounted)
        record = marks / cid
        doc = json.loads(record.read_text()) if record.exists() else {}
        record.write_text(json.dumps({**doc, "bind_mount_id": _mnt_id(mounted)}))
    finally:
        for fd in fds:
            os.close(fd)
    return f"{cid}/rootfs"


def walk(shared: Path, cid: str, names: Sequence[str]) -> list[int]:
    """O_PATH fds of *shared* and of each directory of *names* below it,
    created (0755) where missing, never following a symlink the guest
    planted.  The caller closes them; Internal if one is not a directory."""
    fds = [os.open(shared, _O_DIR)]
    try:
        for name in names:
            try:
                os.mkdir(name, 0o755, dir_fd=fds[-1])
            except FileExistsError:
                pass
            try:
                fds.append(os.open(name, _O_DIR, dir_fd=fds[-1]))
            except OSError as exc:  # a symlink or a file the guest planted
                raise Internal(f"share of {cid}: {name} is not a plain directory: {exc.strerror}") from exc
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def bind_volume(parent_fd: int, name: str, source: Path, *, readonly: bool,
                recursive: bool) -> int:
    """Bind the host file or directory *source* at *name* (new) in *parent_fd*,
    sealed, read-only if asked; returns the mount's id."""
    directory = source.is_dir()
    if directory:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    else:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=parent_fd))
    mounted = _sealed_bind(str(source), parent_fd, name, directory=directory,
                           readonly=readonly, recursive=recursive)
    try:
        return _mnt_id(mounted)
    finally:
        os.close(mounted)


def note_mounts(marks: Path, cid: str, mount_ids: Sequence[int]) -> None:
    """Add *mount_ids* (binds in the share) to *cid*'s record, for :func:`unshare`."""
    record = _record(marks, cid)
    doc = json.loads(record.read_text()) if record.exists() else {}
    ids = [*doc.get("volume_mount_ids", []), *mount_ids]
    record.write_text(json.dumps({**doc, "volume_mount_ids": ids}))


def _detach_by_id(shared: Path, mount_id: int) -> None:
    for _ in range(20):
        points = [p for i, p in mounts_under(shared) if i == mount_id]
        if not points or _detach(mount_id, points[0]):
            break


def unshare(shared: Path, marks: Path, cid: str) -> None:
    """Undo :func:`bind_into_share` and :func:`mount_rootfs` for *cid*; idempotent."""
    record = marks / cid
    try:
        doc = json.loads(record.read_text())
    except FileNotFoundError:
        doc = {}
    # By id first: the guest may have renamed the directories above them.
    for mount_id in reversed(doc.get("volume_mount_ids", [])):
        _detach_by_id(shared, mount_id)
    if (mount_id := doc.get("bind_mount_id")) is not None:
        _detach_by_id(shared, mount_id)
    unmount_under(shared / cid)
    if doc.get("mounted"):
        unmount_under(Path(doc["host_path"]))
    if (shared / cid).is_dir() and not (shared / cid).is_symlink():
        shutil.rmtree(shared / cid, ignore_errors=True)
    record.unlink(missing_ok=True)


def unshare_all(shared: Path, marks: Path) -> None:
    """Undo every container's mounts and remove the share (after the VM stopped)."""
    unmount_under(shared)
    if marks.is_dir():
        for record in marks.iterdir():
            unshare(shared, marks, record.name)
        marks.rmdir()
    if mounts_under(shared):
        raise Internal(f"mounts left under {shared}")
    shutil.rmtree(shared, ignore_errors=True)
