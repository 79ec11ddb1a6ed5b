"""Reading a Prometheus endpoint in tests: GET, parse with prometheus_client, pick samples."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str, timeout: float = 15.0) -> tuple[int, str, bytes]:
    """Status, content type and body of GET *url* (an HTTP error's too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def of(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples of *name* whose labels include *labels*."""
    want = set(labels.items())
    return [(dict(lbls), v) for (n, lbls), v in samples.items() if n == name and want <= lbls]
