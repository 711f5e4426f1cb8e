"""The BPF C of the GC tracer: a pause/cycle state machine over HotSpot's probes.

Per thread (a VM thread runs one VM operation at a time), the kernel keeps
one *pause state*: safepoint begin/end (``hs_private``), the VM operation's
begin/end and name, the GC span (``gc__begin/end``) and every pool the
``mem__pool__gc__*`` probes report while the operation runs. One record goes
out when the pause is over (at safepoint end, else at the VM operation's end,
else at ``gc__end``), so a G1 young pause costs one ring-buffer record, not
the 22 probe hits it is made of.

Pool events outside any VM operation are concurrent cycles (ZGC,
Shenandoah): they are grouped per (thread, manager) and go out when every
pool that began has ended.

Strings (VM operation, manager and pool names) are static in the JVM, so only
their pointers travel; each is copied once into the ``names`` map, keyed by
(pid, pointer). The GC cause is read at the end of each pause from the JVM's
own mapping of its hsperfdata file (``perf`` map, filled from user space).

``aggregate`` mode sends nothing: pauses and cycles are counted in
log-linear histograms per (pid, VM operation, managers), and the pool usage
after each collection is kept per (pid, pool).

USDT arguments are read the way the engine's table-driven groups read them
(:func:`apptrace.codegen.table_row` rows in a ``specs`` array, one row per
probe site, the row's index as the uprobe_multi cookie): the C is then the
same for every libjvm build, so one compiled object serves every JDK.
"""

from __future__ import annotations

import struct

from apptrace.codegen import (
    ARG_CONST,
    ARG_MEM,
    ARG_MEM_IP,
    ARG_REG,
    MAX_TABLE_ARGS,
    NO_REG,
    ArgRead,
    header_c,
    table_row,
)
from apptrace.usdt.notes import Site

__all__ = ["render", "spec_rows", "SPEC_ARG", "MAX_SPECS", "RECORD", "MAX_POOLS",
           "HIST_BUCKETS", "HIST_SUB", "AGG_KEY", "AGG_VALUE",
           "NAME_KEY", "NAME_VALUE", "HEAP_KEY", "HEAP_VALUE", "PERF_VALUE", "COUNTERS",
           "KIND_PAUSE", "KIND_CYCLE", "F_FULL", "F_SP_SEEN", "F_DROPPED", "F_GC_SEEN",
           "F_CAUSE_END",
           "PROBE_FUNCS", "bucket_of", "bucket_bounds"]

MAX_POOLS = 32
MAX_SPECS = 64                  # probe sites per libjvm (JDK 25 has 10 GC sites)
SPEC_ARG = struct.Struct("<BBBBHHqQ")  # struct apptrace_arg (apptrace.codegen.header_c)
HIST_SUB = 4                    # sub-buckets per power of two
HIST_BUCKETS = 64 * HIST_SUB     # microseconds; a power of two, so the C can mask the index
KIND_PAUSE, KIND_CYCLE = 1, 2

# state flags (also in records)
F_SP = 1 << 0          # safepoint open
F_OP = 1 << 1          # VM operation open
F_OP_DONE = 1 << 2     # VM operation ended, waiting for the safepoint's end
F_GC_OPEN = 1 << 3
F_GC_SEEN = 1 << 4     # a gc__begin/end span happened
F_ISGC = 1 << 5        # this operation collected (gc span or pool events)
F_FULL = 1 << 6        # gc__begin's argument was 1
F_SP_SEEN = 1 << 7     # the safepoint's begin and end are in the record
F_DROPPED = 1 << 8     # more pools than MAX_POOLS
F_CAUSE_END = 1 << 9   # causes read at the end: (sun.gc.cause, sun.gc.lastCause)

# counters (per-CPU array slots)
COUNTERS = ("ring_full", "no_state", "pools_dropped", "cycle_no_begin", "gc_end_unmatched",
            "agg_full", "names_full", "heap_full")

