"""Latency of entry/exit pairs, paired per thread in the kernel.

::

    with Latency("uprobe:libc:malloc", pid=1234, by="comm") as lat:
        lat.start()
        lat.wait(5)
        print(lat.read().format())

Each thread has a depth counter; an entry stores its timestamp at slot
(thread, depth) and goes one deeper, an exit takes the slot one up. So
nesting and recursion pair each exit with its own entry.

A frame left without returning (longjmp, a C++ exception) leaves its entry
behind. For a function's entry and return (``uprobe:B:F`` / ``uretprobe:B:F``,
the default) each entry also stores the stack pointer, and a return must
come back to exactly the entry's stack pointer + 8 (its return address
popped): entries of frames below the returning one are dropped as
abandoned, an exit with no entry at its level is counted as unmatched, and
nothing is ever mis-paired. For two USDT probes there is no such frame to
check: pairing is by depth alone.

Durations go to a per-CPU hash keyed by ``by`` (entry arguments, ``comm``,
``pid``, ``tid``, ``probe``): exact count, total, minimum and maximum, and a
log2 histogram from which percentiles are bucket-bounded.
"""

from __future__ import annotations

import struct
from typing import Any, Optional, Sequence, Union

from apptrace.agg.bpfgen import (
    DROP_ABANDONED,
    DROP_C,
    DROP_FILTER,
    DROP_FULL,
    DROP_SLOTS,
    DROP_START,
    DROP_UNMATCHED,
    LOG2_C,
    AggPlan,
    gate_c,
    group_c,
    key_layout,
)
from apptrace.agg.family import KernelFamily, epoch_rows
from apptrace.agg.results import LatencyResult, LatencyRow, log2_histogram
from apptrace.agg.spec import KEY_STR_MAX, MAX_KEYS, check_expr, parse_keys
from apptrace.codegen import TASK_HOOKS, header_c
from apptrace.engine.plan import Group
from apptrace.engine.target import Stdout
from apptrace.errors import OptionError, SessionStateError
from apptrace.options import check_int
from apptrace.probes import ProbeSpec, parse_probe

__all__ = ["Latency", "exit_for"]

LAT_BY = ("pid", "tid", "comm", "probe")
MAX_DEPTH = 32       # calls in flight timed per thread (deeper ones are counted, not timed)
UNWIND = 16          # abandoned entries dropped per hit, at most (the rest on later hits)
MAX_THREADS = (16, 1 << 20)
_U32 = struct.Struct("<I")
_VAL = struct.Struct("<QQQQ65Q")


def exit_for(entry: ProbeSpec) -> str:
    """The default exit of an entry probe string: the same function's return."""
    if entry.kind != "uprobe":
        raise OptionError("exit", "(none)", "an exit probe string: pairs of USDT probes"
                          " need both (usdt:P:start usdt:P:done)")
    return f"uretprobe:{entry.binary}:{entry.name}"


