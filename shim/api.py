"""What other packages may import from the shim.

opsd finds sandboxes and their ops sockets on disk and reads their state
files; it talks to a running shim only over that socket (``OpsService``
in :mod:`shim.ops_pb` terms, the generated ``keel.ops.shim`` module).
``read_config``: the node's config file (``$KEEL_CONFIG`` or
``/etc/keel/config.toml``) as TOML tables, for opsd's own tables.
"""

from __future__ import annotations

from shim.config import read_file as read_config
from shim.dirs import SandboxDir, sandboxes
from shim.state import SandboxRecord, load_record

__all__ = ["SandboxDir", "SandboxRecord", "load_record", "read_config", "sandboxes"]
