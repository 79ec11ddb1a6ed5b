"""A small asyncio QMP client (QEMU Machine Protocol, research/qemu.md section 9).

QMP is newline-delimited JSON over the sandbox's ``qmp.sock``: a greeting,
``qmp_capabilities``, then ``{"execute": ...}`` commands answered by
``{"return": ...}`` or ``{"error": {"class", "desc"}}``; asynchronous
``{"event": ...}`` lines may come in between and are kept (bounded) for
:meth:`QmpClient.events`.

qemu services one QMP client per socket at a time, so sessions are short:
``async with QmpClient.connect(path) as qmp: ...``; the sandbox serialises
its own sessions, and a shim never keeps one open across a handoff.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from keel.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable

#: Longest line accepted from qemu (query results are small).
LINE_LIMIT = 1 << 20
#: Seconds one command may take by default.
COMMAND_TIMEOUT_S = 5.0


class QmpError(Internal):
    """qemu refused a command; ``error_class`` is QMP's (``GenericError``, ...)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"qmp {command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    """One QMP session.  Not safe for concurrent commands: callers serialise."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self.greeting: dict[str, Any] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: str, timeout: float = COMMAND_TIMEOUT_S) -> AsyncIterator[QmpClient]:
        """Open a session (greeting + capabilities negotiation) on *path*.

        Raises Unavailable when qemu is not there or does not answer in time.
        """
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=LINE_LIMIT)
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"qmp {path}: cannot connect: {exc!r}") from exc
        client = cls(reader, writer)
        try:
            client.greeting = await client._read(timeout)
            if "QMP" not in client.greeting:
                raise Internal(f"qmp {path}: unexpected greeting {client.greeting!r}")
            await client.execute("qmp_capabilities", timeout=timeout)
            yield client
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read(self, timeout: float) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                line = await self._reader.readline()
        except TimeoutError:
            raise Unavailable(f"qmp: no answer within {timeout}s") from None
        except OSError as exc:  # qemu died mid-command (an abort resets the connection)
            raise Unavailable(f"qmp: connection lost: {exc!r}") from exc
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise Internal(f"qmp: line longer than {LINE_LIMIT} bytes") from exc
        if not line:
            raise Unavailable("qmp: qemu closed the connection")
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise Internal(f"qmp: not JSON: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise Internal(f"qmp: not an object: {line[:200]!r}")
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float = COMMAND_TIMEOUT_S) -> Any:
        """Run *command*; returns its ``return`` value, raises QmpError on ``error``."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
        except OSError as exc:
            raise Unavailable(f"qmp {command}: {exc!r}") from exc
        while True:
            reply = await self._read(timeout)
            if "event" in reply:
                self._events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(command, str(err.get("class")), str(err.get("desc")))
            if "return" in reply:
                return reply["return"]

    def events(self) -> list[dict[str, Any]]:
        """Events received so far in this session (the newest 256)."""
        return list(self._events)


# -- commands the backend uses ------------------------------------------------------------


async def status(qmp: QmpClient) -> str:
    """The run state: ``running``, ``paused``, ``inmigrate``, ``shutdown``, ..."""
    return str((await qmp.execute("query-status"))["status"])


async def add_vcpu(qmp: QmpClient) -> int:
    """Plug the first free vCPU slot; returns the number of vCPUs now present.

    Needs a machine with CPU hotplug (q35, pc; ``-smp N,maxcpus=M``):
    raises FailedPrecondition when every slot is used.  The new CPU starts
    offline in the guest until something writes ``1`` to its ``online``.
    """
    slots = await qmp.execute("query-hotpluggable-cpus")
    free = [s for s in slots if not s.get("qom-path")]
    if not free:
        raise FailedPrecondition("no free vCPU slot (maxcpus reached)")
    slot = min(free, key=lambda s: tuple(sorted(s["props"].items())))
    props = slot["props"]
    ident = "keel-cpu-" + "-".join(str(props[k]) for k in sorted(props))
    await qmp.execute("device_add", {"driver": slot["type"], "id": ident, **props})
    return len(slots) - len(free) + 1


async def add_memory(qmp: QmpClient, mib: int) -> str:
    """Plug a *mib* MiB DIMM (q35/pc, ``-m ..,slots=S,maxmem=M``); returns its id.

    The guest sees new memory blocks, online when it booted with
    ``memhp_default_state=online`` (the backend passes it), else offline.
    """
    if mib <= 0 or mib % 128:
        raise InvalidArgument(f"memory hotplug size must be a positive multiple of 128 MiB, not {mib}")
    devices = await qmp.execute("query-memory-devices")
    used = {str(d.get("data", {}).get("id")) for d in devices}
    index = next(i for i in range(len(used) + 1) if f"keel-dimm{i}" not in used)
    backend = f"keel-mem{index}"
    await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": backend,
                                     "size": mib << 20})
    try:
        await qmp.execute("device_add", {"driver": "pc-dimm", "id": f"keel-dimm{index}",
                                         "memdev": backend})
    except QmpError:
        with contextlib.suppress(QmpError):
            await qmp.execute("object-del", {"id": backend})
        raise
    return f"keel-dimm{index}"
