"""What other packages (and opsctl) may import from opsd.

The opsctl <-> opsd wire API (generated from proto/keel/opsd/v1/opsd.proto),
the default paths, and the persisted plan's state names.
"""

from __future__ import annotations

import os
from pathlib import Path

from opsd._pb.keel.opsd import v1 as opsd_pb
from opsd.state import COMPONENTS, PlanState, TargetState

#: The API socket (0600, root only).
DEFAULT_SOCKET = Path("/run/keel/opsd.sock")
#: Where opsd persists its upgrade plan.
DEFAULT_STATE_DIR = Path("/var/lib/keel/opsd")


def default_state_root() -> Path:
    """Sandbox state root: $KEEL_STATE_ROOT, else /run/keel (as the shim's config)."""
    return Path(os.environ.get("KEEL_STATE_ROOT") or "/run/keel")


__all__ = [
    "COMPONENTS",
    "DEFAULT_SOCKET",
    "DEFAULT_STATE_DIR",
    "PlanState",
    "TargetState",
    "default_state_root",
    "opsd_pb",
]
