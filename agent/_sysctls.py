"""Network sysctls the agent sets in its own network namespace for a container.

In a VM the pod's containers share the guest's network namespace (the VM
is the pod's boundary), so their specs name no network namespace and runc
refuses every ``net.*`` sysctl ("not allowed in host network namespace").
The shim moves those out of ``linux.sysctl`` into the annotation
`NET_SYSCTLS_ANNOTATION` (a JSON object, name -> value); the agent takes
them from the spec and writes them under ``/proc/sys`` before ``runc
create``, as runc writes sysctls (dots become slashes), and as Kata's
agent does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from agent.api import NET_SYSCTLS_ANNOTATION
from keel.errors import FailedPrecondition, InvalidArgument

PROC_SYS = Path("/proc/sys")
#: ``net.`` then dot-separated names (no empty part, no ``/``, no ``..``).
_NAME = re.compile(r"net(\.[A-Za-z0-9_-]+)+")


def take_net_sysctls(spec: dict[str, Any]) -> dict[str, str]:
    """Remove the annotation from *spec* and return its sysctls (empty without it).

    InvalidArgument for a malformed annotation, a name outside ``net.``,
    or a spec that also asks for a network namespace of its own (there
    runc applies ``net.*`` sysctls itself).
    """
    annotations = spec.get("annotations")
    if not isinstance(annotations, dict) or NET_SYSCTLS_ANNOTATION not in annotations:
        return {}
    raw = annotations.pop(NET_SYSCTLS_ANNOTATION)
    try:
        sysctls = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        sysctls = None
    if not isinstance(sysctls, dict) or not all(isinstance(v, str) for v in sysctls.values()):
        raise InvalidArgument(f"annotation {NET_SYSCTLS_ANNOTATION} must be a JSON object of "
                              f"strings, not {raw!r}")
    for name in sysctls:
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"annotation {NET_SYSCTLS_ANNOTATION}: {name!r} is not a"
                                  " net.* sysctl")
    namespaces = (spec.get("linux") or {}).get("namespaces") or ()
    if sysctls and any(isinstance(ns, dict) and ns.get("type") == "network" for ns in namespaces):
        raise InvalidArgument(f"annotation {NET_SYSCTLS_ANNOTATION} on a container with a network"
                              " namespace of its own")
    return sysctls


def apply(sysctls: dict[str, str], proc_sys: Path = PROC_SYS) -> None:
    """Write each sysctl in this process's network namespace; FailedPrecondition
    naming the first one that cannot be written."""
    for name, value in sysctls.items():
        path = proc_sys.joinpath(*name.split("."))
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(value)
        except OSError as exc:
            raise FailedPrecondition(f"sysctl {name}={value!r}: {exc.strerror or exc}") from exc
