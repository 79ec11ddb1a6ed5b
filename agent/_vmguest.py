"""``python -m agent._vmguest``: the agent's entry point inside a Keel VM.

The same agent (``agent.__main__.main``), plus what a VM guest without udev
needs from its PID 1: hot-added vCPUs come up offline (the kernel has no
policy for them; on a distribution udev onlines them), so a thread listens
for kernel uevents and writes ``1`` to ``/sys/devices/system/cpu/cpuN/online``
for every CPU added.  Hot-added memory needs nothing: the kernel onlines it
(``memhp_default_state=online`` on the command line).

The thread is a daemon thread with a blocking netlink socket: it shares
nothing with the agent's event loop, and a failure there is logged and
ends only the thread.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("keel.agent.hotplug")

NETLINK_KOBJECT_UEVENT = 15
#: Multicast group of the kernel's own uevents (1; udev re-broadcasts on 2).
_KERNEL_GROUP = 1
CPU_ROOT = Path("/sys/devices/system/cpu")


def online_cpu(cpu: Path, attempts: int = 20) -> bool:
    """Write 1 to *cpu*/online; True once it is online (retries while it is busy)."""
    for _ in range(attempts):
        try:
            if (cpu / "online").read_text().strip() == "1":
                return True
            (cpu / "online").write_text("1")
            return True
        except FileNotFoundError:
            return False  # cpu0 on x86 has no online switch; a removed CPU has none either
        except OSError as exc:
            log.debug("onlining %s: %s", cpu.name, exc)
            time.sleep(0.05)
    log.warning("could not online %s", cpu.name)
    return False


def online_all(root: Path = CPU_ROOT) -> list[str]:
    """Online every offline CPU under *root*; the names of those it onlined."""
    done = []
    for cpu in sorted(root.glob("cpu[0-9]*")):
        try:
            offline = (cpu / "online").read_text().strip() == "0"
        except OSError:
            continue
        if offline and online_cpu(cpu):
            done.append(cpu.name)
    return done


def parse_uevent(data: bytes) -> dict[str, str]:
    """The KEY=value fields of one kernel uevent message (``add@/devpath\\0KEY=value\\0...``)."""
    fields = {}
    for part in data.split(b"\0")[1:]:
        key, sep, value = part.partition(b"=")
        if sep:
            fields[key.decode(errors="replace")] = value.decode(errors="replace")
    return fields


def _watch(sock: socket.socket) -> None:
    try:
        while True:
            event = parse_uevent(sock.recv(8192))
            if event.get("SUBSYSTEM") == "cpu" and event.get("ACTION") == "add":
                cpu = Path("/sys" + event.get("DEVPATH", "/nonexistent"))
                if online_cpu(cpu):
                    log.info("hot-added %s is online", cpu.name)
    except Exception:  # noqa: BLE001 - a dead onliner must not take PID 1 down
        log.exception("vCPU onliner stopped")


def start_cpu_onliner() -> threading.Thread | None:
    """Start the uevent thread; None (logged) when the kernel refuses the socket."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                             NETLINK_KOBJECT_UEVENT)
        sock.bind((0, _KERNEL_GROUP))
    except OSError as exc:
        log.warning("no uevent socket (%s): hot-added vCPUs stay offline", exc)
        return None
    thread = threading.Thread(target=_watch, args=(sock,), name="cpu-onliner", daemon=True)
    thread.start()
    # A CPU added before the socket was bound produced no event we saw.
    online_all()
    return thread


#: ioctls of /dev/random: add entropy (and credit it), force a CRNG reseed.
_RNDADDENTROPY = 0x40085203
_RNDRESEEDCRNG = 0x5207
#: The ops port (shim/vmm/qemu/_initramfs.PORTS).
_OPS_PORT = "keel.ops"


# -- template VMs (shim/vmm/qemu/_template.py) ----------------------------------------------

#: What the agent imports before a template is snapshotted: everything a
#: clone needs to serve its first call (lazy imports included).  The image
#: build runs :func:`preload` too, to list the files that go into the
#: preload archive (shim/vmm/qemu/_preload.py).
PRELOAD = ("agent.__main__", "agent._cli", "agent._serial", "agent._upgrade", "agent._daemon",
           "agent.service", "ctypes", "fcntl", "random", "struct", "subprocess",
           "grpclib.server")
#: Seconds between reads of the ops port while no host is connected (a read returns EOF then).
_GO_POLL_S = 0.02
#: What the go line may be at most (args carry the agent's extra arguments).
_GO_MAX = 16384
_MS_MOVE = 8192


