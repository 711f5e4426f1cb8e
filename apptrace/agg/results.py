"""What an aggregation gives back: immutable rows, histograms, and their text.

Counts, sums, minimums and maximums are exact. Percentiles come from a
histogram, so they are known only to their bucket: :meth:`Histogram.percentile`
returns the bucket, and the text says "p99 < 2.1ms" (the bucket's upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from apptrace.output import escape_text

__all__ = ["Bucket", "Histogram", "Row", "AggregateResult", "LatencyRow", "LatencyResult",
           "log2_histogram", "linear_histogram", "format_ns", "format_count"]

LOG2_BUCKETS = 65   # < 0, 0, then [2^k, 2^(k+1)) for k = 0..62
_BAR = 40


@dataclass(frozen=True)
class Bucket:
    """Values ``lo <= v < hi``; ``lo`` None: no lower bound, ``hi`` None: no upper."""

    lo: Optional[int]
    hi: Optional[int]
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "count": self.count}


@dataclass(frozen=True)
class Histogram:
    """A log2 (``kind="log2"``) or linear histogram; only buckets from the first
    to the last non-empty one are kept (all of them for linear)."""

    kind: str
    buckets: tuple[Bucket, ...]

    @property
    def total(self) -> int:
        return sum(b.count for b in self.buckets)

    def percentile(self, q: float) -> Optional[Bucket]:
        """The bucket holding the value at quantile ``q`` (0 < q <= 1)."""
        total = self.total
        if not total:
            return None
        rank = max(1, -(-int(q * total * 1000) // 1000))  # ceil(q * total), float-safe
        seen = 0
        for b in self.buckets:
            seen += b.count
            if seen >= rank:
                return b
        return self.buckets[-1]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "buckets": [b.to_json() for b in self.buckets if b.count
                                               or self.kind == "linear"]}

    def format(self, unit: str = "") -> list[str]:
        """bpftrace-like lines: ``[lo, hi)  count |@@@@   |``."""
        if not self.buckets:
            return []
        peak = max(b.count for b in self.buckets) or 1
        labels = [_bucket_label(b, self.kind, unit) for b in self.buckets]
        width = max(len(lb) for lb in labels)
        cw = max(len(str(b.count)) for b in self.buckets)
        out = []
        for lb, b in zip(labels, self.buckets):
            bar = "@" * (b.count * _BAR // peak) if b.count else ""
            out.append(f"{lb:<{width}} {b.count:>{cw}} |{bar:<{_BAR}}|")
        return out


def _value(v: int, unit: str) -> str:
    return format_ns(v) if unit == "ns" else format_count(v)


def _bucket_label(b: Bucket, kind: str, unit: str) -> str:
    if b.lo is None:
        return f"(..., {_value(b.hi or 0, unit)})"
    if b.hi is None:
        return f"[{_value(b.lo, unit)}, ...)"
    if kind == "log2" and b.hi == b.lo + 1:
        return f"[{_value(b.lo, unit)}]"
    return f"[{_value(b.lo, unit)}, {_value(b.hi, unit)})"


def format_count(v: int) -> str:
    """1024-based suffixes for powers of two, as bpftrace prints them."""
    for suffix, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if v and v % (1 << shift) == 0:
            return f"{v >> shift}{suffix}"
    return str(v)


def format_ns(ns: float) -> str:
    """A duration with three significant digits: 512ns, 1.05us, 2.1ms, 3.2s."""
    a = abs(ns)
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if a >= div:
            x = ns / div
            return f"{x:.3g}{unit}"
    return f"{int(ns)}ns"


def log2_histogram(counts: Sequence[int]) -> Histogram:
    """From the kernel's buckets: index 0 holds v < 0, 1 holds 0, k >= 2 holds
    [2^(k-2), 2^(k-1))."""
    buckets = []
    for i, c in enumerate(counts[:LOG2_BUCKETS]):
        if i == 0:
            buckets.append(Bucket(None, 0, c))
        elif i == 1:
            buckets.append(Bucket(0, 1, c))
        else:
            buckets.append(Bucket(1 << (i - 2), 1 << (i - 1) if i - 1 < 63 else None, c))
    nz = [i for i, b in enumerate(buckets) if b.count]
    if not nz:
        return Histogram("log2", ())
    return Histogram("log2", tuple(buckets[nz[0]:nz[-1] + 1]))


def linear_histogram(counts: Sequence[int], lo: int, hi: int, step: int) -> Histogram:
    """From the kernel's buckets: below ``lo``, then ``step`` wide up to ``hi``, then
    ``hi`` and above."""
    n = len(counts) - 2
    buckets = [Bucket(None, lo, counts[0])]
    for j in range(n):
        a = lo + j * step
        buckets.append(Bucket(a, min(a + step, hi), counts[1 + j]))
    buckets.append(Bucket(hi, None, counts[-1]))
    if not buckets[0].count:
        buckets = buckets[1:]
    if not buckets[-1].count:
        buckets = buckets[:-1]
    return Histogram("linear", tuple(buckets))


# -- aggregations -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One key's numbers. ``key`` holds the key values in
    :attr:`AggregateResult.keys` order (a ``ustack`` key is a tuple of frame
    names, innermost first). ``truncated`` names keys whose string was cut at
    the bound; ``faulted`` keys whose argument could not be read."""

    key: tuple[Any, ...]
    count: int
    sum: Optional[int] = None
    min: Optional[int] = None
    max: Optional[int] = None
    avg: Optional[float] = None
    hist: Optional[Histogram] = None
    truncated: tuple[str, ...] = ()
    faulted: tuple[str, ...] = ()

    def key_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {n: _json_key(v) for n, v in zip(names, self.key)}


