"""Read USDT probes from an ELF file's ``.note.stapsdt`` section.

The ELF header, program headers, section headers, symbols and the stapsdt
notes are read here with :mod:`struct`: importing pyelftools and building its
objects took longer than ``apptrace usdt list`` may take altogether, and
pyelftools labels every type-3 note ``NT_GNU_BUILD_ID`` with no decoder for
their descriptor (three addresses, then provider, name and argument strings).
:attr:`ElfImage.elf` still offers pyelftools' full view, loaded on first use.

Addresses: the kernel wants file offsets. A site's pc maps through the
executable PT_LOAD that holds it; a semaphore through whichever PT_LOAD holds
it. A prelinked object is adjusted by ``.stapsdt.base`` only when that section
exists and the note's base is non-zero.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct

from apptrace._records import record
from apptrace.errors import ElfError, ElfNotFoundError, NoProbesError
from apptrace.usdt.args import Argument, parse_arguments

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Iterator, Optional

__all__ = ["Site", "Probe", "ElfImage", "read_probes", "group_sites"]

_PF_X = 1
_STT_FUNC, _STT_FILE, _STT_GNU_IFUNC = 2, 4, 10
_SYM64 = struct.Struct("<IBBHQQ")  # Elf64_Sym (32-bit objects are refused earlier)
_SHDR64 = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SHT_NOTE, _SHT_NOBITS = 7, 8
_PHDR64 = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_PT_LOAD = 1
_ET_EXEC, _ET_DYN = 2, 3
_EM_X86_64 = 62
# Names for error messages, as readelf and pyelftools spell them.
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_EM_NAMES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390",
             40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV",
             258: "EM_LOONGARCH"}


class _Section:
    """One section header, as far as the readers here use it."""

    __slots__ = ("name", "type", "addr", "offset", "size", "link", "number")

    def __init__(self, name: str, type: int, addr: int, offset: int, size: int, link: int,
                 number: int) -> None:
        self.name, self.type, self.addr, self.offset = name, type, addr, offset
        self.size, self.link, self.number = size, link, number


@record
class Site:
    """One call site of a probe: where it is and how to read its arguments."""

    provider: str
    name: str
    pc: int                 # location as recorded in the note
    base: int               # the note's .stapsdt.base value
    semaphore: int          # semaphore vaddr as recorded (0: none)
    args_spec: str          # raw argument string
    address: int            # pc after prelink adjustment (a vaddr)
    file_offset: int        # what the kernel's uprobe wants
    semaphore_address: int  # adjusted semaphore vaddr (0: none)
    semaphore_offset: int   # semaphore file offset (0: none)
    args: tuple[Argument, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "pc": self.pc,
            "file_offset": self.file_offset,
            "base": self.base,
            "semaphore": self.semaphore,
            "semaphore_offset": self.semaphore_offset,
            "args": [a.to_json() for a in self.args],
        }


@record
class Probe:
    """A provider:name in one binary, with all its sites (one per inlined copy)."""

    binary: str
    provider: str
    name: str
    sites: tuple[Site, ...] = ()

    @property
    def fullname(self) -> str:
        return f"{self.provider}:{self.name}"

    @property
    def has_semaphore(self) -> bool:
        return any(s.semaphore for s in self.sites)

    def to_json(self) -> dict[str, Any]:
        return {
            "binary": self.binary,
            "provider": self.provider,
            "name": self.name,
            "sites": [s.to_json() for s in self.sites],
        }


# What pyelftools raises for corrupt headers (seeks past the end, counts
# that overflow, structures that do not parse), besides its own ELFError.
_MALFORMED = (struct.error, ValueError, OverflowError, IndexError, KeyError, EOFError)
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _map_regular_file(path: str, display: str) -> Any:
    """mmap a regular file read-only; anything else is an :class:`ElfError`.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` before any read, so a
    FIFO (or a file swapped for one) cannot block us and a device is never read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError as err:
        raise ElfNotFoundError(display) from err
    except PermissionError as err:
        raise ElfError("permission denied", path=display,
                       hint="run as root or check the file's mode") from err
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise ElfError(f"cannot open: {getattr(err, 'strerror', None) or err}",
                       path=display) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a file")
            raise ElfError(f"is {kind}, not a regular file (ELF input must be a file)",
                           path=display)
        if st.st_size == 0:
            raise ElfError("empty file, not an ELF file", path=display)
        try:
            # mmap: libjvm.so is ~20 MB and we touch a few pages of it.
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            raise ElfError(f"cannot map the file: {err}", path=display) from err
    finally:
        os.close(fd)


_EHDR64 = struct.Struct("<16xHHIQQQIHHHHHH")  # Elf64_Ehdr after e_ident


def _check_header_bounds(data: Any, display: str) -> None:
    """Program and section header tables must lie inside the file (pyelftools
    would seek to wherever e_phoff points, and fail in its own ways)."""
    if len(data) < _EHDR64.size or data[4] != 2:  # not ELF64: refused by the caller
        return
    if data[5] != 1:  # big-endian: refused by the caller with its own message
        return
    (_t, _m, _v, _e, phoff, shoff, _f, _eh, phentsize, phnum, shentsize, shnum,
     _x) = _EHDR64.unpack_from(data, 0)
    size = len(data)
    if phnum and (phoff >= size or phoff + phnum * phentsize > size or phentsize < 56):
        raise ElfError(f"program headers (offset {phoff:#x}, {phnum} x {phentsize} bytes)"
                       " run past the end of the file", path=display)
    if shoff and (shoff >= size or shoff + max(shnum, 1) * shentsize > size):
        raise ElfError(f"section headers (offset {shoff:#x}) run past the end of the file",
                       path=display)


class ElfImage:
    """The parts of one ELF file that USDT needs: segments, notes, symbols."""

    def __init__(self, path: str, display: Optional[str] = None) -> None:
        self.path = path
        self.display = display or path
        self._data: Any = b""
        self._data = _map_regular_file(path, self.display)
        if self._data[:4] != b"\x7fELF":
            raise ElfError("not an ELF file", path=self.display)
        _check_header_bounds(self._data, self.display)
        self._elf: Any = None
        data = self._data
        ei_class, ei_data = (data[4], data[5]) if len(data) > 5 else (0, 0)
        if ei_class not in (1, 2) or ei_data not in (1, 2) \
                or len(data) < (_EHDR64.size if ei_class == 2 else 52):
            raise ElfError(f"malformed ELF header (EI_CLASS {ei_class}, EI_DATA {ei_data},"
                           f" {len(data)} bytes)", path=self.display)
        e_type, e_machine = struct.unpack_from("<HH" if ei_data == 1 else ">HH", data, 16)
        if e_type not in (_ET_EXEC, _ET_DYN):
            raise ElfError(f"ELF type {_ET_NAMES.get(e_type, hex(e_type))} cannot be traced"
                           " (need an executable or shared object)", path=self.display)
        if ei_data != 1:
            raise ElfError("big-endian ELF; this host is little-endian", path=self.display)
        if e_machine != _EM_X86_64:
            raise ElfError(f"machine {_EM_NAMES.get(e_machine, e_machine)} is not supported"
                           " (x86-64 only)", path=self.display)
        self.is64 = ei_class == 2
        if not self.is64:
            raise ElfError("32-bit ELF; this host traces 64-bit x86-64 objects only",
                           path=self.display)
        (_t, _m, _v, self.entry, phoff, shoff, _f, _eh, phentsize, phnum, shentsize, shnum,
         shstrndx) = _EHDR64.unpack_from(data, 0)
        self.executable = e_type == _ET_EXEC  # else ET_DYN: a PIE or a shared library
        self._shdr_info = (shoff, shnum, shentsize, shstrndx)
        # PT_LOAD segments as (vaddr, memsz, offset, filesz, flags); the table
        # lies inside the file (checked above).
        self.loads: list[tuple[int, int, int, int, int]] = []
        for i in range(phnum):
            p_type, p_flags, p_offset, p_vaddr, _pa, p_filesz, p_memsz, _al = \
                _PHDR64.unpack_from(data, phoff + i * phentsize)
            if p_type == _PT_LOAD:
                self.loads.append((p_vaddr, p_memsz, p_offset, p_filesz, p_flags))
        self._symbols: Optional[dict[str, list[int]]] = None
        self._sections_cache: Optional[list[_Section]] = None

    @property
    def elf(self) -> Any:
        """pyelftools' ``ELFFile`` of this file, for what the readers here do not cover."""
        if self._elf is None:
            from elftools.common.exceptions import ELFError as PyElfError
            from elftools.elf.elffile import ELFFile

            try:
                self._elf = ELFFile(self._data)  # type: ignore[arg-type]  # mmap reads like a file
            except (PyElfError, *_MALFORMED) as err:
                raise ElfError(f"malformed ELF file ({err})", path=self.display) from err
        return self._elf

    def close(self) -> None:
        """Unmap the file now rather than whenever the garbage collector runs."""
        self._elf = None
        data, self._data = self._data, b""
        if isinstance(data, mmap.mmap):
            data.close()

    def __enter__(self) -> ElfImage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- addresses ---------------------------------------------------------

    def vaddr_to_offset(self, vaddr: int, *, executable: bool) -> Optional[int]:
        """File offset of ``vaddr`` through the PT_LOAD holding it: an executable
        one for code; for data a non-executable one first (as libbpf does)."""
        passes = [True] if executable else [False, True]
        for want_exec in passes:
            for start, memsz, off, filesz, flags in self.loads:
                if bool(flags & _PF_X) != want_exec:
                    continue
                if start <= vaddr < start + max(memsz, filesz):
                    return vaddr - start + off
        return None

    def offset_to_vaddr(self, offset: int) -> Optional[int]:
        for start, _memsz, off, filesz, _flags in self.loads:
            if off <= offset < off + filesz:
                return offset - off + start
        return None


    # -- sections ----------------------------------------------------------

    def _section_table(self) -> list[_Section]:
        """Section headers, read with one ``struct.iter_unpack``.

        pyelftools builds a construct object per section; a process maps dozens
        of objects with 30-40 sections each, and this is what ``-p PID``
        resolution spends its time on, so the table is read directly.
        """
        if self._sections_cache is not None:
            return self._sections_cache
        shoff, shnum, shentsize, shstrndx = self._shdr_info
        data = self._data
        out: list[_Section] = []
        if shoff:
            if shentsize != _SHDR64.size or shoff + _SHDR64.size > len(data):
                raise ElfError("malformed section headers", path=self.display)
            first = _SHDR64.unpack_from(data, shoff)
            shnum = shnum or first[5]           # extended numbering: count in sh_size
            if shstrndx == 0xFFFF:
                shstrndx = first[6]             # ... and the name table in sh_link
            end = shoff + shnum * _SHDR64.size
            if end > len(data):
                raise ElfError("section headers run past the end of the file",
                               path=self.display)
            raw = list(_SHDR64.iter_unpack(data[shoff:end]))
            if not 0 <= shstrndx < len(raw):
                raise ElfError("section name table index out of range", path=self.display)
            _n, _t, _f, _a, noff, nsize, *_ = raw[shstrndx]
            names = bytes(data[noff:noff + nsize]) if noff + nsize <= len(data) else b""
            for i, (name, stype, _flags, addr, off, size, link, *_rest) in enumerate(raw):
                nend = names.find(b"\0", name)
                label = names[name:nend if nend >= 0 else None].decode("utf-8", "replace")
                out.append(_Section(label, stype, addr, off, size, link, i))
        self._sections_cache = out
        return out

    def section(self, name: str) -> Optional[_Section]:
        return next((s for s in self._section_table() if s.name == name), None)

    def _section_bytes(self, sec: _Section) -> bytes:
        if sec.type == _SHT_NOBITS:
            return b""
        if sec.offset + sec.size > len(self._data):
            raise ElfError(f"section {sec.name} extends past the end of the file",
                           path=self.display)
        return self._data[sec.offset:sec.offset + sec.size]

    # -- symbols -----------------------------------------------------------

    def resolve_symbol(self, name: str) -> tuple[Optional[int], Optional[str]]:
        """A data symbol's vaddr from .symtab/.dynsym; ambiguity is reported."""
        if self._symbols is None:
            self._symbols = self._read_symbols()
        values = sorted(set(self._symbols.get(name, ())))
        if not values:
            return None, f"symbol {name!r} not in .symtab/.dynsym (stripped binary?)"
        if len(values) > 1:
            return None, (f"symbol {name!r} is ambiguous: {len(values)} definitions at "
                          + ", ".join(hex(v) for v in values))
        return values[0], None

    def _symbols_of(self, secname: str) -> Iterator[tuple[str, int, int]]:
        """(name, value, st_info type) of every defined symbol in one table."""
        sec = self.section(secname)
        if sec is None:
            return
        strtab = self._section_bytes(self._linked(sec))
        data = self._section_bytes(sec)
        data = data[: len(data) - len(data) % _SYM64.size]
        for st_name, st_info, _, st_shndx, st_value, _ in _SYM64.iter_unpack(data):
            if st_name and st_shndx != 0:  # named and defined
                end = strtab.find(b"\0", st_name)
                yield strtab[st_name:end].decode("utf-8", "replace"), st_value, st_info & 0xF

    def _read_symbols(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for secname in (".symtab", ".dynsym"):
            for sym, value, kind in self._symbols_of(secname):
                if kind == _STT_FILE:
                    continue
                vals = out.setdefault(sym, [])
                if value not in vals:
                    vals.append(value)
            if secname == ".symtab" and out:
                # .dynsym is a subset of .symtab; reading both only repeats values.
                break
        return out

    def functions(self) -> dict[str, int]:
        """Defined function symbols (name -> vaddr) from .dynsym and .symtab."""
        out: dict[str, int] = {}
        for secname in (".dynsym", ".symtab"):
            for name, value, kind in self._symbols_of(secname):
                if kind in (_STT_FUNC, _STT_GNU_IFUNC):
                    out.setdefault(name.split("@", 1)[0], value)
        return out

    # -- notes -------------------------------------------------------------

    def _linked(self, sec: _Section) -> _Section:
        table = self._section_table()
        if not 0 <= sec.link < len(table):
            raise ElfError(f"section {sec.name} links to a missing section", path=self.display)
        return table[sec.link]

    def sites(self) -> list[Site]:
        """Every stapsdt note, decoded, in file order; duplicates dropped."""
        secs = [s for s in self._section_table()
                if s.name == ".note.stapsdt" and s.type == _SHT_NOTE]
        if not secs:
            raise NoProbesError(self.display)
        base_sec = self.section(".stapsdt.base")
        base_addr = base_sec.addr if base_sec is not None else None
        out: list[Site] = []
        seen: set[tuple[str, str, int]] = set()
        index = 0
        for sec in secs:
            for raw in self._iter_notes(self._section_bytes(sec), index):
                index += 1
                site = self._decode(raw, index - 1, base_addr)
                if site is None:
                    continue
                key = (site.provider, site.name, site.address)
                if key in seen:
                    continue
                seen.add(key)
                out.append(site)
        return out

    def _iter_notes(self, data: bytes, first_index: int) -> Any:
        pos, index = 0, first_index
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name_end = pos + namesz
            desc_start = name_end + (-namesz % 4)
            desc_end = desc_start + descsz
            if desc_end > len(data):
                raise ElfError(f"note runs past the end of its section (namesz={namesz},"
                               f" descsz={descsz})", path=self.display, note_index=index)
            name = data[pos:name_end]
            desc = data[desc_start:desc_end]
            pos = desc_end + (-descsz % 4)
            index += 1
            yield name, ntype, desc
        if pos != len(data) and data[pos:].strip(b"\0"):
            raise ElfError("trailing bytes after the last note", path=self.display,
                           note_index=index)

    def _decode(self, raw: tuple[bytes, int, bytes], index: int,
                base_addr: Optional[int]) -> Optional[Site]:
        name, ntype, desc = raw
        if name != b"stapsdt\0":
            return None  # some other note in the same section: not ours
        if ntype != 3:
            raise ElfError(f"stapsdt note of type {ntype} (only version 3 is defined)",
                           path=self.display, note_index=index)
        # Three 8-byte addresses (32-bit objects are refused when opened), then
        # three NUL-terminated strings.
        if len(desc) < 3 * 8 + 3:
            raise ElfError(f"descriptor of {len(desc)} bytes is too short",
                           path=self.display, note_index=index)
        pc, base, sema = struct.unpack_from("<QQQ", desc, 0)
        strings = desc[3 * 8:]
        parts = strings.split(b"\0")
        if len(parts) < 4 or not strings.endswith(b"\0"):
            raise ElfError("provider, name and arguments are not three NUL-terminated"
                           " strings", path=self.display, note_index=index)
        try:
            provider, pname, argstr = (p.decode("utf-8") for p in parts[:3])
        except UnicodeDecodeError as err:
            raise ElfError("provider or name is not valid UTF-8", path=self.display,
                           note_index=index) from err
        if not provider or not pname:
            raise ElfError("empty provider or probe name", path=self.display,
                           note_index=index)
        address, sema_addr = pc, sema
        if base_addr is not None and base:
            address = pc + base_addr - base
            if sema:
                sema_addr = sema + base_addr - base
        foff = self.vaddr_to_offset(address, executable=True)
        if foff is None:
            raise ElfError(f"probe {provider}:{pname} at {address:#x} is outside every"
                           " executable segment", path=self.display, note_index=index)
        sema_off = 0
        if sema_addr:
            sema_off_or_none = self.vaddr_to_offset(sema_addr, executable=False)
            if sema_off_or_none is None:
                raise ElfError(f"semaphore of {provider}:{pname} at {sema_addr:#x} is"
                               " outside every segment", path=self.display,
                               note_index=index)
            sema_off = sema_off_or_none
        args = parse_arguments(argstr, self.resolve_symbol)
        return Site(provider, pname, pc, base, sema, argstr, address, foff, sema_addr,
                    sema_off, tuple(args))


def group_sites(binary: str, sites: list[Site]) -> list[Probe]:
    """Sites → probes, grouped by provider:name in first-seen order."""
    groups: dict[tuple[str, str], list[Site]] = {}
    for s in sites:
        groups.setdefault((s.provider, s.name), []).append(s)
    return [Probe(binary, p, n, tuple(ss)) for (p, n), ss in groups.items()]


def read_probes(path: str | os.PathLike[str], *, display: Optional[str] = None) -> list[Probe]:
    """All USDT probes of one ELF file.

    Raises :class:`ElfError` for a missing, non-ELF or malformed file and
    :class:`NoProbesError` when it has no ``.note.stapsdt`` section.
    """
    p = os.fspath(path)
    with ElfImage(p, display) as image:
        return group_sites(display or p, image.sites())