class Latency(KernelFamily):
    """Time entry → exit pairs per thread. ``exit`` defaults to the entry
    function's return; ``by`` keys the rows; ``where`` filters on the entry's
    arguments (an entry filtered out is still paired with its exit, then
    not counted)."""

    def __init__(self, entry: str, exit: Optional[str] = None, *, pid: Optional[int] = None,
                 path: Optional[str] = None, command: Optional[Sequence[str]] = None,
                 command_stdout: Stdout = None, by: Union[str, Sequence[str], None] = (),
                 where: Optional[str] = None, intervals: bool = False,
                 max_keys: int = 10240, max_threads: int = 8192, str_max: int = 64,
                 semaphores: str = "kernel", multi: Optional[bool] = None) -> None:
        self.entry = parse_probe(entry)
        if self.entry.kind == "uretprobe":
            raise OptionError("entry", entry, "a uprobe or USDT probe string (a uretprobe"
                              " is an exit)")
        self.exit = parse_probe(exit if exit is not None else exit_for(self.entry))
        if self.exit.kind == "uprobe" and self.exit.offset is None and "+" not in \
                self.exit.name and self.entry.kind == "uprobe":
            raise OptionError("exit", exit, "a uretprobe or USDT probe string (a function's"
                              " entry is not an exit)")
        self.by = parse_keys(by)
        for k in self.by:
            if k not in LAT_BY and not k.startswith("arg"):
                raise OptionError("by", k, "arg0..arg11 (of the entry), " + ", ".join(LAT_BY))
        self.where = check_expr("where", where)
        self.intervals = bool(intervals)
        self.max_keys = check_int("max_keys", max_keys, *MAX_KEYS)
        self.max_threads = check_int("max_threads", max_threads, *MAX_THREADS)
        self.key_str = check_int("str_max", str_max, *KEY_STR_MAX)
        # A function's own entry and return: exits checked by stack pointer.
        self.by_stack = (self.entry.kind == "uprobe" and self.exit.kind == "uretprobe"
                         and self.entry.offset is None and "+" not in self.entry.name)
        super().__init__(pid=pid, path=path, command=command, command_stdout=command_stdout,
                         semaphores=semaphores, multi=multi)
        self._groups = [Group(0, self.entry), Group(1, self.exit)]
        self._plan: Optional[AggPlan] = None
        self.result: Optional[LatencyResult] = None

    # -- the program --------------------------------------------------------------------

    def _entry(self, g: Group) -> str:
        return "le0" if g.gid == 0 else "lx1"

    def _render(self, groups: list[Group]) -> str:
        entry, exit_ = groups
        plan = AggPlan(self.by, (), None, self.where, intervals=self.intervals,
                       max_keys=self.max_keys, key_str=self.key_str, multi=self.multi,
                       gate=self._target.command is not None)
        plan.site_cookies = {0: self.site_cookies(entry), 1: self.site_cookies(exit_)}
        key_c, fields = key_layout(plan, [entry])
        self._plan = plan
        ep = "k.epoch" if plan.has_head else "0"
        out = [header_c(), TASK_HOOKS, key_c, LOG2_C]
        out.append("struct lat_val { u64 count; u64 total; u64 min; u64 max; u64 hist[65]; };")
        # Per thread: its depth and the calls in flight, one slot per level.
        out.append("struct lat_slot { u64 ts; u64 sp; u32 pass; u32 pad; struct agg_key k; };")
        out.append(f"struct lat_thread {{ u32 depth; u32 pad; struct lat_slot s[{MAX_DEPTH}];"
                   " };")
        out.append(f'BPF_TABLE("lru_hash", u32, struct lat_thread, lat_threads,'
                   f' {self.max_threads});')
        out.append("BPF_PERCPU_ARRAY(lat_zero, struct lat_thread, 1);")
        out.append(f"BPF_PERCPU_HASH(agg_vals, struct agg_key, struct lat_val,"
                   f" {self.max_keys});")
        out.append("BPF_PERCPU_ARRAY(agg_zero, struct lat_val, 1);")
        out.append(f"BPF_PERCPU_ARRAY(agg_drop, u64, {DROP_SLOTS * 2});")
        if self.intervals:
            out.append("BPF_ARRAY(agg_epoch, u32, 1);")
        out.append(DROP_C)
        out.append(f"""static __always_inline void lat_record(struct agg_key *k, u64 ns) {{
    struct lat_val *v = agg_vals.lookup(k);
    if (!v) {{
        u32 z = 0;
        struct lat_val *init = agg_zero.lookup(&z);
        if (!init) return;
        agg_vals.insert(k, init);
        v = agg_vals.lookup(k);
        if (!v) {{ agg_drop_one({'k->epoch' if plan.has_head else '0'}, {DROP_FULL}); return; }}
    }}
    if (v->count == 0 || ns < v->min) v->min = ns;
    if (ns > v->max) v->max = ns;
    __sync_fetch_and_add(&v->total, ns);
    u32 b = agg_log2_bucket((s64)ns);
    asm volatile("" : "+r"(b));
    if (b < 65) __sync_fetch_and_add(&v->hist[b], 1);
    __sync_fetch_and_add(&v->count, 1);
}}
/* This thread's record, made on its first entry (an LRU map: threads that
   are gone make room). */
static __always_inline struct lat_thread *lat_thread_of(u32 tid) {{
    struct lat_thread *t = lat_threads.lookup(&tid);
    if (t) return t;
    u32 z = 0;
    struct lat_thread *init = lat_zero.lookup(&z);
    if (!init) return 0;
    lat_threads.insert(&tid, init);
    return lat_threads.lookup(&tid);
}}""")
        # Entry: drop slots of frames this call shows are gone (stack mode),
        # store this call at the thread's depth, go one deeper. A call deeper
        # than the slots still takes its depth, so later pairs stay aligned.
        unwind = ""
        if self.by_stack:
            unwind = f"""
    u32 gone = 0;
#pragma unroll
    for (int i = 0; i < {UNWIND}; i++) {{
        if (d == 0 || d > {MAX_DEPTH}) break;
        if (t->s[(d - 1) & {MAX_DEPTH - 1}].sp > sp) break;   /* a live caller */
        gone++;
        d--;
    }}
    if (gone) agg_drop_n({ep}, {DROP_ABANDONED}, gone);"""
        push = f"""    u32 tid = (u32)id;
    u64 sp = ctx->sp;
    (void)sp;
    struct lat_thread *t = lat_thread_of(tid);
    if (!t) {{ agg_drop_one({ep}, {DROP_START}); return 0; }}
    u32 d = t->depth;{unwind}
    if (d < {MAX_DEPTH}) {{
        u32 at = d & {MAX_DEPTH - 1};
        t->s[at].ts = bpf_ktime_get_ns();
        t->s[at].sp = sp;
        t->s[at].pass = pass;
        t->s[at].k = k;
    }} else {{
        agg_drop_one({ep}, {DROP_START});
    }}
    t->depth = d + 1;
"""
        out.append(group_c(entry, plan, fields, prefix="le", tail=push, pass_flag=True,
                           uses_id=True))
        out.append(self._exit_c(exit_, plan))
        return "\n\n".join(out) + "\n"

    def _exit_c(self, g: Group, plan: AggPlan) -> str:
        if self.intervals:
            epoch = ("    u32 ez = 0;\n    u32 *epp = agg_epoch.lookup(&ez);\n"
                     "    u32 epoch = epp ? *epp : 0;\n")
        else:
            epoch = "    u32 epoch = 0;\n"
        record = ("if (s->pass) { struct agg_key k = s->k;"
                  + (" k.epoch = epoch;" if plan.has_head else "")
                  + " lat_record(&k, now - s->ts); }")
        if self.by_stack:
            # The returning frame's entry had sp == this sp - 8 (its return
            # address is popped now). Slots below it (lower sp) were left
            # without returning; one above it is an outer frame: this exit's
            # own entry was never seen.
            pair = f"""    u64 want = ctx->sp - 8;
    u32 gone = 0;
    int found = 0;
#pragma unroll
    for (int i = 0; i < {UNWIND}; i++) {{
        if (d == 0) break;
        if (d > {MAX_DEPTH}) {{ found = 2; break; }}   /* not stored (counted) */
        u64 at = t->s[(d - 1) & {MAX_DEPTH - 1}].sp;
        if (at == want) {{ found = 1; break; }}
        if (at > want) break;       /* an outer frame: this exit's entry is not here */
        gone++;                     /* a frame left without returning */
        d--;
    }}
    if (gone) agg_drop_n(epoch, {DROP_ABANDONED}, gone);
    if (found == 1) {{
        struct lat_slot *s = &t->s[(d - 1) & {MAX_DEPTH - 1}];
        {record}
    }}
    if (found) d--;
    else agg_drop_one(epoch, {DROP_UNMATCHED});"""
        else:
            pair = f"""    if (d <= {MAX_DEPTH}) {{
        struct lat_slot *s = &t->s[(d - 1) & {MAX_DEPTH - 1}];
        {record}
    }}
    d--;"""
        n = "lx1"
        body = f"""static __always_inline int {n}_body(struct pt_regs *ctx, u64 ck) {{
{gate_c(plan.gate)}
    u64 now = bpf_ktime_get_ns();
{epoch}    u32 tid = (u32)id;
    struct lat_thread *t = lat_threads.lookup(&tid);
    u32 d = t ? t->depth : 0;
    if (!t || d == 0) {{ agg_drop_one(epoch, {DROP_UNMATCHED}); return 0; }}
{pair}
    t->depth = d;
    return 0;
}}"""
        entries = []
        if self.multi:
            ck = "0" if len(g.reader_plans) <= 1 else "bpf_get_attach_cookie(ctx)"
            entries.append(f"int {n}_multi(struct pt_regs *ctx) {{ return {n}_body(ctx, {ck}); }}")
        for c in plan.site_cookies.get(1, []):
            entries.append(f"int {n}_c{c:x}(struct pt_regs *ctx) {{"
                           f" return {n}_body(ctx, {c}ULL); }}")
        return body + "\n\n" + "\n".join(entries)

    # -- reading --------------------------------------------------------------------------

    def read(self) -> LatencyResult:
        """Every pair timed so far."""
        if self.intervals:
            raise SessionStateError("this latency counts intervals: use read_interval()")
        self.start()
        self.result = self._read(None)
        return self.result

    def read_interval(self) -> LatencyResult:
        """The pairs whose exit came since the previous call, exactly."""
        if not self.intervals:
            raise SessionStateError("made without intervals=True: use read()")
        self.start()
        self.result = self._read(self._flip_epoch())
        return self.result

    def _read(self, epoch: Optional[int]) -> LatencyResult:
        plan = self._plan
        assert plan is not None
        from apptrace.agg.aggregate import _key_value

        m = self._map("agg_vals")
        rows: dict[tuple[Any, ...], LatencyRow] = {}
        for kflags, kvals, cpus in epoch_rows(m, plan, epoch):
            count = total = 0
            lo: Optional[int] = None
            hi = 0
            hist = [0] * 65
            for v in cpus:
                c, t, mn, mx, *h = _VAL.unpack(v)
                if not c:
                    continue
                count += c
                total += t
                lo = mn if lo is None else min(lo, mn)
                hi = max(hi, mx)
                for j, x in enumerate(h):
                    hist[j] += x
            if not count:
                continue
            cut, fault = [], []
            shown: dict[str, Any] = {}
            for f, v in zip(plan.fields, kvals):
                shown[f.name] = _key_value(f, v, self._groups[:1], self.key_str)
                if f.flag_bit >= 0:
                    if kflags >> (2 * f.flag_bit) & 1:
                        fault.append(f.name)
                    if kflags >> (2 * f.flag_bit + 1) & 1:
                        cut.append(f.name)
            key = tuple(shown[n] for n in self.by)
            rows[key] = LatencyRow(key, count, total, lo or 0, hi, log2_histogram(hist),
                                   tuple(cut), tuple(fault))
        e = epoch or 0
        reset = epoch is not None

        def drop(why: int) -> int:
            n = self._counter("agg_drop", e * DROP_SLOTS + why, reset=reset)
            if epoch is None and self.intervals:
                n += self._counter("agg_drop", DROP_SLOTS + why)
            return n

        secs = self._since_last_read()
        threads = self._map("lat_threads")
        in_flight = 0
        for tkey in list(threads.keys()):
            raw = threads.lookup(tkey)
            if raw is not None:
                in_flight += _U32.unpack_from(raw)[0]
        stringy = any(f.kind in ("str", "bytes") for f in plan.fields)
        return LatencyResult(
            self.by, tuple(rows.values()), self.entry.text, self.exit.text,
            self._interval if epoch is not None else 0, secs,
            unmatched_exits=drop(DROP_UNMATCHED), abandoned=drop(DROP_ABANDONED),
            in_flight=in_flight, not_counted=drop(DROP_FULL), start_dropped=drop(DROP_START),
            max_keys=self.max_keys, key_str_max=self.key_str if stringy else 0,
            paired_by="stack" if self.by_stack else "depth",
            filter_faults=drop(DROP_FILTER))

    def close(self) -> None:
        """Detach; keep the last result as :attr:`result`; free everything."""
        if self._state == "running" and not self.intervals:
            try:
                self.detach()
                self.read()
            except Exception:  # noqa: BLE001 - best effort before teardown
                pass
        super().close()
