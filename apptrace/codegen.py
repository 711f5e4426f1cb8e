"""Generate the BPF C that bcc compiles: one program per group of probes.

A *group* is what one probe string matched (``usdt:hotspot:*`` is one group
of ~500 sites). Each distinct way of reading arguments (a site's specs, with
its rip-relative deltas baked in) becomes one ``static __always_inline``
reader. Two entry shapes call them:

- ``<g>_multi``: for a uprobe_multi link. The BPF cookie carries
  ``probe << 32 | site << 16 | reader``; a ``switch`` picks the reader.
- ``<g>_c<cookie>``: one tiny entry per site with the cookie as a constant,
  for kernels without uprobe_multi (one perf event per site).

A group with many layouts (``usdt:hotspot*:*`` has ~130) would take seconds
for clang to compile that way, so past a threshold its specs go in an array
map instead and one generic reader interprets them (``table`` mode: the same
C whatever the layouts, at the price of a map lookup per hit). A group with
``fold`` counts stacks in the kernel and sends no events at all.

Every event starts with the same header; a group's events all have one size,
so the user-space reader can decode a ring buffer in strides.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from apptrace.usdt.args import Argument

__all__ = ["ArgRead", "GroupPlan", "HEADER", "render", "reader_c", "render_base", "render_generic",
           "header_c", "table_row", "table_strings", "TASK_HOOKS", "GATE"]

# struct apptrace_hdr: ts, pid(tgid), tid, probe, site, flags, nstack, comm
HEADER = struct.Struct("<QIIIIIi16s")
FLAG_ARG_FAILED = 0x0000FFFF   # bit i: reading argument i faulted
FLAG_STR_TRUNC_SHIFT = 16      # bit 16+j: string slot j filled its buffer
FLAG_COMM_SAME = 1 << 31       # comm not copied: same thread as this CPU's previous event

_C_INT = {1: "8", 2: "16", 4: "32", 8: "64"}


@dataclass(frozen=True)
class ArgRead:
    """How to fetch one argument slot at one site.

    ``usdt`` is set for USDT arguments; ``reg`` for uprobe arguments and
    return values (a pt_regs field); neither for a slot that cannot be read.
    ``str_slot`` >= 0 means the value is a pointer whose bytes are copied into
    that slot: up to a NUL, or ``str_len_arg``'s value bytes (a pointer and
    length pair, no NUL), or exactly ``str_bytes`` bytes.
    """

    usdt: Optional[Argument] = None
    reg: Optional[str] = None
    str_slot: int = -1
    str_len_arg: int = -1
    str_bytes: int = 0


@dataclass
class GroupPlan:
    """Everything the C for one group needs."""

    gid: int
    nargs: int
    nstr: int
    str_max: int
    stack_depth: int          # 0: no stacks
    ringbuf_pages: int
    nprobes: int
    readers: list[tuple[tuple[ArgRead, ...], int]] = field(default_factory=list)
    # (reads, site vaddr for rip-relative deltas); index = reader id
    site_cookies: list[int] = field(default_factory=list)  # for per-site entries
    multi: bool = True
    fold: bool = False        # count (pid, comm, probe, site, stack) in the kernel; no events
    stack_entries: int = 16384
    table: bool = False       # argument specs in a map, read by one generic reader
    # Several probes share the ring: a spare ring takes the records of probes
    # that rarely need it when the main one is full, so a hot probe cannot
    # starve the others (see _spare_c).
    fair: bool = False
    # A filter (--where): per reader id, (C condition or None where a name it
    # uses is missing, argument fault bits it needs, whether it reads comm).
    filters: Optional[list[tuple[Optional[str], int, bool]]] = None
    spare_pages: int = 0      # fair groups: the spare ring's size

    @property
    def spare_bytes(self) -> int:
        return self.spare_pages * 4096

    @property
    def name(self) -> str:
        return f"g{self.gid}"

    def event_struct(self) -> struct.Struct:
        """The record layout; the C struct is checked against its size at compile time."""
        fmt = HEADER.format + f"{self.nargs}Q"
        if self.nstr:
            fmt += f"{self.nstr * self.str_max}s"
        if self.stack_depth:
            fmt += f"{self.stack_depth}Q"
        return struct.Struct(fmt)


MAX_TABLE_ARGS = 12  # sys/sdt.h's limit

# apptrace_ctl slots.
CTL_GEN = 0        # bumped on every task rename (exec, prctl): comm caches are stale
CTL_HELD = 1       # pid of a spawned command still running apptrace's launcher: ignored
CTL_STOP_EXEC = 2  # non-zero: SIGSTOP the held command at its exec (procmem semaphores)
CTL_NO_SHORTCUT = 3  # non-zero: always copy comm (rename tracking is not attached)
CTL_SLOTS = 4
NO_REG = 0xFFFF

# Byte offsets in x86-64 struct pt_regs (a user-space ABI, fixed since 2.6).
PT_REGS_OFFSET = {name: 8 * i for i, name in enumerate(
    ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx",
     "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss"))}

# apptrace_regs_load: every pt_regs field, in order (index = byte offset / 8).
_NREGS = len(PT_REGS_OFFSET)
_REG_LOADS = "\n".join(f"    r->r[{off // 8}] = ctx->{name};"
                       for name, off in PT_REGS_OFFSET.items())

# kinds in struct apptrace_arg
ARG_NONE, ARG_CONST, ARG_REG, ARG_MEM, ARG_MEM_IP = 0, 1, 2, 3, 4


def header_c() -> str:
    return f"""#include <uapi/linux/ptrace.h>
