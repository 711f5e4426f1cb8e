"""A consumer for the TLS ring buffer, whose records have several sizes.

:class:`apptrace.ringbuf.RingReader` decodes runs of one fixed-size record;
TLS data records carry up to 16 KiB of payload and come in many sizes, with
connection and close records in between. The kernel's layout is the same
(``kernel/bpf/ringbuf.c``): page 0 the consumer position (ours to write),
page 1 the producer position, then the data area mapped twice so a record
that wraps is contiguous. Each record is an 8-byte header (length with BUSY
and DISCARD bits, page offset) and the payload, rounded up to 8 bytes.
"""

from __future__ import annotations

import struct
from typing import Any

from apptrace.ringbuf import RingMapping
from apptrace.ssl._kernel import CLOSE, CLOSE_REC, CONN, CONN_REC, DATA, DATA_HDR

__all__ = ["TlsRing"]

_BUSY = 1 << 31
_DISCARD = 1 << 30
_U32 = struct.Struct("<I")


class TlsRing(RingMapping):
    """Drain TLS records as tuples: ``(DATA, *header, payload)``,
    ``(CONN, *fields)`` or ``(CLOSE, *fields)``."""

    def __init__(self, map_fd: int, size: int) -> None:
        super().__init__(map_fd, size)
        self.base = self._data_off
        self.discarded = 0   # records the kernel discarded (none expected)
        self.malformed = 0   # records of an unknown kind or size

    def drain(self, max_bytes: int = 1 << 62) -> list[tuple[Any, ...]]:
        """Every committed record (up to about ``max_bytes`` of ring), oldest first."""
        cons = start = self._cons_q[0]
        prod = self._prod_q[0]
        view = self._view
        base = self.base
        mask = self.mask
        out: list[tuple[Any, ...]] = []
        append = out.append
        hdr_size = DATA_HDR.size
        unpack_data = DATA_HDR.unpack_from
        while cons < prod and cons - start < max_bytes:
            off = base + (cons & mask)
            word = _U32.unpack_from(view, off)[0]
            if word & _BUSY:
                break
            length = word & ~(_BUSY | _DISCARD)
            if word & _DISCARD:
                self.discarded += 1
            else:
                p = off + 8
                kind = view[p]
                if kind == DATA and length >= hdr_size:
                    h = unpack_data(view, p)
                    n = h[6]
                    if hdr_size + n <= length:
                        append((DATA, *h[1:], bytes(view[p + hdr_size:p + hdr_size + n])))
                    else:
                        self.malformed += 1
                elif kind == CONN and length >= CONN_REC.size:
                    append(CONN_REC.unpack_from(view, p))
                elif kind == CLOSE and length >= CLOSE_REC.size:
                    append(CLOSE_REC.unpack_from(view, p))
                else:
                    self.malformed += 1
            cons += (length + 8 + 7) & ~7
        if cons != start:
            self._cons_q[0] = cons
        return out
