"""``opsctl console``: a debug console in a running sandbox, through opsd.

    opsctl console SANDBOX [--container ID] [-t | -T] [-- CMD ...]
    opsctl console enable|disable SANDBOX
    opsctl console ls [--json]
    opsctl console kill SESSION

On a terminal the session gets one too: raw mode, the window size at start
and on every SIGWINCH, Ctrl-C and Ctrl-Z go to the remote command, and
Ctrl-] detaches (the session ends).  Otherwise stdin is sent until EOF and
the remote stdout and stderr come back apart.  opsctl exits with the remote
command's status (128 + N when signal N killed it), 255 when the session
was lost, 1 when it was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError

from opsd._client import CliError, call
from opsd._pb.keel.opsd import v1 as pb

CONSOLE = "/keel.opsd.v1.Opsd/Console"
#: Ctrl-]: the detach key (as telnet's and virsh console's escape).
DETACH = b"\x1d"
READ_BYTES = 64 * 1024
VERBS = ("attach", "enable", "disable", "ls", "kill")
LOST = 255


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    con = sub.add_parser(
        "console", help="a shell or command in a running sandbox (debug console)",
        description="Open a debug console in a sandbox: a shell (or CMD) run by its agent "
        "with the agent's own tools, in the sandbox or in one container's namespaces. "
        "On a terminal: raw mode, resizes follow, Ctrl-C/Ctrl-Z go to the remote side, "
        "Ctrl-] detaches (the session ends).  Off by default: opsctl console enable SANDBOX.",
        epilog="exit status: the remote command's (128+N for signal N), 255 session lost, "
        "1 refused.  Every session is audited (opsd's log, the sandbox's audit.log).")
    csub = con.add_subparsers(dest="console_command", required=True, metavar="ACTION")
    att = csub.add_parser("attach", help="open a session (the default action: opsctl console"
                          " SANDBOX [-- CMD])")
    att.add_argument("sandbox")
    att.add_argument("--container", default="", metavar="ID",
                     help="in this container's namespaces and cgroups, with the agent's tools"
                     " (the container's files are under $KEEL_CONTAINER_ROOT)")
    mode = att.add_mutually_exclusive_group()
    mode.add_argument("-t", "--tty", dest="tty", action="store_true", default=None,
                      help="give the session a terminal (default: when stdin is one)")
    mode.add_argument("-T", "--no-tty", dest="tty", action="store_false",
                      help="no terminal: stdout and stderr kept apart")
    att.add_argument("command", nargs="*", metavar="CMD",
                     help="command and arguments after '--' (default: a login shell)")
    att.set_defaults(func=cmd_attach)
    for verb, on in (("enable", True), ("disable", False)):
        p = csub.add_parser(verb, help=f"{verb} the console of a running sandbox")
        p.add_argument("sandbox")
        p.set_defaults(func=cmd_switch, enabled=on)
    ls = csub.add_parser("ls", help="open console sessions")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    kill = csub.add_parser("kill", help="end a console session")
    kill.add_argument("session")
    kill.set_defaults(func=cmd_kill)


def split_argv(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """opsctl's arguments for argparse, and the remote command after ``--`` of
    ``console [attach] SANDBOX ...`` (None when there is no ``--``).

    ``opsctl [opts] console SANDBOX ...`` means ``console attach SANDBOX ...``;
    the command is cut off here because argparse mishandles ``--`` after a
    subcommand's positional argument.
    """
    if "console" not in argv:
        return argv, None
    i = argv.index("console")
    rest = argv[i + 1:]
    if rest and rest[0] not in VERBS and not rest[0].startswith("-"):
        argv, rest = [*argv[:i + 1], "attach", *rest], ["attach", *rest]
    if rest[:1] != ["attach"] or "--" not in argv:
        return argv, None
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def cmd_switch(args: argparse.Namespace) -> int:
    r = asyncio.run(call(args.socket, lambda s: s.console_enable(
        pb.ConsoleEnableRequest(sandbox_id=args.sandbox, enabled=args.enabled))))
    print(f"console of sandbox {args.sandbox}: {'enabled' if r.enabled else 'disabled'}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    r = asyncio.run(call(args.socket, lambda s: s.list_consoles(pb.ListConsolesRequest())))
    if args.json:
        print(json.dumps([{"id": s.id, "sandbox": s.sandbox_id, "container": s.container_id,
                           "argv": list(s.argv), "uid": s.uid, "pid": s.pid, "tty": s.tty,
                           "started_at": s.started_at, "bytes_in": s.bytes_in,
                           "bytes_out": s.bytes_out} for s in r.sessions], indent=2))
        return 0
    print(f"{'SESSION':<14} {'SANDBOX':<24} {'CONTAINER':<16} {'UID':>5} {'PID':>7}  COMMAND")
    for s in r.sessions:
        print(f"{s.id:<14} {s.sandbox_id:<24} {s.container_id or '-':<16} {s.uid:>5} {s.pid:>7}"
              f"  {' '.join(s.argv) or '(shell)'}")
    if not r.sessions:
        print("(no console sessions)")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    asyncio.run(call(args.socket, lambda s: s.kill_console(
        pb.KillConsoleRequest(session_id=args.session))))
    print(f"console session {args.session} ended")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    command = args.command
    terminal = sys.stdin.isatty() if args.tty is None else args.tty
    if terminal and not sys.stdin.isatty():
        raise CliError("--tty needs stdin to be a terminal")
    rows, cols = _size() if terminal else (0, 0)
    opening = pb.ConsoleOpen(sandbox_id=args.sandbox, container_id=args.container,
                             argv=command, terminal=terminal, rows=rows, cols=cols,
                             tty=_ttyname(), term=os.environ.get("TERM", "") if terminal else "")
    with _raw(terminal):
        try:
            return asyncio.run(_session(args.socket, opening, terminal))
        except KeyboardInterrupt:  # only without a terminal: raw mode sends Ctrl-C on
            return 130


async def _session(socket: Path, opening: pb.ConsoleOpen, terminal: bool) -> int:
    channel = Channel(path=str(socket))
    loop = asyncio.get_running_loop()
    try:
        async with channel.request(CONSOLE, Cardinality.STREAM_STREAM, pb.ConsoleInput,
                                   pb.ConsoleOutput) as stream:
            await stream.send_message(pb.ConsoleInput(open=opening))
            first = await stream.recv_message()
            if first is None or not first.session_id:
                raise CliError("opsd ended the session before it started")
            sender = asyncio.create_task(_send_input(stream, terminal))
            if terminal:
                loop.add_signal_handler(signal.SIGWINCH, lambda: loop.create_task(
                    stream.send_message(pb.ConsoleInput(rows=_size()[0], cols=_size()[1]))))
            try:
                status = await _receive(stream, sender)
            finally:
                sender.cancel()
            detached = sender.done() and not sender.cancelled() and sender.result()
            if not detached:  # our side ends too (grpclib wants it ended before the trailers)
                with contextlib.suppress(StreamTerminatedError):
                    await stream.end()
            return status
    except GRPCError as exc:
        raise CliError(exc.message or exc.status.name) from exc
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"cannot reach opsd at {socket}: is it running?") from exc
    except PermissionError as exc:
        raise CliError(f"permission denied on {socket}: opsctl must run as root") from exc
    except StreamTerminatedError as exc:
        print(f"\r\nopsctl: opsd closed the session: {exc}", file=sys.stderr)
        return LOST
    finally:
        channel.close()


async def _receive(stream: object, sender: asyncio.Task[bool]) -> int:
    recv = stream.recv_message  # type: ignore[attr-defined]
    while True:
        reading = asyncio.ensure_future(recv())
        done, _ = await asyncio.wait({reading, sender}, return_when=asyncio.FIRST_COMPLETED)
        if reading not in done:  # the user detached (our side ended), or stdin failed
            reading.cancel()
            sender.result()  # raises what went wrong with stdin
            print("\r\n[detached: the session ended]", file=sys.stderr)
            return 0
        msg = reading.result()
        if msg is None:
            print("\r\nopsctl: opsd ended the session without an exit status", file=sys.stderr)
            return LOST
        if msg.stdout:
            _write_all(1, msg.stdout)
        if msg.stderr:
            _write_all(2, msg.stderr)
        if msg.note:
            print(f"\r\nopsctl: {msg.note}", file=sys.stderr)
        if msg.exited:
            return msg.exit_status


async def _send_input(stream: object, terminal: bool) -> bool:
    """Send stdin until EOF (then close the remote stdin) or the detach key
    (then end our side of the stream: True)."""
    send = stream.send_message  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue(4)

    def readable() -> None:
        try:
            data = os.read(0, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        loop.remove_reader(0)  # until this chunk is sent: stdin is not read ahead
        chunks.put_nowait(data)

    kind = _stdin_kind()
    if kind == "watch":
        try:
            loop.add_reader(0, readable)
        except PermissionError:  # epoll refuses some devices (/dev/null): read straight
            kind = "file"
    try:
        while kind != "none":
            data = await chunks.get() if kind == "watch" else os.read(0, READ_BYTES)
            if terminal and DETACH in data:
                before = data.split(DETACH, 1)[0]
                if before:
                    await send(pb.ConsoleInput(stdin=before))
                await stream.end()  # type: ignore[attr-defined]
                return True
            if not data:
                break
            await send(pb.ConsoleInput(stdin=data))
            if kind == "watch":
                loop.add_reader(0, readable)
        if not terminal:
            await send(pb.ConsoleInput(close_stdin=True))
    finally:
        if kind == "watch":
            loop.remove_reader(0)
    await asyncio.Event().wait()  # stay until the session ends
    return False


def _stdin_kind() -> str:
    """How stdin is read: ``watch`` (a pipe, socket or terminal, by the event
    loop), ``file`` (a regular file: read straight through) or ``none`` (closed)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return "none"
    return "file" if stat.S_ISREG(mode) else "watch"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[n:]


def _size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0)
    except OSError:
        return 24, 80
    return size.lines, size.columns


def _ttyname() -> str:
    try:
        return os.ttyname(0)
    except OSError:
        return ""


@contextlib.contextmanager
def _raw(terminal: bool) -> Iterator[None]:
    if not terminal:
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
