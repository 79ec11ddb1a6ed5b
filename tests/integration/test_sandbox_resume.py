"""The shim core's handoff half, without containerd: a real agent (process
backend, real runc) keeps a container printing while the sandbox is frozen
by one ``Sandbox`` and resumed by another, ten times over.  Every byte must
arrive exactly once and in order, and the exit status must survive.

The containerd-facing half (connections, pending Waits) is covered by the
upgrade tests that drive a real containerd.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from shim._events import EventPublisher
from shim._resume import SandboxHandoff
from shim.config import ShimConfig
from shim.sandbox import Sandbox
from shim.state import Stdio
from tests.agent_harness import make_rootfs, make_spec, require_root_and_runc

LINES = 200_000


def _bundle(tmp: Path, args: list[str]) -> Path:
    bundle = tmp / "bundle"
    bundle.mkdir()
    make_rootfs(bundle / "rootfs")
    spec = make_spec(args, "c1")
    spec["root"] = {"path": "rootfs"}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


async def _drain(fd: int, into: bytearray, done: asyncio.Event,
                 progress: asyncio.Event) -> None:
    """Read the fifo into *into*; *progress* is set after every chunk."""
    from upgrade.aio import wait_readable

    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            await wait_readable(fd)
            continue
        if not data:
            done.set()
            progress.set()
            return
        into += data
        progress.set()


def test_freeze_restore_resume_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    require_root_and_runc()
    script = f"i=0; while [ $i -lt {LINES} ]; do echo $i; i=$((i+1)); done; exit 7"
    bundle = _bundle(tmp_path, ["sh", "-c", script])
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    cfg = ShimConfig(state_root=tmp_path / "state")
    got = bytearray()
    offsets: list[int] = []

    async def main() -> int:
        closed, progress = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            drain = tg.create_task(_drain(reader, got, closed, progress))
            sb = Sandbox("pod", "test", cfg, EventPublisher("/nonexistent", "test"), tg)
            await sb.create("c1", str(bundle), (), Stdio("", str(fifo), "", False))
            await sb.start("c1", "")
            for _ in range(10):
                # Hand off only once more output arrived (or all of it did).
                progress.clear()
                async with asyncio.timeout(30):
                    await progress.wait()
                rec = await SandboxHandoff(sb).freeze()
                offsets.append(rec.containers[0].init.offsets.stdout)
                new = Sandbox("pod", "test", cfg, EventPublisher("/nonexistent", "test"), tg)
                handoff = SandboxHandoff(new)
                await handoff.restore(rec)
                await handoff.check_health()
                for c in sb.containers.values():  # the old process exits: its fds close
                    for p in c.processes():
                        p.close_stdio()
                handoff.go_live()
                sb = new
            status = (await sb.wait("c1", "")).status
            async with asyncio.timeout(30):
                await closed.wait()
            await sb.delete("c1", "")
            assert await sb.shutdown()
            await drain
            return status

    try:
        status = asyncio.run(main())
    finally:
        os.close(reader)
    assert status == 7
    lines = got.decode().split("\n")
    assert lines[-1] == ""
    assert lines[:-1] == [str(i) for i in range(LINES)]
    # The handoffs really happened while output was flowing.
    assert any(0 < o < len(got) for o in offsets), offsets
    assert not (cfg.state_root / "sandboxes" / "pod").exists()
