"""containerd-shim-keel-v2: the containerd shim v2 of Keel."""

from __future__ import annotations


def version() -> str:
    """This release's version (keel.release: package metadata; '0+unknown' from a tree)."""
    from keel import release

    return release.version()


def __getattr__(name: str):  # lazy: the start/delete paths must stay light
    if name == "events_pb":
        from shim._pb.containerd import events

        return events
    if name == "keel_events_pb":
        from shim._pb.keel.events import v1

        return v1
    raise AttributeError(name)
