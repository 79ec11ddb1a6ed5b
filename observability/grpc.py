"""W3C trace context on gRPC channels (grpclib): the client side.

The server side is a RecvRequest hook (``agent/_tracing.py``, and
``observability.spans.remote_parent`` for the shim's ops endpoint).
"""

from __future__ import annotations

from grpclib.client import Channel
from grpclib.events import SendRequest, listen

from observability.spans import TRACEPARENT, current_traceparent


def propagate(channel: Channel) -> None:
    """Have every call on *channel* carry the current span's ``traceparent``
    (when a sampled span is current; nothing otherwise)."""

    async def inject(event: SendRequest) -> None:
        value = current_traceparent()
        if value is not None:
            event.metadata[TRACEPARENT] = value

    listen(channel, SendRequest, inject)
