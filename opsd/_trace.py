"""opsd's side of tracing: the live switch and span following.

``set``: ``opsctl trace on|off`` sets the sampling ratio of running
sandboxes through each shim's ops.sock (the shim tells its agent and keeps
the ratio in its state, so a shim upgrade keeps it).  ``follow``: the
spans of one sandbox as they end, from its shim; when the shim hands the
sandbox to a new one (an upgrade), the follow goes on with the new shim.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from agent.api import ops_pb
from keel.errors import InvalidArgument, KeelError, NotFound
from opsd._discovery import ShimClient, check_id
from opsd._pb.keel.opsd import v1 as pb
from shim.api import SandboxDir

log = logging.getLogger("opsd.trace")

#: Calls to shims at a time, and each call's bound.
PARALLEL = 16
CALL_S = 10.0
#: How long a follow waits for a sandbox's (new) shim to answer again.
REFOLLOW_S = 30.0


class Traces:
    def __init__(self, shims: ShimClient) -> None:
        self._shims = shims

    async def set(self, sandbox_ids: list[str], every: bool, ratio: float
                  ) -> list[pb.TracingResult]:
        if not 0.0 <= ratio <= 1.0:
            raise InvalidArgument(f"ratio must be within 0 and 1, not {ratio}")
        if every == bool(sandbox_ids):
            raise InvalidArgument("name sandboxes or --all (not both)")
        ids = self._shims.ids() if every else [check_id(s) for s in sandbox_ids]
        limit = asyncio.Semaphore(PARALLEL)

        async def one(sid: str) -> pb.TracingResult:
            async with limit:
                try:
                    async with self._shims.stub(sid) as stub:
                        r = await stub.set_tracing(ops_pb.SetTracingRequest(ratio=ratio),
                                                   timeout=CALL_S)
                except KeelError as exc:
                    return pb.TracingResult(sandbox_id=sid, problem=str(exc))
                return pb.TracingResult(sandbox_id=sid, ratio=r.ratio, applied=True,
                                        problem=r.agent_problem[:1024])

        results = list(await asyncio.gather(*(one(s) for s in ids)))
        log.info("tracing %s (ratio %g) for %d sandboxes, %d refused",
                 "on" if ratio else "off", ratio, len(results),
                 sum(1 for r in results if r.problem))
        return results

    async def follow(self, sandbox_id: str) -> AsyncIterator[pb.Span]:
        sid = check_id(sandbox_id)
        sdir = SandboxDir.of(self._shims.state_root, sid)
        if not sdir.root.is_dir():
            raise NotFound(f"no sandbox {sid} under {self._shims.state_root}")
        loop = asyncio.get_running_loop()
        lost_at: float | None = None
        while True:
            try:
                async with self._shims.stub(sid) as stub:
                    async for s in stub.follow_spans(ops_pb.FollowSpansRequest()):
                        lost_at = None
                        yield pb.Span(trace_id=s.trace_id, span_id=s.span_id,
                                      parent_span_id=s.parent_span_id, name=s.name,
                                      start_unix_nano=s.start_unix_nano,
                                      end_unix_nano=s.end_unix_nano,
                                      attributes=dict(s.attributes), error=s.error,
                                      service=s.service)
            except KeelError as exc:
                if not sdir.root.is_dir():
                    return  # the sandbox is gone: the follow ends
                if lost_at is None:
                    lost_at = loop.time()
                elif loop.time() - lost_at > REFOLLOW_S:
                    raise
                log.debug("follow %s: %s; asking again", sid, exc)
            if not sdir.root.is_dir():
                return
            # The shim ended the stream (it handed off, or exits): the new one answers soon.
            await asyncio.sleep(0.2)
