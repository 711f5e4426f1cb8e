"""Build small synthetic ELF files in memory, for tests of the stapsdt reader.

The image is laid out like a linked shared object, reduced to what USDT
discovery looks at::

    ELF header | program headers | text (R+X PT_LOAD) | data (RW PT_LOAD)
    | .stapsdt.base | .note.stapsdt | .symtab | .strtab | .shstrtab
    | section headers

By default the executable segment is mapped at a virtual address different
from its file offset (as lld's ``-z separate-code`` layouts do), so a reader
that confuses the two gets wrong answers.

Everything is packed with one struct byte-order prefix, so the same code
writes ELF32 or ELF64, little- or big-endian. Nothing here is x86-64 code:
the "text" is filler bytes; only the headers matter.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "ET_REL", "ET_EXEC", "ET_DYN", "ET_CORE",
    "EM_386", "EM_X86_64", "EM_AARCH64",
    "STB_LOCAL", "STB_GLOBAL", "STT_OBJECT", "STT_FUNC", "STT_FILE",
    "Segment", "Symbol", "ElfSpec", "build_elf",
    "note", "stapsdt_note", "stapsdt_desc",
    "TEXT", "DATA",
]

ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183

PT_LOAD = 1
PF_X, PF_W, PF_R = 1, 2, 4

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOTE = 0, 1, 2, 3, 7
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4

STB_LOCAL, STB_GLOBAL = 0, 1
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_FILE = 0, 1, 2, 4

NT_STAPSDT = 3


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD: where it sits in the file and in memory."""

    vaddr: int
    offset: int
    size: int


# Defaults: text at file 0x1000 mapped at 0x5000; data at file 0x2000
# mapped at 0x9000. Both page-aligned, offset != vaddr for each.
TEXT = Segment(vaddr=0x5000, offset=0x1000, size=0x1000)
DATA = Segment(vaddr=0x9000, offset=0x2000, size=0x200)


@dataclass(frozen=True)
class Symbol:
    """One .symtab entry; ``shndx`` 0 means undefined, None picks the data section."""

    name: str
    value: int
    size: int = 8
    bind: int = STB_GLOBAL
    type: int = STT_OBJECT
    shndx: Optional[int] = None


@dataclass
class ElfSpec:
    """Everything :func:`build_elf` can vary."""

    notes: Optional[bytes] = b""          # .note.stapsdt contents; None: no such section
    base_addr: Optional[int] = None        # sh_addr of .stapsdt.base; None: no section
    symbols: Sequence[Symbol] = ()         # non-empty: write .symtab + .strtab
    text: Segment = TEXT
    data: Segment = DATA
    e_type: int = ET_DYN
    machine: int = EM_X86_64
    is64: bool = True
    little_endian: bool = True
    note_section_name: str = ".note.stapsdt"
    extra_note_sections: Sequence[tuple[str, bytes]] = field(default_factory=tuple)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class _Sec:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int = 0
    info: int = 0
    align: int = 1
    entsize: int = 0


class _StrTab:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.index: dict[str, int] = {"": 0}

    def add(self, s: str) -> int:
        if s not in self.index:
            self.index[s] = len(self.data)
            self.data += s.encode() + b"\0"
        return self.index[s]


