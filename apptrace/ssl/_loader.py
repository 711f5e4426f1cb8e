"""Loading what the engine's :class:`~apptrace.bpf.Program` cannot load as is.

Two kinds of program in the TLS family need more than ``Program.load``:

- the return probe calls ``bpf_loop``, whose callback bcc cannot emit (it
  has no bpf-to-bpf linking): the callback is compiled as a function of its
  own; here it is appended to the caller, the ``ld_imm64`` placeholder
  becomes a ``BPF_PSEUDO_FUNC`` reference, and a minimal BTF (the verifier
  wants ``func_info`` for callbacks) says which function is static;
- the syscall and socket tracepoints need ``BPF_PROG_TYPE_TRACEPOINT`` and a
  tracepoint perf event.

Everything else (compile cache, maps, uprobes) is the engine's. The lead may
move these two into the engine's program layer; nothing here is TLS-specific.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import fcntl
import os
import struct
from typing import Optional

from apptrace.bpf import Program, close_links
from apptrace.capabilities import BPF_TRACE_UPROBE_MULTI, bpf, tracefs_path
from apptrace.errors import ApptraceError, TracePermissionError

__all__ = ["Loader", "tracepoint_fields"]

BPF_PROG_LOAD, BPF_BTF_LOAD = 5, 18
BPF_PROG_TYPE_KPROBE, BPF_PROG_TYPE_TRACEPOINT = 2, 5
_LD_IMM64 = 0x18
_PSEUDO_FUNC = 4
_BTF_KIND_INT, _BTF_KIND_FUNC, _BTF_KIND_FUNC_PROTO = 1, 12, 13
_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_SET_BPF = 0x40042408
_SYS_PERF_EVENT_OPEN = 298  # x86-64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _btf(main: str, callback: str) -> bytes:
    """BTF with an ``int``, a ``int (void)`` prototype, a global ``main`` and a
    static ``callback``: all the verifier checks for a bpf_loop callback."""
    strings = b"\0int\0" + main.encode() + b"\0" + callback.encode() + b"\0"

    def at(name: str) -> int:
        return strings.index(b"\0" + name.encode() + b"\0") + 1

    types = struct.pack("<IIII", at("int"), _BTF_KIND_INT << 24, 4, (1 << 24) | 32)  # [1]
    types += struct.pack("<III", 0, _BTF_KIND_FUNC_PROTO << 24, 1)                   # [2]
    types += struct.pack("<III", at(main), (_BTF_KIND_FUNC << 24) | 1, 2)            # [3]
    types += struct.pack("<III", at(callback), _BTF_KIND_FUNC << 24, 2)              # [4]
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                         len(strings))
    return header + types + strings


def _reads_r2_first(code: bytes) -> bool:
    """Does the callback copy R2 (its context) before anything writes R2?"""
    for i in range(len(code) // 8):
        op, regs = code[i * 8], code[i * 8 + 1]
        dst, src = regs & 0xF, regs >> 4
        if op == 0xBF and src == 2:   # mov64 rX, r2
            return True
        if dst == 2 and op & 0x07 in (0x00, 0x01, 0x04, 0x07):  # ld/ldx/alu/alu64 into r2
            return False
        if op == 0x85:                # a call clobbers r1-r5
            return False
    return False


def tracepoint_fields(category: str, event: str) -> Optional[dict[str, int]]:
    """Field offsets of a tracepoint from its format file (None if it is absent)."""
    base = tracefs_path()
    if base is None:
        return None
    try:
        with open(f"{base}/events/{category}/{event}/format") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        decl, _, rest = line.partition(";")
        name = decl.split()[-1].split("[")[0]
        for part in rest.split(";"):
            part = part.strip()
            if part.startswith("offset:"):
                out[name] = int(part[len("offset:"):])
    return out


class Loader:
    """Loads the TLS family's programs from one compiled :class:`Program`."""

    def __init__(self, prog: Program) -> None:
        self.prog = prog
        self._fds: list[int] = []

    def _bound(self, name: str) -> bytearray:
        obj = self.prog.obj
        try:
            code = bytearray(obj.obj.functions[name])
        except KeyError:
            raise ApptraceError(f"no BPF function {name} in the compiled TLS program") from None
        for index, map_name in obj.obj.relocs.get(name, ()):
            struct.pack_into("<i", code, index * 8 + 4, obj.maps[map_name].fd)
        return code

    def with_callback(self, main: str, callback: str, placeholder: int, *,
                      multi: bool) -> int:
        """Load ``main`` with ``callback`` appended as its bpf_loop callback."""
        code = self._bound(main)
        cb = self._bound(callback)
        if not _reads_r2_first(bytes(cb)):
            raise ApptraceError(f"the compiled {callback} does not read its context first;"
                                " this compiler cannot build the TLS program")
        count = len(code) // 8
        lo = struct.unpack("<i", struct.pack("<I", placeholder & 0xFFFFFFFF))[0]
        hi = struct.unpack("<i", struct.pack("<I", placeholder >> 32))[0]
        linked = 0
        for i in range(count - 1):
            op, regs, _off, imm = struct.unpack_from("<BBhi", code, i * 8)
            second = struct.unpack_from("<i", code, i * 8 + 12)[0]
            if op == _LD_IMM64 and imm == lo and second == hi:
                struct.pack_into("<BBhi", code, i * 8, _LD_IMM64,
                                 (_PSEUDO_FUNC << 4) | (regs & 0xF), 0, count - i - 1)
                struct.pack_into("<i", code, i * 8 + 12, 0)
                linked += 1
        if not linked:
            raise ApptraceError(f"{main} has no bpf_loop callback placeholder")
        btf = _btf(main, callback)
        btf_fd = self._load_btf(btf)
        try:
            func_info = struct.pack("<IIII", 0, 3, count, 4)
            return self._load(main, bytes(code + cb), BPF_PROG_TYPE_KPROBE,
                              BPF_TRACE_UPROBE_MULTI if multi else 0, btf_fd, func_info)
        finally:
            os.close(btf_fd)

    def uprobe(self, name: str, *, multi: bool) -> int:
        return self._load(name, bytes(self._bound(name)), BPF_PROG_TYPE_KPROBE,
                          BPF_TRACE_UPROBE_MULTI if multi else 0)

    def tracepoint(self, name: str) -> int:
        return self._load(name, bytes(self._bound(name)), BPF_PROG_TYPE_TRACEPOINT, 0)

    def _load_btf(self, blob: bytes) -> int:
        data = ctypes.create_string_buffer(blob, len(blob))
        attr = ctypes.create_string_buffer(144)
        struct.pack_into("<QQIII", attr, 0, ctypes.addressof(data), 0, len(blob), 0, 0)
        fd, err = bpf(BPF_BTF_LOAD, attr)
        if fd < 0:
            if err in (_errno.EPERM, _errno.EACCES):
                raise TracePermissionError("the kernel refused to load BTF")
            raise ApptraceError(f"the kernel refused the TLS program's BTF: {os.strerror(err)}")
        return fd

    def _load(self, name: str, insns: bytes, prog_type: int, attach_type: int,
              btf_fd: int = 0, func_info: bytes = b"") -> int:
        fd, err, log = self._prog_load(name, insns, prog_type, attach_type, btf_fd, func_info, 0)
        if fd < 0 and err not in (_errno.EPERM,):
            fd, err, log = self._prog_load(name, insns, prog_type, attach_type, btf_fd,
                                           func_info, 4 << 20)
        if fd < 0:
            if err == _errno.EPERM:
                raise TracePermissionError(f"the kernel refused to load BPF program {name}")
            tail = " | ".join(log.strip().splitlines()[-6:])
            raise ApptraceError(f"the kernel rejected BPF program {name}: {os.strerror(err)}"
                                + (f" (verifier: {tail})" if tail else ""))
        self._fds.append(fd)
        return fd

    @staticmethod
    def _prog_load(name: str, insns: bytes, prog_type: int, attach_type: int, btf_fd: int,
                   func_info: bytes, log_size: int) -> tuple[int, int, str]:
        code = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(log_size) if log_size else None
        info = ctypes.create_string_buffer(func_info, max(len(func_info), 1))
        attr = ctypes.create_string_buffer(144)
        struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(insns) // 8,
                         ctypes.addressof(code), ctypes.addressof(lic), 1 if log else 0,
                         log_size, ctypes.addressof(log) if log else 0)
        struct.pack_into("16s", attr, 48, name[:15].encode())
        struct.pack_into("<I", attr, 68, attach_type)
        if func_info:
            struct.pack_into("<IIQI", attr, 72, btf_fd, 8, ctypes.addressof(info),
                             len(func_info) // 8)
        fd, err = bpf(BPF_PROG_LOAD, attr)
        return fd, err, (log.value.decode("utf-8", "replace") if log else "")

    def attach_tracepoint(self, prog_fd: int, category: str, event: str) -> None:
        """Run ``prog_fd`` on every hit of a tracepoint (all CPUs, all processes)."""
        base = tracefs_path()
        if base is None:
            raise ApptraceError("tracefs is not mounted",
                                hint="mount -t tracefs nodev /sys/kernel/tracing")
        try:
            with open(f"{base}/events/{category}/{event}/id") as f:
                tp_id = int(f.read())
        except OSError as err:
            raise ApptraceError(f"no tracepoint {category}:{event}: {err.strerror}") from err
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIQQQ", attr, 0, _PERF_TYPE_TRACEPOINT, 128, tp_id, 1, 0)
        struct.pack_into("<I", attr, 48, 1)  # wakeup_events
        fd = _libc.syscall(_SYS_PERF_EVENT_OPEN, attr, -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            if code in (_errno.EPERM, _errno.EACCES):
                raise TracePermissionError(f"cannot open tracepoint {category}:{event}")
            raise ApptraceError(f"cannot open tracepoint {category}:{event}:"
                                f" {os.strerror(code)}")
        self._fds.append(fd)
        try:
            fcntl.ioctl(fd, _PERF_EVENT_IOC_SET_BPF, prog_fd)
            fcntl.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0)
        except OSError as err:
            raise ApptraceError(f"cannot attach to tracepoint {category}:{event}:"
                                f" {err.strerror}") from err

    def close(self) -> None:
        """Detach the tracepoints and drop the programs loaded here (before the
        engine's Program closes its maps)."""
        fds, self._fds = self._fds, []
        close_links(fds)
