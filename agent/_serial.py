"""Agent channels over virtio-serial ports (qemu without vhost-vsock).

``--listen agent=serial:NAME`` serves a channel on the virtio-serial port
named NAME (``/dev/virtio-ports/NAME``, found through sysfs when udev made
no link), or on a character device given by absolute path (a pty in
tests).  grpclib needs a socket, a port is a character device, so
:func:`serial_listener` returns an ordinary listening unix socket (in a
private 0700 directory) that the channel's gRPC server serves as usual, and
a bridge relays bytes between the port and one connection to that socket
per *host session* (agent/_serial_bridge.py: the port's traps, and how the
bridge works around them).

In-place upgrade (agent/_upgrade.py): the port fd survives the execve
(``--listen-fd CHANNEL=serial:FD``), the session does not (its socket is
close-on-exec and the bridge lives in this image's memory).  Before the
exec the old image waits until its bridges are *quiet* and flushes them
(:meth:`Bridge.flush_nowait`), so the host has every byte of the old
session up to a frame boundary.  The host sees no EOF (the port stays
open), so the new image's bridge ends the host's session for it: if a host
is connected it writes an HTTP/2 GOAWAY frame, the host's connection
closes and it redials with a fresh preface, which starts a session on the
new image.  Until then host bytes are leftovers and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import tty
from pathlib import Path

from agent._serial_bridge import BUFFER_LIMIT, GOAWAY, PREFACE, Bridge, SerialStatistics

__all__ = [
    "BUFFER_LIMIT", "GOAWAY", "PREFACE", "Bridge", "SerialListener", "SerialStatistics",
    "bridges", "find_port", "inherited_serial_listener", "serial_listener",
]

log = logging.getLogger("keel.agent.serial")


def find_port(name: str) -> str:
    """The device path of virtio-serial port *name*; FileNotFoundError if absent."""
    if name.startswith("/"):
        return name
    link = Path("/dev/virtio-ports") / name
    if link.exists():
        return str(link)
    sysfs = Path("/sys/class/virtio-ports")
    for port in sorted(sysfs.iterdir()) if sysfs.is_dir() else ():
        try:
            if (port / "name").read_text().strip() == name:
                return f"/dev/{port.name}"
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name!r}")


#: The live bridge of each serial channel of this process (a port opens once).
_BRIDGES: dict[str, Bridge] = {}


def bridges() -> dict[str, Bridge]:
    """Channel -> bridge, for the channels served on virtio-serial ports now."""
    return dict(_BRIDGES)


class SerialListener(socket.socket):
    """The listening socket of a serial channel; closing it stops the bridge."""

    bridge: Bridge | None = None
    workdir: str | None = None

    def close(self) -> None:
        if self.bridge is not None:
            for channel, bridge in list(_BRIDGES.items()):
                if bridge is self.bridge:
                    del _BRIDGES[channel]
            self.bridge.close()
            self.bridge = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        super().close()


def serial_listener(channel: str, port: str, backlog: int = 16) -> SerialListener:
    """Open port *port* and return the listening socket its sessions arrive on.

    Must run inside the agent's event loop (the bridge lives there).
    Raises OSError naming the port (missing, busy: a port opens once).
    """
    try:
        path = find_port(port)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise OSError(exc.errno, f"channel {channel}: serial port {port}: {exc.strerror or exc}") from exc
    if os.isatty(fd):  # a pty or ttyS stand-in: bytes must pass untouched
        tty.setraw(fd)
    sock = _listen_on(channel, fd, backlog)
    log.info("channel %s: serial port %s (%s)", channel, port, path)
    return sock


def inherited_serial_listener(channel: str, fd: int, backlog: int = 16) -> SerialListener:
    """The port an in-place upgrade handed over as fd *fd*: a new bridge on it,
    and the previous image's host session ended (see the module docstring)."""
    try:
        os.fstat(fd)
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    except OSError as exc:
        raise OSError(exc.errno, f"channel {channel}: inherited serial port fd {fd}: "
                                 f"{exc.strerror or exc}") from exc
    _remove_stale_workdirs(channel)
    sock = _listen_on(channel, fd, backlog)
    assert sock.bridge is not None
    told = sock.bridge.end_host_session_nowait()
    log.info("channel %s: inherited serial port (fd %d)%s", channel, fd,
             "; told the host to redial" if told else "")
    return sock


def _remove_stale_workdirs(channel: str) -> None:
    """Remove the bridge directories of *channel* that an earlier image of this
    process left (its listener died with the execve): nobody listens on them."""
    for workdir in Path(tempfile.gettempdir()).glob(f"keel-{channel}-*"):
        try:
            st = workdir.lstat()
            if not workdir.is_dir() or workdir.is_symlink() or st.st_uid != os.getuid():
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
                probe.settimeout(0.5)
                probe.connect(str(workdir / "s"))
            continue  # someone listens: not ours to remove
        except ConnectionRefusedError:
            log.debug("removing %s, left by the previous agent image", workdir)
            shutil.rmtree(workdir, ignore_errors=True)
        except OSError:
            continue


def _listen_on(channel: str, fd: int, backlog: int) -> SerialListener:
    loop = asyncio.get_running_loop()
    workdir = tempfile.mkdtemp(prefix=f"keel-{channel}-")
    sock = SerialListener(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.workdir = workdir
    try:
        target = os.path.join(workdir, "s")
        sock.bind(target)
        sock.listen(backlog)
        sock.bridge = _BRIDGES[channel] = Bridge(loop, fd, target)
    except BaseException:
        os.close(fd)
        sock.close()
        raise
    return sock
