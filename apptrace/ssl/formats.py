"""Writers for captured TLS items: text, hex dump, JSON lines and pcapng.

Each writer takes items (:class:`Chunk` / :class:`Gap`) in capture order and
writes to a stream it is given; none of them prints on its own. pcapng frames
the plaintext as TCP over IP with the connection's real addresses, so
Wireshark follows each connection and dissects HTTP (a port Wireshark takes
for TLS, such as 443, needs "Decode As... HTTP": the bytes are plaintext).
"""

from __future__ import annotations

import datetime
import json
from typing import IO, Any, Optional, TextIO

from apptrace.ssl.model import Chunk, Connection, Gap, Item

__all__ = ["TextWriter", "HexWriter", "JsonlWriter", "PcapngWriter", "FORMATS",
           "escape_bytes"]

FORMATS = ("text", "hex", "jsonl", "pcapng")

_GAP_WHY = {"lost": "lost: the ring buffer was full (raise --ring-mb)",
            "unreadable": "not readable: the buffer was not in memory",
            "max-bytes": "not captured (--max-bytes)",
            "missing": "missing"}

_PRINTABLE = {i: chr(i) for i in range(0x20, 0x7F)}
_PRINTABLE[0x0A] = "\n"
_PRINTABLE[0x09] = "\t"
_TABLE = [_PRINTABLE.get(i, f"\\x{i:02x}") for i in range(256)]
_TABLE[0x5C] = "\\\\"
_TABLE[0x0D] = "\\r"


def escape_bytes(data: bytes) -> str:
    """Bytes as text a terminal shows as is: printable ASCII, newlines and tabs
    kept, everything else ``\\xNN`` (a backslash doubled)."""
    return "".join([_TABLE[b] for b in data])


class _Base:
    def __init__(self, out: Any, wall_offset_ns: int = 0) -> None:
        self.out = out
        self.wall_offset_ns = wall_offset_ns

    def clock(self, ts_ns: int) -> str:
        t = datetime.datetime.fromtimestamp((ts_ns + self.wall_offset_ns) / 1e9)
        return t.strftime("%H:%M:%S.%f")

    def header(self, it: Item) -> str:
        what = f"{it.len} bytes"
        if isinstance(it, Chunk):
            if it.call_len != it.len:
                what = f"{it.call_len} bytes" + ("" if it.first else
                                                 f" (from byte {it.call_offset})")
            if it.peek:
                what += " (peek: read again later)"
        return (f"{self.clock(it.ts_ns)} {it.comm}[{it.pid}/{it.tid}] {it.lib} {it.func}"
                f" conn#{it.conn.id} {it.conn.five_tuple} {it.direction} {what}")

    def gap_line(self, g: Gap) -> str:
        return (f"{self.clock(g.ts_ns) if g.ts_ns else '--'} conn#{g.conn.id} {g.direction}:"
                f" {g.length} bytes at offset {g.offset} {_GAP_WHY.get(g.reason, g.reason)}")

    def write(self, it: Item) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.flush()


class TextWriter(_Base):
    """One header line per TLS call, then its bytes with non-printables escaped."""

    def write(self, it: Item) -> None:
        out: TextIO = self.out
        if isinstance(it, Gap):
            out.write(f"-- {self.gap_line(it)} --\n")
            return
        text = escape_bytes(it.data)
        if it.first or it.peek:
            out.write(self.header(it) + "\n")
        out.write(text)
        if it.end - it.offset + it.call_offset >= it.call_len and not text.endswith("\n"):
            out.write("\n")


class HexWriter(_Base):
    """One header line per TLS call, then a hex dump (offsets within the call)."""

    def write(self, it: Item) -> None:
        out: TextIO = self.out
        if isinstance(it, Gap):
            out.write(f"-- {self.gap_line(it)} --\n")
            return
        if it.first or it.peek:
            out.write(self.header(it) + "\n")
        data = it.data
        lines = []
        for i in range(0, len(data), 16):
            row = data[i:i + 16]
            hexes = " ".join(f"{b:02x}" for b in row)
            text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
            lines.append(f"  {it.call_offset + i:08x}  {hexes:<47}  |{text}|\n")
        out.write("".join(lines))


class JsonlWriter(_Base):
    """One JSON object per line: a chunk (``data_b64``) or a gap (``gap``)."""

    def write(self, it: Item) -> None:
        self.out.write(json.dumps(it.to_json(), separators=(",", ":")) + "\n")


class _Frame(bytes):
    """Packet bytes with what scapy's pcapng writer reads from a packet: its
    time, comments and direction (bytes keep the file's one link type)."""

    time: float
    comments: Optional[list[bytes]]
    direction: int


