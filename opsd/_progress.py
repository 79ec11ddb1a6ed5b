"""How opsctl shows plans: a live progress bar on a terminal, plain lines otherwise.

Works on the wire types (``opsd_pb.Plan``): opsctl never imports opsd's
internals.  Exit codes of a finished plan live here too (EXIT_BY_STATE).
"""

from __future__ import annotations

from typing import TextIO

from opsd._pb.keel.opsd import v1 as pb

#: opsctl's exit code for a plan that ended in this state.
EXIT_BY_STATE = {"succeeded": 0, "rolled-back": 3, "failed": 4, "aborted": 5}
ACTIVE = ("running", "rolling-back")


def bar(plan: pb.Plan, width: int = 30) -> str:
    total = len(plan.targets)
    done = sum(t.state == "healthy" for t in plan.targets)
    filled = width * done // total if total else width
    batch = min(plan.batch + 1, plan.batches) if plan.batches else 0
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} sandboxes"
            f"  batch {batch}/{plan.batches}  {plan.state}")


def summary(plan: pb.Plan) -> str:
    return f"upgrade {plan.id} to {plan.to_version}: {plan.state}" + (
        f": {plan.message}" if plan.message else "")


def describe(plan: pb.Plan) -> list[str]:
    """The plan as a table: batches, sandboxes, versions, states."""
    comps = ",".join(plan.components)
    lines = [f"plan {plan.id}: to {plan.to_version} ({comps}), batches of {plan.batch_size},"
             f" pause {plan.pause_s:g} s, state {plan.state}"
             + (" (abort requested)" if plan.abort_requested else "")]
    for t in plan.targets:
        lines.append(f"  batch {t.batch + 1}  {t.sandbox_id:<24} shim {t.from_shim or '?'}"
                     f"  agent {t.from_agent or '?'}  -> {plan.to_version}  {t.state}"
                     + (f"  ({t.message})" if t.message and t.message != "healthy" else ""))
    if plan.message:
        lines.append(f"  {plan.message}")
    return lines


class Progress:
    """Feeds plan snapshots and event lines to *out*; a bar only on a TTY."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self._out = out
        self._tty = tty
        self._drawn = False

    def update(self, plan: pb.Plan, events: list[str]) -> None:
        for line in events:
            self._line(line)
        if self._tty:
            self._out.write("\r\x1b[K" + bar(plan))
            self._drawn = True
        self._out.flush()

    def close(self, plan: pb.Plan | None) -> None:
        if self._drawn:
            self._out.write("\n")
        if plan is not None:
            self._out.write(summary(plan) + "\n")
        self._out.flush()

    def _line(self, text: str) -> None:
        if self._drawn:
            self._out.write("\r\x1b[K")
            self._drawn = False
        self._out.write(text + "\n")
