"""The shim daemon: serves containerd's Task API and the sandbox's ops.sock.

Started by ``start`` with the listening socket inherited, or by an older
shim with a handoff channel (``-handoff-fd``), in which case it adopts
that shim's sandbox and connections (``_handoff.adopt``).  Logs go to the
bundle's ``log`` fifo (containerd copies them into its own log) or, when
containerd is not reading it, to ``<state_root>/shim-logs``.  Exits after
``Shutdown`` once no container is left, on SIGTERM/SIGINT (leaving the
sandbox running: a shim exiting is not a reason to kill a pod), or after
handing off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from keel.logs import loop_error_handler
from shim._flags import Flags
from shim.config import ShimConfig

log = logging.getLogger("keel.shim")


def _setup_logging(debug: bool, fallback: Path) -> None:
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
    for noisy in ("hpack", "h2"):  # every header of every agent call, at debug level
        logging.getLogger(noisy).setLevel(logging.INFO)


def serve(flags: Flags) -> int:
    from shim import config as config_mod

    cfg = config_mod.load(os.environ.get("KEEL_CONFIG") or None)
    _setup_logging(flags.debug, cfg.state_root / "shim-logs" / f"{flags.sandbox_id or flags.id}.log")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        asyncio.run(Daemon(flags, cfg).run())
    except Exception:
        log.exception("shim failed")
        return 1
    return 0


class _Exit(Exception):
    """Ends the daemon's task group."""


class Daemon:
    """One shim process: its sandbox, ttrpc server, events and ops endpoint."""

    def __init__(self, flags: Flags, cfg: ShimConfig) -> None:
        self.flags = flags
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.listener: socket.socket | None = None
        self.handed_off = False

    async def run(self) -> None:
        prelaunch = None
        if not self.flags.handoff_fd:  # a new sandbox: its first Create's bundle is our cwd
            from shim import _prelaunch

            prelaunch = await _prelaunch.start(self.flags.sandbox_id or self.flags.id, self.cfg,
                                               Path.cwd())
        try:
            await self._run(prelaunch)
        finally:
            if prelaunch is not None:
                await prelaunch.aclose()

    async def _run(self, prelaunch: Any) -> None:
        from shim import version
        from shim._events import EventPublisher
        from shim._opsserver import serve_ops
        from shim._resume import SandboxHandoff
        from shim._tracing import observe
        from shim.sandbox import Sandbox
        from shim.service import SERVICE, TaskService
        from shim.ttrpc import Method, TtrpcServer

        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_error_handler(log))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        self.events = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), self.flags.namespace)
        sandbox_id = self.flags.sandbox_id or self.flags.id
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                self.sandbox = Sandbox(sandbox_id, self.flags.namespace, self.cfg, self.events, tg)
                self.sandbox.prelaunch = prelaunch
                self.handoff = SandboxHandoff(self.sandbox)
                task = TaskService(self.sandbox, on_shutdown=self.stop.set)
                self.server = TtrpcServer(observe=observe(self.sandbox))
                self.server.register(SERVICE, {n: Method(r, f) for n, (r, f) in task.methods().items()})
                if self.flags.handoff_fd:
                    from shim._handoff import adopt

                    await adopt(self, int(self.flags.handoff_fd))
                else:
                    fd = int(os.environ.pop("KEEL_LISTEN_FD", "3"))
                    self._serve(socket.socket(fileno=fd))
                log.info("keel shim %s serving sandbox %s on %s", version(), sandbox_id, self.flags.socket)
                ops = await serve_ops(self)
                await self.stop.wait()
                ops.close()
                await self._exit()
                raise _Exit
        except* _Exit:
            pass
        await self.events.aclose()

    def _serve(self, listener: socket.socket) -> None:
        self.listener = listener
        self.tg.create_task(self.events.run(), name="events")
        self.tg.create_task(self.server.serve(listener), name="ttrpc")

    async def _exit(self) -> None:
        if self.handed_off:
            log.info("sandbox %s now served by the new shim; exiting", self.sandbox.id)
        else:
            log.info("shim of sandbox %s exiting", self.sandbox.id)
            await self.events.drain(timeout=2.0)
            await self.server.aclose()
            if self.flags.socket:
                Path(self.flags.socket).unlink(missing_ok=True)
        # Spans still queued get a bounded chance to reach the collector.
        await asyncio.to_thread(self.sandbox.tracing.close, 2.0)

    # -- handoff hooks (used by shim._handoff) -----------------------------

    async def freeze(self) -> tuple[list[Any], Any]:
        frozen = await self.server.freeze_all()
        try:
            await self.events.drain(timeout=2.0)
            record = await self.handoff.freeze()
        except BaseException:
            self.server.thaw_all()  # the sandbox thawed itself; serve containerd again
            raise
        return frozen, record

    def thaw(self) -> None:
        self.handoff.thaw()
        self.server.thaw_all()

    def sandbox_doc(self, record: Any) -> dict[str, Any]:
        from shim.state import document

        return document(record)

    async def restore(self, doc: dict[str, Any], ops: Any = None) -> str:
        """Take the sandbox over from a handoff's state; what took how long.
        *ops*: a connection to the agent's ops channel made before the freeze."""
        import time

        from shim.state import store

        t = [time.monotonic()]
        st = store(self.sandbox.dir)
        record = st.decode_checked(st.migrate(st.parse_doc(doc)))
        await self.handoff.restore(record)
        t.append(time.monotonic())
        how = await self.handoff.check_health(ops)
        t.append(time.monotonic())
        self.handoff.claim()
        t.append(time.monotonic())
        ms = [f"{(b - a) * 1000:.1f}" for a, b in zip(t, t[1:], strict=False)]
        return f"state {ms[0]} ms, agent check {ms[1]} ms ({how}), claim {ms[2]} ms"

    def go_live(self, listener: socket.socket,
                conns: list[tuple[socket.socket, bytes, list[tuple[int, bytes]]]]) -> None:
        self._serve(listener)
        for sock, unparsed, pending in conns:
            self.server.adopt_connection(sock, unparsed, pending)
        self.handoff.go_live()
        if self.sandbox.tracing.ratio > 0:
            self.sandbox.span_pump.kick()

    async def upgrade_shim(self, shim_path: str) -> Any:
        from keel.errors import Unavailable
        from shim._handoff import hand_off

        # The new shim checks the agent on its ops channel, which a
        # virtio-serial port gives one client: let go of ours first.
        self.sandbox.ops_frozen = True
        self.sandbox.release_ops()
        try:
            result = await hand_off(self, shim_path)
        except BaseException:
            self.sandbox.ops_frozen = False  # still ours
            raise
        self.handed_off = True
        self.server.release_all()
        # Exit once the reply to opsd is on its way.
        asyncio.get_running_loop().call_later(0.2, self.stop.set)
        if not result.serving:
            # Past commit nothing can be taken back: containerd sees the new
            # shim's crash and cleans the sandbox up, as for any dead shim.
            raise Unavailable(f"new shim {result.to_version} (pid {result.new_pid}) died after"
                              f" taking over sandbox {self.sandbox.id}")
        return result