# struct gc_rec: 7 u64 times, 8 u32, two u64 managers, two 64-byte cause strings,
# then MAX_POOLS x struct pool (9 u64: manager, pool, init, max, used and
# committed before, used and committed after, bit 0/1: before/after seen)
POOL_FIELDS = 9
RECORD = struct.Struct(f"<7Q8I2Q64s64s64s64s{MAX_POOLS * POOL_FIELDS}Q")
NAME_KEY = struct.Struct("<IIQ")        # pid, pad, pointer
NAME_VALUE = struct.Struct("<Q64s")     # length, bytes
PERF_VALUE = struct.Struct("<QQ")       # address of sun.gc.cause, sun.gc.lastCause
AGG_KEY = struct.Struct("<IIQQQ")       # pid, kind|flags, vm op name, manager 0, manager 1
AGG_VALUE = struct.Struct(f"<6Q{HIST_BUCKETS}Q")  # count, sum, max, sp count, sp sum, sp max
HEAP_KEY = struct.Struct("<IIQ")        # pid, pad, pool name pointer
HEAP_VALUE = struct.Struct("<6Q")       # manager, used, committed, max, init, ts

# probe -> BPF function base name
PROBE_FUNCS = {
    ("hs_private", "safepoint__begin"): "on_sp_begin",
    ("hs_private", "safepoint__end"): "on_sp_end",
    ("hotspot", "vmops__begin"): "on_op_begin",
    ("hotspot", "vmops__end"): "on_op_end",
    ("hotspot", "gc__begin"): "on_gc_begin",
    ("hotspot", "gc__end"): "on_gc_end",
    ("hotspot", "mem__pool__gc__begin"): "on_pool_begin",
    ("hotspot", "mem__pool__gc__end"): "on_pool_end",
}
_NARGS = {"on_op_begin": 3, "on_op_end": 3, "on_gc_begin": 1, "on_pool_begin": 8,
          "on_pool_end": 8}


def bucket_of(ns: int) -> int:
    """The histogram bucket of a duration, as the kernel computes it: whole
    microseconds, 0-3 us exactly, then four buckets per power of two."""
    us = max(0, ns) // 1000
    if us < 4:
        return us
    msb = us.bit_length() - 1
    return min(msb * HIST_SUB + ((us >> (msb - 2)) & 3), HIST_BUCKETS - 1)


def bucket_bounds(b: int) -> tuple[int, int]:
    """[low, high) microseconds of bucket ``b``."""
    if b < 4:
        return b, b + 1
    msb, sub = divmod(b, HIST_SUB)
    step = 1 << (msb - 2)
    low = (1 << msb) + sub * step
    return low, low + step


def spec_rows(sites: dict[tuple[str, str], tuple[Site, ...]]
              ) -> list[tuple[tuple[str, str], int, bytes]]:
    """(probe, site index, ``specs`` value) for every site, in cookie order:
    the cookie of a site is its row's index."""
    out = []
    for key, func in PROBE_FUNCS.items():
        n = _NARGS.get(func, 0)
        for si, site in enumerate(sites.get(key, ())):
            reads = tuple(ArgRead(usdt=site.args[i] if i < len(site.args) else None)
                          for i in range(n))
            rows = table_row(reads, site.address)
            value = b"".join(SPEC_ARG.pack(*r) for r in rows)
            out.append((key, si, value + bytes(SPEC_ARG.size * MAX_TABLE_ARGS - len(value))))
    if len(out) > MAX_SPECS:
        raise ValueError(f"{len(out)} GC probe sites; at most {MAX_SPECS} are supported")
    return out


def _entries(func: str, cookies: list[int]) -> str:
    """A uprobe_multi entry (cookie from the link) and, for kernels without
    uprobe_multi, one entry per site with its cookie as a constant."""
    out = [f"int {func}_m(struct pt_regs *ctx) {{ return {func}_ck(ctx,"
           f" bpf_get_attach_cookie(ctx)); }}"]
    out += [f"int {func}_c{c}(struct pt_regs *ctx) {{ return {func}_ck(ctx, {c}); }}"
            for c in cookies]
    return "\n".join(out)


