"""What other packages may import from the shim.

opsd finds sandboxes and their ops sockets on disk and reads their state
files; it talks to a running shim only over that socket (``OpsService``
in :mod:`shim.ops_pb` terms, the generated ``keel.ops.shim`` module).
"""

from __future__ import annotations

from shim.dirs import SandboxDir, sandboxes
from shim.state import SandboxRecord, load_record

__all__ = ["SandboxDir", "SandboxRecord", "load_record", "sandboxes"]
