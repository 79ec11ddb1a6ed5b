"""The end of a log file, for an error message that says what went wrong."""

from __future__ import annotations

from pathlib import Path


def tail(path: Path, limit: int = 800) -> str:
    """The last *limit* bytes of *path* as text, "(empty)" or "(none)" if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            data = f.read()
    except OSError:
        return "(none)"
    return data.decode(errors="replace").strip() or "(empty)"
