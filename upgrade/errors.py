"""Errors of persisted state and release handling."""

from __future__ import annotations

from keel.errors import FailedPrecondition


class CorruptState(FailedPrecondition):
    """A state file exists but cannot be read; it is left untouched."""


class UnsupportedSchema(FailedPrecondition):
    """A state file was written by a newer release than this one reads."""
