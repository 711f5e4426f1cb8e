"""Read a HotSpot JVM's performance counters (hsperfdata) without attaching to it.

Every HotSpot JVM started with the default ``-XX:+UsePerfData`` keeps its
jvmstat counters in a file it maps shared: ``<tmpdir>/hsperfdata_<user>/<pid>``
(the pid as the JVM sees it, inside its PID namespace). ``jstat`` and
``jcmd PerfCounter.print`` read the same file. We parse it ourselves: no
maintained Python reader exists and the format is small.

Layout (HotSpot ``perfMemory.hpp``), all in the byte order the prologue names:

- prologue (32 bytes): magic ``ca fe c0 c0`` (always these bytes), byte order
  (1 little endian), major and minor version, accessible flag, used bytes,
  overflow bytes, modification time stamp (8), offset of the first entry,
  number of entries;
- entries, each: length, name offset, vector length (0 = scalar), data type
  (``J`` long, ``B`` byte vector, which strings are), flags, units (5 =
  string), variability, data offset. Offsets are relative to the entry.

The GC cause is the string ``sun.gc.cause`` while a collection runs and
``sun.gc.lastCause`` after it; the main class is the first word of
``sun.rt.javaCommand``.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass
from typing import Optional, Union

from apptrace.errors import ApptraceError
from apptrace.procs import nspid

__all__ = ["PerfEntry", "HsPerfData", "find_hsperfdata", "read_hsperfdata", "nspid"]

MAGIC = b"\xca\xfe\xc0\xc0"
_UNITS_STRING = 5


@dataclass(frozen=True)
class PerfEntry:
    """One counter: where its value sits in the file, and how to decode it."""

    name: str
    type: str          # 'J' long, 'B' byte vector (strings), others rare
    units: int
    vector_length: int
    offset: int        # of the value, from the start of the file
    size: int          # bytes of the value


class HsPerfData:
    """A parsed hsperfdata file: entry table plus the bytes it was read from.

    ``path`` is kept so :meth:`refresh` can re-read values (they change while
    the JVM runs; the entry table only grows).
    """

    def __init__(self, data: bytes, path: str = "") -> None:
        self.path = path
        if len(data) < 32 or data[:4] != MAGIC:
            raise ApptraceError(f"{path or 'data'}: not an hsperfdata file (bad magic)")
        order = "<" if data[4] == 1 else ">"
        self._order = order
        self.major, self.minor = data[5], data[6]
        self.accessible = bool(data[7])
        used, _overflow, _mod, entry_off, nentries = struct.unpack_from(order + "iiqii", data, 8)
        self.entries: dict[str, PerfEntry] = {}
        entry = struct.Struct(order + "iiibbbbi")
        off = entry_off
        end = min(len(data), used if used > 0 else len(data))
        for _ in range(max(0, nentries)):
            if off + entry.size > end:
                break
            length, name_off, vlen, dtype, _flags, units, _var, data_off = \
                entry.unpack_from(data, off)
            if length <= 0 or off + length > len(data):
                break
            nstart = off + name_off
            nend = data.find(b"\0", nstart, off + length)
            if nend < 0:
                break
            name = data[nstart:nend].decode("ascii", "replace")
            t = chr(dtype & 0xFF)
            size = vlen if vlen else (8 if t in "JD" else 4 if t in "IF" else 1)
            if t == "J" and vlen:
                size = 8 * vlen
            self.entries[name] = PerfEntry(name, t, units, vlen, off + data_off, size)
            off += length
        self._data = data

    @classmethod
    def from_file(cls, path: str) -> HsPerfData:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise ApptraceError(f"cannot read {path}: {err.strerror}") from err
        return cls(data, path)

    def refresh(self) -> None:
        """Re-read the file's bytes (values change; offsets stay)."""
        if not self.path:
            return
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError:
            return
        if len(data) >= len(self._data):
            if len(data) > len(self._data) or data[:32] != self._data[:32]:
                fresh = HsPerfData(data, self.path)
                self.entries = fresh.entries
            self._data = data

    def value(self, name: str) -> Union[int, str, None]:
        """A counter's value: int for longs, str for strings, None if absent."""
        e = self.entries.get(name)
        if e is None:
            return None
        raw = self._data[e.offset:e.offset + e.size]
        if e.type == "B" and (e.units == _UNITS_STRING or e.vector_length):
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if e.type == "J" and not e.vector_length:
            return int(struct.unpack(self._order + "q", raw)[0])
        if e.type == "I":
            return int(struct.unpack(self._order + "i", raw)[0])
        return None

    def string(self, name: str) -> Optional[str]:
        v = self.value(name)
        return v if isinstance(v, str) else None

    @property
    def main_class(self) -> Optional[str]:
        """The main class (or ``-jar`` file) from ``sun.rt.javaCommand``."""
        cmd = self.string("sun.rt.javaCommand")
        if not cmd:
            return None
        return cmd.split()[0]


def find_hsperfdata(pid: int) -> Optional[tuple[str, int, int]]:
    """Where the JVM ``pid`` keeps its counters: (path to open from here,
    address the JVM maps it at, file offset of that mapping), or None.

    The JVM's own mapping names the file, whatever its tmpdir or user; a
    JVM run with ``-XX:+PerfDisableSharedMem`` or ``-XX:-UsePerfData`` has
    none. Without a mapping (unreadable maps) the usual place is tried.
    """
    from apptrace.procs import read_maps

    want = str(nspid(pid))
    try:
        maps = read_maps(pid)
    except ApptraceError:
        maps = []
    for m in maps:
        if "/hsperfdata_" in m.path and os.path.basename(m.path) == want:
            return f"/proc/{pid}/root{m.path}", m.start, m.offset
    for path in glob.glob(f"/proc/{pid}/root/tmp/hsperfdata_*/{want}"):
        return path, 0, 0
    return None


def read_hsperfdata(pid: int) -> Optional[HsPerfData]:
    """The parsed counters of JVM ``pid``, or None when it publishes none."""
    where = find_hsperfdata(pid)
    if where is None:
        return None
    try:
        return HsPerfData.from_file(where[0])
    except ApptraceError:
        return None
