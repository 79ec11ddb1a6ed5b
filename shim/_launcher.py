"""The launcher: forks shim daemons and process-backend agents from an
interpreter that has imported them already.

Every pod start paid for the start-up of two more interpreters after
``start`` -- the daemon's and the agent's, each ~0.2 s of imports (grpclib,
betterproto, the generated APIs) -- and ``ctr run --rm`` took 5x as long
as with the runc shim.  A Go shim re-execs itself for free;
Python cannot, so one process per release keeps those modules imported
and forks: a forked daemon serves within milliseconds of ``start``.

* **Who starts it**: ``start``.  When no launcher of this release answers,
  ``start`` runs the daemon the plain way (exec) and spawns a launcher in
  the background for the pods that follow.  It is a cache, never needed:
  every caller falls back to exec when it is absent, busy past a deadline
  or says no.
* **Lifetime**: it exits after ``launcher_idle_s`` seconds without a
  request (``shim`` config; 0 disables the launcher), or on SIGTERM,
  removing its socket.  It owns nothing: what it forked is reparented
  at once (double fork) and lives on without it.
* **Which release**: the socket's name is a hash of the interpreter,
  the package location and the newest mtime of the modules
  (:func:`release_key`): an upgrade, a reinstall or an edit gets a new
  launcher; the old one idles out.
* **Trust**: the socket is 0600 in a 0700 directory under the state root,
  and each connection's peer credentials must carry the launcher's uid.
  A request names one of two things the launcher does itself -- serve as
  a shim daemon (``shim``), start an agent in new namespaces (``agent``) --
  never a program to execute.
* **Not** ``delete``: containerd's post-exit ``delete`` finds nothing left
  to do, so its cost is the interpreter's start, which a launcher client
  pays as well.
* **What a child inherits** from the caller, not from the launcher: its
  cgroup (the caller's, read from ``/proc/<peer pid>/cgroup``), working
  directory, environment, stdio, and a process title that reads like the
  command line the exec path would have had.  Python's hash seed is the
  launcher's, shared by its children (as with any fork).

The one-message protocol and its wire format are in
``shim._launcher_wire``; the client half (:func:`request`, :func:`spawn`:
``start`` runs it, standard library only) in ``shim._launcher_client``; the
serving process in ``shim._launcher_server``; what a fork becomes in
``shim._launcher_child``, its exec-like command line in ``shim._proctitle``.
Callers import the client's names from here, and ``python -m
shim._launcher`` starts a launcher.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shim._launcher_client import (
    PACKAGES,
    needs_spawn,
    note,
    release_key,
    request,
    socket_path,
    spawn,
)
from shim._launcher_wire import ACK, MAX_FDS, MAX_MESSAGE, LauncherError, NotRunning, recv, send

__all__ = [
    "ACK", "MAX_FDS", "MAX_MESSAGE", "PACKAGES", "LauncherError", "NotRunning", "main",
    "needs_spawn", "note", "recv", "release_key", "request", "send", "socket_path", "spawn",
]

#: The names these functions had before the protocol got its own module.
_send, _recv = send, recv


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging

    from shim._launcher_server import Launcher

    p = argparse.ArgumentParser(prog="python -m shim._launcher",
                                description="Fork Keel shim daemons and process agents from "
                                            "a warm interpreter (started by the shim's start).")
    p.add_argument("--socket", required=True, type=Path, help="socket to serve on")
    p.add_argument("--idle", type=float, default=600.0, help="exit after this many idle seconds")
    p.add_argument("--tracing", action="store_true",
                   help="also warm the span exporter (the config traces): see TRACING_MODULES")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s launcher[%(process)d] %(levelname)s %(message)s")
    return Launcher(args.socket, args.idle, tracing=args.tracing).serve()


if __name__ == "__main__":
    sys.exit(main())
