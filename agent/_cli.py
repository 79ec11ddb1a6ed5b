"""The agent's command line proper (agent/__main__.py guards it during upgrades).

    keel-agent --state-dir DIR --listen agent=unix:/path/agent.sock \\
               --listen ops=unix:/path/ops.sock [--listen-fd agent=N] \\
               [--runtime runc] [--log-level info] [--resume | --recover]
    keel-agent --preflight --state-dir DIR

Exit status: 0 after SIGTERM/SIGINT, 2 for a bad command line, 1 when it
cannot start (a listener cannot be opened, the state cannot be resumed...).

``--preflight`` is what an agent about to exec this release runs first
(agent/_upgrade.py): it imports the whole agent, reads the state file
(migrating it in memory, writing nothing) and prints
``{"agent_version": ..., "state_schema": ..., "api_version": ...}``; exit
status 0 means this release can resume that state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import _daemon, config, state
from agent._ops import agent_version
from agent.api import API_VERSION, MIN_API_VERSION
from keel.errors import KeelError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s keel-agent[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # The HTTP/2 stack logs every frame at DEBUG: far too much even for debugging the agent.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))


def preflight(argv: Sequence[str]) -> int:
    """``--preflight --state-dir DIR``: can this release resume that state?"""
    p = argparse.ArgumentParser(prog="keel-agent --preflight")
    p.add_argument("--preflight", action="store_true", required=True)
    p.add_argument("--state-dir", required=True, type=Path)
    ns = p.parse_args(argv)
    try:
        state.store(ns.state_dir).load()
    except KeelError as exc:
        print(f"keel-agent {agent_version()}: cannot resume this state: {exc}", file=sys.stderr)
        return 1
    json.dump({"agent_version": agent_version(), "state_schema": state.SCHEMA_VERSION,
               "api_version": API_VERSION, "min_api_version": MIN_API_VERSION}, sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--preflight" in argv:
        return preflight(argv)
    try:
        cfg = config.from_args(argv)
    except KeelError as exc:
        print(f"keel-agent: {exc}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    try:
        asyncio.run(_daemon.serve(cfg))
    except (KeelError, OSError) as exc:
        logging.getLogger("keel.agent").error("cannot run: %s", exc)
        if cfg.mode != "start":
            raise  # the guard in agent/__main__.py records why, then goes back
        return 1
    return 0
