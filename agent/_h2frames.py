"""A cheap ``repr`` for HTTP/2 DATA frames, for both ends of the agent API.

h2 (4.x) logs every received frame with ``logger.trace("...", repr(frame))``:
the ``repr`` runs even when nothing is logged, and hyperframe's DATA frame
``repr`` copies the whole payload and hex-encodes all of it before keeping
20 characters.  On the output path that is three extra passes over every
byte (the shim receiving ReadOutput answers, the agent receiving
WriteStdin).  :func:`install` gives DataFrame a ``repr`` that shows the
length and the first bytes instead.

Remove once h2 stops building the trace message when tracing is off.
"""

from __future__ import annotations

import binascii

from hyperframe.frame import DataFrame

#: Payload bytes shown by the repr.
_SHOWN = 10


def _body_repr(self: DataFrame) -> str:
    data = self.data
    shown = binascii.hexlify(data[:_SHOWN]).decode("ascii")
    return f"<{len(data)} bytes, hex:{shown}{'...' if len(data) > _SHOWN else ''}>"


def install() -> None:
    """Idempotent; affects only the string a DATA frame's repr returns."""
    DataFrame._body_repr = _body_repr  # type: ignore[method-assign,assignment]
