"""``keel-agent`` / ``python -m agent``: the entry point, and the upgrade guard.

The command line itself is agent/_cli.py.  This module is the guard of an
in-place upgrade (DESIGN section 6; agent/PROTOCOL.md "In-place upgrade"):
a release that was just exec'd with ``--resume`` and fails before it has
committed -- an ImportError in any of its modules, an exception while
resuming, a state it cannot read, an exit -- must not end this process
(PID 1 of the sandbox: its death kills every container).  So it imports
nothing but the standard library before the ``try``, and on failure reads
``<state-dir>/upgrade.json`` (written by the old image, removed by the
commit) with plain JSON and execve()s again, with every fd listed there
made inheritable once more:

* first failure (``rollbacks`` 0): the previous release, exactly as it was
  started (executable, argv, environment) plus ``--resume``: it resumes
  from the same, untouched state file;
* the previous release fails to resume too (``recoveries`` 0): it again,
  with ``--recover``: a fresh start on the inherited listeners, the
  unreadable state kept aside (containers keep running, unmanaged);
* after that it gives up and exits: nothing is left to try.

Keep this file stdlib-only and in step with ``state.UpgradeRecord``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Sequence


def _say(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} keel-agent[{os.getpid()}] ERROR keel.agent.guard: {message}",
          file=sys.stderr, flush=True)


def _state_dir(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--state-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--state-dir="):
            return arg.split("=", 1)[1]
    return None


def _write(path: str, doc: dict[str, object]) -> None:
    tmp = f"{path}.guard.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fall_back(args: list[str], failure: str) -> None:
    """execve the previous release (see the module docstring); returns if it cannot."""
    state_dir = _state_dir(args)
    if state_dir is None:
        return
    path = os.path.join(state_dir, "upgrade.json")
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
        previous = doc["previous"]
    except FileNotFoundError:
        return  # committed (or never an upgrade): an ordinary failure
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _say(f"cannot roll back: {path} is unreadable: {exc}")
        return
    if "--resume" in args and not doc.get("rollbacks"):
        doc["rollbacks"], mode = 1, "--resume"
    elif not doc.get("recoveries"):
        doc["recoveries"], mode = 1, "--recover"
    else:
        _say(f"giving up: the previous release could not start either ({failure})")
        return
    doc["failure"] = failure
    try:
        _write(path, doc)
        for fd in dict(doc.get("fds", {})).values():
            try:
                os.set_inheritable(int(fd), True)
            except OSError:
                pass  # closed already: the previous release will say so
        argv = [a for a in previous["argv"] if a not in ("--resume", "--recover")] + [mode]
        _say(f"this release failed before it could resume ({failure}); exec the previous "
             f"release {doc.get('from_version', '?')} ({previous['executable']}) {mode}")
        sys.stdout.flush()
        os.execve(previous["executable"], argv, previous["env"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        _say(f"cannot exec the previous release: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    guarded = "--resume" in args or "--recover" in args
    try:
        from agent import _cli

        status = _cli.main(args)
    except BaseException as exc:
        if guarded and not isinstance(exc, SystemExit | KeyboardInterrupt):
            traceback.print_exc()
        if guarded:
            _fall_back(args, f"{type(exc).__name__}: {exc}")
        raise
    if guarded and status != 0:
        _fall_back(args, f"exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