# Reads USDT arguments from a table_row() spec (see apptrace.codegen): a
# register through apptrace_reg, memory with exactly the operand's size.
_READER = f"""
BPF_ARRAY(specs, struct apptrace_spec, {MAX_SPECS});
static __always_inline u64 gc_arg(struct pt_regs *ctx, struct apptrace_arg *a) {{
    u64 v = 0;
    u32 size = a->size & 0xf;
    if (size > 8) size = 8;
    if (a->kind == {ARG_CONST}) return (u64)a->disp;
    if (a->kind == {ARG_REG}) {{
        v = apptrace_reg(ctx, a->base) >> (a->shift & 0x3f);
    }} else if (a->kind == {ARG_MEM} || a->kind == {ARG_MEM_IP}) {{
        u64 addr = (u64)a->disp;
        if (a->kind == {ARG_MEM_IP}) addr += ctx->ip;
        if (a->base != {NO_REG}) addr += apptrace_reg(ctx, a->base);
        if (a->index != {NO_REG}) addr += apptrace_reg(ctx, a->index) * a->scale;
        if (bpf_probe_read_user(&v, size, (void *)addr)) return 0;
    }} else {{
        return 0;
    }}
    u32 bits = (64 - 8 * size) & 0x3f;
    v <<= bits;
    return a->sign ? (u64)((s64)v >> bits) : v >> bits;
}}
static __always_inline void gc_args(struct pt_regs *ctx, u64 ck, u64 *out, u32 n) {{
    u32 row = ck;
    struct apptrace_spec *sp = specs.lookup(&row);
    if (!sp) return;
#pragma unroll
    for (u32 i = 0; i < 8; i++)
        if (i < n) out[i] = gc_arg(ctx, &sp->a[i]);
}}
"""

_COMMON = r"""
#define MAXP __MAXP__
#define NB __NB__
#define F_SP __F_SP__
#define F_OP __F_OP__
#define F_OP_DONE __F_OP_DONE__
#define F_GC_OPEN __F_GC_OPEN__
#define F_GC_SEEN __F_GC_SEEN__
#define F_ISGC __F_ISGC__
#define F_FULL __F_FULL__
#define F_SP_SEEN __F_SP_SEEN__
#define F_DROPPED __F_DROPPED__
#define F_CAUSE_END __F_CAUSE_END__
#define C_RING_FULL 0
#define C_NO_STATE 1
#define C_POOLS_DROPPED 2
#define C_CYCLE_NO_BEGIN 3
#define C_GC_END_UNMATCHED 4
#define C_AGG_FULL 5
#define C_NAMES_FULL 6
#define C_HEAP_FULL 7

struct pool { u64 mgr, pool, init, max, used0, comm0, used1, comm1, have; };
struct gc_rec {
    u64 sp_begin, sp_end, op_begin, op_end, gc_begin, gc_end, op_name;
    u32 pid, tid, flags, npool, ngc, nbegin, nend, kind;
    u64 mgr, mgr2;
    char cause[64];      /* sun.gc.cause as the first memory manager began */
    char cause2[64];     /* ... as a second one began (a nested collection) */
    char end_cause[64];  /* sun.gc.cause at the end */
    char end_last[64];   /* sun.gc.lastCause at the end */
    struct pool p[MAXP];
};
struct ckey { u64 mgr; u32 tid; u32 pad; };
struct nkey { u32 pid; u32 pad; u64 ptr; };
struct nval { u64 len; char s[64]; };
struct paddr { u64 cause; u64 lastcause; };

BPF_TABLE("lru_hash", u32, struct gc_rec, pst, 1024);
BPF_TABLE("lru_hash", struct ckey, struct gc_rec, cst, 1024);
BPF_PERCPU_ARRAY(scratch, struct gc_rec, 1);
BPF_TABLE("lru_hash", struct nkey, struct nval, names, 8192);
BPF_HASH(perf, u32, struct paddr, 4096);
BPF_PERCPU_ARRAY(cnt, u64, 8);

static __always_inline void count(u32 i) {
    u64 *c = cnt.lookup(&i);
    if (c) *c += 1;
}

static __always_inline void remember(u32 pid, u64 ptr, u64 len) {
    struct nkey k = {};
    k.pid = pid;
    k.ptr = ptr;
    if (!ptr || names.lookup(&k)) return;
    struct nval v = {};
    v.len = len;
    bpf_probe_read_user_str(v.s, sizeof(v.s), (void *)ptr);
    if (names.update(&k, &v)) count(C_NAMES_FULL);
}

static __always_inline struct gc_rec *pause_state(u32 tid) {
    struct gc_rec *s = pst.lookup(&tid);
    if (s) return s;
    u32 z = 0;
    struct gc_rec *zero = scratch.lookup(&z);
    if (!zero) return 0;
    pst.update(&tid, zero);
    s = pst.lookup(&tid);
    if (!s) count(C_NO_STATE);
    return s;
}

static __always_inline void fresh(struct gc_rec *s, u64 id) {
    s->pid = id >> 32;
    s->tid = (u32)id;
    s->flags = 0;
    s->npool = 0;
    s->ngc = 0;
    s->kind = __KIND_PAUSE__;
    s->sp_begin = s->sp_end = s->op_begin = s->op_end = s->gc_begin = s->gc_end = 0;
    s->op_name = 0;
    s->mgr = 0;
    s->mgr2 = 0;
    s->cause[0] = 0;
    s->cause2[0] = 0;
    s->nbegin = 0;
    s->nend = 0;
}

static __always_inline struct pool *slot(struct gc_rec *s, u64 mgr, u64 pool, u32 *created) {
    u32 n = s->npool;
#pragma unroll
    for (u32 i = 0; i < MAXP; i++) {
        if (i >= n) break;
        struct pool *q = &s->p[i & (MAXP - 1)];
        if (q->pool == pool && q->mgr == mgr) return q;
    }
    if (n >= MAXP) {
        s->flags |= F_DROPPED;
        count(C_POOLS_DROPPED);
        return 0;
    }
    struct pool *p = &s->p[n & (MAXP - 1)];
    p->mgr = mgr;
    p->pool = pool;
    p->init = p->max = p->used0 = p->comm0 = p->used1 = p->comm1 = p->have = 0;
    s->npool = n + 1;
    *created = 1;
    return p;
}

/* The cause of the collection running now (sun.gc.cause): read as a memory
   manager starts, because a collection nested in another (Parallel's full
   after a scavenge) puts the outer one's cause back when it ends. */
static __always_inline void cause_now(struct gc_rec *s, char *buf) {
#ifdef GC_CAUSES
    struct paddr *pa = perf.lookup(&s->pid);
    if (pa && pa->cause) bpf_probe_read_user_str(buf, 64, (void *)pa->cause);
#endif
}

/* The causes at the end: the current one, and the last one. */
static __always_inline void cause_at_end(struct gc_rec *s) {
    struct paddr *pa = perf.lookup(&s->pid);
    s->end_cause[0] = 0;
    s->end_last[0] = 0;
    if (!pa) return;
    if (pa->cause)
        bpf_probe_read_user_str(s->end_cause, sizeof(s->end_cause), (void *)pa->cause);
    if (pa->lastcause)
        bpf_probe_read_user_str(s->end_last, sizeof(s->end_last), (void *)pa->lastcause);
}
"""