struct apptrace_hdr {{
    u64 ts; u32 pid; u32 tid; u32 probe; u32 site; u32 flags; s32 nstack; char comm[16];
}};
/* One argument spec, for groups read through a table (see table_row). */
struct apptrace_arg {{
    u8 kind; u8 size; u8 sign; u8 shift; u16 base; u16 index; s64 disp; u64 scale;
}};
struct apptrace_spec {{ struct apptrace_arg a[{MAX_TABLE_ARGS}]; }};
/* This CPU's previous event in a ring: its thread, and the rename generation then. */
struct apptrace_last {{ u32 tid; u32 pad; u64 gen; }};
static __always_inline u64 apptrace_reg(struct pt_regs *ctx, u16 off) {{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)ctx + (off & 0xff));
    return v;
}}
/* The table reader's registers: pt_regs copied once per hit with direct loads
   (a context pointer cannot take a variable offset), then indexed. */
struct apptrace_regs {{ u64 r[{_NREGS}]; }};
static __always_inline void apptrace_regs_load(struct pt_regs *ctx, struct apptrace_regs *r) {{
{_REG_LOADS}
}}
"""


def table_row(reads: tuple[ArgRead, ...], site_vaddr: int) -> list[tuple[int, ...]]:
    """One map value for a table-driven group: (kind, size, sign, shift, base,
    index, disp, scale) per argument. The generic reader does at run time what
    :func:`_read_one` would have generated."""
    rows: list[tuple[int, ...]] = []
    for r in reads[:MAX_TABLE_ARGS]:
        a = r.usdt
        if a is None and r.reg is None:
            rows.append((ARG_NONE, 0, 0, 0, NO_REG, NO_REG, 0, 0))
        elif a is None:  # a uprobe argument or return value: a whole register
            rows.append((ARG_REG, 8, 0, 0, PT_REGS_OFFSET[r.reg or "ax"], NO_REG, 0, 0))
        elif a.kind == "constant":
            v = (a.value or 0) & (1 << 64) - 1
            rows.append((ARG_CONST, 8, 0, 0, NO_REG, NO_REG, v - (1 << 64) if v >> 63 else v, 0))
        elif a.kind == "register":
            rows.append((ARG_REG, a.size, int(a.signed and not a.is_float), a.shift,
                         PT_REGS_OFFSET[a.register or "ax"], NO_REG, 0, 0))
        elif a.kind in ("memory", "rip_relative"):
            ip_relative = a.kind == "rip_relative" or a.symbol is not None
            disp = _wrap_s64((a.address or 0) - site_vaddr if ip_relative else a.displacement)
            rows.append((ARG_MEM_IP if ip_relative else ARG_MEM, a.size,
                         int(a.signed and not a.is_float), 0,
                         PT_REGS_OFFSET[a.base] if a.base else NO_REG,
                         PT_REGS_OFFSET[a.index] if a.index else NO_REG, disp, a.scale))
        else:
            rows.append((ARG_NONE, 0, 0, 0, NO_REG, NO_REG, 0, 0))
    return rows


def _render_table_reader(g: GroupPlan) -> str:
    """A generic argument reader, the same C whatever the number of layouts."""
    n = g.name
    nargs = min(max(g.nargs, 1), MAX_TABLE_ARGS)
    return f"""BPF_ARRAY({n}_specs, struct apptrace_spec, {max(len(g.readers), 1)});
