"""The kubelet's streaming client: Exec, Attach and PortForward through the
CRI stream server.

The CRI calls Exec, Attach and PortForward answer a URL on containerd's
stream server; the kubelet (for the API server) then speaks one of the
server's stream protocols to it.  This client speaks the WebSocket one
(``v4.channel.k8s.io``; containerd's ``pkg/cri/streaming``, copied from the
kubelet):

* every binary message starts with a channel byte: 0 stdin, 1 stdout,
  2 stderr, 3 error (v4: a JSON ``Status`` when the command ends),
  4 resize (JSON ``{"Width": w, "Height": h}``);
* port forwarding opens a data and an error channel per port (``?ports=``
  in the URL), and the first message on each is the port as a
  little-endian uint16.

The stream server listens on 127.0.0.1 in the node's network namespace,
so the TCP connection is made from a thread that entered it (a network
namespace is per thread) and handed to the WebSocket client.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from keel.netns import in_netns
from tests.cri.client import pb

if TYPE_CHECKING:
    from tests.cri.kubelet import Kubelet

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
PROTOCOL = "v4.channel.k8s.io"


def connect_in_netns(netns: Path, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to *host*:*port* made inside network namespace *netns*."""
    return in_netns(str(netns), lambda: socket.create_connection((host, port), timeout))


def open_stream(netns: Path, url: str, timeout: float = 10.0) -> ClientConnection:
    """The WebSocket session of a stream URL (http:// as the CRI answers it)."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    sock = connect_in_netns(netns, parts.hostname, parts.port, timeout)
    ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    ws = connect(ws_url, sock=sock, subprotocols=[PROTOCOL],  # type: ignore[list-item]
                 open_timeout=timeout, max_size=None, compression=None)
    # Entered here, closed by its owner (StreamClient, PortForward): it outlives this call.
    return ws.__enter__()


@dataclass
class Session:
    """What one exec or attach session gave: its output and its end."""

    stdout: bytes = b""
    stderr: bytes = b""
    #: The v4 ``Status`` the server sent on the error channel, if any.
    status: dict[str, Any] | None = None
    #: Messages in arrival order (channel, data), empty ones included.
    messages: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def exit_code(self) -> int | None:
        """0 for Success, the ExitCode cause for NonZeroExitCode, None if no status."""
        if self.status is None:
            return None
        if self.status.get("status") == "Success":
            return 0
        for cause in (self.status.get("details") or {}).get("causes") or ():
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
        raise AssertionError(f"status without an exit code: {self.status}")


class StreamClient:
    """One exec or attach session; send stdin, then collect until the server closes."""

    def __init__(self, netns: Path, url: str, timeout: float = 10.0) -> None:
        self.ws = open_stream(netns, url, timeout)
        self.session = Session()
        self._error = b""

    def send(self, data: bytes, channel: int = STDIN) -> None:
        self.ws.send(bytes([channel]) + data)

    def resize(self, width: int, height: int) -> None:
        self.send(json.dumps({"Width": width, "Height": height}).encode(), RESIZE)

    def read_until(self, needle: bytes, timeout: float = 30.0, channel: int = STDOUT) -> bytes:
        """Receive until *needle* has appeared on *channel*; that channel's output so far."""
        end = time.monotonic() + timeout
        while needle not in self._output(channel):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen on channel {channel} in {timeout}s; "
                                     f"got {self._output(channel)[-500:]!r}")
            if not self._receive(left):
                raise AssertionError(f"stream closed before {needle!r} on channel {channel}; "
                                     f"got {self._output(channel)[-500:]!r}")
        return self._output(channel)

    def finish(self, timeout: float = 30.0) -> Session:
        """Receive until the server closes the session; its outcome."""
        end = time.monotonic() + timeout
        while self._receive(max(end - time.monotonic(), 0.0)):
            if time.monotonic() > end:
                raise AssertionError(f"session still open after {timeout}s: {self.session}")
        self.ws.close()
        if self._error:
            self.session.status = json.loads(self._error)
        return self.session

    def close(self) -> None:
        self.ws.close()

    def _output(self, channel: int) -> bytes:
        return self.session.stdout if channel == STDOUT else self.session.stderr

    def _receive(self, timeout: float) -> bool:
        """Take one message; False once the server closed the session."""
        try:
            msg = self.ws.recv(timeout=timeout)
        except ConnectionClosed:
            return False
        except TimeoutError:
            raise AssertionError(f"no message from the stream server in {timeout:.1f}s") from None
        assert isinstance(msg, bytes), f"text message on a binary session: {msg!r}"
        channel, data = msg[0], msg[1:]
        self.session.messages.append((channel, data))
        if channel == STDOUT:
            self.session.stdout += data
        elif channel == STDERR:
            self.session.stderr += data
        elif channel == ERROR:
            self._error += data
        else:
            raise AssertionError(f"message on unexpected channel {channel}: {data!r}")
        return True


class PortForward:
    """A forwarded port over one WebSocket session (``?ports=PORT``)."""

    def __init__(self, netns: Path, url: str, port: int, timeout: float = 10.0) -> None:
        sep = "&" if "?" in url else "?"
        self.ws = open_stream(netns, f"{url}{sep}ports={port}", timeout)
        self.port = port
        # Data channel 0 and error channel 1 each announce the port first.
        for _ in range(2):
            msg = self.ws.recv(timeout=timeout)
            assert isinstance(msg, bytes) and len(msg) == 3, msg
            assert msg[0] in (0, 1) and struct.unpack("<H", msg[1:])[0] == port, msg
        self.errors = b""

    def send(self, data: bytes) -> None:
        self.ws.send(b"\x00" + data)

    def receive_until(self, needle: bytes, timeout: float = 30.0) -> bytes:
        """Data from the pod's port until *needle* arrived (or the stream closed)."""
        got = b""
        end = time.monotonic() + timeout
        while needle not in got:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not received in {timeout}s; got {got!r}, "
                                     f"errors {self.errors!r}")
            try:
                msg = self.ws.recv(timeout=left)
            except ConnectionClosed:
                raise AssertionError(f"port-forward closed before {needle!r}; got {got!r}, "
                                     f"errors {self.errors!r}") from None
            assert isinstance(msg, bytes), msg
            if msg[0] == 0:
                got += msg[1:]
            elif msg[0] == 1:
                self.errors += msg[1:]
        return got

    def close(self) -> None:
        self.ws.close()


# --- the CRI calls that hand out the URLs ------------------------------------

def exec_url(kubelet: Kubelet, cid: str, cmd: list[str], *, stdin: bool = False,
             tty: bool = False, stderr: bool = True) -> str:
    return kubelet.cri.call(kubelet.cri.runtime.exec(pb.ExecRequest(
        container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=True,
        stderr=stderr and not tty))).url


def attach_url(kubelet: Kubelet, cid: str, *, stdin: bool = True, tty: bool = False) -> str:
    return kubelet.cri.call(kubelet.cri.runtime.attach(pb.AttachRequest(
        container_id=cid, stdin=stdin, tty=tty, stdout=True, stderr=not tty))).url


def port_forward_url(kubelet: Kubelet, pod_id: str, port: int) -> str:
    return kubelet.cri.call(kubelet.cri.runtime.port_forward(pb.PortForwardRequest(
        pod_sandbox_id=pod_id, port=[port]))).url
