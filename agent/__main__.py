"""``keel-agent`` / ``python -m agent``: the guest agent's command line.

    keel-agent --state-dir DIR --listen agent=unix:/path/agent.sock \\
               --listen ops=unix:/path/ops.sock [--listen-fd agent=N] \\
               [--runtime runc] [--log-level info]

Exit status: 0 after SIGTERM/SIGINT, 2 for a bad command line, 1 when it
cannot start (a listener cannot be opened, ...).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from agent import _daemon, config
from agent.errors import KeelError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s keel-agent[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # The HTTP/2 stack logs every frame at DEBUG: far too much even for debugging the agent.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
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
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
