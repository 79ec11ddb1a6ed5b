"""The exec-like look of a forked process: /proc/self/cmdline and environ.

A shim daemon or agent forked by the launcher (shim/_launcher.py) would
otherwise show the launcher's command line, and tools and people find
shims by their flags.  ``prctl(PR_SET_MM_MAP)`` points the kernel's argv
and environment area at a new buffer, so both files read as after an
exec.  Needs CAP_SYS_RESOURCE (root, as the shim runs); where the kernel
refuses, the caller falls back to a setproctitle title.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any

#: prctl(2) option and its sub-option.
PR_SET_MM, PR_SET_MM_MAP = 35, 14
#: The struct prctl_mm_map fields that are addresses, in order.
_FIELDS = ("start_code end_code start_data end_data start_brk brk start_stack "
           "arg_start arg_end env_start env_end").split()

_cmdline_buf: Any = None  # the new argv and env area: must live as long as the process


class _MmMap(ctypes.Structure):
    _fields_ = [*((n, ctypes.c_uint64) for n in _FIELDS), ("auxv", ctypes.c_uint64),
                ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


def set_cmdline(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Make /proc/self/cmdline and /proc/self/environ read *argv* and *env*
    as after an exec (tools and people match shims by their flags), with
    prctl(PR_SET_MM_MAP); False where the kernel refuses (then a
    setproctitle title stands in).

    PR_SET_MM_MAP sets every field of the memory map at once, so the others
    are read back from /proc/self/stat, and brk with sbrk(0) as the last
    step before the call (nothing in between allocates from the heap).
    """
    global _cmdline_buf

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sbrk.restype = ctypes.c_void_p
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                               ctypes.c_ulong]
        raw = b"".join(a.encode() + b"\0" for a in argv)
        env_raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        buf = ctypes.create_string_buffer(raw + env_raw, len(raw) + len(env_raw))
        base = ctypes.addressof(buf)
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().rsplit(b")", 1)[1].split()
        field = lambda n: int(stat[n - 3])  # noqa: E731 - proc(5) numbers fields from 1
        m = _MmMap(start_code=field(26), end_code=field(27), start_data=field(45),
                   end_data=field(46), start_brk=field(47), start_stack=field(28),
                   arg_start=base, arg_end=base + len(raw), env_start=base + len(raw),
                   env_end=base + len(raw) + len(env_raw), auxv=0, auxv_size=0,
                   exe_fd=0xFFFFFFFF)
        m.brk = libc.sbrk(0)
        if libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(m), ctypes.sizeof(m), 0) != 0:
            return False
    except (OSError, AttributeError, ValueError, IndexError):
        return False
    _cmdline_buf = buf
    return True
