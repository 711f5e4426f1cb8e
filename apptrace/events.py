"""What a trace produces: events, per-probe descriptions and statistics."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from apptrace.output import escape_text

if TYPE_CHECKING:
    from apptrace.symbolize import StackFrame

__all__ = ["Unavailable", "Event", "ProbeInfo", "RawBatch", "Stats"]


@dataclass(frozen=True)
class Unavailable:
    """An argument that could not be read, and why (never silently 0)."""

    reason: str

    def __str__(self) -> str:
        return f"<unavailable: {self.reason}>"


@dataclass(frozen=True)
class ProbeInfo:
    """One resolved probe: a USDT provider:name, or a symbol, in one binary."""

    kind: str      # usdt | uprobe | uretprobe
    binary: str
    name: str      # provider:name, or the symbol
    spec: str      # the probe string it came from
    sites: int = 1
    qualified: bool = False  # the label names the binary: another binary has this name

    @property
    def label(self) -> str:
        if self.qualified:
            return f"{self.kind}:{self.binary}:{self.name}"
        return f"{self.kind}:{self.name}"


_FIELDS = ("ts_ns", "pid", "tid", "comm", "probe", "args", "site", "stack", "raw_stack",
           "truncated")


class Event(tuple):  # type: ignore[type-arg]
    """One probe hit: immutable, its fields by name.

    ``args`` holds ints, floats, strings, bytes or :class:`Unavailable`;
    ``truncated`` lists the indexes of string arguments cut at the size
    limit; ``stack`` is the symbolized user stack (innermost first) and
    ``raw_stack`` its addresses, when stacks were asked for.

    A tuple underneath: the decoder builds a million of these a second, and
    a tuple is made in one C call where a frozen dataclass sets each field.
    """

    __slots__ = ()
    _fields = _FIELDS

    ts_ns: int
    pid: int
    tid: int
    comm: str
    probe: ProbeInfo
    args: tuple[Any, ...]
    site: int
    stack: Optional[tuple[StackFrame, ...]]
    raw_stack: Optional[tuple[int, ...]]
    truncated: tuple[int, ...]

    def __new__(cls, ts_ns: int, pid: int, tid: int, comm: str, probe: ProbeInfo,
                args: tuple[Any, ...], site: int = 0,
                stack: Optional[tuple[StackFrame, ...]] = None,
                raw_stack: Optional[tuple[int, ...]] = None,
                truncated: tuple[int, ...] = ()) -> Event:
        return _tuple_new(cls, (ts_ns, pid, tid, comm, probe, args, site, stack, raw_stack,
                                truncated))

    def replace(self, **changes: Any) -> Event:
        """A copy with some fields changed (``ev.replace(stack=frames)``)."""
        values = dict(zip(_FIELDS, self))
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(f"Event has no field(s) {', '.join(sorted(unknown))}")
        values.update(changes)
        return _tuple_new(Event, tuple(values[f] for f in _FIELDS))

    def __repr__(self) -> str:
        return "Event(" + ", ".join(f"{f}={v!r}" for f, v in zip(_FIELDS, self)) + ")"

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts_ns": self.ts_ns,
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            "probe": self.probe.label,
            "args": [_json_arg(a) for a in self.args],
        }
        if self.truncated:
            out["truncated"] = list(self.truncated)
        bad = {i: a.reason for i, a in enumerate(self.args) if isinstance(a, Unavailable)}
        if bad:
            out["unavailable"] = bad
        if self.stack is not None:
            out["frames"] = [f.to_json() for f in self.stack]
        return out

    def format(self) -> str:
        """One line for a terminal: every non-printable character escaped (a process
        may name itself with escape sequences); :meth:`to_json` stays exact."""
        parts = []
        for i, a in enumerate(self.args):
            if isinstance(a, (str, bytes)):
                parts.append(repr(a) + ("[truncated]" if i in self.truncated else ""))
            else:
                parts.append(str(a))
        return escape_text(f"{self.ts_ns / 1e9:.6f} {self.comm}[{self.pid}/{self.tid}]"
                           f" {self.probe.label} " + " ".join(parts)).rstrip()


_tuple_new = tuple.__new__
for _i, _name in enumerate(_FIELDS):
    setattr(Event, _name, property(operator.itemgetter(_i), doc=f"field {_name}"))
del _i, _name


def _json_arg(a: Any) -> Any:
    if isinstance(a, Unavailable):
        return None
    if isinstance(a, bytes):
        return a.hex()  # bytes[N] arguments: exact, as hex
    return a


def make_event(ts_ns: int, pid: int, tid: int, comm: str, probe: ProbeInfo,
               args: tuple[Any, ...], site: int = 0,
               raw_stack: Optional[tuple[int, ...]] = None,
               truncated: tuple[int, ...] = ()) -> Event:
    """An :class:`Event` without a stack (the decoder's fast path)."""
    return _tuple_new(Event, (ts_ns, pid, tid, comm, probe, args, site, None, raw_stack,
                              truncated))


@dataclass(frozen=True)
class RawBatch:
    """Records of one probe string as ``struct`` decoded them: no per-event objects.

    Each record is ``(ts_ns, pid, tid, probe_index, site, flags, nstack, comm,
    arg0..argN-1[, strings][, stack...])``; ``probes[probe_index]`` says which
    probe fired. Arguments are raw 64-bit values (sign-extended by the spec).
    ``comm`` is empty (and flags bit 31 set) when the thread's previous record
    on that CPU already carried it: the kernel side skips the copy.
    """

    probes: tuple[ProbeInfo, ...]
    nargs: int
    records: list[tuple[Any, ...]]


@dataclass
class Stats:
    """Counts for a session: delivered, lost (ring buffer full) and per probe."""

    events: int = 0
    lost: int = 0
    truncated_strings: int = 0
    read_faults: int = 0
    per_probe: dict[str, int] = field(default_factory=dict)
    lost_per_probe: dict[str, int] = field(default_factory=dict)
    # Records the decoder could not read (their size is not the layout's: a
    # bug in apptrace, not a full ring), in total and per probe.
    decode_errors: int = 0
    decode_errors_per_probe: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "lost": self.lost,
                "truncated_strings": self.truncated_strings, "read_faults": self.read_faults,
                "per_probe": dict(self.per_probe), "lost_per_probe": dict(self.lost_per_probe),
                "decode_errors": self.decode_errors,
                "decode_errors_per_probe": dict(self.decode_errors_per_probe)}
