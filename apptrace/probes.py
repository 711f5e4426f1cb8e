"""Probe specifications: what the user asked for, before anything is resolved.

``usdt:[BINARY:]PROVIDER:NAME[(TYPES)]``, ``uprobe:BINARY:SYMBOL[(TYPES)]`` and
``uretprobe:BINARY:SYMBOL[(TYPE)]``. PROVIDER, NAME and SYMBOL take shell
globs; SYMBOL may also be ``0xOFFSET`` (a file offset) or ``SYMBOL+0xOFF``.
TYPES say how to show each argument: ``int``, ``u64``, ``str``, ``double``...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from apptrace.errors import ProbeSpecError

__all__ = ["ProbeSpec", "ArgType", "parse_probe", "parse_types", "TYPE_NAMES"]

KINDS = ("usdt", "uprobe", "uretprobe")


@dataclass(frozen=True)
class ArgType:
    """How to present one argument: an integer of a width, a string or a float."""

    name: str
    kind: str        # "int", "str", "float", "bytes"
    size: int = 8    # bytes, for ints and floats; the count for bytes[N]
    signed: bool = False
    hex: bool = False
    len_arg: Optional[int] = None  # str[argN]: the length is argument N (no NUL needed)


def _int_types() -> dict[str, ArgType]:
    t: dict[str, ArgType] = {}
    for bits in (8, 16, 32, 64):
        t[f"u{bits}"] = ArgType(f"u{bits}", "int", bits // 8, False)
        t[f"s{bits}"] = ArgType(f"s{bits}", "int", bits // 8, True)
        t[f"i{bits}"] = ArgType(f"i{bits}", "int", bits // 8, True)
        t[f"uint{bits}_t"] = ArgType(f"u{bits}", "int", bits // 8, False)
        t[f"int{bits}_t"] = ArgType(f"s{bits}", "int", bits // 8, True)
    for name, size, signed in (("char", 1, True), ("uchar", 1, False), ("short", 2, True),
                               ("ushort", 2, False), ("int", 4, True), ("uint", 4, False),
                               ("unsigned", 4, False), ("long", 8, True), ("ulong", 8, False),
                               ("size_t", 8, False), ("ssize_t", 8, True), ("bool", 1, False)):
        t[name] = ArgType(name, "int", size, signed)
    for name in ("ptr", "pointer", "hex", "void*"):
        t[name] = ArgType("ptr", "int", 8, False, hex=True)
    for name in ("str", "string", "char*"):
        t[name] = ArgType("str", "str")
    t["float"] = ArgType("float", "float", 4)
    t["double"] = ArgType("double", "float", 8)
    return t


TYPE_NAMES = _int_types()


MAX_BYTES = 4096  # bytes[N]: one event carries at most this much of a buffer

_SIZED = re.compile(r"(str|string|bytes)\[(arg)?(\d+)\]")


def _sized_type(name: str, spec: str) -> Optional[ArgType]:
    """``str[argN]`` (pointer + length in argument N, as HotSpot passes names)
    and ``bytes[N]`` (N raw bytes)."""
    m = _SIZED.fullmatch(name)
    if m is None:
        return None
    n = int(m.group(3))
    if m.group(1) == "bytes":
        if m.group(2) or not 1 <= n <= MAX_BYTES:
            raise ProbeSpecError(spec, f"bytes[N] takes a count from 1 to {MAX_BYTES}")
        return ArgType(f"bytes[{n}]", "bytes", n)
    if n > 11:
        raise ProbeSpecError(spec, f"{name}: a length argument is arg0..arg11")
    return ArgType(f"str[arg{n}]", "str", len_arg=n)


def parse_types(text: str, spec: str = "") -> tuple[Optional[ArgType], ...]:
    """``"str, int, -"`` → types; ``-`` or empty keeps the default for that slot."""
    out: list[Optional[ArgType]] = []
    if not text.strip():
        return ()
    for raw in text.split(","):
        name = raw.strip().replace(" ", "")
        if name in ("", "-", "_", "auto"):
            out.append(None)
            continue
        t = TYPE_NAMES.get(name) or _sized_type(name, spec or text)
        if t is None:
            raise ProbeSpecError(spec or text, f"unknown type {raw.strip()!r} (known: int,"
                                 " long, u8..u64, s8..s64, str, str[argN], bytes[N], float,"
                                 " double, ptr)")
        out.append(t)
    return tuple(out)


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed probe string. ``binary`` is None when the target decides it."""

    text: str
    kind: str                 # usdt | uprobe | uretprobe
    binary: Optional[str]
    provider: Optional[str]   # usdt only
    name: str                 # usdt probe name, or symbol / offset for uprobes
    types: tuple[Optional[ArgType], ...] = ()
    stack: bool = False

    @property
    def offset(self) -> Optional[int]:
        """A bare ``0x...`` uprobe target is a file offset."""
        if self.kind != "usdt" and _NUMBER.fullmatch(self.name):
            return int(self.name, 0)
        return None


_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0|[1-9][0-9]*")  # what int(text, 0) takes
_TYPES_AT_END = re.compile(r"^(.*?)\(([^()]*)\)$", re.S)


def parse_probe(text: str, *, stack: bool = False) -> ProbeSpec:
    """Parse one probe string; raises :class:`ProbeSpecError` with the reason."""
    spec = text.strip()
    body, types_text = spec, ""
    m = _TYPES_AT_END.match(spec)
    if m:
        body, types_text = m.group(1), m.group(2)
    if ":" not in body:
        raise ProbeSpecError(spec, "missing the probe kind (usdt:, uprobe:, uretprobe:)")
    kind, rest = body.split(":", 1)
    aliases = {"u": "uprobe", "ur": "uretprobe", "usdt": "usdt", "uprobe": "uprobe",
               "uretprobe": "uretprobe"}
    if kind not in aliases:
        raise ProbeSpecError(spec, f"unknown probe kind {kind!r}")
    kind = aliases[kind]
    types = parse_types(types_text, spec)
    parts = rest.split(":")
    if kind == "usdt":
        if len(parts) == 2:
            binary, provider, name = None, parts[0], parts[1]
        elif len(parts) >= 3:
            binary, provider, name = ":".join(parts[:-2]), parts[-2], parts[-1]
        else:
            raise ProbeSpecError(spec, "expected usdt:[BINARY:]PROVIDER:NAME")
        if not provider or not name:
            raise ProbeSpecError(spec, "empty provider or probe name")
        return ProbeSpec(spec, kind, binary or None, provider, name, types, stack)
    if len(parts) < 2 or not parts[-1] or not ":".join(parts[:-1]):
        raise ProbeSpecError(spec, f"expected {kind}:BINARY:SYMBOL")
    if kind == "uretprobe" and len(types) > 1:
        raise ProbeSpecError(spec, "a uretprobe takes one type, for the return value")
    sym, plus, off = parts[-1].partition("+")
    if plus and (not sym or not _NUMBER.fullmatch(off)):
        raise ProbeSpecError(spec, f"{parts[-1]!r}: expected SYMBOL+OFFSET with a decimal"
                                   " or 0x-hex offset")
    return ProbeSpec(spec, kind, ":".join(parts[:-1]), None, parts[-1], types, stack)
