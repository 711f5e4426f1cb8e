"""Pause statistics per collector: counts, totals, percentiles, histograms.

Both tracing modes feed the same structure: per-event mode adds each pause's
exact duration; aggregation mode merges the kernel's log-linear histogram
(four buckets per power of two). Percentiles are exact while the exact
values are kept, otherwise read from the histogram (within its ~19% bucket
width; the summary marks them as estimates).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from apptrace.jvm.bpfgen import HIST_BUCKETS, bucket_bounds, bucket_of

__all__ = ["CollectorStats", "GcSummary", "Accumulator", "log2_histogram", "format_log2",
           "format_summary"]

MAX_EXACT = 1_000_000  # exact durations kept per collector before percentiles turn estimates


@dataclass(frozen=True)
class CollectorStats:
    """What one collector (manager) did in one JVM over the trace."""

    pid: int
    manager: str
    type: str                     # "pause" or "cycle"
    full: bool
    count: int
    total_ns: int
    max_ns: int
    p50_ns: int
    p90_ns: int
    p99_ns: int
    exact: bool                   # percentiles from every duration (else from the histogram)
    safepoint_count: int
    safepoint_total_ns: int
    safepoint_max_ns: int
    hist: tuple[int, ...]         # log-linear buckets (bpfgen.bucket_of)
    vm_ops: tuple[tuple[str, int], ...] = ()
    causes: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "manager": self.manager, "type": self.type, "full": self.full,
            "count": self.count, "total_ns": self.total_ns, "max_ns": self.max_ns,
            "p50_ns": self.p50_ns, "p90_ns": self.p90_ns, "p99_ns": self.p99_ns,
            "exact": self.exact, "safepoint_count": self.safepoint_count,
            "safepoint_total_ns": self.safepoint_total_ns,
            "safepoint_max_ns": self.safepoint_max_ns,
            "log2_hist": [{"low_ns": lo, "high_ns": hi, "count": c}
                          for lo, hi, c in log2_histogram(self.hist)],
            "vm_ops": dict(self.vm_ops), "causes": dict(self.causes),
        }


@dataclass(frozen=True)
class GcSummary:
    """A snapshot of every collector's statistics, plus what was lost."""

    collectors: tuple[CollectorStats, ...]
    lost: int = 0
    counters: tuple[tuple[str, int], ...] = ()

    @property
    def pauses(self) -> int:
        return sum(c.count for c in self.collectors if c.type == "pause")

    @property
    def cycles(self) -> int:
        return sum(c.count for c in self.collectors if c.type == "cycle")

    def to_json(self) -> dict[str, Any]:
        return {"type": "summary", "pauses": self.pauses, "cycles": self.cycles,
                "lost": self.lost, "counters": dict(self.counters),
                "collectors": [c.to_json() for c in self.collectors]}


@dataclass
class _Acc:
    full: bool = False
    count: int = 0
    total: int = 0
    max: int = 0
    values: list[int] = field(default_factory=list)
    overflowed: bool = False
    sp_count: int = 0
    sp_total: int = 0
    sp_max: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    vm_ops: dict[str, int] = field(default_factory=dict)
    causes: dict[str, int] = field(default_factory=dict)


def _from_hist(hist: Sequence[int], q: float) -> int:
    total = sum(hist)
    if not total:
        return 0
    want = q * total
    run = 0
    for b, c in enumerate(hist):
        run += c
        if c and run >= want:
            lo, hi = (x * 1000 for x in bucket_bounds(b))
            # linear within the bucket
            frac = 1 - (run - want) / c
            return int(lo + (hi - lo) * min(max(frac, 0.0), 1.0))
    return 0


def _exact(values: list[int], q: float) -> int:
    if not values:
        return 0
    i = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[i]


