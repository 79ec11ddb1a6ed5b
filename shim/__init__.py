"""containerd-shim-keel-v2: the containerd shim v2 of Keel."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """This release's version (package metadata; '0+unknown' from a tree)."""
    from importlib import metadata

    try:
        return metadata.version("keel")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str):  # lazy: the start/delete paths must stay light
    if name == "events_pb":
        from shim._pb.containerd import events

        return events
    raise AttributeError(name)
