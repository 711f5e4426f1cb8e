"""The plan: what is attached where, read how, decoded how. Data only.

Every engine layer speaks in these records, so none needs another's
internals: the attach-point layer fills them from probe strings and ELF
files, the program layer turns them into C and attach calls, the stream
layer decodes records with them. A probe family with its own C can make its
own records or none; it never needs these.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from apptrace.codegen import HEADER, ArgRead, GroupPlan
from apptrace.events import ProbeInfo
from apptrace.probes import ArgType, ProbeSpec

__all__ = ["Slot", "Site", "ProbePlan", "Group", "HEADER_FIELDS", "PROBE_AT", "cookie"]

HEADER_FIELDS = len(HEADER.unpack(bytes(HEADER.size)))
PROBE_AT = struct.calcsize(HEADER.format[:4])  # offset of the probe index: ts, pid, tid


@dataclass
class Slot:
    """How Python presents one argument slot of one site."""

    unavailable: Optional[str]   # reason, when the BPF side cannot read it
    is_float: bool
    size: int
    signed: bool
    type: Optional[ArgType]
    str_slot: int = -1


@dataclass
class Site:
    """One attach point: a file offset in a binary, with its reader and slots."""

    binary: str       # path to attach (may be /proc/PID/root/...)
    file_offset: int
    ref_ctr_offset: int   # the semaphore the kernel raises (0: none, or procmem mode)
    semaphore_offset: int
    reader: int
    slots: list[Slot]
    vaddr: int = 0    # the site's address in the ELF (anchors stacks of exited processes)


@dataclass
class ProbePlan:
    """One resolved probe and its sites."""

    info: ProbeInfo
    sites: list[Site] = field(default_factory=list)
    # (binary, semaphore offset) raised for this probe without attaching its sites
    companions: list[tuple[str, int]] = field(default_factory=list)


class Group:
    """What one probe string matched: one ring, one record layout, one program body."""

    def __init__(self, gid: int, spec: ProbeSpec, *, fold: bool = False) -> None:
        self.gid = gid
        self.spec = spec
        self.fold = fold              # stacks counted in the kernel; no events
        self.where: Optional[str] = None  # a filter the kernel applies before the ring
        self.probes: list[ProbePlan] = []
        self.readers: dict[str, int] = {}
        self.reader_plans: list[tuple[tuple[ArgRead, ...], int]] = []
        self.nargs = 0
        self.nstr = 0
        self.str_size = 0  # bytes per string slot (str_max, or more for bytes[N])
        self.plan: Optional[GroupPlan] = None
        self.ring: Any = None          # a RingReader, once attached
        self.spare: Any = None         # several probes: the spare ring's reader

    @property
    def retprobe(self) -> bool:
        return self.spec.kind == "uretprobe"

    def reader(self, reads: tuple[ArgRead, ...], vaddr: int) -> int:
        """Dedup readers by the C they produce (rip-relative deltas differ per site)."""
        key_vaddr = vaddr if any(r.usdt is not None and r.usdt.symbol is not None
                                 for r in reads) else 0
        key = repr((reads, key_vaddr))
        rid = self.readers.get(key)
        if rid is None:
            rid = self.readers[key] = len(self.reader_plans)
            self.reader_plans.append((reads, key_vaddr))
        return rid

    def direct_signs(self) -> Optional[tuple[bool, ...]]:
        """Per slot, signed or not, if no slot of any site needs a conversion:
        then struct decodes the arguments with their sign ('q'/'Q') and an
        event's arguments are a slice of its record."""
        if self.nstr:
            return None
        signs: list[Optional[bool]] = [None] * self.nargs
        for p in self.probes:
            for site in p.sites:
                if len(site.slots) != self.nargs:
                    return None
                for i, sl in enumerate(site.slots):
                    t = sl.type
                    if sl.unavailable is not None or sl.is_float or sl.str_slot >= 0:
                        return None
                    if t is None:
                        signed = sl.signed
                    elif t.kind == "int" and t.size == 8:
                        signed = t.signed
                    else:
                        return None
                    if signs[i] is not None and signs[i] != signed:
                        return None
                    signs[i] = signed
        return tuple(bool(x) for x in signs)

    def record_struct(self) -> struct.Struct:
        """The ring's record layout, with argument signs where they are uniform."""
        assert self.plan is not None
        record = self.plan.event_struct()
        signs = self.direct_signs()
        if not signs:
            return record
        cut = len(HEADER.format)
        layout = self.plan.nargs  # a generic program's record may pad the arguments
        rest = record.format[cut + len(f"{layout}Q"):]
        pad = "Q" * (layout - len(signs))
        return struct.Struct(record.format[:cut] + "".join("q" if x else "Q" for x in signs)
                             + pad + rest)


def cookie(probe: int, site: int, reader: int) -> int:
    """The BPF cookie of a site: which probe, which site, which argument reader."""
    from apptrace.errors import OptionError

    if site > 0xFFFF or reader > 0xFFFF:
        raise OptionError("sites or argument layouts in one probe string",
                          max(site, reader) + 1, "at most 65536: narrow the probe string")
    return (probe << 32) | (site << 16) | reader