def build_elf(spec: Optional[ElfSpec] = None, **kw: Any) -> bytes:
    """The bytes of an ELF file described by ``spec`` (or by keyword overrides)."""
    if spec is None:
        spec = ElfSpec(**kw)
    elif kw:
        raise TypeError("give an ElfSpec or keywords, not both")
    e = "<" if spec.little_endian else ">"
    is64 = spec.is64
    ehsize, phentsize, shentsize = (64, 56, 64) if is64 else (52, 32, 40)
    symentsize = 24 if is64 else 16
    phnum = 2
    text, data = spec.text, spec.data
    if text.offset < ehsize + phnum * phentsize:
        raise ValueError("text segment overlaps the headers")
    if data.offset < text.offset + text.size:
        raise ValueError("data segment must follow the text segment in the file")

    # --- section contents, placed after the data segment -------------------
    shstr = _StrTab()
    sections: list[_Sec] = [_Sec("", SHT_NULL, 0, 0, 0, 0, align=0)]
    blobs: list[tuple[int, bytes]] = []
    cursor = data.offset + data.size

    def place(content: bytes, align: int) -> int:
        nonlocal cursor
        cursor = _align(cursor, align)
        off = cursor
        blobs.append((off, content))
        cursor += len(content)
        return off

    sections.append(_Sec(".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, text.vaddr,
                         text.offset, text.size, align=16))
    sections.append(_Sec(".data", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE, data.vaddr,
                         data.offset, data.size, align=8))
    data_index = len(sections) - 1
    if spec.base_addr is not None:
        off = place(b"\0", 1)
        sections.append(_Sec(".stapsdt.base", SHT_PROGBITS, SHF_ALLOC, spec.base_addr, off, 1))
    for name, content in spec.extra_note_sections:
        off = place(content, 4)
        sections.append(_Sec(name, SHT_NOTE, 0, 0, off, len(content), align=4))
    if spec.notes is not None:
        off = place(spec.notes, 4)
        sections.append(_Sec(spec.note_section_name, SHT_NOTE, 0, 0, off, len(spec.notes),
                             align=4))
    if spec.symbols:
        strtab = _StrTab()
        locals_ = [s for s in spec.symbols if s.bind == STB_LOCAL]
        globals_ = [s for s in spec.symbols if s.bind != STB_LOCAL]
        ordered = locals_ + globals_
        ents = [b"\0" * symentsize]
        for sym in ordered:
            shndx = data_index if sym.shndx is None else sym.shndx
            info = (sym.bind << 4) | (sym.type & 0xF)
            nm = strtab.add(sym.name)
            if is64:
                ents.append(struct.pack(e + "IBBHQQ", nm, info, 0, shndx, sym.value, sym.size))
            else:
                ents.append(struct.pack(e + "IIIBBH", nm, sym.value, sym.size, info, 0, shndx))
        symdata = b"".join(ents)
        sym_off = place(symdata, 8)
        symtab_index = len(sections)
        sections.append(_Sec(".symtab", SHT_SYMTAB, 0, 0, sym_off, len(symdata),
                             symtab_index + 1, 1 + len(locals_), 8, symentsize))
        str_off = place(bytes(strtab.data), 1)
        sections.append(_Sec(".strtab", SHT_STRTAB, 0, 0, str_off, len(strtab.data)))
    shstrndx = len(sections)
    sections.append(_Sec(".shstrtab", SHT_STRTAB, 0, 0, 0, 0))
    for sec in sections:
        shstr.add(sec.name)
    sections[shstrndx].offset = place(bytes(shstr.data), 1)
    sections[shstrndx].size = len(shstr.data)
    shoff = _align(cursor, 8)
    total = shoff + shentsize * len(sections)

    out = bytearray(total)
    # --- ELF header ----------------------------------------------------------
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if spec.little_endian else 2, 1, 0])
    ident += b"\0" * 8
    entry = text.vaddr
    if is64:
        hdr = struct.pack(e + "HHIQQQIHHHHHH", spec.e_type, spec.machine, 1, entry,
                          ehsize, shoff, 0, ehsize, phentsize, phnum, shentsize,
                          len(sections), shstrndx)
    else:
        hdr = struct.pack(e + "HHIIIIIHHHHHH", spec.e_type, spec.machine, 1, entry,
                          ehsize, shoff, 0, ehsize, phentsize, phnum, shentsize,
                          len(sections), shstrndx)
    out[0:ehsize] = ident + hdr
    # --- program headers -----------------------------------------------------
    pos = ehsize
    for seg, flags in ((text, PF_R | PF_X), (data, PF_R | PF_W)):
        if is64:
            ph = struct.pack(e + "IIQQQQQQ", PT_LOAD, flags, seg.offset, seg.vaddr, seg.vaddr,
                             seg.size, seg.size, 0x1000)
        else:
            ph = struct.pack(e + "IIIIIIII", PT_LOAD, seg.offset, seg.vaddr, seg.vaddr,
                             seg.size, seg.size, flags, 0x1000)
        out[pos:pos + phentsize] = ph
        pos += phentsize
    # --- segment filler (int3 in text, a pattern in data) ---------------------
    out[text.offset:text.offset + text.size] = b"\xcc" * text.size
    out[data.offset:data.offset + data.size] = bytes(i & 0xFF for i in range(data.size))
    for off, content in blobs:
        out[off:off + len(content)] = content
    # --- section headers -----------------------------------------------------
    pos = shoff
    for sec in sections:
        fields = (shstr.index[sec.name], sec.type, sec.flags, sec.addr, sec.offset, sec.size,
                  sec.link, sec.info, sec.align, sec.entsize)
        sh = struct.pack(e + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII"), *fields)
        out[pos:pos + shentsize] = sh
        pos += shentsize
    return bytes(out)


# --- notes -------------------------------------------------------------------

def note(name: bytes, desc: bytes, ntype: int = NT_STAPSDT, *, namesz: Optional[int] = None,
         descsz: Optional[int] = None, little_endian: bool = True, pad: bool = True) -> bytes:
    """One raw ELF note. ``name`` is written as given (add the NUL yourself);
    ``namesz``/``descsz`` override the header fields to build malformed notes;
    ``pad=False`` leaves out the 4-byte alignment padding."""
    e = "<" if little_endian else ">"
    hdr = struct.pack(e + "III", len(name) if namesz is None else namesz,
                      len(desc) if descsz is None else descsz, ntype)
    if not pad:
        return hdr + name + desc
    return hdr + name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)


def stapsdt_desc(pc: int, base: int, sema: int, provider: str | bytes, name: str | bytes,
                 args: str | bytes, *, is64: bool = True, little_endian: bool = True) -> bytes:
    """The descriptor of a stapsdt v3 note: three addresses, then three C strings."""
    e = "<" if little_endian else ">"

    def b(s: str | bytes) -> bytes:
        return s if isinstance(s, bytes) else s.encode()

    addrs = struct.pack(e + ("QQQ" if is64 else "III"), pc, base, sema)
    return addrs + b(provider) + b"\0" + b(name) + b"\0" + b(args) + b"\0"


def stapsdt_note(pc: int, base: int, sema: int, provider: str | bytes, name: str | bytes,
                 args: str | bytes = "", *, is64: bool = True,
                 little_endian: bool = True) -> bytes:
    """A well-formed ``stapsdt`` note, as ``sys/sdt.h`` emits it."""
    return note(b"stapsdt\0",
                stapsdt_desc(pc, base, sema, provider, name, args, is64=is64,
                             little_endian=little_endian),
                little_endian=little_endian)