def _json_key(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, tuple):
        return list(v)
    return v


class _Keyed:
    """What a result of keyed rows answers: the total and one key's row."""

    rows: tuple[Any, ...]

    @property
    def count(self) -> int:
        return sum(r.count for r in self.rows)

    def row(self, *key: Any) -> Any:
        """The row of ``key`` (one value per key name), or None."""
        return next((r for r in self.rows if r.key == key), None)


@dataclass(frozen=True)
class AggregateResult(_Keyed):
    """Everything counted over one interval (or the whole run).

    ``stats`` says which values were asked for: (name, expression) pairs such
    as ``("sum", "arg0")``, ``("hist", "arg0")``. ``not_counted`` is the hits
    that found the map full (raise ``max_keys``); never silent.
    """

    keys: tuple[str, ...]
    rows: tuple[Row, ...]
    stats: tuple[tuple[str, str], ...] = ()
    interval: int = 0          # 0: the whole run; 1, 2, ...: the n-th interval
    seconds: float = 0.0       # how long the counting ran
    not_counted: int = 0
    max_keys: int = 0
    key_str_max: int = 0       # strings in keys are cut to this many bytes
    probes: tuple[str, ...] = ()
    value_faults: int = 0      # hits skipped: an argument a value needs could not be read
    filter_faults: int = 0     # hits skipped: an argument the filter needs could not be read
    raced: int = 0             # hits skipped: another hit took this CPU's scratch space

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d: dict[str, Any] = {"key": r.key_dict(self.keys), "count": r.count}
            for name in ("sum", "min", "max", "avg"):
                v = getattr(r, name)
                if v is not None:
                    d[name] = v
            if r.hist is not None:
                d["hist"] = r.hist.to_json()
            if r.truncated:
                d["truncated"] = list(r.truncated)
            if r.faulted:
                d["faulted"] = list(r.faulted)
            rows.append(d)
        return {"type": "aggregate", "interval": self.interval, "seconds": round(self.seconds, 6),
                "keys": list(self.keys), "stats": [list(s) for s in self.stats],
                "count": self.count, "rows": rows, "not_counted": self.not_counted,
                "max_keys": self.max_keys, "key_str_max": self.key_str_max,
                "value_faults": self.value_faults, "filter_faults": self.filter_faults,
                "raced": self.raced, "probes": list(self.probes)}

    def format(self) -> str:
        """A table of counts and values, or one histogram per key."""
        out: list[str] = []
        head = f"{self.count} hits" + (f" in {self.seconds:.2f}s" if self.seconds else "")
        if self.interval:
            head = f"interval {self.interval}: " + head
        if self.key_str_max:
            head += f" (strings in keys cut at {self.key_str_max} bytes, '...' marks a cut one)"
        out.append(head)
        hist = next((e for s, e in self.stats if s == "hist"), None)
        scalar = [(s, e) for s, e in self.stats if s != "hist"]
        rows = sorted(self.rows, key=lambda r: (-r.count, _sort_key(r.key)))
        if hist is not None:
            for r in sorted(self.rows, key=lambda r: _sort_key(r.key)):
                label = ", ".join(f"{n}={_show(v, n in r.truncated, n in r.faulted)}"
                                  for n, v in zip(self.keys, r.key) if n != "ustack")
                values = [f"count {r.count}"] + [f"{s}({e}) {_num(getattr(r, s))}"
                                                 for s, e in scalar]
                out.append("")
                out.append(f"@{hist}" + (f"[{label}]" if label else "") + ": "
                           + ", ".join(values))
                out.extend(_stack_lines(self.keys, r))
                if r.hist is not None:
                    out.extend(r.hist.format())
        elif self.rows and "ustack" in self.keys:
            for r in rows:  # one block per stack, as bpftrace prints them
                label = ", ".join(f"{n}={_show(v, n in r.truncated, n in r.faulted)}"
                                  for n, v in zip(self.keys, r.key) if n != "ustack")
                values = [f"count {r.count}"] + [f"{s}({e}) {_num(getattr(r, s))}"
                                                 for s, e in scalar]
                out.append("")
                out.append((f"[{label}] " if label else "") + ", ".join(values))
                out.extend(_stack_lines(self.keys, r))
        elif self.rows:
            cols = [n for n in self.keys if n != "ustack"]
            header = cols + ["count"] + [f"{s}({e})" for s, e in scalar]
            table = [[_show(v, n in r.truncated, n in r.faulted)
                      for n, v in zip(self.keys, r.key) if n != "ustack"]
                     + [str(r.count)] + [_num(getattr(r, s)) for s, _ in scalar]
                     for r in rows]
            widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
            nkeys = len(cols)
            out.append("  ".join(h.ljust(w) if i < nkeys else h.rjust(w)
                                 for i, (h, w) in enumerate(zip(header, widths))).rstrip())
            for t in table:
                out.append("  ".join(c.ljust(w) if i < nkeys else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(t, widths))).rstrip())
        if self.not_counted:
            out.append(f"{self.not_counted} hits not counted: the map holds at most"
                       f" {self.max_keys} keys (raise --max-keys or use fewer keys)")
        if self.value_faults:
            out.append(f"{self.value_faults} hits not counted: an argument a value needs"
                       " could not be read")
        if self.filter_faults:
            out.append(f"{self.filter_faults} hits not counted: an argument the filter needs"
                       " could not be read")
        if self.raced:
            out.append(f"{self.raced} hits not counted: preempted while reading strings")
        return "\n".join(escape_text(line) for line in out)


