"""The raw kernel calls apptrace makes itself: ``bpf(2)`` and the privilege test.

At the bottom of the package: :mod:`apptrace.bpfobj` (loading, maps),
:mod:`apptrace.bpf` (compiling, attaching) and :mod:`apptrace.capabilities`
(feature checks) all use it, and it uses none of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["bpf", "attr", "has_trace_privileges", "BPF_MAP_CREATE", "BPF_PROG_LOAD",
           "BPF_LINK_CREATE", "BPF_RAW_TRACEPOINT_OPEN", "BPF_PROG_TYPE_SOCKET_FILTER",
           "BPF_PROG_TYPE_KPROBE", "BPF_MAP_TYPE_RINGBUF", "BPF_TRACE_UPROBE_MULTI"]

_SYS_BPF = 321  # x86-64
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN, BPF_LINK_CREATE = 0, 5, 17, 28
BPF_PROG_TYPE_SOCKET_FILTER, BPF_PROG_TYPE_KPROBE = 1, 2
BPF_MAP_TYPE_RINGBUF = 27
BPF_TRACE_UPROBE_MULTI = 48
ATTR_SIZE = 144

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> tuple[int, int]:
    """Raw bpf(2): (return value, errno)."""
    ret = _libc.syscall(_SYS_BPF, cmd, attr, len(attr))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def attr() -> ctypes.Array[ctypes.c_char]:
    """A zeroed ``union bpf_attr``."""
    return ctypes.create_string_buffer(ATTR_SIZE)


def has_trace_privileges() -> bool:
    """CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON: what loading and attaching need.

    Checked on the effective capability set, not the uid: root with its
    capabilities dropped (a container, ``setpriv``) cannot trace.
    """
    caps = _cap_eff()
    return bool(caps >> 21 & 1 or (caps >> 39 & 1 and caps >> 38 & 1))


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0
