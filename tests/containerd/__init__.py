"""A private containerd for tests and benchmarks.

Everything lives under a temp root the caller owns:

    <tmp>/config.toml        rendered with absolute paths (containerd does not expand env vars)
    <tmp>/root, <tmp>/state  containerd's root and state
    <tmp>/containerd.sock    gRPC (what ctr talks to); <tmp>/containerd.sock.ttrpc
    <tmp>/containerd.log     containerd's stdout+stderr, appended across restarts
    <tmp>/bin                first on containerd's PATH: put containerd-shim-keel-v2 here
    <tmp>/opt                the io.containerd.internal.v1.opt plugin's path

The CRI plugin is disabled by default (fast boot, no CNI; tests/cri turns
it on and runs containerd in a network namespace), logging is at debug level,
and containerd runs with cwd = the temp root, so the only shims it finds are
the ones in `<tmp>/bin`, `<tmp>/opt/bin` and the system PATH (it resolves a
runtime name once and caches the answer for its lifetime: install the shim
before the first task that needs it).

Not isolated: the runc shim's sockets are hard-coded under
`/run/containerd/s`, ctr's fifos go to `/run/containerd/fifo`, and
containers land in the `/<namespace>/<id>` cgroups.  Use a namespace and
container ids no concurrent user shares.

Only processes this package started (containerd, ctr) are signalled, by
PID.  `leftovers()` finds what outlived a test; `force_cleanup()` removes
it.  Both see only what belongs to their temp root (see
tests/containerd/cleanup.py), so suites with containerds of their own can
share a host.

The parts: `daemon` (the `Containerd` process and its paths), `cleanup`
(leftovers), `terminal` (a command on a pty), `host` (tools, polling).
Import the names from here.
"""

from tests.containerd.cleanup import (
    Leftovers,
    alive,
    force_cleanup,
    keel_launchers,
    leftovers,
    processes_of,
    remove_root,
    stop_keel_launchers,
    wait_no_leftovers,
)
from tests.containerd.daemon import (
    BOOTED,
    DISABLED_PLUGINS,
    NAMESPACE,
    SHIM_NAME,
    Containerd,
    ContainerdPaths,
    install_shim_wrapper,
)
from tests.containerd.host import missing_prerequisites, rss_mib, wait_for, which
from tests.containerd.terminal import PtyResult, run_on_pty

__all__ = [
    "rss_mib",
    "BOOTED",
    "DISABLED_PLUGINS",
    "NAMESPACE",
    "SHIM_NAME",
    "Containerd",
    "ContainerdPaths",
    "Leftovers",
    "PtyResult",
    "alive",
    "force_cleanup",
    "install_shim_wrapper",
    "keel_launchers",
    "leftovers",
    "remove_root",
    "missing_prerequisites",
    "processes_of",
    "run_on_pty",
    "stop_keel_launchers",
    "wait_for",
    "wait_no_leftovers",
    "which",
]
