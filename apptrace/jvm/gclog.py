"""Read a HotSpot unified GC log and compare it with traced pauses.

The log must carry the ``timenanos`` decorator (``-Xlog:gc*:file=gc.log:
uptime,timenanos``): it is CLOCK_MONOTONIC, the clock the BPF side stamps
events with, so a log line can be placed inside the traced pause it
describes without guessing offsets. Pause lines (``Pause Young ... 5.352ms``,
ZGC's ``Pause Mark Start 0.011ms``) give the GC's own timer; ``safepoint``
lines (``-Xlog:safepoint``) give the whole stop-the-world window.

One traced pause can hold several log lines: JDK 17's Serial and Parallel
collectors log a young collection and the full one it escalated to (or
``System.gc()``'s scavenge and full) inside one VM operation. Counts are
therefore compared as collections: log pause lines against the traced
pauses' collections (one per memory manager that reported, else one).
"""

from __future__ import annotations

import bisect
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from apptrace.errors import GcLogError

__all__ = ["LogPause", "LogSafepoint", "GcLog", "parse_gc_log", "read_gc_log", "KindErrors",
           "GcLogComparison", "compare_with_log", "collections_in", "format_comparison"]

# [0.867s][846437522943ns][21120][info][gc          ] GC(0) Pause Young ... 5.352ms
_DECOR = re.compile(r"^((?:\[[^\]]*\])+)\s?(.*)$")
_NANOS = re.compile(r"^(\d+)ns$")
_PAUSE = re.compile(r"^GC\((\d+)\) (?:[YyOo]: )?(Pause .*?)\s*([0-9]+(?:\.[0-9]+)?)ms$")
_HEAP = re.compile(r"\s+(\d+)([BKMGT])->(\d+)([BKMGT])\((\d+)([BKMGT])\)")
_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SAFEPOINT = re.compile(r'^Safepoint "([^"]*)".*?Total: (\d+) ns')
_REACHING = re.compile(r"Reaching safepoint: (\d+) ns")
# The cause ends the line of these pause kinds; other parentheses are part of the kind.
_CAUSE_LAST = ("Pause Young", "Pause Full")


@dataclass(frozen=True)
class LogPause:
    """One pause line of the log: the GC's own timer for one collection."""

    ts_ns: int                 # when the line was written (at the collection's end)
    gc_id: int
    kind: str                  # "Pause Young (Normal)", "Pause Full", "Pause Mark Start"
    cause: Optional[str]
    duration_ns: int
    heap_before: Optional[int] = None   # bytes, rounded to the unit the log printed
    heap_after: Optional[int] = None
    heap_unit: int = 0                  # that unit (1 MiB for "152M->6M(256M)")


@dataclass(frozen=True)
class LogSafepoint:
    """One ``safepoint`` line: the whole stop-the-world window of a VM operation."""

    ts_ns: int
    vm_op: str
    total_ns: int
    reaching_ns: Optional[int]


@dataclass(frozen=True)
class GcLog:
    pauses: tuple[LogPause, ...]
    safepoints: tuple[LogSafepoint, ...]
    lines: int


_LEVELS = {"trace", "debug", "info", "warning", "error"}


def _tags(decor: list[str]) -> Optional[set[str]]:
    """The tag set of a line, when the log was written with the ``tags``
    decorator (else None: lines are then recognised by their text alone)."""
    for d in reversed(decor):
        words = {w.strip() for w in d.split(",")}
        if ("gc" in words or "safepoint" in words) and not words & _LEVELS:
            return words
    return None


def _heap(text: str) -> tuple[Optional[int], Optional[int], int]:
    h = _HEAP.search(text)
    if not h:
        return None, None, 0
    u0, u1 = _UNITS[h.group(2)], _UNITS[h.group(4)]
    return int(h.group(1)) * u0, int(h.group(3)) * u1, max(u0, u1)