_EVENTS = r"""
BPF_RINGBUF_OUTPUT(events, __PAGES__);

/* A wakeup is an interrupt taken here, inside the pause (under virtualization
   a VM exit: ~20 us measured). The reader polls instead, and is woken only
   when half the ring is waiting: it publishes how many records it consumed. */
BPF_ARRAY(progress, u64, 2);   /* 0: records written, 1: records read (user space) */

static __always_inline void emit(struct gc_rec *s) {
    cause_at_end(s);
    u32 k0 = 0, k1 = 1;
    u64 *written = progress.lookup(&k0);
    u64 *read = progress.lookup(&k1);
    u64 flags = BPF_RB_NO_WAKEUP;
    if (written && read && *written - *read >= __RING_RECORDS__ / 2)
        flags = BPF_RB_FORCE_WAKEUP;
    if (events.ringbuf_output(s, sizeof(*s), flags)) {
        count(C_RING_FULL);
        return;
    }
    if (written) __sync_fetch_and_add(written, 1);
}
"""

_AGGREGATE = r"""
struct akey { u32 pid; u32 kind; u64 op; u64 mgr0; u64 mgr1; };
struct aval { u64 count, sum, max, spcount, spsum, spmax; u64 hist[NB]; };
struct hkey { u32 pid; u32 pad; u64 pool; };
struct hval { u64 mgr, used, committed, max, init, ts; };
BPF_HASH(agg, struct akey, struct aval, 1024);
BPF_PERCPU_ARRAY(ascratch, struct aval, 1);
BPF_HASH(heap, struct hkey, struct hval, 4096);

static __always_inline u32 log2u(u64 v) {
    u32 r = 0, s;
    s = (v > 0xFFFFFFFFULL) << 5; v >>= s; r |= s;
    s = (v > 0xFFFF) << 4; v >>= s; r |= s;
    s = (v > 0xFF) << 3; v >>= s; r |= s;
    s = (v > 0xF) << 2; v >>= s; r |= s;
    s = (v > 0x3) << 1; v >>= s; r |= s;
    r |= (v >> 1);
    return r;
}

static __always_inline u32 bucket(u64 ns) {
    u64 us = ns / 1000;
    if (us < 4) return us;
    u32 msb = log2u(us);
    u32 b = msb * __SUB__ + ((us >> (msb - 2)) & 3);
    return b < NB ? b : NB - 1;
}

static __always_inline void after_gc(struct gc_rec *s, struct akey *k, struct pool *q, u64 ts) {
    u64 m = q->mgr;
    if (!k->mgr0) k->mgr0 = m;
    else if (m != k->mgr0 && !k->mgr1) k->mgr1 = m;
    if (!(q->have & 2)) return;
    struct hkey hk = {};
    hk.pid = s->pid;
    hk.pool = q->pool;
    /* In place: an update would allocate and free an element each time. */
    struct hval *hv = heap.lookup(&hk);
    if (!hv) {
        struct hval zero = {};
        heap.update(&hk, &zero);
        hv = heap.lookup(&hk);
        if (!hv) { count(C_HEAP_FULL); return; }
    }
    hv->mgr = m;
    hv->used = q->used1;
    hv->committed = q->comm1;
    hv->max = q->max;
    hv->init = q->init;
    hv->ts = ts;
}

static __always_inline void emit(struct gc_rec *s) {
    struct akey k = {};
    k.pid = s->pid;
    k.kind = s->kind | (s->flags & F_FULL);
    k.op = s->op_name;
    u32 n = s->npool;
    u64 ts = bpf_ktime_get_ns();
__POOL_LOOP__
    if (s->kind == __KIND_CYCLE__) k.mgr0 = s->mgr;
    struct aval *v = agg.lookup(&k);
    if (!v) {
        u32 z = 0;
        struct aval *zero = ascratch.lookup(&z);
        if (!zero) return;
        agg.update(&k, zero);
        v = agg.lookup(&k);
        if (!v) { count(C_AGG_FULL); return; }
    }
    u64 d = __DURATION__;
    __sync_fetch_and_add(&v->count, 1);
    __sync_fetch_and_add(&v->sum, d);
    if (d > v->max) v->max = d;
    u32 b = bucket(d);
    __sync_fetch_and_add(&v->hist[b & (NB - 1)], 1);
    if (s->flags & F_SP_SEEN) {
        u64 sp = s->sp_end - s->sp_begin;
        __sync_fetch_and_add(&v->spcount, 1);
        __sync_fetch_and_add(&v->spsum, sp);
        if (sp > v->spmax) v->spmax = sp;
    }
}
"""

