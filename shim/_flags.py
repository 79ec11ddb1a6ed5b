"""containerd's shim command line: Go ``flag`` syntax, action word last.

``-namespace ns -address a -publish-binary p -id id [-debug] [-bundle b] start|delete``
(research: containerd-shim.md 2.2).  Hand-parsed because argparse does not
speak single-dash long flags, and the start path must import little.
"""

from __future__ import annotations

import dataclasses

_VALUED = {"namespace", "address", "publish-binary", "id", "bundle", "socket", "sandbox-id",
           "handoff-fd"}
_BOOL = {"debug", "v", "help", "h"}

USAGE = """usage: containerd-shim-keel-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] [-bundle DIR] ACTION

The containerd shim v2 of Keel; containerd runs it, people rarely do.

actions:
  start     start (or join) the sandbox's shim; print its ttrpc address
  delete    clean up after a shim containerd can no longer reach; print a DeleteResponse
  (none)    serve (the daemon that start launches)

flags:
  -namespace NS        containerd namespace
  -address ADDR        containerd's gRPC socket
  -publish-binary BIN  containerd binary (unused: events go over $TTRPC_ADDRESS)
  -id ID               task id
  -bundle DIR          bundle directory (delete)
  -debug               debug logging
  -v                   print the version and exit
"""


class FlagError(ValueError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Flags:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    sandbox_id: str = ""
    handoff_fd: str = ""
    debug: bool = False
    version: bool = False
    help: bool = False
    action: str = ""


def parse(argv: list[str]) -> Flags:
    values: dict[str, object] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, val = arg.lstrip("-").partition("=")
        if name in _BOOL:
            key = {"v": "version", "h": "help"}.get(name, name)
            values[key] = val.lower() not in ("false", "0") if eq else True
        elif name in _VALUED:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise FlagError(f"flag needs an argument: -{name}")
                val = argv[i]
            values[name.replace("-", "_")] = val
        else:
            raise FlagError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if len(rest) > 1:
        raise FlagError(f"unexpected arguments: {' '.join(rest[1:])}")
    if rest:
        if rest[0] not in ("start", "delete"):
            raise FlagError(f"unknown action {rest[0]!r} (expected start or delete)")
        values["action"] = rest[0]
    return Flags(**values)  # type: ignore[arg-type]
