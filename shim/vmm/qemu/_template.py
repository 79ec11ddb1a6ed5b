"""VM templates: boot once, snapshot, start sandboxes by restoring the snapshot.

A template is a VM booted with ``keel.template=1``: its init mounts the
guest root over 9p, unpacks the preload archive (``_preload``: the agent's
interpreter, libraries and modules) into the initramfs, unmounts 9p (a
mounted 9p share blocks migration, research/qemu.md section 8) and starts
the agent from that copy (``agent._vmguest.template_main``), which imports
everything, writes ``ready`` on the ops port and blocks reading a ``go``
line there.  The host stops it and migrates its device state into
``snapshot``.

The guest RAM is a file, ``memory`` (``memory-backend-file``): the template
maps it shared, so its RAM *is* the file, and the migration skips it
(capability ``x-ignore-shared``).  A clone maps the same file private
(``share=off``: copy-on-write), so clones share the template's pages in
the host page cache and copy only what they write; restoring reads only
the small device state.  Kata's VM templates work the same way.  The
template directory should be on a tmpfs (``/dev/shm``): on a disk the
template's writes would go through to it.

A clone is a qemu with the same command line shape (the same devices,
``-m``, ``-smp``, kernel command line; socket and share paths may differ)
plus ``-incoming defer``; the host sets ``x-ignore-shared``, sends
``migrate-incoming exec:cat <snapshot>``, waits until ``query-status``
leaves ``inmigrate``, sends ``cont`` and the ``go`` line::

    go seed=<64 hex> time=<unix s> host=<name> [args=<b64>]

and waits for ``ok`` (or ``error <why>``).  The clone's agent sets the
clock and hostname, credits the seed to the kernel RNG and forces a reseed,
reseeds Python's ``random``, mounts the root and the sandbox share as a
cold boot does, and serves.  A running Python cannot change its hash seed:
clones of one template share the agent's (see ``agent._vmguest``).

Templates live in ``<template_dir>/<key>/`` (``snapshot``, ``memory``,
``template.json``), where the key hashes everything a clone must share
with its template.  A template is built on first use under an exclusive
lock, in a scratch directory renamed into place when complete.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keel.errors import Internal, Unavailable
from keel.logs import tail
from shim.dirs import SandboxDir
from shim.vmm.qemu import qmp as _qmp
from shim.vmm.qemu._cmdline import shell_word

log = logging.getLogger("keel.shim.qemu.template")

#: Bumped when the go line, the snapshot point or the memory layout changes.
FORMAT = 2
#: Linux HOST_NAME_MAX.
_HOSTNAME_MAX = 64

#: (files, guest RAM file, clone?) -> qemu argv.
ArgvFor = Callable[[SandboxDir, Path, bool], list[str]]
#: The migration capability that leaves shared (file-backed) RAM out of the stream.
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
#: (argv, files) -> pid of the daemonized qemu.
Starter = Callable[[list[str], SandboxDir], Awaitable[int]]


@dataclasses.dataclass(frozen=True, slots=True)
class Template:
    """A built template: ``dir`` holds ``snapshot`` and ``template.json``."""

    key: str
    dir: Path

    @property
    def snapshot(self) -> Path:
        return self.dir / "snapshot"

    @property
    def memory(self) -> Path:
        """The guest RAM at the snapshot (clones map it copy-on-write)."""
        return self.dir / "memory"

    @property
    def meta(self) -> Path:
        return self.dir / "template.json"

    def usable(self) -> bool:
        try:
            doc = json.loads(self.meta.read_text())
            return (doc.get("format") == FORMAT and self.snapshot.stat().st_size > 0
                    and self.memory.stat().st_size > 0)
        except (OSError, ValueError, AttributeError):
            return False


def key(shape: Mapping[str, Any]) -> str:
    """The template key of a VM *shape* (JSON-able: image, machine, sizing, cmdline...)."""
    doc = json.dumps({"format": FORMAT, **shape}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def file_id(path: Path) -> list[int]:
    """What tells a rebuilt file apart cheaply (size, mtime)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