static __always_inline u64 {n}_reg(struct apptrace_regs *r, u16 off) {{
    u32 k = off >> 3;
    return k < {_NREGS} ? r->r[k] : 0;
}}
static __always_inline void {n}_arg(struct pt_regs *ctx, struct apptrace_regs *r,
                                   struct apptrace_arg *a, u32 i, struct {n}_ev *e) {{
    u64 v = 0;
    u32 size = a->size & 0xf;
    if (size > 8) size = 8;
    if (a->kind == {ARG_CONST}) {{
        e->a[i] = (u64)a->disp;
        return;
    }} else if (a->kind == {ARG_REG}) {{
        v = {n}_reg(r, a->base) >> (a->shift & 0x3f);
    }} else if (a->kind == {ARG_MEM} || a->kind == {ARG_MEM_IP}) {{
        u64 addr = (u64)a->disp;
        if (a->kind == {ARG_MEM_IP}) addr += ctx->ip;
        if (a->base != {NO_REG}) addr += {n}_reg(r, a->base);
        if (a->index != {NO_REG}) addr += {n}_reg(r, a->index) * a->scale;
        if (bpf_probe_read_user(&v, size, (void *)addr)) e->h.flags |= 1u << i;
    }} else {{
        e->a[i] = 0;
        return;
    }}
    u32 bits = (64 - 8 * size) & 0x3f;
    v <<= bits;
    e->a[i] = a->sign ? (u64)((s64)v >> bits) : v >> bits;
}}
static __always_inline void {n}_table(struct pt_regs *ctx, u32 reader, struct {n}_ev *e) {{
    struct apptrace_spec *sp = {n}_specs.lookup(&reader);
    if (!sp) return;
    struct apptrace_regs r;
    apptrace_regs_load(ctx, &r);
#pragma unroll
    for (u32 i = 0; i < {nargs}; i++)
        {n}_arg(ctx, &r, &sp->a[i], i, e);
}}""" + (_render_table_strings(g) if g.nstr else "")


# struct apptrace_str modes: what a string slot holds.
STR_NONE, STR_NUL, STR_LEN, STR_BYTES = 0, 1, 2, 3


def table_strings(reads: tuple[ArgRead, ...], nstr: int) -> list[tuple[int, int, int, int]]:
    """The string slots of one reader, for a table-driven group:
    (mode, argument, length argument, byte count) per slot."""
    rows = [(STR_NONE, 0, 0, 0)] * nstr
    for i, r in enumerate(reads[:MAX_TABLE_ARGS]):
        if r.str_slot < 0 or r.str_slot >= nstr:
            continue
        if r.str_bytes:
            rows[r.str_slot] = (STR_BYTES, i, 0, r.str_bytes)
        elif r.str_len_arg >= 0:
            rows[r.str_slot] = (STR_LEN, i, r.str_len_arg, 0)
        else:
            rows[r.str_slot] = (STR_NUL, i, 0, 0)
    return rows


def _render_table_strings(g: GroupPlan) -> str:
    """Strings for a table-driven group: each slot says which argument points
    to the bytes and how many to copy, like :func:`_read_str` generates."""
    n = g.name
    size = g.str_max
    return f"""
