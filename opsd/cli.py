"""opsctl: the operator's command line for opsd (entry point ``opsd.cli:main``).

    opsctl ls [--json]
    opsctl release install SOURCE [--current] [--force] [--no-deps] | list | remove VERSION
                   | current VERSION
    opsctl upgrade --to VERSION [--components shim,agent] [--batch N] [--pause S]
                   [--sandbox ID ...] [--dry-run] [--detach]
    opsctl upgrade status [--follow] [--json]
    opsctl upgrade abort
    opsctl console SANDBOX [--container ID] [-t|-T] [-- CMD ...]
    opsctl console enable|disable SANDBOX | ls [--json] | kill SESSION
    opsctl trace on|off [SANDBOX ...|--all] [--ratio R] | SANDBOX --follow [--json]

``ls`` and ``upgrade`` talk to opsd on its socket; ``release`` works on
the releases directory directly (no opsd needed: it installs the release
opsd itself may run from), asking the sandboxes and opsd only which
versions are in use.  Exit codes: 0 ok; 1 refused or failed to run;
2 usage; for a followed upgrade 3 rolled back, 4 failed, 5 aborted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import betterproto

from keel.errors import KeelError
from opsd import _cli_console, _cli_release, _cli_trace
from opsd._client import CliError, call
from opsd._pb.keel.opsd import v1 as pb
from opsd._progress import ACTIVE, EXIT_BY_STATE, Progress, describe, summary
from opsd.api import DEFAULT_SOCKET


def _json(msg: betterproto.Message) -> str:
    snake = betterproto.Casing.SNAKE  # typed as a function in betterproto 2.0.0b7
    return json.dumps(msg.to_pydict(casing=snake), indent=2, default=str)  # type: ignore[arg-type]


def cmd_ls(args: argparse.Namespace) -> int:
    resp = asyncio.run(call(args.socket, lambda s: s.list_sandboxes(pb.ListSandboxesRequest())))
    if args.json:
        print(_json(resp))
        return 0
    print(f"current release: {resp.current_release or '(none)'}")
    print(f"{'SANDBOX':<24} {'SHIM':<10} {'AGENT':<10} {'BACKEND':<12} {'NAMESPACE':<12} CONTAINERS")
    for sb in resp.sandboxes:
        if sb.error:
            print(f"{sb.id:<24} {'?':<10} {'?':<10} unreachable: {sb.error}")
            continue
        backend = f"{sb.backend}/{sb.accel}" if sb.accel else sb.backend
        print(f"{sb.id:<24} {sb.shim_version:<10} {sb.agent_version:<10} {backend:<12}"
              f" {sb.namespace:<12} {len(sb.containers)}")
        for c in sb.containers:
            print(f"  container {c.id:<30} pid {c.pid:<8} {c.status}"
                  + (f"  ({c.execs} execs)" if c.execs else ""))
    if not resp.sandboxes:
        print("(no sandboxes)")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    if args.to is None:
        raise CliError("upgrade needs --to VERSION (or: opsctl upgrade status | abort)")
    comps = [c.strip() for c in args.components.split(",") if c.strip()]
    req = pb.StartUpgradeRequest(to_version=args.to, components=comps, batch_size=args.batch,
                                 pause_s=args.pause, sandbox_ids=args.sandbox or [],
                                 dry_run=args.dry_run)
    resp = asyncio.run(call(args.socket, lambda s: s.start_upgrade(req)))
    for note in resp.notes:
        print(f"note: {note}")
    if args.dry_run:
        print("\n".join(describe(resp.plan)))
        print("dry run: nothing was touched")
        return 0
    if resp.plan.state not in ACTIVE:
        print(summary(resp.plan))
        return EXIT_BY_STATE.get(resp.plan.state, 1)
    if args.detach:
        print(f"upgrade {resp.plan.id} started; follow it with: opsctl upgrade status --follow")
        return 0
    return follow(args.socket, resp.plan.id)


def follow(socket: Path, plan_id: str) -> int:
    """Stream the plan's progress until it finishes; its exit code."""
    progress = Progress(sys.stdout, sys.stdout.isatty())
    last: list[pb.Plan] = []

    async def watch(stub: pb.OpsdStub) -> None:
        async for st in stub.watch_upgrade(pb.WatchUpgradeRequest(plan_id=plan_id)):
            last[:] = [st.plan]
            progress.update(st.plan, st.events)

    try:
        asyncio.run(call(socket, watch))
    except KeyboardInterrupt:
        progress.close(None)
        print(f"detached; upgrade {plan_id} goes on in opsd (opsctl upgrade status --follow)")
        return 130
    progress.close(last[0] if last else None)
    if not last or last[0].state in ACTIVE:
        raise CliError(f"opsd closed the connection before upgrade {plan_id} ended (opsd"
                       f" stopping?); the plan resumes with opsd: opsctl upgrade status --follow")
    return EXIT_BY_STATE.get(last[0].state, 1)


