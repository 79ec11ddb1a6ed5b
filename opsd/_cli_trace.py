"""``opsctl trace``: switch tracing of running sandboxes, follow their spans.

    opsctl trace on  [SANDBOX ...|--all] [--ratio R]
    opsctl trace off [SANDBOX ...|--all]
    opsctl trace SANDBOX --follow [--json]

``--follow`` needs no collector: opsd streams the sandbox's spans (the
shim's and its agent's) as they end, and opsctl prints each trace as an
indented tree ``HOLD_S`` after its top span ended (a span whose parent is
elsewhere, containerd's or opsd's, is a top).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any, TextIO

from opsd._client import CliError, call
from opsd._pb.keel.opsd import v1 as pb

#: How long a span is held for late children (and for its parent) before it is printed.
HOLD_S = 2.0
#: Attributes shown on a tree line (the others are in --json).
SHOWN = {"keel.container.id": "container", "keel.exec.id": "exec",
         "process.command_args": "args", "keel.sandbox.id": "sandbox"}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "trace", help="switch tracing of running sandboxes; follow a sandbox's spans",
        description="on|off: set the sampling ratio of running sandboxes (shim and agent),"
        " live and kept across shim upgrades.  SANDBOX --follow: print its spans as they end,"
        " as indented trees with durations (no collector needed).  Spans are exported to the"
        " OTLP endpoint of the node config's [tracing] table.",
        epilog="examples: opsctl trace on --all --ratio 0.1;  opsctl trace off pod1;"
        "  opsctl trace pod1 --follow")
    p.add_argument("words", nargs="+", metavar="on|off|SANDBOX",
                   help="on or off and the sandboxes, or the sandbox to follow")
    p.add_argument("--all", action="store_true", help="every sandbox of this node")
    p.add_argument("--ratio", type=_ratio, default=1.0, metavar="R",
                   help="sampling ratio of new traces with on, 0 to 1 (%(default)s)")
    p.add_argument("--follow", action="store_true", help="print the sandbox's spans as they end")
    p.add_argument("--json", action="store_true", help="one JSON object per span or result")
    p.set_defaults(func=cmd_trace)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio between 0 and 1, not {text!r}")
    return value


def cmd_trace(args: argparse.Namespace) -> int:
    verb, rest = args.words[0], args.words[1:]
    if verb in ("on", "off"):
        if args.follow:
            raise CliError("--follow goes with one sandbox: opsctl trace SANDBOX --follow")
        return _switch(args, rest, args.ratio if verb == "on" else 0.0)
    if not args.follow or rest or args.all:
        raise CliError("usage: opsctl trace on|off [SANDBOX ...|--all] | opsctl trace SANDBOX"
                       " --follow")
    return _follow(args, verb)


def _switch(args: argparse.Namespace, sandboxes: list[str], ratio: float) -> int:
    if bool(sandboxes) == bool(args.all):
        raise CliError("name the sandboxes, or --all")
    req = pb.SetTracingRequest(sandbox_ids=sandboxes, all=args.all, ratio=ratio)
    resp = asyncio.run(call(args.socket, lambda s: s.set_tracing(req)))
    failed = 0
    for r in resp.results:
        if args.json:
            print(json.dumps({"sandbox": r.sandbox_id, "applied": r.applied, "ratio": r.ratio,
                              "problem": r.problem}))
        elif not r.applied:
            print(f"{r.sandbox_id}: not changed: {r.problem}")
        else:
            state = f"on (ratio {r.ratio:g})" if r.ratio else "off"
            note = f" ({r.problem})" if r.problem else ""
            print(f"{r.sandbox_id}: tracing {state}{note}")
        failed += not r.applied
    if not resp.results and not args.json:
        print("(no sandboxes)")
    return 1 if failed else 0


def _follow(args: argparse.Namespace, sandbox: str) -> int:
    tree = Tree(sys.stdout)

    async def run(stub: pb.OpsdStub) -> None:
        async for span in stub.follow_spans(pb.FollowSpansRequest(sandbox_id=sandbox)):
            if args.json:
                print(json.dumps(span_dict(span)), flush=True)
            else:
                tree.add(span)

    async def main() -> None:
        ticker = asyncio.ensure_future(_tick(tree))
        try:
            await call(args.socket, run)
        finally:
            ticker.cancel()
            tree.flush(everything=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


async def _tick(tree: Tree) -> None:
    while True:
        await asyncio.sleep(0.5)
        tree.flush()


def span_dict(s: pb.Span) -> dict[str, Any]:
    return {"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
            "parent_span_id": s.parent_span_id.hex(), "name": s.name, "service": s.service,
            "start_unix_nano": s.start_unix_nano, "end_unix_nano": s.end_unix_nano,
            "duration_ms": round((s.end_unix_nano - s.start_unix_nano) / 1e6, 3),
            "attributes": dict(s.attributes), "error": s.error}


class Tree:
    """Spans held ``HOLD_S`` after they end, then printed as trees.

    The agent's spans reach the shim up to a pump period after the shim's
    own (a child can arrive after its parent), hence the hold; a child that
    arrives after its parent was printed is printed alone, at its depth."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._spans: dict[bytes, tuple[pb.Span, float]] = {}
        #: Depth of printed spans, for late children (bounded: oldest forgotten).
        self._printed: dict[bytes, int] = {}

    def add(self, span: pb.Span) -> None:
        self._spans[span.span_id] = (span, time.monotonic())

    def flush(self, everything: bool = False) -> None:
        now = time.monotonic()
        tops = [(span, seen) for span, seen in self._spans.values()
                if span.parent_span_id not in self._spans]
        for span, seen in sorted(tops, key=lambda t: t[0].start_unix_nano):
            if everything or now - seen > HOLD_S:
                parent_depth = self._printed.get(span.parent_span_id)
                self._print(span, 0 if parent_depth is None else parent_depth + 1)

    def _print(self, top: pb.Span, depth: int) -> None:
        children: dict[bytes, list[pb.Span]] = {}
        for span, _ in self._spans.values():
            children.setdefault(span.parent_span_id, []).append(span)
        lines: list[str] = []

        def walk(span: pb.Span, depth: int) -> None:
            self._spans.pop(span.span_id, None)
            self._printed[span.span_id] = depth
            lines.append(line(span, depth))
            for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_unix_nano):
                walk(child, depth + 1)

        walk(top, depth)
        while len(self._printed) > 10000:
            del self._printed[next(iter(self._printed))]
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()


def line(s: pb.Span, depth: int) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(s.start_unix_nano / 1e9))
    ms = (s.end_unix_nano - s.start_unix_nano) / 1e6
    attrs = " ".join(f"{short}={s.attributes[k]}" for k, short in SHOWN.items()
                     if s.attributes.get(k) and (depth == 0 or short != "sandbox"))
    error = f"  ERROR {s.error}" if s.error else ""
    return (f"{at}.{s.start_unix_nano // 1_000_000 % 1000:03d} {'  ' * depth}{s.name}"
            f"  {ms:.1f} ms  [{s.service}]{'  ' + attrs if attrs else ''}{error}")