struct {n}_strspec {{ struct {{ u8 mode; u8 arg; u8 len_arg; u8 pad; u32 bytes; }} s[{g.nstr}]; }};
BPF_ARRAY({n}_strs, struct {n}_strspec, {max(len(g.readers), 1)});
static __always_inline void {n}_table_strs(u32 reader, struct {n}_ev *e) {{
    struct {n}_strspec *sp = {n}_strs.lookup(&reader);
    if (!sp) return;
#pragma unroll
    for (u32 j = 0; j < {g.nstr}; j++) {{
        u32 mode = sp->s[j].mode, i = sp->s[j].arg, k = sp->s[j].len_arg;
        if (mode == {STR_NONE} || i >= {max(g.nargs, 1)} || k >= {max(g.nargs, 1)}) continue;
        if (e->h.flags & (1u << i)) continue;
        void *src = (void *)e->a[i];
        if (mode == {STR_NUL}) {{
            int r = bpf_probe_read_user_str(e->s[j], {size}, src);
            if (r < 0) e->h.flags |= 1u << i;
            else if (r >= {size}) e->h.flags |= 1u << ({FLAG_STR_TRUNC_SHIFT} + j);
            continue;
        }}
        u64 len = mode == {STR_BYTES} ? sp->s[j].bytes : e->a[k];
        if (mode == {STR_LEN} && (e->h.flags & (1u << k))) continue;
        if ((s64)len < 0) {{ e->h.flags |= 1u << i; continue; }}
        asm volatile("" : "+r"(len));
        if (len > {size}) {{ len = {size}; e->h.flags |= 1u << ({FLAG_STR_TRUNC_SHIFT} + j); }}
        if (len > 0 && bpf_probe_read_user(e->s[j], len, src)) e->h.flags |= 1u << i;
    }}
}}"""


def _wrap_s64(v: int) -> int:
    """An address difference as the s64 that adds the same modulo 2**64 (a
    crafted note may name addresses far apart; the C must still compile)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _c_s64(v: int) -> str:
    """A C literal for :func:`_wrap_s64` of ``v``."""
    v = _wrap_s64(int(v))
    return "(-9223372036854775807LL - 1)" if v == -(1 << 63) else f"{v}LL"


def _extend(expr: str, size: int, signed: bool) -> str:
    if size == 8:
        return f"(u64)({expr})"
    bits = _C_INT[size]
    if signed:
        return f"(u64)(s64)(s{bits})({expr})"
    return f"(u64)(u{bits})({expr})"


def _read_one(i: int, r: ArgRead, site_vaddr: int) -> str:
    """C statements that set ``e->a[i]`` (and a string slot) or flag a fault."""
    fail = f"e->h.flags |= {1 << i}u;"
    a = r.usdt
    lines: list[str] = []
    if a is None and r.reg is None:
        return f"/* arg{i}: unavailable */"
    if a is None:
        lines.append(f"v = ctx->{r.reg};")
    elif a.kind == "constant":
        lines.append(f"v = {(a.value or 0) & (1 << 64) - 1}ULL;")
    elif a.kind == "register":
        val = f"ctx->{a.register}" + (f" >> {a.shift}" if a.shift else "")
        lines.append(f"v = {_extend(val, a.size, a.signed and not a.is_float)};")
    elif a.kind in ("memory", "rip_relative"):
        if a.kind == "memory":
            addr = f"ctx->{a.base}" if a.base else "0"
            if a.index:
                addr += f" + ctx->{a.index} * {a.scale}"
            if a.symbol is not None:
                # symbol + displacement, relocated through the probe IP like below
                addr += f" + ctx->ip + ({_c_s64((a.address or 0) - site_vaddr)})"
            else:
                addr += f" + ({_c_s64(a.displacement)})"
        else:
            # The global and the probe share a module: address = IP + delta.
            addr = f"ctx->ip + ({_c_s64((a.address or 0) - site_vaddr)})"
        bits = _C_INT[a.size]
        t = f"{'s' if a.signed and not a.is_float else 'u'}{bits}"
        lines.append(f"{{ {t} t = 0; if (bpf_probe_read_user(&t, {a.size}, (void *)({addr})))"
                     f" {{ {fail} }} v = {_extend('t', a.size, a.signed and not a.is_float)}; }}")
    else:
        # Unreadable (the reason stays in Python: nothing from the binary
        # reaches the C text but numbers we produced).
        return f"/* arg{i}: unavailable */"
    lines.append(f"e->a[{i}] = v;")
    return "\n        ".join(lines)