class PcapngWriter(_Base):
    """Plaintext as TCP segments in a pcapng file (IPv4/IPv6, LINKTYPE_RAW).

    Sequence numbers are the stream offsets, so a gap is a missing segment
    Wireshark marks ("previous segment not captured"); each connection starts
    with a synthetic handshake. Connections without known addresses get
    documentation addresses (192.0.2.1:CONN_ID -> 192.0.2.2:80). ``out`` is a
    binary file opened for writing; its descriptor is written through scapy's
    pcapng writer.
    """

    _ISN_LOCAL = 0x10000000
    _ISN_REMOTE = 0x20000000

    def __init__(self, out: IO[bytes], wall_offset_ns: int = 0) -> None:
        super().__init__(out, wall_offset_ns)
        import logging

        logging.getLogger("scapy").setLevel(logging.ERROR)  # the library does not print
        from scapy.utils import PcapNgWriter as _ScapyWriter

        # The writer opens a path; /proc/self/fd/N reopens exactly the file
        # (or pipe) the CLI created privately, whatever the path now names.
        out.flush()
        self._w = _ScapyWriter(f"/proc/self/fd/{out.fileno()}")
        self._w.linktype = 101  # LINKTYPE_RAW: IPv4 or IPv6 by the version nibble
        self._seen: dict[int, list[int]] = {}   # conn id -> [next read off, next write off]
        self._pending: dict[tuple[int, str], list[str]] = {}

    @staticmethod
    def _ends(conn: Connection) -> tuple[tuple[str, int], tuple[str, int]]:
        if conn.laddr is not None and conn.raddr is not None:
            return conn.laddr, conn.raddr
        return ("192.0.2.1", 1024 + conn.id % 60000), ("192.0.2.2", 80)

    def _packet(self, conn: Connection, outbound: bool, flags: str, seq: int, ack: int,
                payload: bytes, ts_ns: int, comment: Optional[str] = None) -> None:
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6

        (lhost, lport), (rhost, rport) = self._ends(conn)
        src, sport, dst, dport = (lhost, lport, rhost, rport) if outbound else \
            (rhost, rport, lhost, lport)
        ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
        pkt = ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq & 0xFFFFFFFF,
                       ack=ack & 0xFFFFFFFF, window=65535)
        if payload:
            pkt = pkt / payload
        raw = _Frame(bytes(pkt))
        raw.time = (ts_ns + self.wall_offset_ns) / 1e9 if ts_ns else 0.0
        raw.comments = [comment.encode("utf-8", "replace")] if comment else None
        raw.direction = 2 if outbound else 1
        self._w.write(raw)

    def _start(self, it: Item) -> list[int]:
        state = self._seen.get(it.conn.id)
        if state is None:
            c = it.conn
            note = f"apptrace conn#{c.id} pid {c.pid} {c.lib} fd {c.fd}"
            self._packet(c, True, "S", self._ISN_LOCAL - 1, 0, b"", it.ts_ns, note)
            self._packet(c, False, "SA", self._ISN_REMOTE - 1, self._ISN_LOCAL, b"", it.ts_ns)
            self._packet(c, True, "A", self._ISN_LOCAL, self._ISN_REMOTE, b"", it.ts_ns)
            state = self._seen[it.conn.id] = [0, 0]
        return state

    def write(self, it: Item) -> None:
        state = self._start(it)
        key = (it.conn.id, it.direction)
        if isinstance(it, Gap):
            self._pending.setdefault(key, []).append(
                f"{it.length} bytes before this segment {_GAP_WHY.get(it.reason, it.reason)}")
            return
        if it.peek:
            return  # the same bytes come again with the read that consumes them
        outbound = it.direction == "write"
        d = 1 if outbound else 0
        seq = (self._ISN_LOCAL if outbound else self._ISN_REMOTE) + it.offset
        ack = (self._ISN_REMOTE + state[0]) if outbound else (self._ISN_LOCAL + state[1])
        notes = self._pending.pop(key, [])
        notes.append(f"{it.comm}[{it.pid}/{it.tid}] {it.func}")
        self._packet(it.conn, outbound, "PA", seq, ack, it.data, it.ts_ns, "; ".join(notes))
        state[d] = max(state[d], it.end)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.flush()
        self._w.close()


def make_writer(fmt: str, out: Any, wall_offset_ns: int = 0) -> _Base:
    """A writer for ``fmt`` (one of :data:`FORMATS`) on ``out``."""
    cls = {"text": TextWriter, "hex": HexWriter, "jsonl": JsonlWriter,
           "pcapng": PcapngWriter}[fmt]
    return cls(out, wall_offset_ns)

