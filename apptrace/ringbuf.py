"""Read a BPF ring buffer by mapping it, decoding many records per call.

bcc's ``ring_buffer_poll`` calls back into Python through ctypes once per
event; at a million events a second that callback is the bottleneck. The
kernel's layout is simple enough to read directly (``kernel/bpf/ringbuf.c``):

- page 0: the consumer position (we write it);
- page 1: the producer position (the kernel writes it);
- then the data area, mapped twice in a row so a record that wraps around the
  end is still contiguous in our view.

Each record is an 8-byte header (``len`` with a BUSY bit while the producer
still writes it and a DISCARD bit, then a page offset) followed by ``len``
bytes, the total rounded up to 8. A group's records all have one size, so a
contiguous run of them is decoded with one ``struct.iter_unpack``.

A record of another size means the BPF side and the decoder disagree on the
layout (a bug, never a full ring): it is skipped and counted per probe in
:attr:`RingReader.decode_errors`, keyed by the probe index read from the
record's own header when the reader knows where that field is.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, Optional

__all__ = ["RingMapping", "RingReader"]

_BUSY = 1 << 31
_DISCARD = 1 << 30
_U32 = struct.Struct("<I")


class RingMapping:
    """A ring buffer map as its consumer sees it: the two positions and the
    data area (mapped twice in a row, so a record that wraps is contiguous).
    Readers of one record layout or of many build on it."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.fd = map_fd
        self.size = size
        self.mask = size - 1
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._view = memoryview(self._prod)
        # Positions are read and written as whole 8-byte words: struct.pack_into
        # writes byte by byte, and a kernel reading a half-written consumer
        # position sees a full ring and drops events.
        self._cons_q = memoryview(self._cons).cast("Q")
        self._prod_q = self._view[:8].cast("Q")
        self._data_off = page  # where the data area starts in the view

    def pending(self) -> int:
        """Bytes the producer committed (or reserved) that we have not read."""
        return int(self._prod_q[0] - self._cons_q[0])

    def close(self) -> None:
        # A drain cut short by a signal (the CLI raises there to end) may still
        # hold a slice of the ring in a frame its exception keeps alive while
        # the session closes: the mapping then goes when that view does.
        for v in (self._cons_q, self._prod_q, self._view):
            try:
                v.release()
            except BufferError:
                pass
        for m in (self._prod, self._cons):
            try:
                m.close()
            except BufferError:
                pass


class RingReader(RingMapping):
    """Consumer side of one ring buffer map whose records share one layout."""

    def __init__(self, map_fd: int, size: int, record: struct.Struct, *,
                 probe_offset: Optional[int] = None) -> None:
        super().__init__(map_fd, size)
        self.record = record
        self.stride = (record.size + 8 + 7) & ~7
        # record header (len, pgoff) skipped, payload, padding: for stride decoding
        self._payload = struct.Struct("<8x" + record.format.lstrip("<@=!>")
                                      + f"{self.stride - 8 - record.size}x")
        # Records the producer threw away (bpf_ringbuf_discard): not data.
        self.discarded = 0
        # Records whose size is not the layout's, by probe index (-1: unknown),
        # the index read as a u32 at ``probe_offset`` in the record.
        self.decode_errors: dict[int, int] = {}
        self.probe_offset = probe_offset


    def drain(self, max_records: int = 1 << 30) -> list[tuple[Any, ...]]:
        """Decode every committed record (up to ``max_records``), oldest first."""
        cons = start_cons = self._cons_q[0]
        prod = self._prod_q[0]
        out: list[tuple[Any, ...]] = []
        view = self._view
        base = self._data_off
        stride = self.stride
        size = self.record.size
        while cons < prod and len(out) < max_records:
            off = base + (cons & self.mask)
            # Decode a contiguous run of full-stride records in one call. The
            # ring never holds more than `size` bytes and its data is mapped
            # twice, so a run from any offset stays inside the mapping.
            n = min((prod - cons) // stride, max_records - len(out))
            if n > 0:
                chunk = view[off:off + n * stride]
                # The first u32 of every record is its length word; a run is
                # decoded at C speed up to the first one that is busy, discarded
                # or of another size.
                lens = chunk.cast("I")[::stride // 4].tolist()
                good = n if lens.count(size) == n else next(
                    i for i, h in enumerate(lens) if h != size)
                if good:
                    out.extend(self._payload.iter_unpack(chunk[:good * stride]))
                    cons += good * stride
                if good == n:
                    continue
            # The run stopped at a record that was not a committed one of our
            # size. Read its header again: it may have been committed since.
            hdr = _U32.unpack_from(view, base + (cons & self.mask))[0]
            if hdr & _BUSY:
                break  # still being written: it and what follows wait
            length = hdr & ~(_BUSY | _DISCARD)
            if hdr & _DISCARD:
                self.discarded += 1
            elif length == size:  # busy a moment ago, committed now
                out.append(self.record.unpack_from(view, base + (cons & self.mask) + 8))
            else:
                self._bad_size(base + (cons & self.mask) + 8, length)
            cons += (length + 8 + 7) & ~7
        if cons != start_cons:
            self._cons_q[0] = cons
        return out

    def _bad_size(self, payload: int, length: int) -> None:
        probe = -1
        at = self.probe_offset
        if at is not None and length >= at + 4:
            probe = _U32.unpack_from(self._view, payload + at)[0]
        self.decode_errors[probe] = self.decode_errors.get(probe, 0) + 1
