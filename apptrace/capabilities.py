"""What this machine can do, asked of the kernel itself (features, not versions).

Every check returns a :class:`Check`; ``apptrace doctor`` prints them, the
engine uses the booleans to pick an attach method, and the tests build their
skip reasons from them. The BPF probes here use the raw ``bpf(2)`` syscall so
they work (and fail clearly) even when bcc is broken.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import glob
import os
import platform
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

__all__ = [
    "Check",
    "run_checks",
    "is_root",
    "has_ringbuf",
    "has_uprobe_multi",
    "ringbuf_status",
    "uprobe_multi_status",
    "tracefs_mounts",
    "has_ref_ctr_offset",
    "tracefs_path",
    "bcc_status",
    "find_jdks",
    "may_start",
]

# The raw calls live in apptrace.syscall (below bpf.py and bpfobj.py, which
# use them too); they are re-exported here for callers that check features.
from apptrace.syscall import (  # noqa: E402
    BPF_LINK_CREATE,
    BPF_MAP_CREATE,
    BPF_MAP_TYPE_RINGBUF,
    BPF_PROG_LOAD,
    BPF_PROG_TYPE_KPROBE,
    BPF_PROG_TYPE_SOCKET_FILTER,
    BPF_TRACE_UPROBE_MULTI,
    _cap_eff,
    bpf,
    has_trace_privileges,
)
from apptrace.syscall import (
    attr as _attr,
)


@dataclass(frozen=True)
class Check:
    """One line of ``apptrace doctor``."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True
    checked: bool = True   # False: could not run here (no privilege); ``ok`` means nothing

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix,
                "required": self.required, "checked": self.checked}


_RET0 = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
_GPL = ctypes.create_string_buffer(b"GPL")


def _load_trivial(prog_type: int, expected_attach: int = 0) -> tuple[int, int]:
    insns = ctypes.create_string_buffer(_RET0, len(_RET0))
    a = _attr()
    struct.pack_into("<IIQQ", a, 0, prog_type, 2, ctypes.addressof(insns),
                     ctypes.addressof(_GPL))
    struct.pack_into("<I", a, 68, expected_attach)  # expected_attach_type
    return bpf(BPF_PROG_LOAD, a)


def is_root() -> bool:
    return os.geteuid() == 0


@lru_cache(maxsize=None)
def can_load_bpf() -> tuple[bool, str]:
    fd, err = _load_trivial(BPF_PROG_TYPE_SOCKET_FILTER)
    if fd >= 0:
        os.close(fd)
        return True, "a socket-filter program loaded"
    return False, f"BPF_PROG_LOAD failed: {os.strerror(err)}"


_DENIED = (_errno.EPERM, _errno.EACCES)


