"""The shim's part of console sessions: the switch, the audit records, the relay.

opsd drives a session (``opsd/_console.py``); the shim checks that the
sandbox's console is enabled, writes the session's audit records and relays
each call to the agent's ops channel (``agent/_console.py``) on the
sandbox's one ops connection.  The shim keeps no session state: opsd holds
the offsets, so a session goes on through a shim handoff.

The switch is ``[console] enabled`` in the config unless set live
(``opsctl console enable|disable``), which is persisted in the sandbox's
state and so kept by the next shim.  Disabling refuses new sessions; open
ones go on until they end or ``opsctl console kill`` ends them.

Audit records go to ``<sandbox dir>/audit.log`` (0600, one JSON object a
line) and to the shim's log.  A session whose start record cannot be
written does not start.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from agent.api import ops_pb
from keel.errors import FailedPrecondition, ResourceExhausted
from shim._agentconn import ops_call

if TYPE_CHECKING:
    from shim.sandbox import Sandbox

log = logging.getLogger("keel.shim.console")
T = TypeVar("T")

#: Seconds a relayed call may take beyond the wait it asks the agent for.
CALL_S = 10.0
#: Characters of a command kept in an audit record.
MAX_AUDIT_ARGV_CHARS = 4096


def enabled(sb: Sandbox) -> bool:
    return sb.config.console_enabled if sb.console is None else sb.console


def set_enabled(sb: Sandbox, on: bool, caller_uid: int) -> bool:
    """Switch the sandbox's console; persisted before it takes effect."""
    before = sb.console
    sb.console = on
    try:
        sb.persist()
    except OSError as exc:
        sb.console = before
        raise ResourceExhausted(f"cannot record the console switch: {exc}") from exc
    audit(sb, {"event": "console-enabled" if on else "console-disabled", "uid": caller_uid})
    return on


def refusal(sb: Sandbox) -> str:
    return (f"the console of sandbox {sb.id} is disabled; enable it with: opsctl console enable"
            f" {sb.id} (or [console] enabled = true in the Keel config for new sandboxes)")


def audit(sb: Sandbox, record: dict[str, Any]) -> None:
    """Append *record* to the sandbox's audit log (and the shim's log); raises OSError."""
    line = json.dumps({"time": round(time.time(), 3), "sandbox": sb.id, **record},
                      sort_keys=True)
    fd = os.open(sb.dir.audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    log.info("audit: %s", line)


async def relay(sb: Sandbox, call: Callable[[ops_pb.OpsServiceStub], Awaitable[T]],
                wait_ms: int = 0) -> T:
    """*call* on the agent's ops channel, within its wait plus CALL_S."""
    if sb.ops is None:
        raise FailedPrecondition(f"sandbox {sb.id} has no running agent")
    return await ops_call(sb.ops, call, CALL_S + wait_ms / 1000)


async def start(sb: Sandbox, req: ops_pb.ConsoleStartRequest) -> ops_pb.ConsoleStartResponse:
    if not enabled(sb):
        raise FailedPrecondition(refusal(sb))
    caller = req.caller or ops_pb.ConsoleCaller()
    record = {"event": "console-start", "session": req.session_id,
              "container": req.container_id, "argv": _argv(req.argv),
              "terminal": bool(req.terminal), "uid": caller.uid, "pid": caller.pid,
              "tty": caller.tty[:64]}
    try:
        audit(sb, record)
    except OSError as exc:
        raise ResourceExhausted(f"cannot write the audit record, so no console session: {exc}"
                                ) from exc
    req.caller = ops_pb.ConsoleCaller()  # the agent has no use for it
    resp = await relay(sb, lambda s: s.console_start(req))
    log.info("console session %s started: pid %d in the sandbox", req.session_id, resp.pid)
    return resp


async def remove(sb: Sandbox, req: ops_pb.ConsoleRemoveRequest) -> ops_pb.ConsoleRemoveResponse:
    resp = await relay(sb, lambda s: s.console_remove(ops_pb.ConsoleRemoveRequest(
        session_id=req.session_id)))
    try:
        audit(sb, {"event": "console-end", "session": req.session_id,
                   "reason": req.reason[:200],
                   "exit_status": resp.exit_status if resp.exited else None,
                   "bytes_in": req.bytes_in, "bytes_out": req.bytes_out})
    except OSError as exc:
        log.error("console session %s ended, but its audit record could not be written: %s",
                  req.session_id, exc)
    return resp


def _argv(argv: list[str]) -> list[str]:
    kept, size = [], 0
    for arg in argv:
        size += len(arg)
        if size > MAX_AUDIT_ARGV_CHARS:
            kept.append("...")
            break
        kept.append(arg)
    return kept
