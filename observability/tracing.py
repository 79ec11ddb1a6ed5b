"""``Tracing``: one process's tracer, the export of its spans, and followers."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from observability.config import TracingConfig
from observability.spans import Span, Tracer


class Tracing:
    """One process's tracing: its tracer, the export of its spans (and of
    spans it takes from elsewhere, the guest's), and live followers."""

    def __init__(self, service: str, config: TracingConfig,
                 resource: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.resource = dict(resource or {})
        self.tracer = Tracer(service, self.ingest, ratio=config.start_ratio)
        #: Spans dropped before they reached the exporter (the agent's buffer, refused guest spans).
        self.dropped_elsewhere = 0
        self._exporter: object | None = None
        self._followers: list[Callable[[Span], None]] = []

    @property
    def ratio(self) -> float:
        return self.tracer.ratio

    def set_ratio(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be within 0 and 1, not {ratio}")
        self.tracer.ratio = ratio

    def ingest(self, span: Span) -> None:
        """Export *span* and show it to followers (called on the event loop)."""
        exporter = self._exporter
        if exporter is None:
            from observability.export import Exporter

            exporter = self._exporter = Exporter(self.config, self.resource)
        exporter(span)  # type: ignore[operator]
        for follower in list(self._followers):
            follower(span)

    def follow(self, callback: Callable[[Span], None]) -> Callable[[], None]:
        """Call *callback* with every span as it ends; returns the unfollow."""
        self._followers.append(callback)
        return lambda: self._followers.remove(callback) if callback in self._followers else None

    @property
    def dropped(self) -> int:
        exported = getattr(self._exporter, "dropped", 0)
        return int(exported) + self.dropped_elsewhere

    def flush(self, timeout: float = 5.0) -> bool:
        flush = getattr(self._exporter, "flush", None)
        return True if flush is None else bool(flush(timeout))

    def close(self, timeout: float = 2.0) -> None:
        close = getattr(self._exporter, "close", None)
        if close is not None:
            close(timeout)