async def ensure(root: Path, tpl_key: str, shape: Mapping[str, Any], argv_for: ArgvFor,
                 start: Starter, timeout: float) -> Template:
    """The template *tpl_key* under *root*, built now unless a usable one exists.

    Concurrent callers (other shims) wait on a lock file for one builder.
    Raises Unavailable or Internal when the build fails; nothing is left
    but the lock file.
    """
    tpl = Template(tpl_key, root / tpl_key)
    if tpl.usable():
        return tpl
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = os.open(root / f"{tpl_key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await _lock(lock_fd, timeout)
        if tpl.usable():
            return tpl
        started = time.monotonic()
        await _build(tpl, shape, argv_for, start, timeout)
        log.info("template %s built in %.1fs (%d MiB)", tpl_key, time.monotonic() - started,
                 tpl.snapshot.stat().st_size >> 20)
        return tpl
    finally:
        os.close(lock_fd)  # releases the flock


async def _lock(fd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Unavailable(f"template lock still held after {timeout}s") from None
            await asyncio.sleep(0.1)  # another shim is building: poll its lock


async def _build(tpl: Template, shape: Mapping[str, Any], argv_for: ArgvFor, start: Starter,
                 timeout: float) -> None:
    scratch = tpl.dir.with_name(f".build-{tpl.key}")
    await asyncio.to_thread(_clear, scratch, tpl.dir)
    files = SandboxDir(scratch)
    scratch.mkdir(mode=0o700)
    files.shared.mkdir(mode=0o700)  # the template never mounts it
    pid = 0
    try:
        pid = await start(argv_for(files, scratch / "memory", False), files)
        async with asyncio.timeout(timeout):
            reader, writer = await _open_ops(files)
            try:
                line = await reader.readline()
                if line.strip() != b"ready":
                    raise Internal(f"template VM said {line[:80]!r}, not ready; console: "
                                   f"{tail(files.agent_log, 6000)}")
                # Stay connected until it is stopped: with the host end gone, the
                # guest's read would return EOF.
                await _snapshot(files, scratch / "snapshot")
            finally:
                writer.close()
        _kill(pid)  # stopped: its RAM (the memory file) no longer changes
        pid = 0
        (scratch / "template.json").write_text(json.dumps(
            {"format": FORMAT, "key": tpl.key, "shape": dict(shape), "created": time.time()}))
        await asyncio.to_thread(_finish, files, tpl.dir)
    except TimeoutError:
        raise Unavailable(f"template VM not snapshotted within {timeout}s; console: "
                          f"{tail(files.agent_log, 6000)}") from None
    finally:
        if pid:
            _kill(pid)
        await asyncio.to_thread(shutil.rmtree, scratch, True)


async def _open_ops(files: SandboxDir) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the ops channel's socket (qemu creates it before it daemonizes)."""
    return await asyncio.open_unix_connection(str(files.channel("ops")))


async def _snapshot(files: SandboxDir, dest: Path) -> None:
    async with _qmp.QmpClient.connect(str(files.qmp)) as client:
        await client.execute("stop")
        await client.execute("migrate-set-capabilities", _IGNORE_SHARED)
        await client.execute("migrate", {"uri": f"exec:cat > {shell_word(dest)}"})
        await _migrated(client, "template snapshot")


async def _migrated(client: _qmp.QmpClient, what: str) -> None:
    """Wait until the migration of *client*'s VM completes; Internal if it fails."""
    while True:
        state = await client.execute("query-migrate")
        status = state.get("status") if isinstance(state, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise Internal(f"{what} {status}: {state.get('error-desc', '')}")
        await asyncio.sleep(0.02)  # qemu has no blocking wait for migration


def _clear(scratch: Path, final: Path) -> None:
    """Remove a crashed builder's scratch dir and an unusable template (under the lock)."""
    for path in (scratch, scratch.with_name(scratch.name + ".done"), final):
        shutil.rmtree(path, ignore_errors=True)


def _finish(files: SandboxDir, final: Path) -> None:
    keep = files.root.with_name(files.root.name + ".done")
    keep.mkdir(mode=0o700)
    for name in ("snapshot", "memory", "template.json"):
        os.rename(files.root / name, keep / name)
    with contextlib.suppress(OSError):  # the snapshot is small; the memory file is on tmpfs
        for name in ("snapshot", "template.json"):
            fd = os.open(keep / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    os.rename(keep, final)


def _kill(pid: int) -> None:
    """SIGKILL the template qemu (a daemon we started: its pid is from our pid file)."""
    with contextlib.suppress(OSError):
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


def discard(tpl: Template) -> None:
    """Remove a template a clone could not be restored from (the next launch rebuilds it).

    Clones restoring from it right now keep reading their open snapshot.
    """
    shutil.rmtree(tpl.dir, ignore_errors=True)


# -- clones -------------------------------------------------------------------------------


def go_line(sandbox_id: str, agent_args: Sequence[str]) -> bytes:
    """The ``go`` line for a clone (fresh entropy and the current time)."""
    host = "".join(c for c in sandbox_id if c.isalnum() or c in "-.")[:_HOSTNAME_MAX - 1]
    words = ["go", f"seed={secrets.token_hex(32)}", f"time={time.time():.6f}",
             f"host={host or 'keel'}"]
    if agent_args:
        words.append("args=" + base64.b64encode("".join(f"{a}\n" for a in agent_args).encode()).decode())
    return (" ".join(words) + "\n").encode()


async def resume(files: SandboxDir, tpl: Template, sandbox_id: str, agent_args: Sequence[str],
                 timeout: float) -> None:
    """Bring a clone started with ``-incoming defer`` up: load the state, ``cont``, ``go``.

    Raises Unavailable (qemu died, no answer within *timeout*) or Internal.
    """
    try:
        async with asyncio.timeout(timeout):
            async with _qmp.QmpClient.connect(str(files.qmp)) as client:
                await client.execute("migrate-set-capabilities", _IGNORE_SHARED)
                await client.execute("migrate-incoming",
                                     {"uri": f"exec:cat {shell_word(tpl.snapshot)}"})
                while True:
                    status = await _qmp.status(client)
                    if status != "inmigrate":
                        break
                    await asyncio.sleep(0.01)  # poll: qemu has no blocking wait for it
                if status not in ("paused", "postmigrate", "running"):
                    raise Internal(f"template clone in state {status!r} after restore")
                if status != "running":
                    await client.execute("cont")
            reader, writer = await _open_ops(files)
            try:
                writer.write(go_line(sandbox_id, agent_args))  # now: it carries the time
                await writer.drain()
                answer = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        raise Unavailable(f"template clone did not answer go within {timeout}s") from None
    if answer.strip() != b"ok":
        raise Internal(f"template clone answered {answer[:200]!r} to go")
