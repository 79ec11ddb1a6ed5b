"""The launcher's protocol (shim/_launcher.py): one request per connection.

Wire: a 4-byte big-endian length and a JSON object, its fds in the same
message (SCM_RIGHTS); the reply is framed the same way, without fds.
Requests and replies::

  {"op": "shim",  "argv": FLAGS, "env": ENV, "cwd": DIR}   fds: [listener]
      -> {"pid": DAEMON_PID}
  {"op": "agent", "argv": AGENT_ARGS, "env": ENV, "cwd": DIR,
                  "hostname": NAME, "log": PATH}           fds: []
      -> {"pid": AGENT_PID} (host pid of the new pid namespace's PID 1)
  any failure -> {"error": TEXT}

After a pid reply the caller sends one byte, :data:`ACK`: only then does
the forked child run (a caller that gave up must not get a twin of what
it starts itself).

Bytes in and out only, standard library only: ``start`` runs the client
side, the launcher the server side.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

from upgrade.scm import close_all, fds_of, rights

#: Most bytes a request or reply may have (an environment fits many times).
MAX_MESSAGE = 1 << 20
MAX_FDS = 4
#: The caller's acknowledgement of a pid reply.
ACK = b"\x01"


class LauncherError(Exception):
    """The launcher refused or failed a request (the caller falls back)."""


class NotRunning(LauncherError):
    """No launcher listens at the path (not started yet, or idled out)."""


def send(sock: socket.socket, doc: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """Send *doc* framed, *fds* with it; LauncherError when over MAX_MESSAGE."""
    body = json.dumps(doc).encode()
    if len(body) > MAX_MESSAGE:
        raise LauncherError(f"message of {len(body)} bytes is over {MAX_MESSAGE}")
    data = struct.pack(">I", len(body)) + body
    sent = sock.sendmsg([data], rights(fds))
    if sent < len(data):
        sock.sendall(data[sent:])


def recv(sock: socket.socket, within: float | None = None) -> tuple[dict[str, Any], list[int]]:
    """One framed message and its fds (the caller owns them); LauncherError
    on anything malformed, with every received fd closed.  With *within*,
    the whole message must arrive in that many seconds (a peer trickling
    bytes cannot hold the reader longer)."""
    fds: list[int] = []
    buf = b""
    end = None if within is None else time.monotonic() + within
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        if len(buf) >= 4 and struct.unpack(">I", buf[:4])[0] > MAX_MESSAGE:
            close_all(fds)
            raise LauncherError("message over the size limit")
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                close_all(fds)
                raise LauncherError(f"the request did not arrive within {within:g}s")
            sock.settimeout(left)
        try:
            data, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except TimeoutError:
            close_all(fds)
            if within is None:
                raise  # the socket's own timeout: the caller's to report
            raise LauncherError(f"the request did not arrive within {within:g}s") from None
        fds.extend(fds_of(anc))
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise LauncherError(f"more than {MAX_FDS} fds")
        if not data:
            close_all(fds)
            raise LauncherError("connection closed mid-message" if buf else "no message")
        buf += data
    (n,) = struct.unpack(">I", buf[:4])
    try:
        doc = json.loads(buf[4 : 4 + n])
    except ValueError as exc:
        close_all(fds)
        raise LauncherError(f"malformed message: {exc}") from None
    if not isinstance(doc, dict):
        close_all(fds)
        raise LauncherError("malformed message: not an object")
    return doc, fds
