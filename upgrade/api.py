"""What other packages may import from :mod:`upgrade` about releases.

The release layout (``<root>/<version>/`` virtualenvs and ``current``),
the entry-point paths an upgrade hands to a shim, and the compatibility
rule between releases.  The handoff protocol and the state store are
imported from their own modules (:mod:`upgrade.handoff`,
:mod:`upgrade.store`).
"""

from __future__ import annotations

from upgrade.errors import CorruptState, UnsupportedSchema
from upgrade.releases import (
    AGENT_ENTRY,
    DEFAULT_ROOT,
    SHIM_ENTRY,
    Manifest,
    Release,
    ReleaseStore,
    check_version,
    compatible,
    incompatibility,
    version_key,
)

__all__ = [
    "AGENT_ENTRY",
    "DEFAULT_ROOT",
    "SHIM_ENTRY",
    "CorruptState",
    "Manifest",
    "Release",
    "ReleaseStore",
    "UnsupportedSchema",
    "check_version",
    "compatible",
    "incompatibility",
    "version_key",
]
