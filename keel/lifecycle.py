"""The states of a container's processes, and the table of legal moves.

Shim and agent track the same lifecycle on either side of the VM
boundary (containerd's ``process/init_state.go`` keeps one type per
state; a table says the same in less code).  A container's state is its
init process's; PAUSED exists only there.  An illegal move raises
FailedPrecondition naming the current state.
"""

from __future__ import annotations

import enum
import logging

from keel.errors import FailedPrecondition

log = logging.getLogger("keel.lifecycle")


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


#: Legal transitions.  CREATED -> STOPPED: killed (or deleted) before start.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.RUNNING, State.STOPPED}),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPED}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPED}),
    State.STOPPED: frozenset(),
}


class Lifecycle:
    """Mixin for an object with a ``state`` moved only through the table.

    The owner sets ``state`` once at construction (or from a persisted
    record) and moves it with :meth:`to` afterwards.
    """

    state: State
    #: Log every move at INFO (the agent's log is the guest's history).
    log_moves = False

    @property
    def what(self) -> str:
        """How errors name the object ("container c1", "exec e1 of container c1")."""
        raise NotImplementedError

    def to(self, new: State, action: str) -> bool:
        """Move to *new*; False if already there.

        Raises FailedPrecondition ("cannot *action* ...: it is ...") when the
        table forbids the move.
        """
        if new is self.state:
            return False
        if new not in TRANSITIONS[self.state]:
            raise FailedPrecondition(f"cannot {action} {self.what}: it is {self.state.value}")
        if self.log_moves:
            log.info("%s: %s -> %s", self.what, self.state.value, new.value)
        self.state = new
        return True

    def require(self, action: str, *states: State) -> None:
        """FailedPrecondition unless the current state is one of *states*."""
        if self.state not in states:
            raise FailedPrecondition(f"cannot {action} {self.what}: it is {self.state.value}")
