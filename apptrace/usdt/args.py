"""USDT argument specs (x86-64): parse ``-4@%ebx``, ``8@-8(%rbp)``, ``8@sym+8(%rip)``...

A note's argument string is a list of ``[-]SIZE[f]@OPERAND`` tokens. Each token
becomes one :class:`Argument`. Parsing never raises for a bad token: the
argument comes back with ``kind == "unavailable"`` and a ``reason``, so one
odd operand never costs the user the other arguments or the probe.

Rules worth knowing (see shared/reference/usdt.md §b):
- the size before ``@`` governs, whatever width the register name suggests,
  so we always read the full 64-bit register and truncate/extend to SIZE;
- ``%ah``..``%dh`` are bits 8..15 of their register;
- ``%xmm``/``%st`` are not in ``pt_regs`` and cannot be read from a uprobe;
- ``sym(%rip)`` names a global: its run-time address is the probe IP plus a
  constant delta, so no PID or load base is needed.
"""

from __future__ import annotations

import functools
import re

from apptrace._records import record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Callable, Optional

__all__ = [
    "Argument",
    "parse_arguments",
    "parse_argument",
    "split_arguments",
    "REGISTERS",
    "KINDS",
]

KINDS = ("constant", "register", "memory", "rip_relative", "unavailable")

# name -> (pt_regs field, bit shift, natural size in bytes)
REGISTERS: dict[str, tuple[str, int, int]] = {}


def _add_regs() -> None:  # pragma: no mutate block
    # (It runs once at import, before mutmut picks a mutant: its mutants could
    # only ever "survive". test_usdt_args checks the table it builds.)
    legacy = {"ax": "a", "bx": "b", "cx": "c", "dx": "d"}
    for field, letter in legacy.items():
        REGISTERS["r" + field] = (field, 0, 8)
        REGISTERS["e" + field] = (field, 0, 4)
        REGISTERS[field] = (field, 0, 2)
        REGISTERS[letter + "l"] = (field, 0, 1)
        REGISTERS[letter + "h"] = (field, 8, 1)
    for field in ("si", "di", "bp", "sp"):
        REGISTERS["r" + field] = (field, 0, 8)
        REGISTERS["e" + field] = (field, 0, 4)
        REGISTERS[field] = (field, 0, 2)
        REGISTERS[field + "l"] = (field, 0, 1)
    for n in range(8, 16):
        field = f"r{n}"
        REGISTERS[field] = (field, 0, 8)
        REGISTERS[field + "d"] = (field, 0, 4)
        REGISTERS[field + "w"] = (field, 0, 2)
        REGISTERS[field + "b"] = (field, 0, 1)
        REGISTERS[field + "l"] = (field, 0, 1)  # AT&T alias some assemblers accept
    REGISTERS["rip"] = ("ip", 0, 8)
    REGISTERS["eip"] = ("ip", 0, 4)
    REGISTERS["ip"] = ("ip", 0, 2)


_add_regs()

_UNREADABLE_REG = re.compile(r"^(xmm\d+|ymm\d+|zmm\d+|st\(?\d?\)?|mm\d|k\d)$")


@record
class Argument:
    """One decoded USDT argument of one site.

    ``kind`` says how to fetch it: ``constant`` (``value``), ``register``
    (``register`` = pt_regs field, ``shift``), ``memory`` (``base`` +
    ``index`` * ``scale`` + ``displacement``, plus ``symbol``'s address when the
    operand names one), ``rip_relative`` (a global at
    ``symbol`` + ``displacement``, resolved to ``address``), or
    ``unavailable`` with ``reason``.
    """

    spec: str
    size: int
    signed: bool
    is_float: bool
    kind: str
    value: Optional[int] = None
    register: Optional[str] = None
    shift: int = 0
    base: Optional[str] = None
    index: Optional[str] = None
    scale: int = 1
    displacement: int = 0
    symbol: Optional[str] = None
    address: Optional[int] = None
    reason: Optional[str] = None

    @property
    def available(self) -> bool:
        return self.kind != "unavailable"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec,
            "size": self.size,
            "signed": self.signed,
            "float": self.is_float,
            "kind": self.kind,
        }
        if self.kind == "constant":
            out["value"] = self.value
        elif self.kind == "register":
            out["register"] = self.register
            if self.shift:
                out["shift"] = self.shift
        elif self.kind == "memory":
            out.update(base=self.base, index=self.index, scale=self.scale,
                       displacement=self.displacement)
            if self.symbol is not None:
                out.update(symbol=self.symbol, address=self.address)
        elif self.kind == "rip_relative":
            out.update(symbol=self.symbol, displacement=self.displacement,
                       address=self.address)
        if self.reason:
            out["reason"] = self.reason
        return out

    def describe(self) -> str:
        """Short human form for tables: ``s32 reg:bx``, ``u64 *(bp-8)``..."""
        if self.kind == "unavailable":
            return f"?({self.reason})"
        t = ("f" if self.is_float else ("s" if self.signed else "u")) + str(self.size * 8)
        if self.kind == "constant":
            return f"{t} ${self.value}"
        if self.kind == "register":
            return f"{t} {self.register}" + (f">>{self.shift}" if self.shift else "")
        disp = f"{self.displacement:+d}" if self.displacement else ""
        if self.kind == "memory":  # always a base or an index (else: unavailable)
            terms = [f"&{self.symbol}"] if self.symbol else []
            terms += [self.base] if self.base else []
            terms += [f"{self.index}*{self.scale}"] if self.index else []
            return f"{t} *({'+'.join(terms)}{disp})"
        return f"{t} *&{self.symbol}{disp}"  # rip_relative: always a symbol


