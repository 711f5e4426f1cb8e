"""USDT semaphores raised by writing ``/proc/PID/mem`` (the ``procmem`` mode).

The default mode hands the semaphore's file offset to the kernel
(``ref_ctr_offset``), which covers every process and drops the count if we
die. This mode exists for kernels without it and for users who want to touch
one process only. It is careful about where it writes: the address must fall
in a mapping of the *same file* (device and inode) at the semaphore's file
offset, otherwise we refuse rather than corrupt the target.
"""

from __future__ import annotations

import os
import struct

from apptrace.errors import ApptraceError, ProcessGoneError, TracePermissionError
from apptrace.procs import read_maps

__all__ = ["ProcMemSemaphores", "semaphore_address", "read_semaphore"]


def semaphore_address(pid: int, binary: str, file_offset: int) -> int:
    """Where the semaphore at ``file_offset`` of ``binary`` lives in PID's memory."""
    try:
        st = os.stat(binary)
    except OSError as err:
        raise ApptraceError(f"cannot stat {binary}: {err}") from err
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    same_file = [m for m in read_maps(pid) if m.inode == st.st_ino and m.dev == dev]
    if not same_file:
        same_file = [m for m in read_maps(pid) if m.inode == st.st_ino
                     and os.path.basename(m.path) == os.path.basename(binary)]
    for m in same_file:
        if m.offset <= file_offset < m.offset + (m.end - m.start) and "w" in m.perms:
            return m.start + (file_offset - m.offset)
    if same_file:
        raise ApptraceError(
            f"process {pid} maps {binary} but no writable mapping holds file offset"
            f" {file_offset:#x}; refusing to write its memory")
    raise ApptraceError(f"process {pid} does not map {binary} (device {dev[0]}:{dev[1]},"
                        f" inode {st.st_ino})",
                        hint="the library may not be loaded yet; kernel mode covers that")


def _mem(pid: int, mode: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", mode)
    except FileNotFoundError as err:
        raise ProcessGoneError(pid) from err
    except PermissionError as err:
        raise TracePermissionError(f"cannot open /proc/{pid}/mem") from err


def read_semaphore(pid: int, address: int) -> int:
    """The 16-bit counter at ``address`` in PID."""
    fd = _mem(pid, os.O_RDONLY)
    try:
        return struct.unpack("<H", os.pread(fd, 2, address))[0]
    finally:
        os.close(fd)


class ProcMemSemaphores:
    """Raise semaphores in one process; :meth:`close` lowers each one it raised."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._raised: dict[int, int] = {}  # address -> times we raised it

    def add(self, binary: str, file_offset: int) -> int:
        addr = semaphore_address(self.pid, binary, file_offset)
        self._bump(addr, +1)
        self._raised[addr] = self._raised.get(addr, 0) + 1
        return addr

    def _bump(self, addr: int, delta: int) -> None:
        fd = _mem(self.pid, os.O_RDWR)
        try:
            (cur,) = struct.unpack("<H", os.pread(fd, 2, addr))
            os.pwrite(fd, struct.pack("<H", max(0, min(0xFFFF, cur + delta))), addr)
        except OSError as err:
            if err.errno == 3 or not os.path.exists(f"/proc/{self.pid}"):
                raise ProcessGoneError(self.pid) from err
            raise ApptraceError(f"cannot update semaphore at {addr:#x} in {self.pid}: {err}")\
                from err
        finally:
            os.close(fd)

    def close(self) -> None:
        """Lower every semaphore we raised. A process that is gone needs nothing."""
        raised, self._raised = self._raised, {}
        for addr, n in raised.items():
            try:
                for _ in range(n):
                    self._bump(addr, -1)
            except ProcessGoneError:
                return