def _stack_lines(keys: Sequence[str], r: Row) -> list[str]:
    if "ustack" not in keys:
        return []
    frames = r.key[list(keys).index("ustack")]
    return ["    " + f for f in frames] or ["    [no frames]"]


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def _show(v: Any, cut: bool, fault: bool) -> str:
    if fault:
        return "<fault>"
    if isinstance(v, bytes):
        s = v.hex()
    elif isinstance(v, tuple):
        s = ";".join(str(x) for x in v)
    else:
        s = str(v)
    return s + ("..." if cut else "")


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# -- latency ------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyRow:
    """One key's durations (ns): exact count, total, minimum, maximum; a log2
    histogram for the percentiles."""

    key: tuple[Any, ...]
    count: int
    total_ns: int
    min_ns: int
    max_ns: int
    hist: Histogram
    truncated: tuple[str, ...] = ()
    faulted: tuple[str, ...] = ()

    @property
    def avg_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def percentile(self, q: float) -> Optional[Bucket]:
        """The histogram bucket holding quantile ``q``: the true value is in
        [lo, hi), and never above :attr:`max_ns`."""
        return self.hist.percentile(q)

    def percentile_bound(self, q: float) -> Optional[int]:
        """An upper bound of quantile ``q``: its bucket's end, or the maximum if lower."""
        b = self.percentile(q)
        if b is None:
            return None
        return min(b.hi, self.max_ns) if b.hi is not None else self.max_ns