def _read_str(i: int, r: ArgRead) -> str:
    """Copy the bytes argument ``i`` points to into its string slot.

    Runs after every argument is read, so a length argument may come later
    than its pointer (HotSpot passes ``name, len``).
    """
    j = r.str_slot
    fail = f"e->h.flags |= {1 << i}u;"
    trunc = f"e->h.flags |= {1 << (FLAG_STR_TRUNC_SHIFT + j)}u;"
    size = f"sizeof(e->s[{j}])"
    if r.str_bytes:
        return (f"if (!(e->h.flags & {1 << i}u) && bpf_probe_read_user(e->s[{j}],"
                f" {r.str_bytes}, (void *)e->a[{i}])) {{ {fail} }}")
    if r.str_len_arg >= 0:
        k = r.str_len_arg
        # The barrier keeps the clamp and the helper's size in one register,
        # where the verifier can see the bound (clang otherwise splits them).
        return (f"if (!(e->h.flags & {(1 << i) | (1 << k)}u)) {{ u64 n = e->a[{k}];"
                f" if ((s64)n < 0) {{ {fail} }} else {{ asm volatile(\"\" : \"+r\"(n));"
                f" if (n > {size}) {{ n = {size}; {trunc} }}"
                f" if (n > 0 && bpf_probe_read_user(e->s[{j}], n,"
                f" (void *)e->a[{i}])) {{ {fail} }} }} }}")
    return (f"if (!(e->h.flags & {1 << i}u)) {{ int n = bpf_probe_read_user_str(e->s[{j}],"
            f" {size}, (void *)e->a[{i}]); if (n < 0) {{ {fail} }}"
            f" else if (n >= (int){size}) {trunc} }}")




def reader_c(reads: tuple[ArgRead, ...], site_vaddr: int) -> str:
    """The C statements that read one site's arguments, for a probe family's
    own record: they set ``e->a[i]`` and string slots ``e->s[j]``, and flag
    faults and cut strings in ``e->h.flags``, where ``e`` points to any struct
    with those members; ``ctx`` and a ``u64 v`` must be in scope. (The event
    path of :func:`render` generates the same statements.)"""
    return "\n        ".join([_read_one(i, r, site_vaddr) for i, r in enumerate(reads)]
                             + [_read_str(i, r) for i, r in enumerate(reads) if r.str_slot >= 0])


def _entries(g: GroupPlan) -> str:
    out = []
    if g.multi:
        out.append(f"int {g.name}_multi(struct pt_regs *ctx) {{"
                   f" return {g.name}_body(ctx, bpf_get_attach_cookie(ctx)); }}")
    for ck in g.site_cookies:
        out.append(f"int {g.name}_c{ck:x}(struct pt_regs *ctx) {{"
                   f" return {g.name}_body(ctx, {ck}ULL); }}")
    return "\n".join(out)


def _render_fold(g: GroupPlan) -> str:
    """In-kernel stack counting: a stack map plus a hash of counts per stack.

    A stack the map could not store (hash collision, no room) is still
    counted, under its negative error code, so nothing is lost silently.
    """
    n = g.name
    return f"""BPF_STACK_TRACE({n}_stacks, {g.stack_entries});
struct {n}_key {{ u32 pid; u32 probe; u32 site; s32 stack; char comm[16]; }};
BPF_HASH({n}_counts, struct {n}_key, u64, 65536);
BPF_PERCPU_ARRAY({n}_lost, u64, {max(g.nprobes, 1)});
static __always_inline int {n}_body(struct pt_regs *ctx, u64 ck) {{
{_GATE}
    struct {n}_key k = {{}};
    u32 probe = ck >> 32;
    k.pid = id >> 32;
    k.probe = probe;
    k.site = (ck >> 16) & 0xffff;
    k.stack = {n}_stacks.get_stackid(ctx, BPF_F_USER_STACK);
    bpf_get_current_comm(&k.comm, sizeof(k.comm));
    u64 zero = 0;
    u64 *c = {n}_counts.lookup_or_try_init(&k, &zero);
    if (c) {{
        __sync_fetch_and_add(c, 1);
    }} else {{
        u64 *l = {n}_lost.lookup(&probe);
        if (l) *l += 1;
    }}
    return 0;
}}
{_entries(g)}"""


# Stops a spawned command at its ELF entry point (the loader has mapped every
# DT_NEEDED library by then) so its memory map can be snapshotted.
HOLD_AT_ENTRY = """int apptrace_hold_at_entry(struct pt_regs *ctx) {
    bpf_send_signal(19 /* SIGSTOP */);
    return 0;
}"""


