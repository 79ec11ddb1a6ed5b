"""Shell workloads shared by the tests that keep a container busy across an upgrade.

The counter prints 0, 1, 2... until an exec (``STOPPER``) creates
/tmp/stop, then prints "end" and exits 7.  It must not exit while the
stopper still runs: when a container's init exits, the kernel SIGKILLs
every process left in its PID namespace (pid_namespaces(7)), so a plain
``touch /tmp/stop`` that is descheduled between creating the file and
exiting ends with status 137.  Stock runc shows that under CPU load too.
So the stopper writes its own pid into the file (atomically, by rename),
and the counter waits for that process to be gone before it exits.
"""

from __future__ import annotations


def counter(interval_us: int = 2000) -> str:
    """``sh -c`` script: count every *interval_us* until stopped; exits 7."""
    return ("i=0; while [ ! -e /tmp/stop ]; do echo $i; i=$((i+1)); "
            f"usleep {interval_us}; done; "
            "read p < /tmp/stop; while [ -e /proc/$p ]; do usleep 1000; done; "
            "echo end; exit 7")


#: The exec that stops :func:`counter` (exits 0; the counter waits for it).
STOPPER = ("sh", "-c", "echo $$ > /tmp/stop.new && mv /tmp/stop.new /tmp/stop")
