"""opsd: the Keel node ops daemon (systemd ``Type=notify``).

    opsd [--socket /run/keel/opsd.sock] [--state-dir /var/lib/keel/opsd]
         [--releases /opt/keel/releases] [--state-root /run/keel]
         [--metrics-address 127.0.0.1:9464|none]

Serves keel.opsd.v1.Opsd on a 0600 unix socket (peer uid checked on each
call), drives each sandbox's ops.sock, runs one upgrade plan at a time and
resumes a persisted one at start.  Serves Prometheus metrics over HTTP at
``/metrics`` (opsd/_metrics.py; the address: ``--metrics-address``, else
``[metrics] address`` in the Keel config file, else 127.0.0.1:9464).
READY=1 is sent once both listen; SIGTERM/SIGINT stop it (a running plan
stays persisted and resumes at the next start).  One opsd per state
directory (flock).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from grpclib.server import Server
from prometheus_client import CollectorRegistry, disable_created_metrics

from keel.errors import FailedPrecondition, KeelError
from keel.grpc import limit_messages, require_uids
from keel.logs import loop_error_handler
from keel.release import version as release_version
from observability.config import from_table as tracing_from_table
from observability.tracing import Tracing
from opsd._console import Consoles
from opsd._discovery import ShimClient
from opsd._manager import Manager, status_line
from opsd._metrics import NodeCollector, UpgradeMetrics, state_identity
from opsd._metrics_http import MetricsServer, configured_address
from opsd._notify import Notifier, setup_logging
from opsd._rollout import RolloutConfig
from opsd._trace import Traces
from opsd.api import DEFAULT_SOCKET, DEFAULT_STATE_DIR, default_state_root
from opsd.service import OpsdService
from opsd.state import plan_store
from shim.api import read_config
from upgrade.releases import DEFAULT_ROOT, ReleaseStore

log = logging.getLogger("opsd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opsd", description="Keel node ops daemon (run by systemd).")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help="API socket (%(default)s)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="persisted upgrade plan (%(default)s)")
    p.add_argument("--releases", type=Path, default=DEFAULT_ROOT,
                   help="releases root (%(default)s)")
    p.add_argument("--state-root", type=Path, default=default_state_root(),
                   help="sandbox state root ($KEEL_STATE_ROOT or /run/keel)")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                   help="also allow this uid besides root (tests)")
    p.add_argument("--gate-timeout", type=float, default=30.0, metavar="S",
                   help="how long a batch may take to look healthy (%(default)s)")
    p.add_argument("--settle-timeout", type=float, default=30.0, metavar="S",
                   help="how long a new shim may take to answer (%(default)s)")
    p.add_argument("--upgrade-timeout", type=float, default=120.0, metavar="S",
                   help="deadline of one UpgradeShim/UpgradeAgent call (%(default)s)")
    p.add_argument("--status-timeout", type=float, default=5.0, metavar="S",
                   help="deadline of one Status call (%(default)s)")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics; 'none' turns"
                        " them off (default: [metrics] address in $KEEL_CONFIG or"
                        " /etc/keel/config.toml, else 127.0.0.1:9464)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def _lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "opsd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(f"another opsd is running with state dir {state_dir}") from None
    return fd


def _claim(path: Path) -> None:
    """Make *path* free for our socket; refuse if another process answers there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a dead opsd
        else:
            raise FailedPrecondition(f"another process already serves {path}")
        finally:
            probe.close()


async def _listen(server: Server, path: Path) -> None:
    """Serve on *path*, created 0600 (umask) so it is never open to others."""
    _claim(path)
    old = os.umask(0o177)
    try:
        await server.start(path=str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


async def _serve_metrics(args: argparse.Namespace,
                         collector: NodeCollector) -> MetricsServer | None:
    """Start the metrics endpoint where configured (None: turned off)."""
    address = configured_address(args.metrics_address)
    if address is None:
        log.info("metrics: off")
        return None
    server = MetricsServer(collector.scrape)
    log.info("serving metrics on http://%s/metrics", await server.start(address))
    return server


def _tracing() -> Tracing:
    """opsd's tracing (its upgrade plans), from the node config's ``[tracing]`` and ``OTEL_*``."""
    file, raw = read_config()
    config = tracing_from_table(raw.get("tracing"), where=f"config file {file}")
    if config.enabled:
        log.info("tracing: upgrade plans traced (ratio %g) to %s", config.ratio, config.endpoint)
    return Tracing("opsd", config, {"service.version": release_version()})


async def serve(args: argparse.Namespace) -> None:
    lock = _lock_state_dir(args.state_dir)
    tracing = _tracing()
    notifier = Notifier()
    shims = ShimClient(args.state_root, status_timeout=args.status_timeout,
                       upgrade_timeout=args.upgrade_timeout)
    releases = ReleaseStore(args.releases)
    config = RolloutConfig(gate_timeout_s=args.gate_timeout, settle_timeout_s=args.settle_timeout)
    registry = CollectorRegistry()  # opsd's own: never prometheus_client's global one
    disable_created_metrics()  # no *_created series next to each counter (process-wide)
    manager = Manager(store=plan_store(args.state_dir), releases=releases, shims=shims,
                      config=config, on_change=lambda p: notifier.status(status_line(p)),
                      metrics=UpgradeMetrics(registry), tracer=tracing.tracer)
    manager.load()
    collector = NodeCollector(registry, shims, plan=lambda: manager.plan,
                              releases=lambda: len(releases.list()),
                              identity=state_identity(args.state_root))
    limit_messages()
    server = Server([OpsdService(manager, shims, releases, Consoles(args.state_root),
                                 Traces(shims))])
    require_uids(server, {0, *args.allow_uid}, "opsd")
    await _listen(server, args.socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_error_handler(log))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics: MetricsServer | None = None
    try:
        metrics = await _serve_metrics(args, collector)
        log.info("listening on %s (state root %s, releases %s)", args.socket, args.state_root,
                 args.releases)
        notifier.ready(status_line(manager.plan))
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(manager.run(), name="manager"),
                     tg.create_task(notifier.watchdog(), name="watchdog")]
            await stop.wait()
            log.info("stopping")
            notifier.stopping()
            for task in tasks:
                task.cancel()
    finally:
        server.close()
        await server.wait_closed()
        if metrics is not None:
            await metrics.aclose()
        args.socket.unlink(missing_ok=True)
        os.close(lock)
        await asyncio.to_thread(tracing.close, 2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if os.geteuid() != 0:
        log.warning("not running as root: sandbox sockets will likely refuse opsd")
    try:
        asyncio.run(serve(args))
    except KeelError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
