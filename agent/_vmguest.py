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


#: Where the guest init leaves a template clone's entropy (``shim/vmm/qemu/_template.py``).
SEED_FILE = Path("/run/keel/seed")
#: ioctls of /dev/random: add entropy (and credit it), force a CRNG reseed.
_RNDADDENTROPY = 0x40085203
_RNDRESEEDCRNG = 0x5207


def reseed(seed_file: Path = SEED_FILE) -> bool:
    """Reseed a template clone's kernel RNG from the host's seed; False if there is none.

    Every clone resumes with its template's CRNG state, and writing to
    /dev/urandom (what the init could do) only mixes into the input pool:
    credit the seed and force a reseed so that clones diverge now.
    """
    try:
        seed = bytes.fromhex(seed_file.read_text().strip())
        seed_file.unlink()
    except (OSError, ValueError):
        return False
    import fcntl
    import random
    import struct

    try:
        with open("/dev/random", "wb") as dev:
            fcntl.ioctl(dev, _RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(dev, _RNDRESEEDCRNG)
    except OSError as exc:  # a clone sharing its template's RNG is bad, a dead PID 1 worse
        log.error("reseeding the kernel RNG: %s", exc)
    random.seed()
    return True


def main() -> int:
    if os.getpid() == 1:
        reseed()
        start_cpu_onliner()
    from agent.__main__ import main as agent_main

    return agent_main()


if __name__ == "__main__":
    sys.exit(main())
