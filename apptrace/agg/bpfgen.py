"""The BPF C of an aggregation: per probe string, read what the keys, the
filter and the values need, then update one hash map. Nothing goes through a
ring buffer, so nothing can be lost on the way; a hit the map has no room
for is counted (``agg_drop``), never silent.

Layout::

    agg_vals   per-CPU hash: struct agg_key → struct agg_val
               (count, sums, minimums, maximums, histogram buckets)
    agg_zero   a zeroed value: the template of a new key
    agg_drop   per-CPU counters: map full, value read faulted, filter read
               faulted, scratch overwritten (per epoch with intervals)
    agg_epoch  with intervals: which half of the map hits go to; user space
               flips it, waits for hits in flight, then reads and deletes
               the other half (exact per interval, nothing lost at the edge)
    agg_stacks with a ``ustack`` key: user stacks by id

The per-site argument reads are :func:`apptrace.codegen.reader_c`'s, pruned
to the arguments an expression or key uses. Each expression is compiled
once per argument reader (:mod:`apptrace.engine.filter`), since sites of one
probe string may store an argument differently.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from apptrace.codegen import GATE, HOLD_AT_ENTRY, TASK_HOOKS, ArgRead, header_c, reader_c
from apptrace.engine.filter import (
    Names,
    ReaderExpr,
    combine,
    int_c,
    reader_exprs,
    reader_slots,
)
from apptrace.engine.plan import Group, Slot
from apptrace.errors import OptionError
from apptrace.expr import names_used, parse

__all__ = ["KeyField", "AggPlan", "render_aggregate", "key_layout", "group_c", "gate_c", "LOG2_C",
           "DROP_C", "DROP_FULL", "DROP_VALUE", "DROP_FILTER", "DROP_RACE", "DROP_UNMATCHED",
           "DROP_ABANDONED", "DROP_START", "DROP_SLOTS", "decode_key"]

DROP_FULL, DROP_VALUE, DROP_FILTER, DROP_RACE = 0, 1, 2, 3
DROP_UNMATCHED, DROP_ABANDONED, DROP_START = 4, 5, 6   # latency pairing
DROP_SLOTS = 8
MAX_KEY_BYTES = 256      # the key is built on the BPF stack (512 bytes in all)
STACK_ARGS_BYTES = 128   # argument records up to this size live on the stack

# floor(log2(v)) for v >= 1, in six steps (no loops for the verifier).
LOG2_C = """static __always_inline u32 agg_log2(u64 v) {
    u32 r = 0, s;
    s = (v > 0xFFFFFFFFULL) << 5; v >>= s; r |= s;
    s = (v > 0xFFFFULL) << 4; v >>= s; r |= s;
    s = (v > 0xFFULL) << 3; v >>= s; r |= s;
    s = (v > 0xFULL) << 2; v >>= s; r |= s;
    s = (v > 0x3ULL) << 1; v >>= s; r |= s;
    return r | (u32)(v >> 1);
}
/* 0: v < 0, 1: v == 0, k >= 2: 2^(k-2) <= v < 2^(k-1) */
static __always_inline u32 agg_log2_bucket(s64 v) {
    if (v < 0) return 0;
    if (v == 0) return 1;
    return 2 + agg_log2((u64)v);
}"""


DROP_C = f"""static __always_inline void agg_drop_n(u32 epoch, u32 why, u64 n) {{
    u32 i = (epoch & 1) * {DROP_SLOTS} + why;
    u64 *c = agg_drop.lookup(&i);
    if (c) __sync_fetch_and_add(c, n);
}}
static __always_inline void agg_drop_one(u32 epoch, u32 why) {{ agg_drop_n(epoch, why, 1); }}"""


@dataclass(frozen=True)
class KeyField:
    """One component of the key: where it sits and how Python shows it."""

    name: str
    kind: str          # "int", "str", "bytes", "comm", "probe", "stack"
    offset: int
    size: int
    signed: bool = False
    hex: bool = False
    flag_bit: int = -1  # bit 2*i: faulted, 2*i+1: cut (argument keys)


@dataclass
class AggPlan:
    """Everything the C needs besides the groups."""

    keys: tuple[str, ...]
    stats: tuple[tuple[str, str], ...]        # ("sum"|"min"|"max"|"avg", expr)
    hist: Optional[tuple[str, Optional[tuple[int, int, int]]]]  # (expr, linear)
    where: Optional[str]
    group_where: dict[int, str] = field(default_factory=dict)   # gid → filter
    intervals: bool = False
    max_keys: int = 10240
    key_str: int = 64
    stack_entries: int = 16384
    multi: bool = True
    gate: bool = True         # a held command: drop hits in apptrace's launcher (GATE)
    site_cookies: dict[int, list[int]] = field(default_factory=dict)  # gid → cookies (perf)
    # filled by render_aggregate:
    fields: list[KeyField] = field(default_factory=list)
    key_struct: Optional[struct.Struct] = None
    val_struct: Optional[struct.Struct] = None
    hidden: tuple[str, ...] = ()              # keys added for symbolizing (pid, probe)
    has_head: bool = False                    # the key starts with u32 epoch, u32 kflags

    @property
    def nbuckets(self) -> int:
        if self.hist is None:
            return 0
        lin = self.hist[1]
        if lin is None:
            return 65
        lo, hi, step = lin
        return -(-(hi - lo) // step) + 2


def _arg_types(groups: Sequence[Group], name: str) -> str:
    """'str', 'bytes' or 'int' for an argument key, the same in every probe string."""
    i = int(name[3:])
    kinds = set()
    for g in groups:
        t = g.spec.types[i] if i < len(g.spec.types) else None
        kinds.add((t.kind if t.kind in ("str", "bytes") else "int") if t is not None else "int")
    if len(kinds) > 1:
        raise OptionError("key", name, "an argument that is a string in every probe string"
                          " or in none (give each the same types)")
    return kinds.pop()


def key_layout(plan: AggPlan, groups: Sequence[Group]) -> tuple[str, list[KeyField]]:
    keys = list(plan.keys)
    hidden: list[str] = []
    if "ustack" in keys:  # symbolizing needs the process and where it fired
        for extra in ("pid", "probe"):
            if extra not in keys:
                keys.append(extra)
                hidden.append(extra)
    plan.hidden = tuple(hidden)
    ints: list[tuple[str, str, bool, bool]] = []   # (name, kind, signed, hex)
    strs: list[tuple[str, str, int]] = []
    nflag = 0
    flagged: dict[str, int] = {}
    for k in keys:
        if k.startswith("arg"):
            kind = _arg_types(groups, k)
            if kind in ("str", "bytes") or _may_fault(groups, int(k[3:])):
                flagged[k] = nflag
                nflag += 1
            if kind in ("str", "bytes"):
                strs.append((k, kind, (plan.key_str + 7) & ~7))
            else:
                signed, hexa = _int_key_shape(groups, int(k[3:]))
                ints.append((k, "int", signed, hexa))
        elif k == "comm":
            strs.append((k, "comm", 16))
        elif k == "probe":
            ints.append((k, "probe", False, False))
        elif k == "ustack":
            ints.append((k, "stack", True, False))
        else:
            ints.append((k, "int", False, False))
    lines = []
    fields: list[KeyField] = []
    off = 0
    head = plan.intervals or not keys or bool(flagged)
    plan.has_head = head
    if head:
        lines.append("    u32 epoch;")
        lines.append("    u32 kflags;")
        off = 8
    for name, kind, signed, hexa in ints:
        lines.append(f"    u64 k_{name};")
        fields.append(KeyField(name, kind, off, 8, signed, hexa, flagged.get(name, -1)))
        off += 8
    for name, kind, size in strs:
        lines.append(f"    char k_{name}[{size}];")
        fields.append(KeyField(name, kind, off, size, flag_bit=flagged.get(name, -1)))
        off += size
    if off > MAX_KEY_BYTES:
        raise OptionError("keys", ",".join(plan.keys),
                          f"a key of at most {MAX_KEY_BYTES} bytes (this one is {off}):"
                          " fewer string keys, or a smaller --str-max")
    plan.fields = fields
    fmt = "<" + ("II" if head else "") + "".join(
        "Q" if f.size == 8 and f.kind not in ("str", "bytes", "comm") else f"{f.size}s"
        for f in fields)
    plan.key_struct = struct.Struct(fmt)
    return "struct agg_key {\n" + "\n".join(lines) + "\n};", fields


def _may_fault(groups: Sequence[Group], i: int) -> bool:
    """Can argument ``i`` fail to be read at some site (a memory read, or no
    such argument)? Registers and constants cannot: their key needs no flags."""
    for g in groups:
        for reads, _v in g.reader_plans:
            if i >= len(reads):
                return True
            r = reads[i]
            if r.reg is not None:
                continue
            if r.usdt is None or r.usdt.kind not in ("register", "constant"):
                return True
        for slots in reader_slots(g):
            if slots is None or i >= len(slots) or slots[i].unavailable is not None:
                return True
    return False


def _int_key_shape(groups: Sequence[Group], i: int) -> tuple[bool, bool]:
    for g in groups:
        for slots in reader_slots(g):
            if slots and i < len(slots) and slots[i].unavailable is None:
                sl = slots[i]
                hexa = bool(sl.type is not None and sl.type.hex)
                return int_c("x", sl)[1], hexa
    return False, False


def _val_layout(plan: AggPlan) -> str:
    lines = ["    u64 count;"]
    fmt = "<Q"
    for i, (stat, _e) in enumerate(plan.stats):
        lines.append(f"    s64 v{i}; /* {stat} */")
        fmt += "q"
    if plan.hist is not None:
        lines.append(f"    u64 hist[{plan.nbuckets}];")
        fmt += f"{plan.nbuckets}Q"
    plan.val_struct = struct.Struct(fmt)
    return "struct agg_val {\n" + "\n".join(lines) + "\n};"


def _prune(reads: tuple[ArgRead, ...], used: set[int]) -> tuple[ArgRead, ...]:
    """Only the reads an expression or key uses (and the lengths of counted strings)."""
    need = set(used)
    for i in used:
        if i < len(reads) and reads[i].str_len_arg >= 0:
            need.add(reads[i].str_len_arg)
    return tuple(r if i in need else ArgRead() for i, r in enumerate(reads))


def _args_used(texts: Sequence[str], keys: Sequence[str]) -> set[int]:
    out = set()
    for t in texts:
        for n in names_used(parse(t)):
            if n.startswith("arg") and n[3:].isdigit():
                out.add(int(n[3:]))
    for k in keys:
        if k.startswith("arg"):
            out.add(int(k[3:]))
    return out


def render_aggregate(groups: Sequence[Group], plan: AggPlan) -> str:
    """The whole program: hooks, maps, and one body per probe string."""
    key_c, fields = key_layout(plan, groups)
    val_c = _val_layout(plan)
    nb = plan.nbuckets
    out = [header_c(), TASK_HOOKS, key_c, val_c]
    if "ustack" in plan.keys:
        out.append(HOLD_AT_ENTRY)
    out.append(f"BPF_PERCPU_HASH(agg_vals, struct agg_key, struct agg_val, {plan.max_keys});")
    out.append("BPF_PERCPU_ARRAY(agg_zero, struct agg_val, 1);")
    out.append(f"BPF_PERCPU_ARRAY(agg_drop, u64, {DROP_SLOTS * 2});")
    if plan.intervals:
        out.append("BPF_ARRAY(agg_epoch, u32, 1);")
    if "ustack" in plan.keys:
        out.append(f"BPF_STACK_TRACE(agg_stacks, {plan.stack_entries});")
    if plan.hist is not None:
        out.append(LOG2_C)
    out.append(DROP_C)
    out.append(_update_c(plan, nb))
    for g in groups:
        out.append(group_c(g, plan, fields))
    return "\n\n".join(out) + "\n"


def _update_c(plan: AggPlan, nb: int) -> str:
    """Add one hit's values to its key's slot; a key the map cannot hold is counted."""
    lines = []
    for i, (stat, _e) in enumerate(plan.stats):
        if stat in ("sum", "avg"):
            lines.append(f"    __sync_fetch_and_add(&v->v{i}, x[{i}]);")
        elif stat == "min":
            lines.append(f"    if (first || x[{i}] < v->v{i}) v->v{i} = x[{i}];")
        elif stat == "max":
            lines.append(f"    if (first || x[{i}] > v->v{i}) v->v{i} = x[{i}];")
    if plan.hist is not None:
        expr, lin = plan.hist
        if lin is None:
            lines.append("    u32 b = agg_log2_bucket(h);")
        else:
            lo, hi, step = lin
            lines.append(f"    u32 b = h < {lo}LL ? 0 : h >= {hi}LL ? {nb - 1} :"
                         f" 1 + (u32)(((u64)h - (u64)({lo}LL)) / {step}ULL);")
        # The compiler knows b < nb and would drop the check the verifier needs.
        lines.append("    asm volatile(\"\" : \"+r\"(b));")
        lines.append(f"    if (b < {nb}) __sync_fetch_and_add(&v->hist[b], 1);")
    nx = max(len(plan.stats), 1)
    body = "\n".join(lines)
    return f"""static __always_inline void agg_update(struct agg_key *k, s64 *x, s64 h) {{
    struct agg_val *v = agg_vals.lookup(k);
    if (!v) {{
        u32 z = 0;
        struct agg_val *init = agg_zero.lookup(&z);
        if (!init) return;
        agg_vals.insert(k, init);
        v = agg_vals.lookup(k);
        if (!v) {{ agg_drop_one({'k->epoch' if plan.has_head else '0'}, {DROP_FULL}); return; }}
    }}
    int first = v->count == 0;
    (void)first; (void)x; (void)h;
{body}
    __sync_fetch_and_add(&v->count, 1);
}}
/* {nx} value(s) per hit */"""


def group_c(g: Group, plan: AggPlan, fields: list[KeyField], *, prefix: str = "ag",
             tail: str = "    agg_update(&k, x, h);\n", pass_flag: bool = False,
             uses_id: bool = False) -> str:
    """One probe string's body: read, filter, build the key, then ``tail``
    (by default: update the map). With ``pass_flag`` a hit the filter rejects
    goes on with ``pass = 0`` instead of returning (latency entries must still
    be paired with their exits)."""
    n = f"{prefix}{g.gid}"
    ep = "k.epoch" if plan.has_head else "0"
    wheres = [w for w in (plan.where, plan.group_where.get(g.gid)) if w]
    value_texts = [e for _s, e in plan.stats] + ([plan.hist[0]] if plan.hist else [])
    arg_keys = [k for k in plan.keys if k.startswith("arg")]
    used = _args_used(wheres + value_texts, arg_keys)
    nargs = max([len(r) for r, _v in g.reader_plans] + [0])
    nstr = max([sum(1 for r in reads if r.str_slot >= 0) for reads, _v in g.reader_plans]
               + [0])
    need_args = bool(used) and nargs > 0
    str_size = plan.key_str + 1  # a key's cut shows in the byte after its bound
    for reads, _v in g.reader_plans:
        for i, r in enumerate(reads):
            if i in used and r.str_bytes:
                str_size = max(str_size, r.str_bytes)
    str_size = (str_size + 7) & ~7
    g.str_size = str_size
    names = Names(args="e->a", strs="e->s", flags="e->h.flags", comm="comm", id="id")
    filt = combine([reader_exprs(w, g, names, what="the filter") for w in wheres]) \
        if wheres else None
    vals = [reader_exprs(t, g, names, what="a value") for t in value_texts]
    uses_comm = "comm" in plan.keys or any(r.uses_comm for r in (filt or [])) or any(
        r.uses_comm for v in vals for r in v)
    # bpf_get_current_pid_tgid() only when something reads it (each helper
    # call is a few percent of a hit).
    read: set[str] = set().union(*(names_used(parse(t)) for t in wheres + value_texts))
    uses_id = bool(uses_id or plan.gate or "ustack" in plan.keys
                   or {"pid", "tid"} & (read | set(plan.keys) | set(plan.hidden)))
    out = []
    on_stack = need_args and (nstr == 0 or 8 + 8 * nargs + nstr * str_size <= STACK_ARGS_BYTES)
    if need_args:
        members = ["    struct { u32 flags; u32 owner; } h;", f"    u64 a[{nargs}];"]
        if nstr:
            members.append(f"    char s[{nstr}][{str_size}];")
        out.append(f"struct {n}_args {{\n" + "\n".join(members) + "\n};")
        if not on_stack:
            out.append(f"BPF_PERCPU_ARRAY({n}_scratch, struct {n}_args, 1);")
    slots_of = reader_slots(g)
    cases = []
    for rid, (reads, vaddr) in enumerate(g.reader_plans):
        slots = slots_of[rid] or []
        lines = []
        if need_args:
            pruned = _prune(reads, used)
            for i, r in enumerate(pruned):  # key strings: zero past the copy, for hashing
                if r.str_slot >= 0 and f"arg{i}" in arg_keys:
                    lines.append(f"__builtin_memset(e->s[{r.str_slot}], 0, {str_size});")
            body = reader_c(pruned, vaddr)
            out.append(f"static __always_inline void {n}_r{rid}(struct pt_regs *ctx,"
                       f" struct {n}_args *e) {{\n    u64 v = 0;\n        {body}\n"
                       f"    (void)v;\n}}")
            lines.append(f"{n}_r{rid}(ctx, e);")
        if filt is not None:
            lines.extend(_filter_lines(filt[rid], ep, pass_flag))
        for j, v in enumerate(vals):
            lines.extend(_value_lines(v[rid], j, len(plan.stats), ep))
        for f in fields:
            if f.name.startswith("arg"):
                lines.extend(_arg_key_lines(f, int(f.name[3:]), reads, slots, plan.key_str))
        cases.append(f"    case {rid}: {{\n        " + "\n        ".join(lines)
                     + "\n        break;\n    }")
    switch = ("    switch (ck & 0xffff) {\n" + "\n".join(cases)
              + "\n    default: return 0;\n    }")
    common = []
    for f in fields:
        if f.name == "pid":
            common.append("k.k_pid = id >> 32;")
        elif f.name == "tid":
            common.append("k.k_tid = (u32)id;")
        elif f.name == "cpu":
            common.append("k.k_cpu = bpf_get_smp_processor_id();")
        elif f.name == "probe":
            common.append(f"k.k_probe = ((u64){g.gid} << 32) | probe;")
        elif f.name == "ustack":
            common.append("k.k_ustack = (u64)(s64)agg_stacks.get_stackid(ctx, BPF_F_USER_STACK);")
        elif f.name == "comm":
            common.append("__builtin_memcpy(k.k_comm, comm, 16);")
    nx = max(len(plan.stats), 1)
    args_decl = ""
    if need_args:
        if on_stack:
            args_decl = (f"    struct {n}_args ea;\n    __builtin_memset(&ea, 0, sizeof(ea));\n"
                         f"    struct {n}_args *e = &ea;\n")
        else:
            args_decl = (f"    u32 sz = 0;\n    struct {n}_args *e = {n}_scratch.lookup(&sz);\n"
                         "    if (!e) return 0;\n    e->h.flags = 0;\n"
                         "    e->h.owner = (u32)id;\n")
    race = ""
    if need_args and not on_stack:
        # Another hit on this CPU (a preempted program) may have used the scratch.
        race = (f"    if (e->h.owner != (u32)id) {{ agg_drop_one({ep}, {DROP_RACE});"
                " return 0; }\n")
    epoch_c = ""
    if plan.intervals:
        epoch_c = ("    u32 ez = 0;\n    u32 *epp = agg_epoch.lookup(&ez);\n"
                   "    k.epoch = epp ? *epp : 0;\n")
    comm_decl = ""
    if uses_comm:
        comm_decl = "    char comm[16] = {};\n    bpf_get_current_comm(&comm, sizeof(comm));\n"
    body = f"""static __always_inline int {n}_body(struct pt_regs *ctx, u64 ck) {{
{gate_c(plan.gate, uses_id or (need_args and not on_stack))}
    u32 probe = ck >> 32;
    (void)probe;
    struct agg_key k;
    __builtin_memset(&k, 0, sizeof(k));
{epoch_c}    s64 x[{nx}] = {{}};
    s64 h = 0;
    u32 pass = 1;
    (void)x; (void)h; (void)pass;
{args_decl}{comm_decl}{switch}
{"".join("    " + c + chr(10) for c in common)}{race}{tail}    return 0;
}}"""
    out.append(body)
    entries = []
    if plan.multi:
        # One argument layout and one probe (or no use of which probe fired):
        # the cookie says nothing, and reading it is a few percent of a hit.
        const = len(g.reader_plans) == 1 and (len(g.probes) == 1 or not any(
            f.name == "probe" for f in fields))
        ck_c = "0" if const else "bpf_get_attach_cookie(ctx)"
        entries.append(f"int {n}_multi(struct pt_regs *ctx) {{ return {n}_body(ctx, {ck_c}); }}")
    for ck in plan.site_cookies.get(g.gid, []):
        entries.append(f"int {n}_c{ck:x}(struct pt_regs *ctx) {{ return {n}_body(ctx, {ck}ULL); }}")
    out.append("\n".join(entries))
    return "\n\n".join(out)


def gate_c(gate: bool, uses_id: bool = True) -> str:
    """The head of a body: the exec gate of a held command, or the ids if used."""
    if gate:
        return GATE
    return "    u64 id = bpf_get_current_pid_tgid();" if uses_id else "    u64 id = 0;"


def _filter_lines(r: ReaderExpr, ep: str, pass_flag: bool = False) -> list[str]:
    no = "pass = 0;" if pass_flag else "return 0;"
    if r.c is None:
        return [f"{no}  /* a name the filter uses is missing at these sites */"]
    lines = []
    if r.fault_mask:
        lines.append(f"if (e->h.flags & {r.fault_mask}u) {{ agg_drop_one({ep},"
                     f" {DROP_FILTER}); {no} }}")
    lines.append(f"if (!({r.c})) {no}")
    return lines


def _value_lines(r: ReaderExpr, j: int, nstats: int, ep: str) -> list[str]:
    if r.c is None:
        return ["return 0;  /* a name this value uses is missing at these sites */"]
    lines = []
    if r.fault_mask:
        lines.append(f"if (e->h.flags & {r.fault_mask}u) {{ agg_drop_one({ep},"
                     f" {DROP_VALUE}); return 0; }}")
    target = f"x[{j}]" if j < nstats else "h"
    lines.append(f"{target} = (s64)({r.c});")
    return lines


def _arg_key_lines(f: KeyField, i: int, reads: tuple[ArgRead, ...], slots: list[Slot],
                   bound: int) -> list[str]:
    """Set an argument's key field (a string cut at ``bound`` bytes, the cut marked)."""
    if f.flag_bit < 0:  # a register or constant at every site: nothing to flag
        return [f"k.k_{f.name} = (u64)({int_c(f'e->a[{i}]', slots[i])[0]});"]
    fault = 1 << (2 * f.flag_bit)
    cut = 1 << (2 * f.flag_bit + 1)
    if i >= len(slots) or slots[i].unavailable is not None or i >= len(reads):
        return [f"k.kflags |= {fault}u;"]
    r = reads[i]
    sl = slots[i]
    lines = [f"if (e->h.flags & {1 << i}u) k.kflags |= {fault}u;"]
    if f.kind in ("str", "bytes"):
        if r.str_slot < 0:
            return [f"k.kflags |= {fault}u;"]
        if r.str_len_arg >= 0:
            lines[0] = f"if (e->h.flags & {(1 << i) | (1 << r.str_len_arg)}u) k.kflags |= {fault}u;"
        lines.append(f"__builtin_memcpy(k.k_{f.name}, e->s[{r.str_slot}], {f.size});")
        if bound < f.size:
            lines.append(f"__builtin_memset(k.k_{f.name} + {bound}, 0, {f.size - bound});")
        if r.str_bytes:
            if r.str_bytes > bound:
                lines.append(f"k.kflags |= {cut}u;")
        elif r.str_len_arg >= 0:
            lines.append(f"if (e->a[{r.str_len_arg}] > {bound}) k.kflags |= {cut}u;")
        else:  # the slot holds bound + 1 bytes or more: a longer string has a byte there
            lines.append(f"if (e->s[{r.str_slot}][{bound}]) k.kflags |= {cut}u;")
        return lines
    c, _signed = int_c(f"e->a[{i}]", sl)
    lines.append(f"k.k_{f.name} = (u64)({c});")
    return lines


def decode_key(plan: AggPlan, raw: bytes) -> tuple[int, int, list[Any]]:
    """(epoch, kflags, values per field) from a key's bytes."""
    assert plan.key_struct is not None
    vals = list(plan.key_struct.unpack(raw[:plan.key_struct.size]))
    epoch = kflags = 0
    if plan.has_head:
        epoch, kflags = vals[0], vals[1]
        vals = vals[2:]
    return epoch, kflags, vals
