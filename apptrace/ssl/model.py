"""What a TLS capture yields: immutable chunks, gaps, connections and streams.

Offsets are positions in one connection direction's plaintext, counted by the
kernel from the first byte seen after attaching: a chunk's ``offset`` says
where its bytes go even when records arrive late or others were lost, and a
:class:`Gap` stands in the stream wherever bytes are known to be missing.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

__all__ = ["Connection", "Chunk", "Gap", "Stream", "CaptureStats", "reassemble",
           "format_addr"]


def format_addr(addr: Optional[tuple[str, int]]) -> Optional[str]:
    """``("127.0.0.1", 443)`` → ``"127.0.0.1:443"``, IPv6 in brackets."""
    if addr is None:
        return None
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Connection:
    """One TLS connection: a TLS object (``SSL*``, GnuTLS session, NSS
    ``PRFileDesc*``) in one process, with its socket when known.

    ``id`` is unique within a capture; a TLS object reused for a new
    connection (freed and allocated again, or given a new socket) gets a new
    id. ``fd``, ``laddr`` and ``raddr`` are None while unknown (a TLS object
    over memory BIOs, as node uses, has no socket of its own).
    """

    id: int
    pid: int
    handle: int
    lib: str
    fd: Optional[int] = None
    laddr: Optional[tuple[str, int]] = None
    raddr: Optional[tuple[str, int]] = None

    @property
    def five_tuple(self) -> str:
        """``tcp 127.0.0.1:40000 -> 127.0.0.1:443`` (local first), or ``?``."""
        if self.laddr is None or self.raddr is None:
            return "?" if self.fd is None else f"fd {self.fd}"
        return f"tcp {format_addr(self.laddr)} -> {format_addr(self.raddr)}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "fd": self.fd, "laddr": format_addr(self.laddr),
                "raddr": format_addr(self.raddr)}


@dataclass(frozen=True)
class Chunk:
    """Plaintext bytes one TLS call moved (all of them, or one piece of a
    large call: ``call_offset`` > 0 or ``len`` < ``call_len``).

    ``direction`` is ``"read"`` (received from the peer) or ``"write"`` (sent).
    A ``peek`` chunk shows bytes a later read returns again; it is not part of
    the stream and does not advance it.
    """

    ts_ns: int
    pid: int
    tid: int
    comm: str
    lib: str
    func: str
    direction: str
    conn: Connection
    offset: int
    data: bytes
    call_len: int
    call_offset: int
    peek: bool = False

    @property
    def len(self) -> int:
        return len(self.data)

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    @property
    def first(self) -> bool:
        """The first chunk of its call (the one that starts a call's output)."""
        return self.call_offset == 0

    def to_json(self) -> dict[str, Any]:
        out = {"ts_ns": self.ts_ns, "pid": self.pid, "tid": self.tid, "comm": self.comm,
               "lib": self.lib, "func": self.func, "direction": self.direction,
               "conn": self.conn.to_json(), "offset": self.offset, "len": len(self.data),
               "data_b64": base64.b64encode(self.data).decode("ascii")}
        if self.call_len != len(self.data):
            out["call_len"] = self.call_len
            out["call_offset"] = self.call_offset
        if self.peek:
            out["peek"] = True
        return out


@dataclass(frozen=True)
class Gap:
    """Bytes of a connection direction that the capture does not have.

    ``reason``: ``"lost"`` (the ring buffer was full: raise the ring size),
    ``"unreadable"`` (the buffer's pages were not in memory when copied) or
    ``"max-bytes"`` (beyond the per-call limit the user set).
    """

    ts_ns: int
    pid: int
    tid: int
    comm: str
    lib: str
    func: str
    direction: str
    conn: Connection
    offset: int
    length: int
    reason: str

    data = b""

    @property
    def len(self) -> int:
        return self.length

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_json(self) -> dict[str, Any]:
        return {"ts_ns": self.ts_ns, "pid": self.pid, "tid": self.tid, "comm": self.comm,
                "lib": self.lib, "func": self.func, "direction": self.direction,
                "conn": self.conn.to_json(), "offset": self.offset, "len": self.length,
                "data_b64": None, "gap": self.reason}


Item = Union[Chunk, Gap]


@dataclass(frozen=True)
class Stream:
    """One connection direction put back together.

    ``data`` holds every byte from ``start``; missing ranges are zero bytes
    and listed in ``gaps`` as (offset, length, reason).
    """

    conn: Connection
    direction: str
    start: int
    data: bytes
    gaps: tuple[tuple[int, int, str], ...]

    @property
    def complete(self) -> bool:
        return not self.gaps

    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def reassemble(items: Iterable[Item], conn: Union[Connection, int],
               direction: str) -> Stream:
    """The stream of ``conn`` (a Connection or its id) in ``direction`` from
    captured items, byte-exact where the capture is, with every hole named."""
    if direction not in ("read", "write"):
        raise ValueError("direction must be 'read' or 'write'")
    cid = conn.id if isinstance(conn, Connection) else int(conn)
    pieces: list[tuple[int, bytes]] = []
    gaps: list[tuple[int, int, str]] = []
    found: Optional[Connection] = conn if isinstance(conn, Connection) else None
    for it in items:
        if it.conn.id != cid or it.direction != direction:
            continue
        found = it.conn
        if isinstance(it, Gap):
            gaps.append((it.offset, it.length, it.reason))
        elif not it.peek:
            pieces.append((it.offset, it.data))
    if found is None:
        raise LookupError(f"connection {cid} has no {direction} data in this capture")
    pieces.sort(key=lambda p: p[0])
    ranges = sorted([(o, o + len(d)) for o, d in pieces] + [(o, o + n) for o, n, _ in gaps])
    start = ranges[0][0] if ranges else 0
    end = max((e for _, e in ranges), default=start)
    buf = bytearray(end - start)
    for off, data in pieces:
        buf[off - start:off - start + len(data)] = data
    # A hole nothing reported cannot happen with kernel offsets; name it if it does.
    pos = start
    for off, data in pieces:
        if off > pos and not any(g[0] <= pos < g[0] + g[1] for g in gaps):
            gaps.append((pos, off - pos, "missing"))
        pos = max(pos, off + len(data))
    gaps.sort()
    return Stream(found, direction, start, bytes(buf), tuple(gaps))


@dataclass(frozen=True)
class CaptureStats:
    """Counts for a capture's summary: what the kernel saw and what was lost."""

    calls: int = 0             # TLS calls that moved bytes
    bytes: int = 0             # bytes those calls moved
    chunks: int = 0            # data records delivered
    connections: int = 0
    lost_records: int = 0      # ring buffer full: records dropped
    lost_bytes: int = 0
    unreadable_bytes: int = 0  # buffer pages not resident when copied
    skipped_bytes: int = 0     # beyond --max-bytes
    gaps: int = 0              # gap items delivered
    lost_meta: int = 0         # connection/close records dropped
    nested_calls: int = 0      # TLS calls made inside another hooked call
    failed_calls: int = 0      # calls that returned an error or 0 bytes
    malformed: int = 0         # records the decoder could not read (a bug if not 0)

    @property
    def lost(self) -> int:
        """Everything lost, in bytes (``lost_bytes`` + unreadable)."""
        return self.lost_bytes + self.unreadable_bytes

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
