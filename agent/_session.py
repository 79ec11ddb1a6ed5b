"""One shim session owns the agent: the session key every call must carry.

A shim makes a random key when it starts a sandbox and keeps it in its
state file, so the shim that takes over in a handoff, and ``shim delete``,
present the same one.  The agent learns it from the first Hello that
carries it (metadata ``keel-session-key``) and keeps it in its own state,
so an in-place upgrade keeps enforcing it.  From then on a call on either
channel without that key is refused with PERMISSION_DENIED: a stray client
on ``agent.chan`` (a debugging tool, a second shim started by mistake)
cannot read output offsets away from the shim or change a container.

The key is not a secret against root on the host (it is in the shim's
0600 state file) nor against the guest (which runs the agent): it names the
session that owns the sandbox, so that accidents are refused.

Exceptions, each for a reason:

* ops ``Health`` answers anyone: it changes nothing, and the shim of an
  older release checks the agent there before it takes over (a downgrade).
* A Hello without a key while none is bound is a keyless session, as with
  every release before keys (tests and tools too).
* A Hello from a client of agent API 1 (a release before keys: a rollback
  of the shim) drops the key, with a warning: refusing it would make a
  rollback impossible for every sandbox a keyed release started.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable

from grpclib import Status
from grpclib.events import RecvRequest
from grpclib.exceptions import GRPCError

from agent.api import SESSION_KEY_API, SESSION_KEY_HEADER
from keel.errors import PermissionDenied

log = logging.getLogger("keel.agent.session")

#: Longest key accepted (the shim sends 32 hex digits).
MAX_KEY_CHARS = 128
#: Calls that pass the gate whatever they carry (see the module docstring).
_OPEN = ("/keel.agent.v1.AgentService/Hello", "/keel.ops.v1.OpsService/Health")

#: The key the current call presented ("" for none); Hello reads it.
_presented: contextvars.ContextVar[str] = contextvars.ContextVar("keel_session_key", default="")


class SessionGate:
    """Holds the bound key; ``on_request`` is every server's RecvRequest hook.

    *key* is the key the state file kept ("" for none); *keep* is called
    with the new key when it changes, to persist it.
    """

    def __init__(self, key: str, keep: Callable[[str], None]) -> None:
        self.key = key
        self._keep = keep
        self._refused = 0

    async def on_request(self, event: RecvRequest) -> None:
        presented = event.metadata.get(SESSION_KEY_HEADER, "")
        if not isinstance(presented, str) or len(presented) > MAX_KEY_CHARS:
            presented = "\0"  # never a bound key: refused below, unless the call is open
        _presented.set(presented)
        if not self.key or event.method_name in _OPEN or presented == self.key:
            return
        self._refused += 1
        if self._refused == 1 or self._refused % 1000 == 0:  # one line, not one per call
            log.warning("refused %s from %s: %s session key (%d refused so far)",
                        event.method_name, event.peer.addr() if event.peer else "?",
                        "a wrong" if presented else "no", self._refused)
        raise GRPCError(Status.PERMISSION_DENIED,
                        "this agent belongs to another session: calls must carry its session key")

    def hello(self, client_api: int, client: str) -> None:
        """Bind, check or drop the key for a Hello from *client* speaking *client_api*."""
        presented = _presented.get()
        if client_api < SESSION_KEY_API:
            if self.key:
                log.warning("client %r speaks agent API %d, before session keys: the session "
                            "key is dropped and calls are no longer checked", client, client_api)
                self._set("")
            return
        if not self.key:
            if presented and presented != "\0":
                self._set(presented)
                log.info("session key bound by %r", client)
            return
        if presented != self.key:
            self._refused += 1
            log.warning("refused Hello from %r: %s session key", client,
                        "a wrong" if presented else "no")
            raise PermissionDenied("this agent belongs to another session: Hello must carry "
                                   "its session key")

    def _set(self, key: str) -> None:
        self.key = key
        self._keep(key)