class Accumulator:
    """Collects pauses and cycles (or kernel histograms) into a :class:`GcSummary`."""

    def __init__(self) -> None:
        self._acc: dict[tuple[int, str, str], _Acc] = {}

    def _get(self, pid: int, manager: str, type_: str) -> _Acc:
        key = (pid, manager, type_)
        a = self._acc.get(key)
        if a is None:
            a = self._acc[key] = _Acc()
        return a

    def add(self, pid: int, manager: str, type_: str, duration_ns: int, *, full: bool = False,
            safepoint_ns: Optional[int] = None, vm_op: Optional[str] = None,
            cause: Optional[str] = None) -> None:
        a = self._get(pid, manager, type_)
        a.full = a.full or full
        a.count += 1
        a.total += duration_ns
        a.max = max(a.max, duration_ns)
        if len(a.values) < MAX_EXACT:
            bisect.insort(a.values, duration_ns)
        else:
            a.overflowed = True
        a.hist[bucket_of(duration_ns)] += 1
        if safepoint_ns is not None:
            a.sp_count += 1
            a.sp_total += safepoint_ns
            a.sp_max = max(a.sp_max, safepoint_ns)
        if vm_op:
            a.vm_ops[vm_op] = a.vm_ops.get(vm_op, 0) + 1
        if cause:
            a.causes[cause] = a.causes.get(cause, 0) + 1

    def merge_hist(self, pid: int, manager: str, type_: str, *, full: bool, count: int,
                   total_ns: int, max_ns: int, hist: Sequence[int], sp_count: int,
                   sp_total_ns: int, sp_max_ns: int, vm_op: Optional[str] = None) -> None:
        """Add a kernel-side histogram (aggregation mode): no exact values."""
        a = self._get(pid, manager, type_)
        a.full = a.full or full
        a.count += count
        a.total += total_ns
        a.max = max(a.max, max_ns)
        a.overflowed = True
        for i, c in enumerate(hist[:HIST_BUCKETS]):
            a.hist[i] += c
        a.sp_count += sp_count
        a.sp_total += sp_total_ns
        a.sp_max = max(a.sp_max, sp_max_ns)
        if vm_op:
            a.vm_ops[vm_op] = a.vm_ops.get(vm_op, 0) + count

    def snapshot(self, lost: int = 0, counters: Iterable[tuple[str, int]] = ()) -> GcSummary:
        out = []
        for (pid, manager, type_), a in sorted(self._acc.items()):
            exact = not a.overflowed
            if exact:
                p50, p90, p99 = (_exact(a.values, q) for q in (0.5, 0.9, 0.99))
            else:
                # an estimate inside a bucket never passes the exact maximum
                p50, p90, p99 = (min(_from_hist(a.hist, q), a.max) for q in (0.5, 0.9, 0.99))
            out.append(CollectorStats(
                pid, manager, type_, a.full, a.count, a.total, a.max, p50, p90, p99, exact,
                a.sp_count, a.sp_total, a.sp_max, tuple(a.hist),
                tuple(sorted(a.vm_ops.items(), key=lambda kv: -kv[1])),
                tuple(sorted(a.causes.items(), key=lambda kv: -kv[1]))))
        return GcSummary(tuple(out), lost, tuple(counters))


def log2_histogram(hist: Sequence[int]) -> list[tuple[int, int, int]]:
    """Collapse the log-linear buckets to powers of two of microseconds:
    (low, high, count) rows, low and high included, from the first non-empty
    row to the last."""
    rows: dict[int, int] = {}
    for b, c in enumerate(hist):
        if c:
            r = bucket_bounds(b)[0].bit_length()
            rows[r] = rows.get(r, 0) + c
    if not rows:
        return []
    return [((1 << r) >> 1, (1 << r) - 1, rows.get(r, 0))
            for r in range(min(rows), max(rows) + 1)]


def format_log2(hist: Sequence[int], width: int = 40) -> list[str]:
    """Lines of a log2 histogram in microseconds, bcc style."""
    rows = log2_histogram(hist)
    if not rows:
        return []
    top = max(c for _, _, c in rows)
    lines = [f"{'usecs':>23} : {'count':<8} distribution"]
    for lo, hi, c in rows:
        bar = "*" * (round(width * c / top) if top else 0)
        lines.append(f"{lo:>10} -> {hi:<10} : {c:<8} |{bar:<{width}}|")
    return lines


# Memory managers of young collections (gctrace.YOUNG_MANAGERS, without the import cycle).
_YOUNG = frozenset({"G1 Young Generation", "Copy", "PS Scavenge", "ParNew"})


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def format_summary(summary: GcSummary, main_class: Optional[dict[int, str]] = None,
                   seconds: Optional[float] = None, histograms: bool = True) -> list[str]:
    """The end-of-trace report: a row per collector and JVM (count, total,
    p50/p90/p99/max, safepoint total), then a log2 histogram for each."""
    names = main_class or {}
    span = f" over {seconds:.1f}s" if seconds is not None else ""
    lines = [f"GC summary{span}: {summary.pauses} pauses, {summary.cycles} concurrent cycles,"
             f" {summary.lost} lost"]
    if not summary.collectors:
        return lines
    rows = [("PID", "MAIN", "COLLECTOR", "TYPE", "COUNT", "TOTAL ms", "p50 ms", "p90 ms",
             "p99 ms", "max ms", "SAFEPOINT ms")]
    for c in summary.collectors:
        est = "" if c.exact else "~"
        kind = "cycle" if c.type == "cycle" else ("full" if c.full else (
            "young" if c.manager in _YOUNG else "pause"))
        rows.append((str(c.pid), names.get(c.pid, ""), c.manager, kind, str(c.count),
                     _ms(c.total_ns), est + _ms(c.p50_ns), est + _ms(c.p90_ns),
                     est + _ms(c.p99_ns), _ms(c.max_ns),
                     _ms(c.safepoint_total_ns) if c.safepoint_count else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i in (1, 2, 3) else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip())
    if any(not c.exact for c in summary.collectors):
        lines.append("(~: estimated from the in-kernel histogram, within a quarter octave)")
    if histograms:
        for c in summary.collectors:
            hist = format_log2(c.hist)
            if not hist:
                continue
            what = "cycles" if c.type == "cycle" else "pauses"
            lines.append("")
            lines.append(f"{c.manager} {what}, pid {c.pid}:")
            lines.extend(hist)
    return lines