# Renames and execs, for every session (raw tracepoints: no tracefs, no kprobes).
# A rename (exec sets the new name too; so do prctl and /proc/PID/comm) bumps a
# generation that invalidates every CPU's "same thread as last time" comm
# cache. The exec of a held command ends its hold: from then on its events
# count, and it can be stopped before its first instruction.
TASK_HOOKS = f"""/* Session controls, written from user space (indexes CTL_*): */
BPF_ARRAY(apptrace_ctl, u64, {CTL_SLOTS});
int apptrace_on_rename(struct bpf_raw_tracepoint_args *ctx) {{
    u32 slot = {CTL_GEN};
    u64 *gen = apptrace_ctl.lookup(&slot);
    if (gen) __sync_fetch_and_add(gen, 1);
    return 0;
}}
int apptrace_on_exec(struct bpf_raw_tracepoint_args *ctx) {{
    u32 slot = {CTL_HELD};
    u64 *held = apptrace_ctl.lookup(&slot);
    if (!held || *held == 0 || *held != (bpf_get_current_pid_tgid() >> 32)) return 0;
    *held = 0;
    slot = {CTL_STOP_EXEC};
    u64 *stop = apptrace_ctl.lookup(&slot);
    if (stop && *stop) bpf_send_signal(19 /* SIGSTOP */);
    return 0;
}}
/* Carries a semaphore (ref_ctr_offset) for a probe whose sites stay unhit. */
int apptrace_noop(struct pt_regs *ctx) {{ return 0; }}"""

# The head of every body: the hold gate. Hits in apptrace's own launcher,
# before it execs the command, are not the command's and are dropped. A probe
# family with its own C puts TASK_HOOKS in its program and GATE at the top of
# each probe function (it declares ``id``; ``return 0`` leaves early).
GATE = _GATE = f"""    u64 id = bpf_get_current_pid_tgid();
    u32 ctl_slot = {CTL_HELD};
    u64 *held = apptrace_ctl.lookup(&ctl_slot);
    if (held && *held == (id >> 32)) return 0;"""


def render_base(*, hold_at_entry: bool = False) -> str:
    """The session's own programs, apart from any group: the rename and exec
    hooks (with the control map every group shares), the entry hold, the
    no-op that carries a companion semaphore."""
    return render([], hold_at_entry=hold_at_entry)


def render_generic(plan: GroupPlan) -> str:
    """One group's program whose C depends only on its shape (argument count,
    string slots and size, stack depth, fold): sites, argument layouts, ring
    size and probe count are data filled in at load time. So a probe string
    never seen before loads bytecode compiled for any other of its shape,
    with no compiler run.

    Map sizes here are placeholders: the loader sets ``g0_rb``, ``g0_lost``,
    ``g0_specs`` and ``g0_strs`` to the group's real sizes.
    """
    assert plan.multi and (plan.table or plan.fold or plan.nargs == 0)
    return render([plan])


SPARE_WINDOW_SHIFT = 24   # a probe's budget in the spare ring renews every 16.8 ms
SPARE_BUDGET = 128        # spare requests per probe, CPU and window (~7600/s)


def _spare_c(g: GroupPlan) -> str:
    """A fair group's spare ring, used only when the main ring is full, and
    only by a probe that asked for it at most SPARE_BUDGET times (per CPU) in
    this window and in the previous one. A probe firing far more often than
    the others fills the main ring, overflows its budget in its first full
    window and is then kept out of the spare ring for as long as it keeps
    overflowing: its excess is lost (counted) while the others' records land
    in the spare one. Nothing is counted while the main ring has room."""
    n = g.name
    return f"""struct {n}_share {{ u64 window; u64 n; u64 prev; }};
BPF_PERCPU_ARRAY({n}_share, struct {n}_share, {max(g.nprobes, 1)});
BPF_RINGBUF_OUTPUT({n}_rs, {g.spare_pages});
static __always_inline int {n}_may_spare(u32 probe) {{
    struct {n}_share *sh = {n}_share.lookup(&probe);
    if (!sh) return 0;
    u64 w = bpf_ktime_get_ns() >> {SPARE_WINDOW_SHIFT};
    if (sh->window != w) {{
        sh->prev = sh->window + 1 == w ? sh->n : 0;
        sh->window = w;
        sh->n = 0;
    }}
    return ++sh->n <= {SPARE_BUDGET} && sh->prev <= {SPARE_BUDGET};
}}"""