@lru_cache(maxsize=None)
def ringbuf_status() -> Optional[bool]:
    """Can a BPF ring buffer be created? None: not allowed to ask (no privilege)."""
    a = _attr()
    struct.pack_into("<IIII", a, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    fd, err = bpf(BPF_MAP_CREATE, a)
    if fd >= 0:
        os.close(fd)
        return True
    return None if err in _DENIED and not has_trace_privileges() else False


def has_ringbuf() -> bool:
    return bool(ringbuf_status())


def has_uprobe_multi() -> bool:
    return bool(uprobe_multi_status())


@lru_cache(maxsize=None)
def uprobe_multi_status() -> Optional[bool]:
    """Load a kprobe program for BPF_TRACE_UPROBE_MULTI and ask for a link on
    "/": a kernel with uprobe_multi answers EBADF (not a regular file).
    None: not allowed to load the program, so the kernel was not asked."""
    fd, err = _load_trivial(BPF_PROG_TYPE_KPROBE, BPF_TRACE_UPROBE_MULTI)
    if fd < 0:
        return None if err in _DENIED and not has_trace_privileges() else False
    try:
        path = ctypes.create_string_buffer(b"/")
        offs = (ctypes.c_uint64 * 1)(0)
        a = _attr()
        struct.pack_into("<IIII", a, 0, fd, 0, BPF_TRACE_UPROBE_MULTI, 0)
        struct.pack_into("<QQQQII", a, 16, ctypes.addressof(path), ctypes.addressof(offs),
                         0, 0, 1, 0)
        link, err = bpf(BPF_LINK_CREATE, a)
        if link >= 0:
            os.close(link)
            return True
        return err == _errno.EBADF
    finally:
        os.close(fd)


UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"


def has_ref_ctr_offset() -> bool:
    return os.path.exists(f"{UPROBE_PMU}/format/ref_ctr_offset")


def tracefs_path() -> Optional[str]:
    for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.exists(f"{p}/uprobe_events"):
            return p
    return None


def tracefs_mounts() -> list[str]:
    """Where tracefs is mounted, from /proc/self/mountinfo (readable by anyone,
    unlike tracefs itself)."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "tracefs":
                    out.append(left.split()[4].replace("\\040", " "))
    except OSError:
        pass
    return out


@lru_cache(maxsize=None)
def bcc_status(compile_test: bool = True) -> tuple[bool, str]:
    """Is bcc importable, and can it compile a uprobe program here?"""
    from apptrace import bpf as _bpf  # the one module that imports bcc

    return _bpf.self_test(compile_test)


def find_jdks() -> list[tuple[str, int]]:
    """(libjvm.so path, number of hotspot probes) for every JDK under /usr/lib/jvm."""
    from apptrace.errors import ApptraceError
    from apptrace.usdt.notes import read_probes

    out = []
    seen: set[str] = set()
    for lib in sorted(glob.glob("/usr/lib/jvm/*/lib/server/libjvm.so")):
        real = os.path.realpath(lib)
        if real in seen:
            continue
        seen.add(real)
        try:
            n = sum(1 for p in read_probes(lib) if p.provider.startswith("hotspot"))
        except ApptraceError:
            n = 0
        out.append((lib, n))
    return out


def run_checks(*, progress: Optional[Callable[[str], None]] = None) -> list[Check]:
    """All doctor checks, in the order a user would fix them."""
    from apptrace.symbolize import symbolizer_available

    checks: list[Check] = []

    def step(name: str) -> None:
        if progress:
            progress(name)

    step("privileges")
    caps = _cap_eff()
    privileged = has_trace_privileges()
    checks.append(Check("privileges", privileged,
                        f"euid {os.geteuid()}, effective capabilities {caps:#x}",
                        "run as root with its capabilities, or grant CAP_BPF and CAP_PERFMON"))
    checks.append(Check("kernel", True, f"{platform.system()} {platform.release()}",
                        required=False))
    # Without privilege some checks cannot ask the kernel at all: say so rather
    # than report a missing feature (a wrong cause sends users the wrong way).
    unprivileged = ("not checked: asking the kernel needs CAP_BPF+CAP_PERFMON (root with its"
                    " capabilities has them)")
    again = "run `apptrace doctor` as root to check it"
    step("bpf")
    ok, detail = can_load_bpf()
    checks.append(Check("bpf program load", ok,
                        detail + ("" if ok or privileged else
                                  " (without root or CAP_BPF, as expected)"),
                        "run as root; check kernel.unprivileged_bpf_disabled and lockdown"))
    step("tracefs")
    tp = tracefs_path()
    mounts = tracefs_mounts()
    if tp is None and mounts and not privileged:
        checks.append(Check("tracefs", False, f"mounted at {', '.join(mounts)}; {unprivileged}",
                            again, checked=False))
    else:
        checks.append(Check("tracefs", tp is not None, tp or "not mounted",
                            "mount -t tracefs nodev /sys/kernel/tracing"))
    pmu = os.path.exists(f"{UPROBE_PMU}/type")
    checks.append(Check("uprobe PMU", pmu, UPROBE_PMU if pmu else "missing",
                        "kernel needs CONFIG_UPROBE_EVENTS"))
    checks.append(Check("uprobe ref_ctr_offset (kernel semaphores)", has_ref_ctr_offset(),
                        "supported" if has_ref_ctr_offset() else "missing",
                        "kernel >= 4.20; otherwise use --semaphores procmem",
                        required=False))
    rb = ringbuf_status()
    if rb is None:
        checks.append(Check("BPF ring buffer", False, unprivileged, again, checked=False))
    else:
        checks.append(Check("BPF ring buffer", rb,
                            "supported" if rb else "map creation refused",
                            "kernel >= 5.8 with BPF ring buffers"))
    um = uprobe_multi_status()
    if um is None:
        checks.append(Check("uprobe_multi link", False, unprivileged, again, required=False,
                            checked=False))
    else:
        checks.append(Check("uprobe_multi link", um, "supported" if um else "not supported",
                            "kernel >= 6.6; without it each site is a separate perf event",
                            required=False))
    step("bcc")
    if privileged:
        ok, detail = bcc_status()
        checks.append(Check("bcc", ok, detail,
                            "apt-get install python3-bpfcc and kernel headers; run `make setup`"))
    else:
        ok, detail = bcc_status(False)
        checks.append(Check("bcc", ok, f"{detail}; compiling and loading {unprivileged}"
                            if ok else detail,
                            again if ok else "apt-get install python3-bpfcc; run `make setup`",
                            checked=not ok))
    step("symbolizer")
    ok, detail = symbolizer_available()
    checks.append(Check("symbolizer (blazesym)", ok, detail, "run `make blazesym`",
                        required=False))
    step("jdks")
    jdks = find_jdks()
    with_probes = [f"{p} ({n} probes)" for p, n in jdks if n]
    checks.append(Check("JDKs with HotSpot probes", bool(with_probes),
                        "; ".join(with_probes) or "none under /usr/lib/jvm",
                        "install a JDK built with DTrace probes (Debian's openjdk-17)",
                        required=False))
    return checks


def may_start(state: str, what: str) -> bool:
    """The checks every single-use tracer's ``start()`` makes first: False if
    it already started (nothing to do); an error if ``what`` (e.g. "this
    capture") was closed or this process may not load BPF programs."""
    from apptrace.errors import SessionStateError, TracePermissionError

    if state == "closed":
        raise SessionStateError(f"{what} is closed; it is single-use")
    if state != "new":
        return False
    if not has_trace_privileges():
        raise TracePermissionError("not allowed to load BPF programs or attach uprobes")
    return True