@dataclass(frozen=True)
class LatencyResult(_Keyed):
    """Paired entry/exit durations, and what could not be paired (never silent).

    ``unmatched_exits``: exits with no entry (the call began before tracing,
    or its entry was filtered by the kernel's map being full).
    ``abandoned``: entries whose exit never came because the frame was left
    another way (longjmp, an exception), found when an outer frame returned.
    ``in_flight``: entries still waiting for their exit when this was read.
    ``not_counted``: paired calls the result map had no room for.
    ``start_dropped``: calls not timed, nested deeper than the slots a thread
    keeps (their pairing stays right: the depth still counts them).
    """

    by: tuple[str, ...]
    rows: tuple[LatencyRow, ...]
    entry: str
    exit: str
    interval: int = 0
    seconds: float = 0.0
    unmatched_exits: int = 0
    abandoned: int = 0
    in_flight: int = 0
    not_counted: int = 0
    start_dropped: int = 0
    max_keys: int = 0
    key_str_max: int = 0
    paired_by: str = "depth"   # "stack" when uprobe/uretprobe exits are checked by sp
    filter_faults: int = 0     # entries the filter could not judge (argument read faulted)
    percentiles: tuple[float, ...] = field(default=(0.5, 0.9, 0.99))

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d: dict[str, Any] = {"key": {n: _json_key(v) for n, v in zip(self.by, r.key)},
                                 "count": r.count, "total_ns": r.total_ns, "min_ns": r.min_ns,
                                 "max_ns": r.max_ns, "avg_ns": round(r.avg_ns, 1),
                                 "hist": r.hist.to_json()}
            for q in self.percentiles:
                b = r.percentile(q)
                d[f"p{_qname(q)}"] = None if b is None else {
                    "lo": b.lo, "hi": b.hi, "bound": r.percentile_bound(q)}
            if r.truncated:
                d["truncated"] = list(r.truncated)
            if r.faulted:
                d["faulted"] = list(r.faulted)
            rows.append(d)
        return {"type": "latency", "entry": self.entry, "exit": self.exit,
                "interval": self.interval, "seconds": round(self.seconds, 6),
                "by": list(self.by), "count": self.count, "rows": rows,
                "unmatched_exits": self.unmatched_exits, "abandoned": self.abandoned,
                "in_flight": self.in_flight, "not_counted": self.not_counted,
                "start_dropped": self.start_dropped, "paired_by": self.paired_by,
                "filter_faults": self.filter_faults,
                "max_keys": self.max_keys, "key_str_max": self.key_str_max}

    def format(self) -> str:
        out = []
        head = (f"{self.count} calls" + (f" in {self.seconds:.2f}s" if self.seconds else "")
                + f" ({self.entry} -> {self.exit})")
        if self.interval:
            head = f"interval {self.interval}: " + head
        out.append(head)
        for r in sorted(self.rows, key=lambda r: _sort_key(r.key)):
            label = ", ".join(f"{n}={_show(v, n in r.truncated, n in r.faulted)}"
                              for n, v in zip(self.by, r.key))
            ps = ", ".join(f"p{_qname(q)} < {format_ns(r.percentile_bound(q) or 0)}"
                           for q in self.percentiles)
            out.append("")
            out.append((f"[{label}] " if label else "") +
                       f"count {r.count}, avg {format_ns(r.avg_ns)}, min {format_ns(r.min_ns)},"
                       f" max {format_ns(r.max_ns)}, {ps} (percentiles: bucket bounds)")
            out.extend(r.hist.format("ns"))
        problems = []
        if self.unmatched_exits:
            problems.append(f"{self.unmatched_exits} exits without an entry (calls begun"
                            " before tracing)")
        if self.abandoned:
            problems.append(f"{self.abandoned} entries left without an exit (longjmp,"
                            " exceptions)")
        if self.in_flight:
            problems.append(f"{self.in_flight} calls still in flight")
        if self.not_counted:
            problems.append(f"{self.not_counted} calls not counted: the map holds at most"
                            f" {self.max_keys} keys (raise --max-keys)")
        if self.start_dropped:
            problems.append(f"{self.start_dropped} calls not timed: deeper than the calls in"
                            " flight kept per thread")
        if problems:
            out.append("")
            out.append("not paired: " + "; ".join(problems))
        return "\n".join(escape_text(line) for line in out)


def _qname(q: float) -> str:
    s = f"{q * 100:g}"
    return s.replace(".", "_")
