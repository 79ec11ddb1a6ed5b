"""A deliberately hostile agent, started by a real shim in place of
``keel-agent`` (the process backend's ``agent_command``) for the
robustness tests in tests/integration/test_hostile_agent_ctr.py.

It speaks the agent API through the generated stubs and plays a container
well enough for ``ctr run`` (Hello, Create, Start, Wait, Signal, Remove,
ReadOutput) until its ``--mode`` makes it misbehave:

* ``never-create``: CreateContainer never answers;
* ``never-update``: UpdateContainer never answers;
* ``huge-output``: every ReadOutput answer is 5 MiB, over the 4 MiB cap;
* ``wrong-offset``: ReadOutput answers 5 bytes past the offset asked;
* ``huge-version``: Hello's agent_version is 10,000 characters with
  terminal escapes;
* ``bad-spans``: its ops channel answers the shim's first TakeSpans with
  one good span and four malformed ones, a clock an hour ahead and a
  dropped count of 7.

    python -m tests.hostile.agent --mode MODE <the agent's usual arguments>
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

from grpclib.server import Server

from agent.api import API_VERSION, ops_pb, pb
from keel.grpc import NO_STATUS_DETAILS

MODES = ("never-create", "never-update", "huge-output", "wrong-offset", "huge-version",
         "bad-spans")
#: bad-spans: how far ahead the hostile guest's clock runs.
CLOCK_AHEAD_NS = 3600 * 10**9
log = logging.getLogger("hostile-agent")


class HostileAgent(pb.AgentServiceBase):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.exits: dict[tuple[str, str], asyncio.Future[int]] = {}

    def _exit(self, cid: str, eid: str) -> asyncio.Future[int]:
        return self.exits.setdefault((cid, eid), asyncio.get_running_loop().create_future())

    async def hello(self, req: pb.HelloRequest) -> pb.HelloResponse:
        version = "\x1b[31m" + "9" * 10_000 if self.mode == "huge-version" else "0.0.1-hostile"
        return pb.HelloResponse(api_version=API_VERSION, min_api_version=API_VERSION,
                                max_api_version=API_VERSION, agent_version=version,
                                boot_id="hostile", agent_pid=1)

    async def create_container(self, req: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        if self.mode == "never-create":
            await asyncio.Event().wait()
        self._exit(req.container_id, "")
        return pb.CreateContainerResponse(pid=4242)

    async def start_process(self, req: pb.StartProcessRequest) -> pb.StartProcessResponse:
        return pb.StartProcessResponse(pid=4242)

    async def signal_process(self, req: pb.SignalProcessRequest) -> pb.Empty:
        fut = self._exit(req.container_id, req.exec_id)
        if not fut.done() and req.signal in (signal.SIGKILL, signal.SIGTERM):
            fut.set_result(128 + req.signal)
        return pb.Empty()

    async def wait_process(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        status = await asyncio.shield(self._exit(req.container_id, req.exec_id))
        return pb.WaitProcessResponse(exit_status=status, pid=4242)

    async def remove_process(self, req: pb.RemoveProcessRequest) -> pb.Empty:
        self.exits.pop((req.container_id, req.exec_id), None)
        return pb.Empty()

    async def read_output(self, req: pb.ReadOutputRequest) -> pb.ReadOutputResponse:
        if self.mode == "huge-output":
            return pb.ReadOutputResponse(offset=req.offset, data=b"x" * (5 << 20))
        if self.mode == "wrong-offset":
            return pb.ReadOutputResponse(offset=req.offset + 5, data=b"stolen")
        await asyncio.sleep(min(req.wait_ms, 1000) / 1000)
        return pb.ReadOutputResponse(offset=req.offset)

    async def update_container(self, req: pb.UpdateContainerRequest) -> pb.Empty:
        if self.mode == "never-update":
            await asyncio.Event().wait()
        return pb.Empty()


class HostileOps(ops_pb.OpsServiceBase):
    """bad-spans: a good span among malformed ones, from a clock an hour ahead."""

    def __init__(self) -> None:
        self.sent = False

    async def set_tracing(self, req: ops_pb.SetTracingRequest) -> ops_pb.SetTracingResponse:
        return ops_pb.SetTracingResponse(ratio=req.ratio)

    async def take_spans(self, req: ops_pb.TakeSpansRequest) -> ops_pb.TakeSpansResponse:
        now = time.time_ns() + CLOCK_AHEAD_NS
        spans = []
        if not self.sent:
            self.sent = True

            def span(name: str, **kw: object) -> ops_pb.SpanData:
                base: dict[str, object] = {
                    "trace_id": b"\x11" * 16, "span_id": b"\x22" * 8, "name": name,
                    "start_unix_nano": now - 2_000_000, "end_unix_nano": now - 1_000_000}
                return ops_pb.SpanData(**{**base, **kw})  # type: ignore[arg-type]

            spans = [span("hostile.ok", attributes={"k": "v"}),
                     span("hostile.short-trace-id", trace_id=b"\x11" * 15),
                     span("hostile.many-attributes", attributes={f"k{i}": "v" for i in range(40)}),
                     span("hostile.backwards", end_unix_nano=now - 3_000_000),
                     span("h" * 1000)]
        return ops_pb.TakeSpansResponse(spans=spans, dropped=7, now_unix_nano=now)


def _listen_paths(args: list[str]) -> dict[str, str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", default=[])
    known, _ = parser.parse_known_args(args)
    paths = {}
    for item in known.listen:
        channel, _, address = item.partition("=")
        paths[channel] = address.removeprefix("unix:")
    return paths


async def serve(mode: str, paths: dict[str, str]) -> None:
    ops = [HostileOps()] if mode == "bad-spans" else []  # else nothing answers there
    servers = [Server([HostileAgent(mode)], status_details_codec=NO_STATUS_DETAILS),
               Server(ops, status_details_codec=NO_STATUS_DETAILS)]
    for server, channel in zip(servers, ("agent", "ops"), strict=True):
        await server.start(path=paths[channel])
    log.info("hostile agent (%s) serving %s", mode, paths)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hostile-agent")
    parser.add_argument("--mode", choices=MODES, required=True)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hostile-agent %(message)s")
    asyncio.run(serve(args.mode, _listen_paths(rest)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