def _render_filtered(g: GroupPlan, dispatch: str, stack: str) -> str:
    """The body of a group with a filter: the record is filled in a per-CPU
    scratch, the filter decides, and only a passing hit is copied into the
    ring (a filtered-out hit costs no ring space). A hit whose filter cannot
    be judged (an argument it needs faulted) is sent, marked as faulted."""
    n = g.name
    assert g.filters is not None
    by_text: dict[str, list[int]] = {}
    comm = False
    for rid, (c, mask, uses_comm) in enumerate(g.filters):
        cond = "0" if c is None else (f"(e->h.flags & {mask}u) || ({c})" if mask else c)
        by_text.setdefault(cond, []).append(rid)
        comm = comm or uses_comm
    cases = "\n".join("".join(f"    case {rid}:" for rid in rids) + f" pass = {cond}; break;"
                       for cond, rids in by_text.items())
    comm_c = ("    char comm[16] = {};\n    bpf_get_current_comm(&comm, sizeof(comm));\n"
              if comm else "")
    # A fair group's record that goes to the spare ring carries comm, and the
    # next one does too (the two rings are read one after the other).
    spare = ""
    if g.fair:
        spare = f"""
        if ({n}_may_spare(probe)) {{
            if (e->h.flags & {FLAG_COMM_SAME}u) {{
                bpf_get_current_comm(&e->h.comm, sizeof(e->h.comm));
                e->h.flags &= ~{FLAG_COMM_SAME}u;
            }}
            if (last) last->tid = 0;
            failed = {n}_rs.ringbuf_output(e, sizeof(*e), 0) != 0;
        }}"""
    return f"""BPF_PERCPU_ARRAY({n}_scratch, struct {n}_ev, 1);
static __always_inline int {n}_body(struct pt_regs *ctx, u64 ck) {{
{_GATE}
    u32 probe = ck >> 32;
    u32 zero = 0;
    struct {n}_ev *e = {n}_scratch.lookup(&zero);
    if (!e) return 0;
    e->h.tid = (u32)id;  /* this CPU's scratch: checked again before the copy */
    e->h.flags = 0;
{dispatch}
{comm_c}    u32 pass = 0;
    switch (ck & 0xffff) {{
{cases}
    default: break;
    }}
    if (!pass) return 0;
    e->h.ts = bpf_ktime_get_ns();
    e->h.pid = id >> 32;
    e->h.probe = probe;
    e->h.site = (ck >> 16) & 0xffff;
    e->h.nstack = 0;
    ctl_slot = {CTL_GEN};
    u64 *genp = apptrace_ctl.lookup(&ctl_slot);
    u64 gen = genp ? *genp : 0;
    ctl_slot = {CTL_NO_SHORTCUT};
    u64 *off = apptrace_ctl.lookup(&ctl_slot);
    struct apptrace_last *last = {n}_lasttid.lookup(&zero);
    if (last && last->tid == e->h.tid && last->gen == gen && !(off && *off)) {{
        e->h.flags |= {FLAG_COMM_SAME}u;
        e->h.comm[0] = 0;
    }} else {{
        bpf_get_current_comm(&e->h.comm, sizeof(e->h.comm));
        if (last) {{ last->tid = e->h.tid; last->gen = gen; }}
    }}
{stack}    /* A hit preempted here by another on this CPU would find its record
       overwritten: counted lost, never sent mixed. */
    int failed = e->h.tid != (u32)id;
    if (!failed && {n}_rb.ringbuf_output(e, sizeof(*e), 0)) {{
        failed = 1;{spare}
    }}
    if (failed) {{
        u64 *c = {n}_lost.lookup(&probe);
        if (c) *c += 1;
        if (last) last->tid = 0;  /* the reader did not get this comm */
    }}
    return 0;
}}"""


