"""Tracing for shim, agent and opsd (see docs/ARCHITECTURE.md, "Traces").

``spans``: the span model, W3C context and sampling (stdlib only);
``config``: ``[tracing]`` and ``OTEL_*``; ``export``: OTLP/HTTP export in a
thread; ``tracing.Tracing`` ties them together for one process.  Nothing is
imported here: ``shim start`` reads the config on every container start.
"""