_HANDLERS = r"""
static __always_inline int on_sp_begin_do(struct pt_regs *ctx, u64 *a) {
    u64 id = bpf_get_current_pid_tgid();
    struct gc_rec *s = pause_state((u32)id);
    if (!s) return 0;
    fresh(s, id);
    s->flags = F_SP;
    s->sp_begin = bpf_ktime_get_ns();
    return 0;
}

static __always_inline int on_sp_end_do(struct pt_regs *ctx, u64 *a) {
    u32 tid = bpf_get_current_pid_tgid();
    struct gc_rec *s = pst.lookup(&tid);
    if (!s || !(s->flags & F_SP)) return 0;
    s->sp_end = bpf_ktime_get_ns();
    if (s->flags & F_ISGC) {
        s->flags |= F_SP_SEEN;
        emit(s);
    }
    s->flags = 0;
    return 0;
}

static __always_inline int on_op_begin_do(struct pt_regs *ctx, u64 *a) {
    u64 id = bpf_get_current_pid_tgid();
    struct gc_rec *s = pause_state((u32)id);
    if (!s) return 0;
    u32 sp = s->flags & F_SP;
    u64 spb = s->sp_begin;
    fresh(s, id);
    s->flags = sp | F_OP;
    s->sp_begin = sp ? spb : 0;
    s->op_name = a[0];
    s->op_begin = bpf_ktime_get_ns();
    remember(s->pid, a[0], a[1]);
    return 0;
}

static __always_inline int on_op_end_do(struct pt_regs *ctx, u64 *a) {
    u32 tid = bpf_get_current_pid_tgid();
    struct gc_rec *s = pst.lookup(&tid);
    if (!s || !(s->flags & F_OP)) return 0;
    s->op_end = bpf_ktime_get_ns();
    s->flags &= ~F_OP;
    if (s->flags & F_ISGC) {
        if (s->flags & F_SP) {
            s->flags |= F_OP_DONE;
            return 0;
        }
        emit(s);
        s->flags = 0;
    }
    return 0;
}

static __always_inline int on_gc_begin_do(struct pt_regs *ctx, u64 *a) {
    u64 id = bpf_get_current_pid_tgid();
    struct gc_rec *s = pause_state((u32)id);
    if (!s) return 0;
    if (!(s->flags & F_OP)) {   /* a GC outside any VM operation */
        u32 sp = s->flags & F_SP;
        u64 spb = s->sp_begin;
        fresh(s, id);
        s->flags = sp;
        s->sp_begin = spb;
    }
    u64 now = bpf_ktime_get_ns();
    if (!(s->flags & F_GC_SEEN)) s->gc_begin = now;
    s->ngc += 1;
    s->flags |= F_GC_OPEN | F_GC_SEEN | F_ISGC;
    if (a[0] & 0xff) s->flags |= F_FULL;
    return 0;
}

static __always_inline int on_gc_end_do(struct pt_regs *ctx, u64 *a) {
    u32 tid = bpf_get_current_pid_tgid();
    struct gc_rec *s = pst.lookup(&tid);
    if (!s || !(s->flags & F_GC_OPEN)) {
        count(C_GC_END_UNMATCHED);
        return 0;
    }
    s->gc_end = bpf_ktime_get_ns();
    s->flags &= ~F_GC_OPEN;
    if (!(s->flags & (F_OP | F_SP))) {
        emit(s);
        s->flags = 0;
    }
    return 0;
}

/* a: manager, manager length, pool, pool length, init, used, committed, max */
static __always_inline int pool_event(struct pt_regs *ctx, u64 *a, int begin) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    u64 now = bpf_ktime_get_ns();
    struct gc_rec *s = pst.lookup(&tid);
    if (s && (s->flags & (F_OP | F_GC_OPEN))) {
        u32 created = 0;
        struct pool *p = slot(s, a[0], a[2], &created);
        if (created) {
            remember(s->pid, a[0], a[1]);
            remember(s->pid, a[2], a[3]);
            if (begin && !s->mgr) {
                s->mgr = a[0];
                cause_now(s, s->cause);
            } else if (begin && a[0] != s->mgr && !s->mgr2) {
                s->mgr2 = a[0];
                cause_now(s, s->cause2);
            }
        }
        if (!p) return 0;
        p->init = a[4];
        p->max = a[7];
        if (begin) { p->used0 = a[5]; p->comm0 = a[6]; p->have |= 1; s->nbegin += 1; }
        else { p->used1 = a[5]; p->comm1 = a[6]; p->have |= 2; s->nend += 1; }
        s->flags |= F_ISGC;
        return 0;
    }
    /* Outside a VM operation: a concurrent cycle of this manager. */
    struct ckey k = {};
    k.mgr = a[0];
    k.tid = tid;
    struct gc_rec *c = cst.lookup(&k);
    if (!c) {
        if (!begin) { count(C_CYCLE_NO_BEGIN); return 0; }
        u32 z = 0;
        struct gc_rec *zero = scratch.lookup(&z);
        if (!zero) return 0;
        cst.update(&k, zero);
        c = cst.lookup(&k);
        if (!c) { count(C_NO_STATE); return 0; }
    }
    if (c->nbegin == 0) {
        if (!begin) { count(C_CYCLE_NO_BEGIN); return 0; }
        fresh(c, id);
        c->kind = __KIND_CYCLE__;
        c->mgr = a[0];
        c->op_begin = now;
        remember(c->pid, a[0], a[1]);
    }
    u32 created = 0;
    struct pool *p = slot(c, a[0], a[2], &created);
    if (p) {
        if (created) remember(c->pid, a[2], a[3]);
        p->init = a[4];
        p->max = a[7];
        if (begin) { p->used0 = a[5]; p->comm0 = a[6]; p->have |= 1; }
        else { p->used1 = a[5]; p->comm1 = a[6]; p->have |= 2; }
    }
    if (begin) { c->nbegin += 1; return 0; }
    c->nend += 1;
    c->op_end = now;
    if (c->nend >= c->nbegin) {
        emit(c);
        c->nbegin = 0;
        c->nend = 0;
        c->npool = 0;
    }
    return 0;
}

static __always_inline int on_pool_begin_do(struct pt_regs *ctx, u64 *a) {
    return pool_event(ctx, a, 1);
}

static __always_inline int on_pool_end_do(struct pt_regs *ctx, u64 *a) {
    return pool_event(ctx, a, 0);
}
"""