def render(plans: list[GroupPlan], *, hold_at_entry: bool = False) -> str:
    """The whole C source for a session."""
    out = [header_c(), TASK_HOOKS]
    if hold_at_entry:
        out.append(HOLD_AT_ENTRY)
    for g in plans:
        n = g.name
        if g.fold:
            out.append(_render_fold(g))
            continue
        fields = ["    struct apptrace_hdr h;"]
        if g.nargs:
            fields.append(f"    u64 a[{g.nargs}];")
        if g.nstr:
            fields.append(f"    char s[{g.nstr}][{g.str_max}];")
        if g.stack_depth:
            fields.append(f"    u64 stack[{g.stack_depth}];")
        out.append(f"struct {n}_ev {{\n" + "\n".join(fields) + "\n};")
        # The Python decoder strides records by event_struct(): a mismatch is
        # a compile error, never silently discarded records.
        out.append(f"_Static_assert(sizeof(struct {n}_ev) == {g.event_struct().size},"
                   f" \"{n} record size\");")
        out.append(f"BPF_RINGBUF_OUTPUT({n}_rb, {g.ringbuf_pages});")
        out.append(f"BPF_PERCPU_ARRAY({n}_lost, u64, {max(g.nprobes, 1)});")
        out.append(f"BPF_PERCPU_ARRAY({n}_lasttid, struct apptrace_last, 1);")
        if g.nargs == 0:
            dispatch = ""
        elif g.table:
            out.append(_render_table_reader(g))
            dispatch = f"    {n}_table(ctx, ck & 0xffff, e);"
            if g.nstr:
                dispatch += f"\n    {n}_table_strs(ck & 0xffff, e);"
        else:
            for rid, (reads, vaddr) in enumerate(g.readers):
                body = "\n        ".join([_read_one(i, r, vaddr) for i, r in enumerate(reads)]
                                          + [_read_str(i, r) for i, r in enumerate(reads)
                                             if r.str_slot >= 0])
                out.append(f"static __always_inline void {n}_r{rid}(struct pt_regs *ctx,"
                           f" struct {n}_ev *e) {{\n    u64 v = 0;\n        {body}\n"
                           f"    (void)v;\n}}")
            cases = "\n".join(f"    case {rid}: {n}_r{rid}(ctx, e); break;"
                              for rid in range(len(g.readers)))
            dispatch = f"    switch (ck & 0xffff) {{\n{cases}\n    default: break;\n    }}"
        stack = ""
        if g.stack_depth:
            stack = ("    e->h.nstack = bpf_get_stack(ctx, e->stack, sizeof(e->stack),"
                     " BPF_F_USER_STACK);\n")
        spare = same = ""
        if g.fair:
            out.append(_spare_c(g))
            # A spare record carries comm: the other ring may be read later.
            spare = (f"    int spare = 0;\n    if (!e && {n}_may_spare(probe)) {{\n"
                     f"        e = {n}_rs.ringbuf_reserve(sizeof(struct {n}_ev));\n"
                     f"        spare = 1;\n    }}\n")
            same = "!spare && "
        if g.filters is not None:
            out.append(_render_filtered(g, dispatch, stack))
            out.append(_entries(g))
            continue
        out.append(f"""static __always_inline int {n}_body(struct pt_regs *ctx, u64 ck) {{
{_GATE}
    u32 probe = ck >> 32;
    struct {n}_ev *e = {n}_rb.ringbuf_reserve(sizeof(struct {n}_ev));
{spare}
    if (!e) {{
        u64 *c = {n}_lost.lookup(&probe);
        if (c) *c += 1;
        return 0;
    }}
    e->h.ts = bpf_ktime_get_ns();
    e->h.pid = id >> 32;
    e->h.tid = (u32)id;
    e->h.probe = probe;
    e->h.site = (ck >> 16) & 0xffff;
    e->h.flags = 0;
    e->h.nstack = 0;
    /* Copying comm is a good part of the per-hit cost. When this CPU's previous
       event in this ring came from the same thread, and no task was renamed
       since (exec, prctl), the reader already has the name (records of one CPU
       keep their order in the ring). */
    u32 zero = 0;
    ctl_slot = {CTL_GEN};
    u64 *genp = apptrace_ctl.lookup(&ctl_slot);
    u64 gen = genp ? *genp : 0;
    ctl_slot = {CTL_NO_SHORTCUT};
    u64 *off = apptrace_ctl.lookup(&ctl_slot);
    struct apptrace_last *last = {n}_lasttid.lookup(&zero);
    if ({same}last && last->tid == e->h.tid && last->gen == gen && !(off && *off)) {{
        e->h.flags = {FLAG_COMM_SAME}u;
        e->h.comm[0] = 0;
    }} else {{
        bpf_get_current_comm(&e->h.comm, sizeof(e->h.comm));
        if ({same}last) {{ last->tid = e->h.tid; last->gen = gen; }}
    }}
{dispatch}
{stack}    {n}_rb.ringbuf_submit(e, 0);
    return 0;
}}""")
        out.append(_entries(g))
    return "\n\n".join(out) + "\n"
