"""The pure parts of the agent upgrade: a state file of the first release is
migrated, and the configuration survives the old image's command line."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from agent import config as agent_config
from agent import state as agent_state


def test_state_schema_1_is_migrated() -> None:
    """A state file of the first release (no upgrades yet) reads as schema 2."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.json"
        path.write_text(json.dumps({"schema_version": 1, "kind": "keel-agent-state",
                                    "boot_id": "b1", "containers": [], "fds": {"listener:ops": 7}}))
        loaded = agent_state.store(Path(tmp)).load()
    assert loaded == agent_state.AgentState(boot_id="b1", fds={"listener:ops": 7})


def test_config_round_trips_through_argv() -> None:
    """What the old image passes to the new one gives the same configuration."""
    cfg = agent_config.from_args(["--state-dir", "/s", "--listen-fd", "agent=5", "--listen-fd",
                                  "ops=6", "--runtime", "crun", "--output-buffer-bytes", "8192",
                                  "--runtime-timeout", "2.5", "--log-level", "debug"])
    again = agent_config.from_args([*cfg.to_argv(), "--resume"])
    assert again == dataclasses.replace(cfg, mode="resume")
