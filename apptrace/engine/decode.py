"""The generic argument decoder: records of a probe string's ring to :class:`Event`.

One decoder per group (probe string). In the common case (no faulted reads,
no strings, arguments that are plain 64-bit integers) an event is built from
a slice of its record; other sites get per-slot converters built once.
"""

from __future__ import annotations

import gc
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional

from apptrace.codegen import FLAG_ARG_FAILED, FLAG_COMM_SAME, FLAG_STR_TRUNC_SHIFT
from apptrace.engine.plan import HEADER_FIELDS, Group, ProbePlan, Slot
from apptrace.events import Event, ProbeInfo, Unavailable, make_event
from apptrace.probes import ArgType

__all__ = ["ArgDecoder", "DecodeCounts", "ThreadNames"]

_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_M64 = (1 << 64) - 1
_tuple_new = tuple.__new__

Symbolize = Callable[[list[Event], list[tuple[str, int]]], list[Event]]


@dataclass
class DecodeCounts:
    """What decoding found: cut strings and faulted reads (never silent)."""

    truncated_strings: int = 0
    read_faults: int = 0


class ThreadNames:
    """Thread names, shared by a session's decoders: the kernel leaves comm out
    of a record when the same thread's previous record on that CPU had it."""

    def __init__(self) -> None:
        self.by_tid: dict[int, str] = {}
        self.by_bytes: dict[bytes, str] = {}

    def lookup(self, pid: int, tid: int) -> str:
        """A thread whose named record we never saw (read through poll_raw)."""
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
                name = f.read().strip().decode("utf-8", "replace")
        except OSError:
            name = "?"
        self.by_tid[tid] = name
        return name


def string_value(t: ArgType, strs: bytes, slot: int, size: int,
                 raw_args: tuple[int, ...]) -> Any:
    """A string slot's value: text up to a NUL, ``str[argN]``'s bytes, or ``bytes[N]``."""
    raw = strs[slot * size:(slot + 1) * size]
    if t.kind == "bytes":
        return raw[:t.size]
    if t.len_arg is not None:
        n = raw_args[t.len_arg] if t.len_arg < len(raw_args) else 0
        if n >> 63:
            n -= 1 << 64
        return raw[:max(0, min(n, size))].decode("utf-8", "replace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def value(v: int, slot: Slot, strs: bytes = b"", raw_args: tuple[int, ...] = (),
          str_size: int = 0) -> Any:
    """One raw 64-bit argument as the probe string's type says."""
    t = slot.type
    if t is not None and t.kind in ("str", "bytes") and slot.str_slot >= 0:
        return string_value(t, strs, slot.str_slot, str_size, raw_args)
    if t is not None and t.kind == "float" or (t is None and slot.is_float):
        size = t.size if t is not None else slot.size
        if size == 4:
            return _F32.unpack(struct.pack("<I", v & 0xFFFFFFFF))[0]
        return _F64.unpack(_U64.pack(v))[0]
    if t is not None and t.kind == "int":
        bits = t.size * 8
        v &= (1 << bits) - 1
        if t.signed and v >> (bits - 1):
            v -= 1 << bits
        return v
    if slot.signed and v >> 63:
        return v - (1 << 64)
    return v


