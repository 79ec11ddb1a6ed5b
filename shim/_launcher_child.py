"""What a launcher fork becomes (shim/_launcher.py): the caller's cgroup,
namespaces and session, then the shim daemon or agent the exec path would
have started.

The launcher forks an *intermediate*, which sets up, forks the real child
and reports that child's pid on a pipe; the child waits for a go byte
(the caller's acknowledgement, relayed by the launcher) and then runs.
Nothing here returns to the launcher's code: every path ends in
``os._exit``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from shim._launcher_wire import LauncherError
from shim._proctitle import set_cmdline


def intermediate(op: str, req: dict[str, Any], fds: list[int], peer: int, w: int, go: int,
                 close: list[int]) -> None:
    """Forked from the launcher: set up, fork the real child (which waits for
    a byte on *go*), report its pid (or what went wrong) on *w*, exit."""
    try:
        for fd in close:
            os.close(fd)
        _join_cgroup(peer)
        if op == "agent":
            from shim.vmm.process import _nsinit

            _nsinit.enter_namespaces(frozenset(req.get("share") or ()))
        else:
            os.setsid()
        pid = os.fork()
        if pid:
            os.write(w, str(pid).encode())
            os._exit(0)
        os.close(w)
        if os.read(go, 1) != b"g":  # the caller never took our pid: it starts its own
            os._exit(0)
        os.close(go)
        _child(op, req, fds)  # never returns
    except BaseException as exc:  # noqa: BLE001 - the launcher reads this as the error
        try:
            os.write(w, f"{op}: {exc}".encode()[:4096])
        finally:
            os._exit(1)


def _join_cgroup(peer: int) -> None:
    """Move this process into *peer*'s cgroup (v2), unless already there."""
    try:
        theirs, mine = _cgroup(str(peer)), _cgroup("self")
    except OSError as exc:
        raise LauncherError(f"cannot read the caller's cgroup: {exc}") from None
    if theirs is None or theirs == mine:
        return
    with open(f"/sys/fs/cgroup{theirs}/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def _cgroup(pid: str) -> str | None:
    """The cgroup v2 path of process *pid* ("self" for this one), None if it has none."""
    with open(f"/proc/{pid}/cgroup") as f:
        return next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)


def _child(op: str, req: dict[str, Any], fds: list[int]) -> None:
    """The forked daemon, action or agent: become what the exec path would
    have started, run it, exit.  Never returns."""
    status = 1
    try:
        argv: list[str] = req["argv"]
        title = _become(op, req, fds)
        # As if exec'd: the agent's in-place upgrade re-execs from these.
        sys.argv = [sys.executable, *argv]
        sys.orig_argv = title
        if not set_cmdline(title, req["env"]):
            import setproctitle

            setproctitle.setproctitle(" ".join(title))
        if op == "agent":
            from agent.__main__ import main as agent_main

            status = agent_main(argv)
        else:
            from shim.__main__ import main as shim_main

            status = shim_main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass
        os._exit(status)


def _become(op: str, req: dict[str, Any], fds: list[int]) -> list[str]:
    """Take the state a fresh interpreter of *op* would start with (signals,
    logging, directory, environment, stdio, namespaces' PID 1); the command
    line the exec path would have had."""
    import logging
    import random

    # What a fresh interpreter starts with (SIGPIPE ignored: a write to
    # a closed socket raises instead of killing), not the launcher's.
    for sig, handler in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGCHLD, signal.SIG_DFL),
                         (signal.SIGINT, signal.default_int_handler),
                         (signal.SIGPIPE, signal.SIG_IGN), (signal.SIGXFSZ, signal.SIG_IGN)):
        signal.signal(sig, handler)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    random.seed()
    argv: list[str] = req["argv"]
    if op == "agent":
        from shim.vmm.process import _nsinit

        _nsinit.become_init(req["hostname"], req["log"], frozenset(req.get("share") or ()))
        from shim.vmm.api import AGENT_COMMAND

        return [*AGENT_COMMAND, *argv]
    os.environ["KEEL_LISTEN_FD"] = str(fds[0])
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return [sys.executable, "-m", "shim", *argv]
