"""An OTLP/HTTP trace receiver for tests: the real wire format, decoded
with the ``opentelemetry-proto`` classes (as a collector would).

    with Receiver() as rx:          # http://127.0.0.1:<port>/v1/traces
        ...
        spans = rx.wait_for(lambda spans: ..., timeout=30)

``stall=True`` makes it accept requests and never answer (a hung collector).
"""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: bool
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def child(spans: list[ReceivedSpan], parent: ReceivedSpan, name: str) -> ReceivedSpan | None:
    """The span *name* whose parent is *parent* (same trace), if it arrived."""
    return next((s for s in spans if s.name == name and s.parent_span_id == parent.span_id
                 and s.trace_id == parent.trace_id), None)


def decode(body: bytes) -> list[ReceivedSpan]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    service=str(resource.get("service.name", "")), name=s.name,
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    error=s.status.code == 2, resource=resource))
    return out


class Receiver:
    def __init__(self, *, stall: bool = False) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests += 1
                if stall:
                    receiver._release.wait(120)
                    return
                if self.path != "/v1/traces" or \
                        self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(404)
                    return
                spans = decode(body)
                with receiver._lock:
                    receiver.spans.extend(spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, ok: Callable[[list[ReceivedSpan]], Any], timeout: float = 30.0) -> Any:
        """Poll until ``ok(spans)`` is truthy; its value.  AssertionError on timeout."""
        end = time.monotonic() + timeout
        while True:
            got = ok(self.snapshot())
            if got:
                return got
            if time.monotonic() > end:
                names = sorted({f"{s.service}:{s.name}" for s in self.snapshot()})
                raise AssertionError(f"receiver: condition not met in {timeout}s;"
                                     f" {self.requests} requests, spans seen: {names}")
            time.sleep(0.1)


def refused_endpoint() -> str:
    """An endpoint on loopback where nothing listens (connections refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/traces"
