"""The shim daemon: serves containerd's Task API and the sandbox's ops.sock.

Started by ``start`` with the listening socket inherited.  Logs go to the
bundle's ``log`` fifo (containerd copies them into its own log) or, when
containerd is not reading it, to the sandbox directory.  Exits after
``Shutdown`` once no container is left, or on SIGTERM/SIGINT (leaving the
sandbox running: a shim exiting is not a reason to kill a pod).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from shim._flags import Flags

log = logging.getLogger("keel.shim")


def _setup_logging(debug: bool, fallback: Path) -> None:
    stream = None
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        stream = os.fdopen(fd, "w", buffering=1, errors="replace")
    except OSError:
        fallback.parent.mkdir(parents=True, exist_ok=True)
        stream = open(fallback, "a", buffering=1, errors="replace")  # noqa: SIM115
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(
        "time=%(asctime)s level=%(levelname)s msg=%(message)s pid=" + str(os.getpid()) + " runtime=keel"))
    logging.raiseExceptions = False  # a log fifo without reader must not break the shim
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def serve(flags: Flags) -> int:
    from shim import config as config_mod

    cfg = config_mod.load(os.environ.get("KEEL_CONFIG") or None)
    _setup_logging(flags.debug, cfg.state_root / "shim-logs" / f"{flags.sandbox_id or flags.id}.log")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    fd = int(os.environ.pop("KEEL_LISTEN_FD", "3"))
    listener = socket.socket(fileno=fd)
    try:
        asyncio.run(_serve(flags, cfg, listener))
    except Exception:
        log.exception("shim failed")
        return 1
    return 0


async def _serve(flags: Flags, cfg: object, listener: socket.socket) -> None:
    from shim import version
    from shim._events import EventPublisher
    from shim._opsserver import serve_ops
    from shim.sandbox import Sandbox
    from shim.service import SERVICE, TaskService
    from shim.ttrpc import Method, TtrpcServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    events = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    sandbox_id = flags.sandbox_id or flags.id
    log.info("keel shim %s serving sandbox %s on %s", version(), sandbox_id, flags.socket)
    try:
        async with asyncio.TaskGroup() as tg:
            sandbox = Sandbox(sandbox_id, flags.namespace, cfg, events, tg)  # type: ignore[arg-type]
            task = TaskService(sandbox, on_shutdown=stop.set)
            server = TtrpcServer()
            server.register(SERVICE, {name: Method(req, fn) for name, (req, fn) in task.methods().items()})
            tg.create_task(events.run(), name="events")
            tg.create_task(server.serve(listener), name="ttrpc")
            ops = await serve_ops(sandbox)
            await stop.wait()
            log.info("shim of sandbox %s exiting", sandbox_id)
            ops.close()
            await events.drain(timeout=2.0)
            await server.aclose()
            raise _Exit
    except* _Exit:
        pass
    if flags.socket:
        Path(flags.socket).unlink(missing_ok=True)
    await events.aclose()


class _Exit(Exception):
    """Ends the daemon's task group."""