def cmd_status(args: argparse.Namespace) -> int:
    st = asyncio.run(call(args.socket, lambda s: s.upgrade_status(pb.UpgradeStatusRequest())))
    if args.json:
        print(_json(st))
        return 0
    if not st.found:
        print("no upgrade has run")
        return 0
    if args.follow and st.plan.state in ACTIVE:
        return follow(args.socket, st.plan.id)
    print("\n".join(describe(st.plan)))
    if not args.follow:
        return 0
    print(summary(st.plan))  # it had ended already: the line a follow ends with
    return EXIT_BY_STATE.get(st.plan.state, 1)


def cmd_abort(args: argparse.Namespace) -> int:
    st = asyncio.run(call(args.socket, lambda s: s.abort_upgrade(pb.AbortUpgradeRequest())))
    print(f"abort requested for upgrade {st.plan.id}: the batch in flight finishes, no new batch"
          f" starts")
    return 0


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 86400, not {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsctl", description="Operate Keel on this node.",
                                epilog="exit codes: 0 ok, 1 refused/error, 2 usage; a followed"
                                " upgrade: 3 rolled back, 4 failed, 5 aborted")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help="opsd socket (%(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="sandboxes, their containers and versions")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    _cli_release.add_parser(sub)
    _cli_console.add_parser(sub)
    _cli_trace.add_parser(sub)
    up = sub.add_parser("upgrade", help="roll sandboxes to another release",
                        description="Upgrade running sandboxes in batches, with a health gate"
                        " after each batch and automatic rollback of a failed batch.")
    up.add_argument("--to", metavar="VERSION", help="installed release to upgrade to")
    up.add_argument("--components", default="shim,agent", help="shim, agent or both (%(default)s)")
    up.add_argument("--batch", type=_count, default=1, metavar="N", help="sandboxes per batch (1)")
    up.add_argument("--pause", type=_seconds, default=0.0, metavar="S",
                    help="seconds between batches (0)")
    up.add_argument("--sandbox", nargs="+", action="extend", metavar="ID",
                    help="only these sandboxes (default: all)")
    up.add_argument("--dry-run", action="store_true", help="show the plan, touch nothing")
    up.add_argument("--detach", action="store_true", help="start it and return")
    up.set_defaults(func=cmd_upgrade)
    upsub = up.add_subparsers(dest="upgrade_command", metavar="{status,abort}")
    status = upsub.add_parser("status", help="the running or last upgrade plan")
    status.add_argument("--follow", action="store_true",
                        help="stream progress until it ends; exit code as for upgrade")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    abort = upsub.add_parser("abort", help="stop the running upgrade after its batch in flight")
    abort.set_defaults(func=cmd_abort)
    return p


def main(argv: list[str] | None = None) -> int:
    argv, command = _cli_console.split_argv(list(sys.argv[1:] if argv is None else argv))
    args = parser().parse_args(argv)
    if command is not None:
        args.command = command
    try:
        rc: int = args.func(args)
    except (CliError, KeelError) as exc:
        print(f"opsctl: {exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
