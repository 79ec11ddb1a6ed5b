"""The bridge between a virtio-serial port and per-session unix connections.

A channel served on a port (agent/_serial.py) needs a socket for grpclib;
this relays bytes between the port and one connection to that socket per
*host session*.

The port's traps (research/qemu.md section 6) shape the bridge:

* while no host client is connected the port polls ``POLLIN|POLLHUP``
  forever, so it is watched through an edge-triggered epoll (whose own fd
  is what asyncio watches), never a level-triggered reader;
* a host disconnect reads as EOF: the session ends (the agent's HTTP/2
  connection is closed and pending output dropped);
* a fast close and reconnect can be invisible (no EOF), so a read chunk
  that starts with the HTTP/2 client preface also starts a new session: a
  chunk never mixes bytes of two host connections, and the shim opens
  every connection with the preface and a Hello;
* bytes that arrive with no session and no preface are leftovers of a
  finished session: they are counted and dropped.

Buffers are bounded in both directions: when one is full the bridge stops
reading the other side, it never drops a session's bytes.

For an in-place upgrade the old image flushes its bridge
(:meth:`Bridge.flush_nowait`) and the new image's bridge ends the host's
stale session (:meth:`Bridge.end_host_session_nowait`); agent/_serial.py
says how the two fit together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import select
import socket
import time

log = logging.getLogger("keel.agent.serial")

#: What every HTTP/2 client connection starts with (RFC 9113, 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Bytes buffered per direction before the bridge stops reading the source.
BUFFER_LIMIT = 1 << 20
_READ = 65536
#: HTTP/2 GOAWAY (RFC 9113, 6.8): last stream 0, NO_ERROR.  What a resumed
#: bridge tells a host still attached to the previous image's session.
GOAWAY = b"\x00\x00\x08\x07\x00" + bytes(4) + bytes(4) + bytes(4)


@dataclasses.dataclass(frozen=True, slots=True)
class SerialStatistics:
    sessions: int
    bytes_from_host: int
    bytes_to_host: int
    stray_bytes: int


class Bridge:
    """Relays one port to per-session connections to *target* (callback driven)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port_fd: int, target: str) -> None:
        self._loop = loop
        self._fd = port_fd
        self._target = target
        self._ep = select.epoll()
        self._ep.register(port_fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        self._sess: socket.socket | None = None
        self._to_agent = bytearray()
        self._to_host = bytearray()
        # Edge-triggered: remember readiness we have not used up yet.
        self._readable = self._writable = True
        self._agent_paused = False
        self._stats = {"sessions": 0, "bytes_from_host": 0, "bytes_to_host": 0, "stray_bytes": 0}
        loop.add_reader(self._ep.fileno(), self._on_port)
        loop.call_soon(self._pump)

    @property
    def port_fd(self) -> int:
        return self._fd

    def statistics(self) -> SerialStatistics:
        return SerialStatistics(**self._stats)

    def host_connected(self) -> bool:
        """Whether a host client holds the port now (a port without one polls POLLHUP)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return not any(ev & select.POLLHUP for _fd, ev in poller.poll(0))

    def end_host_session_nowait(self) -> bool:
        """A resumed bridge: make a host still attached to the previous image's
        session drop it (GOAWAY) and redial.  True if a host was connected."""
        if not self.host_connected():
            return False
        self._to_host += GOAWAY
        self._pump()
        return True

    def quiet(self) -> bool:
        """Nothing waits to go to the host: the session socket is drained and so is the buffer."""
        if self._to_host:
            return False
        sess = self._sess
        return sess is None or not select.select([sess], [], [], 0)[0]

    def flush_nowait(self, timeout: float) -> bool:
        """Synchronously move what the session has written to the port (the
        last thing before an execve); True if everything went out in *timeout*."""
        end = time.monotonic() + timeout
        while True:
            more = self._sess is not None and self._recv_session_nowait()
            self._writable = True
            self._write_port()
            if not more and not self._to_host:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            if not more:
                select.select([], [self._fd], [], min(left, 0.01))

    def _recv_session_nowait(self) -> bool:
        assert self._sess is not None
        if len(self._to_host) >= BUFFER_LIMIT:
            return True
        try:
            data = self._sess.recv(_READ)
        except (BlockingIOError, OSError):
            return False
        self._to_host += data
        return bool(data)

    def _on_port(self) -> None:
        for _fd, ev in self._ep.poll(0):
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._readable = True
            if ev & select.EPOLLOUT:
                self._writable = True
        self._pump()

    def _pump(self) -> None:
        if self._fd < 0:
            return
        self._write_port()
        if self._readable and len(self._to_agent) < BUFFER_LIMIT:
            self._read_port()
        self._flush_agent()
        if self._agent_paused and len(self._to_host) < BUFFER_LIMIT and self._sess is not None:
            self._agent_paused = False
            self._loop.add_reader(self._sess.fileno(), self._on_session)

    def _read_port(self) -> None:
        eof_seen = False
        while len(self._to_agent) < BUFFER_LIMIT:
            try:
                chunk = os.read(self._fd, _READ)
            except BlockingIOError:
                self._readable = False
                return
            except OSError as exc:  # EIO and friends: treat like a disconnect
                log.warning("reading the serial port: %s", exc)
                chunk = b""
            if chunk:
                eof_seen = False
                self._from_host(chunk)
                continue
            # EOF: the host disconnected.  A disconnected port keeps reading
            # EOF; two in a row mean no new host has connected since.
            self._end_session("host disconnected")
            self._to_host.clear()
            if eof_seen:
                self._readable = False
                return
            eof_seen = True

    def _from_host(self, chunk: bytes) -> None:
        self._stats["bytes_from_host"] += len(chunk)
        if chunk.startswith(PREFACE):
            self._end_session("host started a new session")
            self._to_host.clear()
            self._start_session()
        elif self._sess is None:
            self._stats["stray_bytes"] += len(chunk)
            return
        self._to_agent += chunk

    def _start_session(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self._target)
        except OSError:
            sock.close()
            raise
        self._sess = sock
        self._stats["sessions"] += 1
        self._agent_paused = False
        self._loop.add_reader(sock.fileno(), self._on_session)

    def _end_session(self, why: str) -> None:
        sock, self._sess = self._sess, None
        self._to_agent.clear()
        if sock is None:
            return
        log.debug("serial session ended: %s", why)
        self._loop.remove_reader(sock.fileno())
        self._loop.remove_writer(sock.fileno())
        sock.close()

    def _on_session(self) -> None:
        assert self._sess is not None
        try:
            data = self._sess.recv(_READ)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("serial session socket: %s", exc)
            data = b""
        if not data:
            self._end_session("agent closed the connection")
            return
        self._to_host += data
        if len(self._to_host) >= BUFFER_LIMIT:
            self._agent_paused = True
            self._loop.remove_reader(self._sess.fileno())
        self._pump()

    def _flush_agent(self) -> None:
        sess = self._sess
        if sess is None or not self._to_agent:
            return
        try:
            sent = sess.send(self._to_agent)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.warning("serial session socket: %s", exc)
            self._end_session("agent connection failed")
            return
        del self._to_agent[:sent]
        if self._to_agent:
            self._loop.add_writer(sess.fileno(), self._on_session_writable)
        else:
            self._loop.remove_writer(sess.fileno())

    def _on_session_writable(self) -> None:
        self._pump()

    def _write_port(self) -> None:
        while self._writable and self._to_host:
            try:
                n = os.write(self._fd, self._to_host[:_READ])
            except BlockingIOError:
                self._writable = False
                return
            except OSError as exc:
                log.warning("writing the serial port: %s", exc)
                self._to_host.clear()
                return
            self._stats["bytes_to_host"] += n
            del self._to_host[:n]

    def close(self) -> None:
        """End the session and close the port; idempotent.  (The listener that
        owns this bridge also drops it from the channel registry.)"""
        if self._fd < 0:
            return
        self._end_session("channel closed")
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        os.close(self._fd)
        self._fd = -1