def _groups(text: str) -> tuple[str, list[str]]:
    """``Pause Young (Normal) (System.gc())`` -> ("Pause Young", ["Normal", "System.gc()"]):
    the text before the first top-level parenthesis, and each group (nested
    parentheses kept, as in ``System.gc()``)."""
    head, groups, depth, start = None, [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            if depth == 0:
                if head is None:
                    head = text[:i].strip()
                start = i + 1
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                groups.append(text[start:i])
    return (text.strip() if head is None else head), groups


def _split_kind(text: str) -> tuple[str, Optional[str]]:
    """The pause kind and the GC cause. Young and full pauses end with their
    cause; G1's young ones name their type first (``Normal``, ``Mixed``...)
    and JDK 21+ may add ``(Evacuation Failure: ...)`` after the cause."""
    text = _HEAP.sub("", text).strip()
    head, groups = _groups(text)
    if head not in _CAUSE_LAST or not groups:
        return text, None
    groups = [g for g in groups if not g.startswith("Evacuation Failure")] or groups
    if head == "Pause Young" and len(groups) >= 2:
        return f"{head} ({groups[0]})", groups[1]
    return head, groups[-1]


def parse_gc_log(lines: Iterable[str], *, name: str = "the GC log") -> GcLog:
    """Pause and safepoint lines of a unified log written with ``timenanos``."""
    pauses: list[LogPause] = []
    safepoints: list[LogSafepoint] = []
    n = decorated = stamped = 0
    for raw in lines:
        n += 1
        m = _DECOR.match(raw.rstrip("\n"))
        if not m:
            continue
        decorated += 1
        decor = [d.strip() for d in m.group(1)[1:-1].split("][")]
        ts = next((int(x.group(1)) for x in map(_NANOS.match, decor) if x), None)
        if ts is None:
            continue
        stamped += 1
        msg = m.group(2).strip()
        tags = _tags(decor)
        if (tags is None or "safepoint" in tags) and msg.startswith('Safepoint "'):
            s = _SAFEPOINT.match(msg)
            if s:
                r = _REACHING.search(msg)
                safepoints.append(LogSafepoint(ts, s.group(1), int(s.group(2)),
                                               int(r.group(1)) if r else None))
            continue
        if tags is not None and ("gc" not in tags or "start" in tags):
            continue
        p = _PAUSE.match(msg)
        if p:
            kind, cause = _split_kind(p.group(2))
            pauses.append(LogPause(ts, int(p.group(1)), kind, cause,
                                   round(float(p.group(3)) * 1e6), *_heap(p.group(2))))
    how = "write it with -Xlog:gc*,safepoint:file=gc.log:uptime,timenanos,tid,level,tags"
    if n and not decorated:
        raise GcLogError(f"{name} is not a HotSpot unified log (no [decorations])", hint=how)
    if decorated and not stamped:
        raise GcLogError(f"{name} has no timenanos decoration, so its times cannot be"
                         " matched to traced pauses", hint=how)
    return GcLog(tuple(pauses), tuple(safepoints), n)


def read_gc_log(path: str) -> GcLog:
    """Parse a log file; a missing or unreadable file is a clear error."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_gc_log(f, name=path)
    except OSError as err:
        raise GcLogError(f"cannot read {path}: {err.strerror or err}") from err


def collections_in(managers: Sequence[str]) -> int:
    """Log pause lines one traced pause stands for: a line per memory manager."""
    return max(1, len(managers))


@dataclass(frozen=True)
class KindErrors:
    """Traced minus logged duration for one pause kind (nanoseconds)."""

    kind: str
    count: int
    log_median_ns: int
    error_median_ns: int
    error_p10_ns: int
    error_p90_ns: int
    error_max_abs_ns: int

    @property
    def relative_median(self) -> float:
        return self.error_median_ns / self.log_median_ns if self.log_median_ns else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "log_median_ns": self.log_median_ns,
                "error_median_ns": self.error_median_ns, "error_p10_ns": self.error_p10_ns,
                "error_p90_ns": self.error_p90_ns, "error_max_abs_ns": self.error_max_abs_ns,
                "relative_median": round(self.relative_median, 5)}


@dataclass(frozen=True)
class GcLogComparison:
    """How the traced pauses line up with the log over the same window."""

    pid: Optional[int]             # the JVM compared (None: no pauses traced)
    log_pauses: int                # log pause lines in the window
    traced_pauses: int             # traced pauses (stop-the-world VM operations)
    traced_collections: int        # traced pauses counted as the log counts them
    matched_lines: int             # log lines that fell inside a traced pause
    unmatched_lines: tuple[LogPause, ...]
    unmatched_pauses: int          # traced pauses no log line fell in
    kinds: tuple[KindErrors, ...]  # duration error per pause kind
    safepoint: Optional[KindErrors]  # traced safepoint minus the log's Total
    causes_agree: int = 0          # traced cause equals the log's (where the log names one)
    causes_differ: tuple[tuple[str, str], ...] = ()   # (log, traced) where they do not
    heap_agree: int = 0            # heap before->after equal to the log's, to its rounding
    heap_differ: int = 0
    errors: tuple[tuple[str, int, int], ...] = field(default=(), repr=False)
    # (kind, log duration, traced minus log) per matched pause, for the tests

    @property
    def counts_equal(self) -> bool:
        return self.log_pauses == self.traced_collections and not self.unmatched_lines

    def to_json(self) -> dict[str, Any]:
        return {"type": "gc_log_check", "pid": self.pid, "counts_equal": self.counts_equal,
                "log_pauses": self.log_pauses, "traced_pauses": self.traced_pauses,
                "traced_collections": self.traced_collections,
                "matched_lines": self.matched_lines,
                "unmatched_lines": [{"ts_ns": p.ts_ns, "gc_id": p.gc_id, "kind": p.kind,
                                     "duration_ns": p.duration_ns}
                                    for p in self.unmatched_lines],
                "unmatched_pauses": self.unmatched_pauses,
                "kinds": [k.to_json() for k in self.kinds],
                "safepoint": self.safepoint.to_json() if self.safepoint else None,
                "causes_agree": self.causes_agree,
                "causes_differ": [list(c) for c in self.causes_differ],
                "heap_agree": self.heap_agree, "heap_differ": self.heap_differ}


def _quantile(values: Sequence[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _errors(kind: str, logged: Sequence[int], errs: Sequence[int]) -> KindErrors:
    return KindErrors(kind, len(errs), int(statistics.median(logged)),
                      int(statistics.median(errs)), _quantile(errs, 0.1),
                      _quantile(errs, 0.9), max(abs(e) for e in errs))


def compare_with_log(pauses: Sequence[Any], log: GcLog, start_ns: int,
                     end_ns: Optional[int] = None, pid: Optional[int] = None) -> GcLogComparison:
    """Line the traced pauses (:class:`~apptrace.jvm.gctrace.GcPause`) up with a log.

    Only log lines of collections that began after ``start_ns`` (and ended
    before ``end_ns``) count: the window the tracer saw. A log line belongs
    to the traced pause whose stop-the-world window contains its time stamp.
    Without ``pid``, pauses of several JVMs (``--all``) are compared JVM by
    JVM and the one the log lines up with best is reported.
    """
    if pid is None:
        pids = sorted({p.pid for p in pauses if getattr(p, "type", "pause") == "pause"})
        if len(pids) > 1:
            return max((compare_with_log(pauses, log, start_ns, end_ns, p) for p in pids),
                       key=lambda c: (c.matched_lines, -c.unmatched_pauses))
    traced = sorted((p for p in pauses if getattr(p, "type", "pause") == "pause"
                     and (pid is None or p.pid == pid)), key=lambda p: p.ts_ns)
    end = end_ns if end_ns is not None else (1 << 63)
    window = [lp for lp in log.pauses
              if lp.ts_ns - lp.duration_ns >= start_ns and lp.ts_ns <= end]
    groups: dict[int, list[LogPause]] = {}
    unmatched: list[LogPause] = []
    starts = [p.ts_ns for p in traced]

    for lp in window:
        i = bisect.bisect_right(starts, lp.ts_ns) - 1
        if i >= 0 and traced[i].ts_ns <= lp.ts_ns <= traced[i].end_ns:
            groups.setdefault(i, []).append(lp)
        else:
            unmatched.append(lp)
    by_kind: dict[str, tuple[list[int], list[int]]] = {}
    rows: list[tuple[str, int, int]] = []
    causes_agree, heap_agree, heap_differ = 0, 0, 0
    causes_differ: list[tuple[str, str]] = []
    for i, lines in groups.items():
        p = traced[i]
        causes = getattr(p, "causes", ()) or (p.cause,)
        for j, lp in enumerate(lines):
            traced_cause = causes[j] if j < len(causes) else causes[-1]
            if lp.cause is not None:
                if lp.cause == traced_cause:
                    causes_agree += 1
                else:
                    causes_differ.append((lp.cause, traced_cause or ""))
        first, last = lines[0], lines[-1]
        if first.heap_before is not None and last.heap_after is not None and \
                p.heap_before is not None and p.heap_after is not None:
            # the log rounds to its unit (down or to the nearest, by collector)
            if abs(p.heap_before - first.heap_before) <= first.heap_unit and \
                    abs(p.heap_after - last.heap_after) <= last.heap_unit:
                heap_agree += 1
            else:
                heap_differ += 1
        logged = sum(lp.duration_ns for lp in lines)
        kind = " + ".join(lp.kind for lp in lines)
        err = traced[i].duration_ns - logged
        rows.append((kind, logged, err))
        lg, es = by_kind.setdefault(kind, ([], []))
        lg.append(logged)
        es.append(err)
    kinds = tuple(_errors(k, lg, es) for k, (lg, es) in sorted(by_kind.items(),
                                                                  key=lambda kv: -len(kv[1][0])))
    # Safepoints: a safepoint's line is written as it ends, so it is the first
    # line after the safepoint began (names differ: the log has the operation's
    # type, "ShenandoahInitMark", the probe its name, "Shenandoah Init Marking").
    sp_logged: list[int] = []
    sp_errs: list[int] = []
    sp_ts = [s.ts_ns for s in log.safepoints]
    for p in traced:
        if p.safepoint_ns is None:
            continue
        j = bisect.bisect_right(sp_ts, p.ts_ns)
        if j >= len(sp_ts) or sp_ts[j] - p.end_ns > 10_000_000:
            continue
        best = log.safepoints[j]
        sp_logged.append(best.total_ns)
        sp_errs.append(p.safepoint_ns - best.total_ns)
    sp = _errors("safepoint", sp_logged, sp_errs) if sp_errs else None
    in_window = [p for p in traced if p.ts_ns >= start_ns and p.end_ns <= end]
    return GcLogComparison(
        pid=pid if pid is not None else (traced[0].pid if traced else None),
        log_pauses=len(window), traced_pauses=len(in_window),
        traced_collections=sum(collections_in(p.managers) for p in in_window),
        matched_lines=len(window) - len(unmatched), unmatched_lines=tuple(unmatched),
        unmatched_pauses=len(in_window) - len(groups), kinds=kinds, safepoint=sp,
        causes_agree=causes_agree, causes_differ=tuple(causes_differ),
        heap_agree=heap_agree, heap_differ=heap_differ, errors=tuple(rows))


def format_comparison(c: GcLogComparison, name: str = "GC log") -> list[str]:
    """What --check-gc-log prints: counts, then the error distribution per kind."""
    verdict = "equal" if c.counts_equal else "DIFFERENT"
    who = f" of pid {c.pid}" if c.pid is not None else ""
    lines = [f"{name}: {c.log_pauses} pause lines, traced {c.traced_collections} collections in"
             f" {c.traced_pauses} pauses{who}: counts {verdict}"]
    if c.unmatched_lines:
        lines.append(f"  {len(c.unmatched_lines)} log lines fell in no traced pause (first:"
                     f" GC({c.unmatched_lines[0].gc_id}) {c.unmatched_lines[0].kind})")
    if c.unmatched_pauses:
        lines.append(f"  {c.unmatched_pauses} traced pauses have no log line (a log without"
                     " gc* tags, or a collector that logs them at debug level)")
    if c.kinds:
        lines.append("  traced minus logged duration, per pause kind:")
        lines.append(f"    {'KIND':<34} {'N':>5} {'log p50 us':>11} {'err p50 us':>11}"
                     f" {'err %':>7} {'p10 us':>9} {'p90 us':>9}")
        for k in c.kinds:
            lines.append(f"    {k.kind[:34]:<34} {k.count:>5} {k.log_median_ns / 1e3:>11.1f}"
                         f" {k.error_median_ns / 1e3:>+11.1f} {k.relative_median * 100:>+6.1f}%"
                         f" {k.error_p10_ns / 1e3:>+9.1f} {k.error_p90_ns / 1e3:>+9.1f}")
    if c.causes_agree or c.causes_differ:
        first = (f" (first: log {c.causes_differ[0][0]!r}, traced {c.causes_differ[0][1]!r})"
                 if c.causes_differ else "")
        lines.append(f"  causes: {c.causes_agree} agree, {len(c.causes_differ)} differ{first}")
    if c.heap_agree or c.heap_differ:
        lines.append(f"  heap before->after: {c.heap_agree} agree with the log's rounding,"
                     f" {c.heap_differ} differ")
    sp = c.safepoint
    if sp is not None:
        lines.append(f"  safepoint minus the log's Total: median {sp.error_median_ns / 1e3:+.1f}us,"
                     f" p10 {sp.error_p10_ns / 1e3:+.1f}us, p90 {sp.error_p90_ns / 1e3:+.1f}us"
                     f" over {sp.count} pauses")
    else:
        lines.append("  no safepoint lines to compare (add the safepoint tag: -Xlog:gc*,safepoint)")
    return lines
