"""Counts, sums, extremes and histograms of probe hits, kept in the kernel.

::

    with Aggregator(pid=1234, keys="comm", hist="arg0") as agg:
        agg.add("uprobe:libc:malloc(long)", where="arg0 >= 4096")
        agg.start()
        agg.wait(5)
        print(agg.read().format())

Each hit updates one slot of a per-CPU hash map, keyed by what ``keys``
names; nothing crosses into Python until :meth:`Aggregator.read`, so a probe
firing millions of times a second loses nothing. A hit that finds the map
full is counted in :attr:`AggregateResult.not_counted`.

With ``intervals=True``, :meth:`Aggregator.read_interval` returns what was
counted since the previous call, exactly: hits go to one of two halves of
the map (an epoch in the key); reading flips the epoch, waits for hits in
flight, then reads and deletes the other half.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from apptrace.agg.bpfgen import (
    DROP_FILTER,
    DROP_FULL,
    DROP_RACE,
    DROP_SLOTS,
    DROP_VALUE,
    AggPlan,
    KeyField,
    render_aggregate,
)
from apptrace.agg.family import KernelFamily, epoch_rows
from apptrace.agg.results import AggregateResult, Row, linear_histogram, log2_histogram
from apptrace.agg.spec import (
    KEY_STR_MAX,
    MAX_KEYS,
    STATS,
    HistSpec,
    check_expr,
    parse_hist,
    parse_keys,
)
from apptrace.engine.plan import Group
from apptrace.engine.target import Stdout
from apptrace.errors import SessionStateError
from apptrace.events import Event, ProbeInfo
from apptrace.options import check_int
from apptrace.probes import ProbeSpec, parse_probe

__all__ = ["Aggregator", "AggregateHandle"]

_U32 = struct.Struct("<I")


@dataclass
class AggregateHandle:
    """What :meth:`Aggregator.add` returns: the spec, and the probes after start."""

    spec: ProbeSpec
    where: Optional[str] = None
    probes: list[ProbeInfo] = field(default_factory=list)


class Aggregator(KernelFamily):
    """Aggregate probe hits in the kernel.

    ``keys``: what rows are keyed by (``"arg0,comm"`` or a sequence; see
    :mod:`apptrace.agg.spec`). ``where``: a filter for every probe string.
    ``sum``/``min``/``max``/``avg``: expressions whose sum, minimum, maximum
    or mean each row keeps. ``hist``: ``EXPR`` (log2 buckets) or
    ``EXPR:MIN:MAX:STEP`` (linear), or a :class:`HistSpec`. ``max_keys``:
    rows the map holds. ``str_max``: bytes of a string kept in a key (longer
    ones are cut and marked). Target: at most one of ``pid``, ``path``,
    ``command``, as for :class:`apptrace.Session`.
    """

    def __init__(self, *, pid: Optional[int] = None, path: Optional[str] = None,
                 command: Optional[Sequence[str]] = None, command_stdout: Stdout = None,
                 keys: Union[str, Sequence[str], None] = (), where: Optional[str] = None,
                 sum: Optional[str] = None, min: Optional[str] = None,
                 max: Optional[str] = None, avg: Optional[str] = None,
                 hist: Union[str, HistSpec, None] = None, intervals: bool = False,
                 max_keys: int = 10240, str_max: int = 64, semaphores: str = "kernel",
                 multi: Optional[bool] = None, symbolize: bool = True) -> None:
        self.keys = parse_keys(keys)
        self.where = check_expr("where", where)
        self.stats: tuple[tuple[str, str], ...] = tuple(
            (name, check_expr(name, text) or "") for name, text in
            zip(STATS, (sum, min, max, avg)) if text is not None)
        self.hist = parse_hist(hist) if isinstance(hist, str) else hist
        self.intervals = bool(intervals)
        self.max_keys = check_int("max_keys", max_keys, *MAX_KEYS)
        self.key_str = check_int("str_max", str_max, *KEY_STR_MAX)
        self.symbolize = symbolize
        super().__init__(pid=pid, path=path, command=command, command_stdout=command_stdout,
                         semaphores=semaphores, multi=multi)
        self._handles: list[AggregateHandle] = []
        self._plan: Optional[AggPlan] = None
        self.result: Optional[AggregateResult] = None  # the last one read (kept after close)

    def add(self, spec: str, *, where: Optional[str] = None) -> AggregateHandle:
        """Add a probe string, with a filter of its own (and-ed with the common one)."""
        self._check_new()
        h = AggregateHandle(parse_probe(spec, stack="ustack" in self.keys),
                            check_expr("where", where))
        self._handles.append(h)
        self._groups.append(Group(len(self._groups), h.spec))
        return h

    # -- the program --------------------------------------------------------------------

    def _render(self, groups: list[Group]) -> str:
        plan = AggPlan(self.keys, self.stats,
                       (self.hist.expr, self.hist.linear) if self.hist else None, self.where,
                       {g.gid: h.where for g, h in zip(groups, self._handles) if h.where},
                       intervals=self.intervals, max_keys=self.max_keys, key_str=self.key_str,
                       multi=self.multi, gate=self._target.command is not None)
        for g in groups:
            plan.site_cookies[g.gid] = self.site_cookies(g)
        text = render_aggregate(groups, plan)
        self._plan = plan
        for h, g in zip(self._handles, groups):
            h.probes = [p.info for p in g.probes]
        return text

    def _entry(self, g: Group) -> str:
        return f"ag{g.gid}"

    def _wants_stacks(self) -> bool:
        return "ustack" in self.keys and self.symbolize

    # -- reading --------------------------------------------------------------------------

    def read(self) -> AggregateResult:
        """Everything counted so far (the whole run, or since the last interval)."""
        if self.intervals:
            raise SessionStateError("this aggregation counts intervals: use read_interval()")
        self.start()
        rows, drops = self._collect(None)
        self.result = self._result(rows, drops, 0)
        return self.result

    def read_interval(self) -> AggregateResult:
        """What was counted since the previous call (or the start), exactly."""
        if not self.intervals:
            raise SessionStateError("made without intervals=True: use read()")
        self.start()
        rows, drops = self._collect(self._flip_epoch())
        self.result = self._result(rows, drops, self._interval)
        return self.result

    def _result(self, rows: list[Row], drops: list[int], interval: int) -> AggregateResult:
        secs = self._since_last_read()
        return AggregateResult(
            self.keys, tuple(rows),
            self.stats + ((("hist", self.hist.expr),) if self.hist else ()),
            interval, secs, drops[DROP_FULL], self.max_keys,
            self.key_str if any(_stringy(k, self._groups) for k in self.keys) else 0,
            tuple(p.label for p in self.probes), drops[DROP_VALUE], drops[DROP_FILTER],
            drops[DROP_RACE])

    def _collect(self, epoch: Optional[int]) -> tuple[list[Row], list[int]]:
        plan = self._plan
        assert plan is not None and plan.val_struct is not None
        m = self._map("agg_vals")
        vs = plan.val_struct
        merged: dict[tuple[Any, ...], tuple[int, list[Any], list[int]]] = {}
        order: list[tuple[Any, ...]] = []
        for kflags, kvals, cpus in epoch_rows(m, plan, epoch):
            value = _merge(plan, [vs.unpack(v) for v in cpus])
            if value is None:
                continue
            key = (kflags, *kvals)
            if key not in merged:
                order.append(key)
                merged[key] = value
        drops = [self._counter("agg_drop", (epoch or 0) * DROP_SLOTS + i,
                               reset=epoch is not None) for i in range(DROP_SLOTS)]
        if epoch is None and plan.intervals:  # both halves
            drops = [a + self._counter("agg_drop", DROP_SLOTS + i) for i, a in enumerate(drops)]
        return self._rows(plan, [(k, merged[k]) for k in order]), drops

    def _rows(self, plan: AggPlan, items: list[tuple[tuple[Any, ...], Any]]) -> list[Row]:
        fields = plan.fields
        stack_names: dict[tuple[int, int, int], tuple[str, ...]] = {}
        if "ustack" in self.keys and items:
            stack_names = self._symbolize_stacks(plan, [k for k, _ in items])
        by_key: dict[tuple[Any, ...], Row] = {}
        for key, (count, stats, hist) in items:
            kflags, kvals = key[0], key[1:]
            shown: dict[str, Any] = {}
            raw_of: dict[str, Any] = {}
            cut, fault = [], []
            for f, v in zip(fields, kvals):
                raw_of[f.name] = v
                shown[f.name] = _key_value(f, v, self._groups, self.key_str)
                if f.flag_bit >= 0:
                    if kflags >> (2 * f.flag_bit) & 1:
                        fault.append(f.name)
                    if kflags >> (2 * f.flag_bit + 1) & 1:
                        cut.append(f.name)
            if "ustack" in shown:
                shown["ustack"] = stack_names.get(
                    (int(raw_of["pid"]), _signed(raw_of["ustack"]), int(raw_of["probe"])), ())
            k = tuple(shown[name] for name in self.keys)
            vals: dict[str, Any] = {}
            for (stat, _e), v in zip(self.stats, stats):
                vals[stat] = v / count if stat == "avg" and count else v
            hg = None
            if self.hist is not None:
                hg = (log2_histogram(hist) if self.hist.linear is None
                      else linear_histogram(hist, *self.hist.linear))
            row = Row(k, count, vals.get("sum"), vals.get("min"), vals.get("max"),
                      vals.get("avg"), hg, tuple(cut), tuple(fault))
            if k in by_key:  # hidden keys (the pid of a stack) merged away
                row = _add_rows(by_key[k], row)
            by_key[k] = row
        return list(by_key.values())

    def _symbolize_stacks(self, plan: AggPlan, keys: list[tuple[Any, ...]]
                          ) -> dict[tuple[int, int, int], tuple[str, ...]]:
        """Frame names of each counted stack, innermost first."""
        idx = {f.name: i for i, f in enumerate(plan.fields)}
        stacks = self._map("agg_stacks")
        events, anchors, ids = [], [], []
        for key in keys:
            kv = key[1:]
            pid = int(kv[idx["pid"]])
            sid = _signed(kv[idx["ustack"]])
            probe = int(kv[idx["probe"]])
            gid, pidx = probe >> 32, probe & 0xFFFFFFFF
            if sid < 0:
                continue
            raw = stacks.lookup(_U32.pack(sid & 0xFFFFFFFF))
            ips = tuple(a for a in struct.unpack(f"<{len(raw) // 8}Q", raw) if a) if raw else ()
            g = self._groups[gid] if gid < len(self._groups) else self._groups[0]
            p = g.probes[min(pidx, len(g.probes) - 1)]
            site = p.sites[0]
            events.append(Event(0, pid, pid, "", p.info, (), 0, None, ips))
            anchors.append((site.binary, site.vaddr))
            ids.append((pid, sid, probe))
        out: dict[tuple[int, int, int], tuple[str, ...]] = {}
        if events and self.symbolize:
            events = self._stacks().symbolize(events, anchors)
        for (pid, sid, probe), ev in zip(ids, events):
            if ev.stack is not None:
                out[(pid, sid, probe)] = tuple(f.symbol or f"{f.addr:#x}" for f in ev.stack)
            else:
                out[(pid, sid, probe)] = tuple(f"{a:#x}" for a in ev.raw_stack or ())
        for key in keys:
            kv = key[1:]
            sid = _signed(kv[idx["ustack"]])
            if sid < 0:
                out[(int(kv[idx["pid"]]), sid, int(kv[idx["probe"]]))] = (
                    f"[stack lost: {os.strerror(-sid)}]",)
        return out

    def close(self) -> None:
        """Detach; keep the last result readable as :attr:`result`; free everything."""
        if self._state == "running" and not self.intervals:
            try:
                self.detach()
                self.read()
            except Exception:  # noqa: BLE001 - best effort before teardown
                pass
        super().close()


def _stringy(key: str, groups: Sequence[Group]) -> bool:
    """A key whose strings the bound cuts (comm is the kernel's 16 bytes, whole)."""
    if not key.startswith("arg"):
        return False
    i = int(key[3:])
    return any(i < len(g.spec.types) and g.spec.types[i] is not None
               and g.spec.types[i].kind in ("str", "bytes") for g in groups)  # type: ignore[union-attr]


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _key_value(f: KeyField, v: Any, groups: Sequence[Group], bound: int = 1 << 30) -> Any:
    if f.kind == "comm":
        return v.split(b"\0", 1)[0].decode("utf-8", "replace")
    if f.kind == "str":
        i = int(f.name[3:])
        counted = any(i < len(g.spec.types) and g.spec.types[i] is not None
                      and g.spec.types[i].len_arg is not None for g in groups)  # type: ignore[union-attr]
        raw = v.rstrip(b"\0") if counted else v.split(b"\0", 1)[0]
        return raw.decode("utf-8", "replace")
    if f.kind == "bytes":
        i = int(f.name[3:])
        n = max((g.spec.types[i].size for g in groups  # type: ignore[union-attr]
                 if i < len(g.spec.types) and g.spec.types[i] is not None), default=len(v))
        return bytes(v[:min(n, bound)])
    if f.kind == "probe":
        gid, pidx = v >> 32, v & 0xFFFFFFFF
        if gid < len(groups) and pidx < len(groups[gid].probes):
            return groups[gid].probes[pidx].info.label
        return f"probe {gid}.{pidx}"
    if f.kind == "stack":
        return v
    if f.signed:
        return _signed(v)
    return v


def _merge(plan: AggPlan, per_cpu: list[tuple[Any, ...]]
           ) -> Optional[tuple[int, list[Any], list[int]]]:
    """Per-CPU values → (count, stats, histogram), or None if nothing was counted."""
    nstats = len(plan.stats)
    count = 0
    stats: list[Any] = [None] * nstats
    hist = [0] * plan.nbuckets
    for v in per_cpu:
        c = v[0]
        if not c:
            continue
        count += c
        for i, (stat, _e) in enumerate(plan.stats):
            x = v[1 + i]
            if stat in ("sum", "avg"):
                stats[i] = _wrap((stats[i] or 0) + x)
            elif stat == "min":
                stats[i] = x if stats[i] is None else min(stats[i], x)
            else:
                stats[i] = x if stats[i] is None else max(stats[i], x)
        if plan.nbuckets:
            for j, h in enumerate(v[1 + nstats:1 + nstats + plan.nbuckets]):
                hist[j] += h
    if not count:
        return None
    return count, stats, hist


def _wrap(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _add_rows(a: Row, b: Row) -> Row:
    """Two rows of one shown key (they differed only in a hidden key)."""
    from apptrace.agg.results import Histogram

    def pick(x: Any, y: Any, fn: Any) -> Any:
        return y if x is None else x if y is None else fn(x, y)

    hist = None
    if a.hist is not None and b.hist is not None:
        # both come from the same bucket layout: add bucket by bucket
        counts: dict[tuple[Any, Any], int] = {}
        for bk in (*a.hist.buckets, *b.hist.buckets):
            counts[(bk.lo, bk.hi)] = counts.get((bk.lo, bk.hi), 0) + bk.count
        from apptrace.agg.results import Bucket

        hist = Histogram(a.hist.kind, tuple(Bucket(lo, hi, c) for (lo, hi), c in sorted(
            counts.items(), key=lambda kv: (kv[0][0] is not None, kv[0][0] or 0))))
    count = a.count + b.count
    total = pick(a.sum, b.sum, lambda x, y: x + y)
    avg = None
    if a.avg is not None and b.avg is not None:
        avg = (a.avg * a.count + b.avg * b.count) / count
    return Row(a.key, count, total, pick(a.min, b.min, min), pick(a.max, b.max, max), avg,
               hist, tuple(sorted(set(a.truncated) | set(b.truncated))),
               tuple(sorted(set(a.faulted) | set(b.faulted))))
