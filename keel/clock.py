"""Timestamps as containerd's protobuf messages carry them."""

from __future__ import annotations

import datetime


def utc_of_ns(ns: int) -> datetime.datetime:
    """An aware UTC datetime for nanoseconds since the epoch (protobuf Timestamp)."""
    return datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