# What aggregate mode counts as a pause's duration (see gctrace.GcPause.duration_ns).
DURATION_C = ("(s->kind == __KIND_CYCLE__ ? s->op_end - s->op_begin : "
              "(s->op_end && s->op_begin ? s->op_end - s->op_begin : s->gc_end - s->gc_begin))")


def render(sites: dict[tuple[str, str], tuple[Site, ...]], *, aggregate: bool,
           ring_pages: int = 64, per_site: bool = False) -> str:
    """The whole C for one libjvm's probe sites.

    With uprobe_multi (the default) the text does not depend on the sites,
    so every libjvm shares one compiled object; ``per_site`` adds an entry
    per site for kernels without it.
    """
    consts = {
        "__MAXP__": str(MAX_POOLS), "__NB__": str(HIST_BUCKETS), "__SUB__": str(HIST_SUB),
        "__F_SP__": str(F_SP), "__F_OP__": str(F_OP), "__F_OP_DONE__": str(F_OP_DONE),
        "__F_GC_OPEN__": str(F_GC_OPEN), "__F_GC_SEEN__": str(F_GC_SEEN),
        "__F_ISGC__": str(F_ISGC), "__F_FULL__": str(F_FULL), "__F_SP_SEEN__": str(F_SP_SEEN),
        "__F_DROPPED__": str(F_DROPPED), "__F_CAUSE_END__": str(F_CAUSE_END),
        "__KIND_PAUSE__": str(KIND_PAUSE),
        "__KIND_CYCLE__": str(KIND_CYCLE), "__PAGES__": str(ring_pages),
        "__RING_RECORDS__": str(ring_pages * 4096 // (RECORD.size + 8)),
    }
    text = header_c() + ("" if aggregate else "#define GC_CAUSES 1\n") + _READER + _COMMON + (
        _AGGREGATE.replace("__DURATION__", DURATION_C) if aggregate else _EVENTS) + _HANDLERS
    # The decoders stride records and keys by these layouts: a mismatch is a
    # compile error, never misread data.
    text += "".join(f'_Static_assert(sizeof(struct {c}) == {st.size}, "{c} layout");\n'
                    for c, st in (("gc_rec", RECORD), ("nkey", NAME_KEY), ("nval", NAME_VALUE),
                                  ("paddr", PERF_VALUE)))
    if aggregate:
        text += "".join(f'_Static_assert(sizeof(struct {c}) == {st.size}, "{c} layout");\n'
                        for c, st in (("akey", AGG_KEY), ("aval", AGG_VALUE),
                                      ("hkey", HEAP_KEY), ("hval", HEAP_VALUE)))
    cookies: dict[str, list[int]] = {}
    for c, (key, _si, _value) in enumerate(spec_rows(sites)):
        cookies.setdefault(PROBE_FUNCS[key], []).append(c)
    for func in PROBE_FUNCS.values():
        n = _NARGS.get(func, 0)
        read = f"gc_args(ctx, ck, a, {n}); " if n else ""
        text += (f"static __always_inline int {func}_ck(struct pt_regs *ctx, u64 ck) {{"
                 f" u64 a[8] = {{}}; {read}return {func}_do(ctx, a); }}\n")
        text += _entries(func, cookies.get(func, []) if per_site else []) + "\n"
    # Unrolled here: clang turns a bounded loop over the pools into pointer
    # arithmetic the verifier cannot bound.
    loop = "\n".join(f"    if (n > {i}) after_gc(s, &k, &s->p[{i}], ts);"
                     for i in range(MAX_POOLS))
    text = text.replace("__POOL_LOOP__", loop)
    for k, v in consts.items():
        text = text.replace(k, v)
    return text


def default_programs() -> list[str]:
    """The C a default ``apptrace jvm gc`` compiles (both modes, the default
    ring, uprobe_multi): for ``apptrace prepare``. It does not depend on the JDK."""
    pages = 1024 * 1024 // 4096  # GcTracer's default ring_kb
    return [render({}, aggregate=a, ring_pages=pages) for a in (False, True)]
