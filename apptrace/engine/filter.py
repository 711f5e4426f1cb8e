"""What names mean in a probe string's expressions, per argument reader.

A filter (``--where``) or an aggregated value (``--sum arg1``) is C that
reads the arguments a site's reader has just stored. The sites of one probe
string can store them differently (a glob matches probes whose third
argument is signed at one site, a string at another, or missing), so the
C is made once per reader (:func:`reader_exprs`), from that reader's slots.

A name missing at some readers but present at others makes the expression
false (a filter) or skips the hit (an aggregation) there; a name present
nowhere is an :class:`~apptrace.errors.ExpressionError`. A hit whose
argument read faulted does not pass a filter that uses that argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from apptrace.engine.plan import Group, Slot
from apptrace.errors import ExpressionError
from apptrace.expr import Env, Expr, compile_c, names_used, parse

__all__ = ["Names", "reader_env", "reader_exprs", "reader_slots", "ReaderExpr", "combine"]

_BITS = {1: "8", 2: "16", 4: "32", 8: "64"}
FLOAT_REASON = "a floating-point argument: expressions compare integers and strings"


@dataclass(frozen=True)
class Names:
    """The C spelling of what a reader stored and of the hit itself."""

    args: str = "e->a"          # u64 array of argument values
    strs: str = "e->s"          # char [nstr][size] string slots
    flags: str = "e->h.flags"   # bit i: argument i faulted
    comm: str = "comm"          # char[16], filled when an expression names comm
    id: str = "id"              # bpf_get_current_pid_tgid()


def int_c(v: str, slot: Slot) -> tuple[str, bool]:
    """An integer slot's raw u64 as its type says (width, sign): C and signedness."""
    t = slot.type
    if t is not None and t.kind == "int":
        bits = _BITS.get(t.size, "64")
        if bits == "64":
            return (f"(s64){v}" if t.signed else f"(u64){v}"), t.signed
        return (f"(s64)(s{bits}){v}" if t.signed else f"(u64)(u{bits}){v}"), t.signed
    return (f"(s64){v}" if slot.signed else f"(u64){v}"), slot.signed


def reader_env(slots: Sequence[Slot], str_size: int, names: Names = Names()
               ) -> tuple[Env, dict[str, int]]:
    """The names of one reader's hit, and the fault bits each argument name needs
    clear (a counted string needs its length argument read too)."""
    ints: dict[str, tuple[str, bool]] = {
        "pid": (f"({names.id} >> 32)", False),
        "tid": (f"(u32){names.id}", False),
        "cpu": ("bpf_get_smp_processor_id()", False),
    }
    strs: dict[str, tuple[str, int]] = {"comm": (names.comm, 16)}
    lens: dict[str, str] = {}
    missing: dict[str, str] = {}
    bits: dict[str, int] = {}
    for i, slot in enumerate(slots):
        name = f"arg{i}"
        t = slot.type
        v = f"{names.args}[{i}]"
        bits[name] = 1 << i
        if slot.unavailable is not None:
            missing[name] = f"{name}: {slot.unavailable}"
        elif t is not None and t.kind in ("str", "bytes"):
            if slot.str_slot < 0:
                missing[name] = f"{name}: not readable here"
                continue
            size = min(t.size, str_size) if t.kind == "bytes" else str_size
            strs[name] = (f"{names.strs}[{slot.str_slot}]", size)
            if t.kind == "bytes":
                lens[name] = str(size)
            elif t.len_arg is not None:
                lens[name] = f"{names.args}[{t.len_arg}]"
                bits[name] |= 1 << t.len_arg
        elif (t is not None and t.kind == "float") or (t is None and slot.is_float):
            missing[name] = f"{name}: {FLOAT_REASON}"
        else:
            ints[name] = int_c(v, slot)
    return Env(ints, strs, missing, lens), bits


def reader_slots(g: Group) -> list[Optional[list[Slot]]]:
    """Per reader id, the slots of a site read by it (sites sharing a reader
    read the same way)."""
    out: list[Optional[list[Slot]]] = [None] * len(g.reader_plans)
    for p in g.probes:
        for s in p.sites:
            if 0 <= s.reader < len(out) and out[s.reader] is None:
                out[s.reader] = s.slots
    return out


@dataclass(frozen=True)
class ReaderExpr:
    """One expression's C at one reader; ``None`` where a name it uses is missing."""

    c: Optional[str]
    fault_mask: int        # argument fault bits that make the hit not count
    uses_comm: bool


def _first(tree: Expr, names: set[str]) -> Optional[Expr]:
    """The leftmost use of one of ``names``."""
    if tree.op == "name" and str(tree.value) in names:
        return tree
    for a in tree.args:
        hit = _first(a, names)
        if hit is not None:
            return hit
    return None


def reader_exprs(text: str, g: Group, names: Names = Names(), *,
                 what: str = "expression") -> list[ReaderExpr]:
    """The expression's C for each reader of a resolved group."""
    tree = parse(text)  # syntax errors first, the same for every reader
    used = names_used(tree)
    out: list[ReaderExpr] = []
    missing: Optional[ExpressionError] = None
    for slots in reader_slots(g):
        env, bits = reader_env(slots or [], g.str_size, names)
        gone = {n for n in used if n not in env.ints and n not in env.strs
                and (n in env.missing or (n.startswith("arg") and n[3:].isdigit()))}
        if gone:
            if missing is None:
                node = _first(tree, gone)
                assert node is not None
                name = str(node.value)
                have = sum(1 for n in env.ints if n.startswith("arg")) + sum(
                    1 for n in env.strs if n.startswith("arg"))
                args = "none" if not have else "arg0" if have == 1 else f"arg0..arg{have - 1}"
                why = env.missing.get(name) or f"no {name} here (arguments: {args})"
                missing = ExpressionError(text, node.col, why)
            out.append(ReaderExpr(None, 0, False))
            continue
        mask = 0
        for n in used:
            mask |= bits.get(n, 0)
        out.append(ReaderExpr(compile_c(text, env), mask, "comm" in used))
    if out and all(r.c is None for r in out):
        assert missing is not None
        raise ExpressionError(text, missing.column,
                              f"{missing.reason}, at every site of {g.spec.text} ({what})")
    return out


def combine(exprs: Sequence[list[ReaderExpr]]) -> list[ReaderExpr]:
    """Several filters per reader, all of which must hold."""
    out = []
    for per_reader in zip(*exprs):
        if any(r.c is None for r in per_reader):
            out.append(ReaderExpr(None, 0, False))
            continue
        mask = 0
        for r in per_reader:
            mask |= r.fault_mask
        out.append(ReaderExpr(" && ".join(f"({r.c})" for r in per_reader), mask,
                              any(r.uses_comm for r in per_reader)))
    return out
