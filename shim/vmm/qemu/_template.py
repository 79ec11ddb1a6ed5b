"""VM templates: boot once, snapshot, start sandboxes by restoring the snapshot.

A template is a VM booted with ``keel.template=1``: its init loads the
modules and stops before any 9p mount (a mounted 9p share blocks
migration, research/qemu.md section 8), writes ``ready`` on the ops port
and blocks reading a ``go`` line there.  The host then stops it and
migrates its state into ``snapshot`` (``exec:cat > ...``).

A clone is a qemu with the same command line shape (the same devices,
``-m``, ``-smp``, kernel command line; socket and share paths may differ)
plus ``-incoming exec:cat <snapshot>``.  Once ``query-status`` leaves
``inmigrate`` the host sends ``cont`` and the ``go`` line::

    go seed=<64 hex> hashseed=<n> time=@<unix s> host=<name> [args=<b64>] [net=<b64>]

and waits for ``ok``.  Every clone resumes with the template's RNG state
and a stale clock: the init sets the clock, mixes the seed into the kernel
pool and hands it to the agent, which credits it and forces a reseed of the
kernel CRNG (``agent._vmguest.reseed``); Python starts after ``go``, with
the given hash seed.

Templates live in ``<template_dir>/<key>/`` (``snapshot``,
``template.json``), where the key hashes everything a clone must share with
its template.  A template is built on first use under an exclusive lock,
in a scratch directory renamed into place when complete.
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

from agent.errors import Internal, Unavailable
from shim.vmm.qemu import qmp as _qmp
from shim.vmm.qemu._cmdline import SandboxFiles, shell_word

log = logging.getLogger("keel.shim.qemu.template")

#: Bumped when the go line or the snapshot point changes.
FORMAT = 1
#: Linux HOST_NAME_MAX.
_HOSTNAME_MAX = 64

#: (files, snapshot to restore or None) -> qemu argv.
ArgvFor = Callable[[SandboxFiles, "Path | None"], list[str]]
#: (argv, files) -> pid of the daemonized qemu.
Starter = Callable[[list[str], SandboxFiles], Awaitable[int]]


@dataclasses.dataclass(frozen=True, slots=True)
class Template:
    """A built template: ``dir`` holds ``snapshot`` and ``template.json``."""

    key: str
    dir: Path

    @property
    def snapshot(self) -> Path:
        return self.dir / "snapshot"

    @property
    def meta(self) -> Path:
        return self.dir / "template.json"

    def usable(self) -> bool:
        try:
            doc = json.loads(self.meta.read_text())
            return doc.get("format") == FORMAT and self.snapshot.stat().st_size > 0
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
    files = SandboxFiles(scratch)
    scratch.mkdir(mode=0o700)
    files.shared.mkdir(mode=0o700)  # the template never mounts it
    pid = 0
    try:
        pid = await start(argv_for(files, None), files)
        async with asyncio.timeout(timeout):
            reader, writer = await _open_ops(files)
            try:
                line = await reader.readline()
                if line.strip() != b"ready":
                    raise Internal(f"template VM said {line[:80]!r}, not ready")
                # Stay connected until it is stopped: with the host end gone, the
                # guest's read would return EOF.
                await _snapshot(files, scratch / "snapshot")
            finally:
                writer.close()
        (scratch / "template.json").write_text(json.dumps(
            {"format": FORMAT, "key": tpl.key, "shape": dict(shape), "created": time.time()}))
        await asyncio.to_thread(_finish, files, tpl.dir)
    except TimeoutError:
        raise Unavailable(f"template VM not snapshotted within {timeout}s; console: "
                          f"{_tail(files.console)}") from None
    finally:
        if pid:
            _kill(pid)
        await asyncio.to_thread(shutil.rmtree, scratch, True)


async def _open_ops(files: SandboxFiles) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the ops channel's socket (qemu creates it before it daemonizes)."""
    return await asyncio.open_unix_connection(str(files.channel("ops")))


async def _snapshot(files: SandboxFiles, dest: Path) -> None:
    async with _qmp.QmpClient.connect(str(files.qmp)) as client:
        await client.execute("stop")
        await client.execute("migrate", {"uri": f"exec:cat > {shell_word(dest)}"})
        while True:
            state = await client.execute("query-migrate")
            status = state.get("status") if isinstance(state, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise Internal(f"template snapshot {status}: {state.get('error-desc', '')}")
            await asyncio.sleep(0.05)  # qemu has no blocking wait for migration


def _clear(scratch: Path, final: Path) -> None:
    """Remove a crashed builder's scratch dir and an unusable template (under the lock)."""
    for path in (scratch, scratch.with_name(scratch.name + ".done"), final):
        shutil.rmtree(path, ignore_errors=True)


def _finish(files: SandboxFiles, final: Path) -> None:
    keep = files.root.with_name(files.root.name + ".done")
    keep.mkdir(mode=0o700)
    for name in ("snapshot", "template.json"):
        os.rename(files.root / name, keep / name)
    os.sync()
    os.rename(keep, final)


def _kill(pid: int) -> None:
    """SIGKILL the template qemu (a daemon we started: its pid is from our pid file)."""
    with contextlib.suppress(OSError):
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


def _tail(path: Path, limit: int = 800) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip() or "(empty)"
    except OSError:
        return "(none)"


def discard(tpl: Template) -> None:
    """Remove a template a clone could not be restored from (the next launch rebuilds it).

    Clones restoring from it right now keep reading their open snapshot.
    """
    shutil.rmtree(tpl.dir, ignore_errors=True)


# -- clones -------------------------------------------------------------------------------


def go_line(sandbox_id: str, agent_args: Sequence[str], net: str = "") -> bytes:
    """The ``go`` line for a clone (fresh entropy, hash seed and the current time)."""
    words = ["go", f"seed={secrets.token_hex(32)}",
             f"hashseed={secrets.randbelow(2**32)}", f"time=@{round(time.time())}",
             f"host={''.join(c for c in sandbox_id if c.isalnum() or c in '-.')[:_HOSTNAME_MAX - 1] or 'keel'}"]
    if agent_args:
        words.append("args=" + base64.b64encode("".join(f"{a}\n" for a in agent_args).encode()).decode())
    if net:
        words.append("net=" + base64.b64encode(net.encode()).decode())
    return (" ".join(words) + "\n").encode()


async def resume(files: SandboxFiles, sandbox_id: str, agent_args: Sequence[str],
                 timeout: float) -> None:
    """Bring a clone started with ``-incoming`` up: wait for the state, ``cont``, ``go``.

    Raises Unavailable (qemu died, no answer within *timeout*) or Internal.
    """
    try:
        async with asyncio.timeout(timeout):
            async with _qmp.QmpClient.connect(str(files.qmp)) as client:
                while True:
                    status = await _qmp.status(client)
                    if status != "inmigrate":
                        break
                    await asyncio.sleep(0.02)  # poll: qemu has no blocking wait for it
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
        raise Internal(f"template clone answered {answer[:80]!r} to go")
