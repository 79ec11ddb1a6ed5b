"""Start the agent as PID 1 of new pid/mount/uts/ipc/net namespaces.

Run as ``python -m shim.vmm.process._nsinit HOSTNAME LOG SHARE -- AGENT_ARGV...``.
It unshares the namespaces, makes its mount tree a slave of the host's,
forks (the child is PID 1 of the new pid namespace), and prints the
child's host pid on stdout before exiting, so the agent is owned by no
shim: it outlives shim handoffs, and the shim watches it through a pidfd.

SHARE lists the OCI namespace types the pod shares with the host
(``network``, ``ipc``, ``uts``, ``pid``; comma-separated, ``-`` for none):
those are not unshared, and with the host's UTS namespace the hostname is
left alone.  With the host's PID namespace the agent is no PID 1 but a
subreaper, and the shim stops the pod through its cgroups (``_cgroups``).  The mount tree is a slave, not private: host mounts made later
reach the sandbox (a container's ``rslave`` volume sees them), while
nothing mounted in the sandbox propagates back to the host.

Kept free of heavy imports: it runs on every sandbox start that the
launcher (shim/_launcher.py) does not serve; a launcher fork calls
:func:`enter_namespaces` and :func:`become_init` itself (shim/_launcher_child.py).
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC, MS_SLAVE = 0x4000, 1 << 19
#: OCI namespace type -> clone flag, for the types a sandbox may share.
_FLAGS = {"network": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS,
          "pid": CLONE_NEWPID}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, None), f"mount {target}")


def parse_share(arg: str) -> frozenset[str]:
    """SHARE as given on the command line; ValueError for an unknown type."""
    share = frozenset() if arg == "-" else frozenset(arg.split(","))
    if unknown := share - set(_FLAGS):
        raise ValueError(f"cannot share namespaces {sorted(unknown)} with the host")
    return share


def enter_namespaces(share: frozenset[str] = frozenset()) -> None:
    """Unshare the sandbox's namespaces (all but *share*) and make the mount
    tree a slave; the next child forked is PID 1 of the new pid namespace
    (unless *share* has ``pid``)."""
    flags = CLONE_NEWNS
    for kind, flag in _FLAGS.items():
        if kind not in share:
            flags |= flag
    _check(_libc.unshare(flags), "unshare")
    # Nothing we mount in the sandbox may propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_SLAVE)


def become_init(hostname: str, log: str, share: frozenset[str] = frozenset()) -> None:
    """In that child: own session, /proc of the new pid namespace, hostname
    (unless the UTS namespace is the host's), stdin from /dev/null, stdout
    and stderr to *log*."""
    os.setsid()
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if "uts" not in share:
        name = hostname.encode()
        _check(_libc.sethostname(name, len(name)), "sethostname")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(null)
    os.close(fd)


def main() -> int:
    hostname, log, share_arg, sep, *argv = sys.argv[1:]
    if sep != "--" or not argv:
        print("usage: _nsinit HOSTNAME LOG SHARE -- AGENT_ARGV...", file=sys.stderr)
        return 2
    share = parse_share(share_arg)
    enter_namespaces(share)
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        return 0
    try:
        become_init(hostname, log, share)
        os.execvp(argv[0], argv)
    except BaseException as exc:  # the child must never return into Python's caller
        os.write(2, f"keel nsinit: {exc}\n".encode())
    os._exit(127)


if __name__ == "__main__":
    sys.exit(main())
