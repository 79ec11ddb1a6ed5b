"""VMM backends: one registry used by create and restore."""

from __future__ import annotations

from keel.errors import InvalidArgument
from shim.vmm.api import Backend, BackendFactory


def _process() -> Backend:
    from shim.vmm.process import ProcessBackend

    return ProcessBackend()


def _qemu() -> Backend:
    from shim.vmm.qemu import QemuBackend

    return QemuBackend()


BACKENDS: dict[str, BackendFactory] = {"process": _process, "qemu": _qemu}


def backend(name: str) -> Backend:
    """The backend registered as *name*; InvalidArgument if there is none."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown VMM backend {name!r} (known: {', '.join(sorted(BACKENDS))})"
        ) from None
    return factory()
