"""CRI PortForward into a VM pod: a relay on the pod's host-side localhost.

containerd serves ``kubectl port-forward`` by dialing ``127.0.0.1:PORT``
inside the pod's network namespace on the host.  For a VM pod nothing
listens there: the pod's servers run in the guest, and the namespace's
veth is only bridged to the VM (shim/vmm/qemu/_net.py).  So the shim of a
sandbox whose backend names such a namespace (``Sandbox.pod_netns``):

* listens on ``127.0.0.1:<relay port>`` in that namespace (an ephemeral
  port, bound from a thread inside it: keel.netns);
* adds to the namespace's ``nat`` table a chain ``KEEL-PORTFORWARD``,
  jumped to from ``OUTPUT`` for loopback, that redirects every other TCP
  connection to 127.0.0.1 to the relay port (the namespace is the pod's
  own, created by CRI and deleted with the pod, and no process of the
  host runs in it but containerd's dial);
* for each connection reads the port it was meant for (``SO_ORIGINAL_DST``)
  and carries it to 127.0.0.1:PORT in the guest over the agent's ``Dial``
  stream (agent/_dial.py).

A shim that takes over after an upgrade binds a new relay port and
rewrites the chain.  Without ``iptables`` port forwarding into the VM is
off, said once in the log.  Connections are bounded (``MAX_CONNECTIONS``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator

from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from agent.api import pb
from keel.netns import in_netns
from shim._agentconn import AgentConnection

log = logging.getLogger("keel.shim.portforward")

CHAIN = "KEEL-PORTFORWARD"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MAX_CONNECTIONS = 64
READ_BYTES = 64 * 1024
IPTABLES_TIMEOUT_S = 10.0


class PortRelay:
    """The relay of one sandbox; :meth:`close` stops it (the chain dies with the namespace)."""

    def __init__(self, sandbox_id: str, agent: AgentConnection, port: int) -> None:
        self._id = sandbox_id
        self._agent = agent
        self._server: asyncio.Server | None = None
        self.port = port
        self._open: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, sandbox_id: str, netns: str, agent: AgentConnection) -> PortRelay | None:
        """Start relaying *netns*'s localhost into the guest; None (logged) when it cannot."""
        iptables = shutil.which("iptables")
        if iptables is None:
            log.warning("sandbox %s: port-forward into the VM is off: iptables is not installed",
                        sandbox_id)
            return None
        try:
            sock = await asyncio.to_thread(in_netns, netns, _listen)
        except OSError as exc:
            log.warning("sandbox %s: port-forward into the VM is off: cannot listen in %s: %s",
                        sandbox_id, netns, exc)
            return None
        port = sock.getsockname()[1]
        try:
            await asyncio.to_thread(in_netns, netns, lambda: _redirect(iptables, port))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            sock.close()
            log.warning("sandbox %s: port-forward into the VM is off: %s", sandbox_id, exc)
            return None
        relay = cls(sandbox_id, agent, port)
        relay._server = await asyncio.start_server(relay._serve, sock=sock)
        log.info("sandbox %s: port-forward relay on 127.0.0.1:%d in %s", sandbox_id, port, netns)
        return relay

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= MAX_CONNECTIONS:
            log.warning("sandbox %s: port-forward: %d connections open, refusing another",
                        self._id, len(self._open))
            writer.close()
            return
        self._open.add(writer)
        port = 0
        try:
            port = _original_port(writer.get_extra_info("socket"))
            await self._relay(port, reader, writer)
        except GRPCError as exc:
            log.info("sandbox %s: port-forward to %d: %s", self._id, port, exc.message)
        except (OSError, ProtocolError, StreamTerminatedError, ValueError) as exc:
            log.info("sandbox %s: port-forward to %d ended: %r", self._id, port, exc)
        finally:
            self._open.discard(writer)
            writer.close()

    async def _relay(self, port: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        async def frames() -> AsyncIterator[pb.DialFrame]:
            yield pb.DialFrame(port=port)
            while data := await reader.read(READ_BYTES):
                yield pb.DialFrame(data=data)

        await self._agent.ready()
        async for frame in self._agent.stub.dial(frames()):
            writer.write(frame.data)
            await writer.drain()


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _redirect(iptables: str, port: int) -> None:
    """(In the pod's namespace) send TCP to 127.0.0.1, except to *port*, to *port*."""
    def run(*args: str, check: bool = True) -> int:
        proc = subprocess.run([iptables, "-w", "5", "-t", "nat", *args], capture_output=True,
                              text=True, timeout=IPTABLES_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"iptables -t nat {' '.join(args)}: {proc.stderr.strip()}")
        return proc.returncode

    run("-N", CHAIN, check=False)  # exists already after a shim upgrade
    run("-F", CHAIN)
    run("-A", CHAIN, "-p", "tcp", "-d", "127.0.0.1", "!", "--dport", str(port),
        "-j", "REDIRECT", "--to-ports", str(port))
    if run("-C", "OUTPUT", "-o", "lo", "-j", CHAIN, check=False) != 0:
        run("-A", "OUTPUT", "-o", "lo", "-j", CHAIN)


def _original_port(sock: socket.socket) -> int:
    """The port a redirected connection was meant for (``struct sockaddr_in``)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port: int = struct.unpack_from("!H", raw, 2)[0]
    if not port:
        raise ValueError("connection without an original destination")
    return port