def split_arguments(text: str) -> list[str]:
    """Split an argument string on blanks outside parentheses and brackets."""
    out: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]" and depth:
            depth -= 1
        if ch.isspace() and depth == 0:
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


_SIZE = re.compile(r"^(-?)(\d+)(f?)@(.*)$", re.S)
_INT = r"[-+]?(?:0[xX][0-9a-fA-F]+|\d+)"
_IMM = re.compile(rf"^\$({_INT})$")
_MEM = re.compile(r"^(?P<disp>[^()]*)\((?P<inner>[^()]*)\)$")
_SYMCHARS = re.compile(r"^[A-Za-z_.$][A-Za-z0-9_.$@]*$")
_TERM = re.compile(r"([-+]?)\s*([^-+\s]+)")


def _int(text: str) -> int:
    return int(text, 0)


def _unavailable(spec: str, size: int, signed: bool, is_float: bool, reason: str) -> Argument:
    return Argument(spec, size, signed, is_float, "unavailable", reason=reason)


def _parse_terms(text: str) -> tuple[int, Optional[str], Optional[str]]:
    """Sum a displacement like ``-8+16``, ``sym+40``, ``24+mp_``: (disp, symbol, error)."""
    text = text.strip()
    if not text:
        return 0, None, None
    disp = 0
    symbol: Optional[str] = None
    pos = 0
    for m in _TERM.finditer(text):
        if text[pos:m.start()].strip():
            return 0, None, f"cannot parse displacement {text!r}"
        pos = m.end()
        sign, term = m.group(1), m.group(2)
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", term):
            disp += -_int(term) if sign == "-" else _int(term)
        elif _SYMCHARS.match(term):
            if symbol is not None:
                return 0, None, f"two symbols in {text!r}"
            if sign == "-":
                return 0, None, f"negated symbol in {text!r}"
            symbol = term
        else:
            return 0, None, f"cannot parse displacement {text!r}"
    if text[pos:].strip():
        return 0, None, f"cannot parse displacement {text!r}"
    if not -(1 << 63) <= disp < (1 << 63):
        return 0, None, f"displacement {text!r} is out of the 64-bit range"
    return disp, symbol, None


def _reg(name: str) -> tuple[Optional[tuple[str, int, int]], Optional[str]]:
    """Look up ``%name``: (entry, reason-if-unusable)."""
    if not name.startswith("%"):
        return None, f"expected a register, got {name!r}"
    bare = name[1:].strip().lower()
    if bare in REGISTERS:
        return REGISTERS[bare], None
    if _UNREADABLE_REG.match(bare):
        return None, f"%{bare} is not in pt_regs; uprobes cannot read FP/SIMD registers"
    return None, f"unknown register {name!r}"


@functools.lru_cache(maxsize=4096)
def parse_argument(token: str) -> Argument:
    """Parse one ``[-]SIZE[f]@OPERAND`` token; never raises."""
    spec = token
    try:
        return _parse_argument(token)
    except (ValueError, IndexError, KeyError) as err:  # defensive: grammar holes
        return _unavailable(spec, 8, False, False, f"cannot parse: {err}")