class ArgDecoder:
    """Decodes one group's records; symbolizes stacks in batches when asked."""

    def __init__(self, group: Group, names: ThreadNames, counts: DecodeCounts, *,
                 symbolize: Optional[Symbolize] = None) -> None:
        assert group.plan is not None
        self.group = group
        self.names = names
        self.counts = counts
        self.symbolize = symbolize if group.plan.stack_depth else None
        self.signs = group.direct_signs()
        self._converters: dict[tuple[int, int], tuple[ProbeInfo, list[Any]]] = {}

    def decode(self, records: list[tuple[Any, ...]]) -> list[Event]:
        """Records → Events, with the cyclic garbage collector paused.

        Events hold no cycles, but each is a new container object: with the
        collector running, building a batch of 100k of them triggers collections
        that walk every live event, and costs four times the decoding itself.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            out = self._decode(records)
        finally:
            if enabled:
                gc.enable()
        if self.symbolize is not None:
            probes = self.group.probes
            anchors = []
            for r in records:
                sites = probes[r[3]].sites
                st = sites[min(r[4], len(sites) - 1)]
                anchors.append((st.binary, st.vaddr))
            out = self.symbolize(out, anchors)
        return out

    def _decode(self, records: list[tuple[Any, ...]]) -> list[Event]:
        g = self.group
        assert g.plan is not None
        if self.signs is not None and not g.plan.nstr and not g.plan.stack_depth:
            return self._decode_plain(records)
        return self._decode_any(records)

    def _decode_plain(self, records: list[tuple[Any, ...]]) -> list[Event]:
        """The common case: integer arguments decoded by struct with their sign,
        no strings, no stacks. A record that carries flags (a faulted read)
        takes the general path."""
        nh = HEADER_FIELDS
        own = nh + self.group.nargs
        infos = [p.info for p in self.group.probes]
        comms = self.names.by_bytes
        thread_names = self.names.by_tid
        names_get = thread_names.get
        comms_get = comms.get
        new = _tuple_new
        out: list[Event] = []
        append = out.append
        for rec in records:
            flags = rec[5]
            tid = rec[2]
            if flags == FLAG_COMM_SAME:
                name = names_get(tid) or self.names.lookup(rec[1], tid)
            elif flags == 0:
                comm = rec[7]
                known = comms_get(comm)
                if known is None:
                    known = comms[comm] = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
                name = thread_names[tid] = known
            else:
                out.extend(self._decode_any([rec]))
                continue
            append(new(Event, (rec[0], rec[1], tid, name, infos[rec[3]], rec[nh:own], rec[4],
                               None, None, ())))
        return out

    def _decode_any(self, records: list[tuple[Any, ...]]) -> list[Event]:
        g = self.group
        plan = g.plan
        assert plan is not None
        nh = HEADER_FIELDS
        nargs = plan.nargs       # argument words in the record (padded to a shape)
        has_str = plan.nstr > 0
        end = nh + nargs
        own = nh + g.nargs       # the probe string's own arguments
        stack_base = end + (1 if has_str else 0)
        stack_depth = plan.stack_depth
        probes = g.probes
        comms = self.names.by_bytes
        thread_names = self.names.by_tid
        convs = self._converters
        direct = self.signs is not None
        out: list[Event] = []
        append = out.append
        for rec in records:
            ts, pid, tid, pidx, site, flags, nstack, comm = rec[:nh]
            key = (pidx, site)
            conv = convs.get(key)
            if conv is None:
                conv = convs[key] = self._converters_of(probes[pidx], site)
            info, fns = conv
            if flags & FLAG_COMM_SAME:
                flags &= ~FLAG_COMM_SAME
                name = thread_names.get(tid) or self.names.lookup(pid, tid)
            else:
                known = comms.get(comm)
                if known is None:
                    known = comms[comm] = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
                name = thread_names[tid] = known
            truncated: tuple[int, ...] = ()
            if flags or has_str:
                raw = rec[nh:end]
                if direct:  # back to the raw 64-bit values the slow path expects
                    raw = tuple([v & _M64 for v in raw])
                args, truncated = self._slow_args(probes[pidx], site, raw,
                                                  rec[end] if has_str else b"", flags)
            elif direct:
                args = rec[nh:own]
            else:
                args = tuple([f(v) if f else v for f, v in zip(fns, rec[nh:])])
            stack_ips = None
            if stack_depth:
                stack_ips = tuple(rec[stack_base:stack_base + max(0, nstack) // 8])
            append(make_event(ts, pid, tid, name, info, args, site, stack_ips, truncated))
        return out

    @staticmethod
    def _converters_of(p: ProbePlan, site: int) -> tuple[ProbeInfo, list[Any]]:
        """For one site: a function per argument slot (None: the raw value as is)."""
        s = p.sites[site] if site < len(p.sites) else p.sites[0]
        fns: list[Any] = []
        for slot in s.slots:
            if slot.unavailable is not None:
                gone = Unavailable(slot.unavailable)
                fns.append(lambda v, gone=gone: gone)
            elif slot.type is None and not slot.is_float and not slot.signed:
                fns.append(None)
            else:
                fns.append(lambda v, slot=slot: value(v, slot))
        return p.info, fns

    def _slow_args(self, p: ProbePlan, site: int, raw: tuple[int, ...], strs: bytes,
                   flags: int) -> tuple[tuple[Any, ...], tuple[int, ...]]:
        """Arguments with strings, faults or truncation; and the truncated indexes."""
        s = p.sites[site] if site < len(p.sites) else p.sites[0]
        args: list[Any] = []
        truncated: list[int] = []
        for i, slot in enumerate(s.slots):
            if slot.unavailable is not None:
                args.append(Unavailable(slot.unavailable))
            elif flags & (1 << i) & FLAG_ARG_FAILED:
                self.counts.read_faults += 1
                args.append(Unavailable("memory read faulted"))
            else:
                args.append(value(raw[i], slot, strs, raw, self.group.str_size))
                if slot.str_slot >= 0 and flags & (1 << (FLAG_STR_TRUNC_SHIFT + slot.str_slot)):
                    self.counts.truncated_strings += 1
                    truncated.append(i)
        return tuple(args), tuple(truncated)