def preload() -> None:
    """Import :data:`PRELOAD` (what a template's agent has loaded when it is snapshotted)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


@dataclasses.dataclass(frozen=True, slots=True)
class Go:
    """What the host's ``go`` line gives a clone (FORMAT 2 of the template module)."""

    seed: bytes
    time: float
    hostname: str
    args: tuple[str, ...]


def parse_go(line: bytes) -> Go:
    """``go seed=<hex> time=<unix s> host=<name> [args=<b64 lines>]``; ValueError if malformed."""
    words = line.decode("ascii").split()
    if not words or words[0] != "go":
        raise ValueError(f"not a go line: {line[:80]!r}")
    fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    args = base64.b64decode(fields.get("args", ""), validate=True).decode()
    go = Go(seed=bytes.fromhex(fields["seed"]), time=float(fields["time"]),
            hostname=fields["host"], args=tuple(a for a in args.split("\n") if a))
    if len(go.seed) < 16 or not go.hostname:
        raise ValueError(f"bad go line: {line[:80]!r}")
    return go


def _wait_go(port: int) -> bytes:
    """Say ready on the ops port and read the go line (the snapshot is taken meanwhile)."""
    os.write(port, b"ready\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(port, 4096)
        if not chunk:
            # No host connected (a clone resumes before its host dials): poll.
            time.sleep(_GO_POLL_S)
            continue
        line += chunk
        if len(line) > _GO_MAX:
            raise ValueError("go line too long")
    return line


def _apply(go: Go) -> float:
    """A clone's own clock, hostname and RNG (the template's are stale or shared).

    Returns how far behind the clock was (the template's age, roughly).
    """
    behind = go.time - time.time()
    time.clock_settime(time.CLOCK_REALTIME, go.time)
    socket.sethostname(go.hostname)
    reseed_with(go.seed)
    return behind


def reseed_with(seed: bytes) -> None:
    """Credit *seed* to the kernel RNG, force a CRNG reseed, reseed Python's ``random``.

    Every clone resumes with its template's CRNG state, and writing to
    /dev/urandom only mixes into the input pool: credit the seed and force
    a reseed so that clones diverge now.
    """
    import fcntl
    import random
    import struct

    try:
        with open("/dev/random", "wb") as dev:
            fcntl.ioctl(dev, _RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(dev, _RNDRESEEDCRNG)
    except OSError as exc:  # a clone sharing its template's RNG is bad, a dead PID 1 worse
        log.error("reseeding the kernel RNG: %s", exc)
    random.seed()  # from os.urandom, now the clone's own


def _switch_root(debug: bool) -> None:
    """Mount the guest root and the share at /newroot (``/init clone-root``), move it onto
    / and enter it: the agent ends up where a cold boot's ``switch_root`` puts it."""
    import ctypes
    import subprocess

    subprocess.run(["/bin/busybox", "sh", "/init", "clone-root", "1" if debug else ""],
                   check=True)
    os.chdir("/newroot")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b".", b"/", None, _MS_MOVE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"moving /newroot onto /: {os.strerror(err)}")
    os.chroot(".")
    os.chdir("/")


def template_main(argv: list[str]) -> int:
    """The agent of a template VM: preload, wait for go, become the clone's agent.

    Python cannot change the hash seed of a running interpreter: every clone
    of one template shares the agent's ``PYTHONHASHSEED`` (random per
    template build).  Everything it starts (runc, container processes) is a
    new process with its own seed, from the reseeded kernel RNG.
    """
    debug = "--debug" in argv
    base = [a for a in argv if a not in ("--template", "--debug")]
    preload()
    from agent._serial import find_port

    port = os.open(find_port(_OPS_PORT), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        line = _wait_go(port)
        go = parse_go(line)
        behind = _apply(go)
        _switch_root(debug)
        import random

        # On the console: what tells clones apart (tests compare the check value).
        print(f"keel-vmguest: clone {go.hostname} resumed, clock was {behind:.1f}s behind, "
              f"random check {random.getrandbits(32):08x}", file=sys.stderr, flush=True)
        os.write(port, b"ok\n")
    except Exception as exc:  # noqa: BLE001 - tell the host why, then die (it cold-boots)
        os.write(port, f"error {type(exc).__name__}: {exc}\n".encode(errors="replace")[:400])
        raise
    finally:
        os.close(port)  # the agent opens it again (a port opens once)
    start_cpu_onliner()
    from agent.__main__ import main as agent_main

    return agent_main([*base, *go.args])


def main() -> int:
    if "--template" in sys.argv[1:]:
        return template_main(sys.argv[1:])
    if os.getpid() == 1:
        start_cpu_onliner()
    from agent.__main__ import main as agent_main

    return agent_main()


if __name__ == "__main__":
    sys.exit(main())