def _parse_argument(token: str) -> Argument:
    spec = token
    m = _SIZE.match(token)
    size_given = m is not None
    if m:
        signed = m.group(1) == "-"
        size = int(m.group(2))
        is_float = m.group(3) == "f"
        operand = m.group(4).strip()
    else:
        # Old sdt v1/v2 notes and hand-written asm carry no size. Take it from
        # the register name, else a machine word (unsigned, like sdt v3 asm).
        signed, size, is_float, operand = False, 8, False, token.strip()
    if not operand:
        return _unavailable(spec, size, signed, is_float, "empty operand")
    if size not in (1, 2, 4, 8):
        return _unavailable(spec, size, signed, is_float, f"size {size} is not 1, 2, 4 or 8")
    if is_float and size not in (4, 8):
        return _unavailable(spec, size, signed, is_float, f"float of size {size}")

    # Segment-prefixed (TLS) operands: not produced with sdt.h's constraints.
    if re.match(r"^%[cdefgs]s:", operand):
        return _unavailable(spec, size, signed, is_float, "segment-relative operand")

    if operand.startswith("$"):
        im = _IMM.match(operand)
        if not im:
            return _unavailable(spec, size, signed, is_float, f"bad immediate {operand!r}")
        raw = _int(im.group(1))
        if raw < -(1 << 63) or raw >= (1 << 64):
            return _unavailable(spec, size, signed, is_float, "immediate out of 64-bit range")
        return Argument(spec, size, signed, is_float, "constant",
                        value=_fit(raw, size, signed and not is_float))

    if operand.startswith("%"):
        entry, why = _reg(operand)
        if entry is None:
            return _unavailable(spec, size, signed, is_float, why or "bad register")
        field, shift, natural = entry
        if not size_given:
            size = natural
        return Argument(spec, size, signed, is_float, "register", register=field, shift=shift)

    mm = _MEM.match(operand)
    if mm:
        disp, symbol, err = _parse_terms(mm.group("disp"))
        if err:
            return _unavailable(spec, size, signed, is_float, err)
        parts = [p.strip() for p in mm.group("inner").split(",")]
        if len(parts) > 3:
            return _unavailable(spec, size, signed, is_float, f"bad address {operand!r}")
        base_name = parts[0]
        index_name = parts[1] if len(parts) > 1 and parts[1] else None
        scale = 1
        if len(parts) == 3 and parts[2]:
            scale = _int(parts[2])
            if scale not in (1, 2, 4, 8):
                return _unavailable(spec, size, signed, is_float, f"scale {scale} is not 1/2/4/8")
        base: Optional[str] = None
        if base_name:
            entry, why = _reg(base_name)
            if entry is None:
                return _unavailable(spec, size, signed, is_float, why or "bad base")
            if entry[2] != 8 or entry[1]:
                return _unavailable(spec, size, signed, is_float,
                                    f"{base_name} cannot be a 64-bit base register")
            base = entry[0]
        index: Optional[str] = None
        if index_name:
            entry, why = _reg(index_name)
            if entry is None:
                return _unavailable(spec, size, signed, is_float, why or "bad index")
            if entry[0] in ("ip", "sp") or entry[2] != 8 or entry[1]:
                return _unavailable(spec, size, signed, is_float,
                                    f"{index_name} cannot be an index register")
            index = entry[0]
        if base == "ip":
            if index:
                return _unavailable(spec, size, signed, is_float, "%rip with an index")
            if symbol is None:
                return _unavailable(spec, size, signed, is_float,
                                    "rip-relative operand without a symbol")
            return Argument(spec, size, signed, is_float, "rip_relative",
                            symbol=symbol, displacement=disp)
        if base is None and index is None:
            return _unavailable(spec, size, signed, is_float, "absolute address")
        # With a symbol (non-PIC array indexing, `-4@arr(,%r9,4)`), the symbol's
        # address joins the sum; it is resolved like a rip-relative one.
        return Argument(spec, size, signed, is_float, "memory", base=base, index=index,
                        scale=scale, displacement=disp, symbol=symbol)

    # A bare symbol (non-PIC i386-style `4@sym+4`): the same IP-delta read.
    disp, symbol, err = _parse_terms(operand)
    if err is None and symbol is not None:
        return Argument(spec, size, signed, is_float, "rip_relative",
                        symbol=symbol, displacement=disp)
    return _unavailable(spec, size, signed, is_float, f"cannot parse operand {operand!r}")


def _fit(raw: int, size: int, signed: bool) -> int:
    """Truncate to SIZE bytes, then read as signed or unsigned."""
    bits = size * 8
    v = raw & ((1 << bits) - 1)
    if signed and v >> (bits - 1):
        v -= 1 << bits
    return v


if TYPE_CHECKING:
    # resolve(name) -> (vaddr, error)
    SymbolResolver = Callable[[str], "tuple[Optional[int], Optional[str]]"]


def parse_arguments(text: str, resolve: Optional[SymbolResolver] = None) -> list[Argument]:
    """Parse a whole argument string. ``resolve(name) -> (vaddr, error)`` fills
    in ``address`` for rip-relative arguments; without it they stay unresolved."""
    text = text.strip()
    if not text or text.startswith(":"):
        return []
    args = [parse_argument(tok) for tok in split_arguments(text)]
    if resolve is None:
        return args
    out = []
    for a in args:
        if a.kind in ("rip_relative", "memory") and a.symbol is not None:
            vaddr, why = resolve(a.symbol)
            if vaddr is None:
                a = _unavailable(a.spec, a.size, a.signed, a.is_float,
                                 why or f"symbol {a.symbol!r} not found")
            elif not 0 <= vaddr + a.displacement < (1 << 64):
                a = _unavailable(a.spec, a.size, a.signed, a.is_float,
                                 f"symbol {a.symbol!r} + {a.displacement} is outside the"
                                 " address space")
            else:
                a = a.replace(address=vaddr + a.displacement)  # type: ignore[attr-defined]
        out.append(a)
    return out
