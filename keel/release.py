"""Which Keel release this code is.

An installed release knows its version from its package metadata.  A
guest image holds the agent's packages without metadata, so the image
build writes the release it was built from into ``keel/RELEASE``
(:func:`write_marker`), and the agent in the VM reports that.  A source
tree with neither is ``0+unknown``.
"""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

__all__ = ["MARKER", "UNKNOWN", "version", "write_marker"]

UNKNOWN = "0+unknown"
#: The file, next to this module, that names the release of a copied tree.
MARKER = "RELEASE"


@functools.cache
def version() -> str:
    """This code's release: package metadata, else the marker file, else ``0+unknown``."""
    try:
        return metadata.version("keel")
    except metadata.PackageNotFoundError:
        pass
    try:
        text = (Path(__file__).parent / MARKER).read_text().strip()
    except OSError:
        return UNKNOWN
    return text if text and len(text) < 64 and text.isprintable() else UNKNOWN


def write_marker(keel_dir: Path, release: str) -> None:
    """Name *release* in a copied ``keel`` package directory."""
    (keel_dir / MARKER).write_text(release + "\n")
