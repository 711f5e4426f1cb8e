"""apptrace.usdt.notes against synthetic ELF files built by tests/elfwriter.py.

Every file here is written byte by byte, so each test controls exactly the
segments, sections, symbols and notes the reader sees. The layout puts the
executable PT_LOAD at vaddr 0x5000 / file offset 0x1000 and the RW PT_LOAD at
vaddr 0x9000 / file offset 0x2000, so a reader that treats vaddrs as file
offsets is caught.
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from elfwriter import (
    DATA,
    EM_386,
    EM_AARCH64,
    ET_CORE,
    ET_EXEC,
    ET_REL,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FILE,
    TEXT,
    Symbol,
    build_elf,
    note,
    stapsdt_desc,
    stapsdt_note,
)
from helpers import missing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apptrace.errors import ElfError, NoProbesError
from apptrace.usdt.notes import ElfImage, Probe, Site, read_probes

PC = TEXT.vaddr + 0x10          # a pc inside the executable segment
SEMA = DATA.vaddr + 0x8         # a semaphore inside the RW segment


def write(tmp_path: Path, data: bytes, name: str = "probe.so") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def sites_of(tmp_path: Path, **kw: Any) -> list[Site]:
    return ElfImage(write(tmp_path, build_elf(**kw))).sites()


# --- decoding ---------------------------------------------------------------

def test_pc_and_semaphore_map_through_their_segments(tmp_path: Path) -> None:
    notes = stapsdt_note(PC, 0, SEMA, "prov", "hit", "-4@%edi 8@%rsi")
    [site] = sites_of(tmp_path, notes=notes)
    assert (site.provider, site.name) == ("prov", "hit")
    assert site.pc == site.address == PC
    # 0x5010 lies 0x10 into the text segment, which starts at file offset 0x1000.
    assert site.file_offset == TEXT.offset + 0x10 == 0x1010
    assert site.file_offset != site.pc
    assert site.semaphore == site.semaphore_address == SEMA
    assert site.semaphore_offset == DATA.offset + 0x8 == 0x2008
    assert site.base == 0
    assert site.args_spec == "-4@%edi 8@%rsi"
    assert [(a.kind, a.register, a.size, a.signed) for a in site.args] == [
        ("register", "di", 4, True), ("register", "si", 8, False)]


def test_no_semaphore_means_zero_offsets(tmp_path: Path) -> None:
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, 0, "p", "n", ""))
    assert site.semaphore == site.semaphore_address == site.semaphore_offset == 0
    assert site.args == ()


def test_pc_at_the_last_byte_of_text_maps_and_one_past_does_not(tmp_path: Path) -> None:
    last = TEXT.vaddr + TEXT.size - 1
    [site] = sites_of(tmp_path, notes=stapsdt_note(last, 0, 0, "p", "n"))
    assert site.file_offset == TEXT.offset + TEXT.size - 1
    with pytest.raises(ElfError, match="outside every executable segment"):
        sites_of(tmp_path, notes=stapsdt_note(last + 1, 0, 0, "p", "n"))


def test_to_json_of_a_site(tmp_path: Path) -> None:
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, SEMA, "p", "n", "8@$7"))
    assert site.to_json() == {
        "pc": PC, "file_offset": 0x1010, "base": 0, "semaphore": SEMA,
        "semaphore_offset": 0x2008,
        "args": [{"spec": "8@$7", "size": 8, "signed": False, "float": False,
                  "kind": "constant", "value": 7}],
    }


# --- prelink: .stapsdt.base --------------------------------------------------

NOTE_BASE = DATA.vaddr + 0x100   # where the base was at link time
MOVED_BASE = NOTE_BASE + 0x40    # where .stapsdt.base is now (prelink moved it)


def test_prelink_adjusts_when_section_exists_and_note_base_nonzero(tmp_path: Path) -> None:
    notes = stapsdt_note(PC, NOTE_BASE, SEMA, "p", "n")
    [site] = sites_of(tmp_path, notes=notes, base_addr=MOVED_BASE)
    assert site.pc == PC and site.base == NOTE_BASE and site.semaphore == SEMA  # as recorded
    assert site.address == PC + 0x40
    assert site.file_offset == TEXT.offset + 0x10 + 0x40
    assert site.semaphore_address == SEMA + 0x40
    assert site.semaphore_offset == DATA.offset + 0x8 + 0x40


def test_no_prelink_adjustment_when_note_base_is_zero(tmp_path: Path) -> None:
    # A linker with --gc-sections can drop _.stapsdt.base and leave base 0.
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, SEMA, "p", "n"),
                      base_addr=MOVED_BASE)
    assert site.address == PC
    assert site.file_offset == 0x1010
    assert site.semaphore_address == SEMA and site.semaphore_offset == 0x2008


def test_no_prelink_adjustment_without_stapsdt_base_section(tmp_path: Path) -> None:
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, NOTE_BASE, SEMA, "p", "n"))
    assert site.base == NOTE_BASE
    assert site.address == PC and site.file_offset == 0x1010
    assert site.semaphore_address == SEMA


def test_unmoved_base_is_a_no_op(tmp_path: Path) -> None:
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, NOTE_BASE, 0, "p", "n"),
                      base_addr=NOTE_BASE)
    assert site.address == PC and site.file_offset == 0x1010


# --- duplicates and grouping ----------------------------------------------------

def test_exact_duplicate_at_same_address_is_dropped(tmp_path: Path) -> None:
    one = stapsdt_note(PC, 0, 0, "p", "n", "8@%rdi")
    other = stapsdt_note(PC, 0, 0, "p", "other", "8@%rdi")  # same pc, other name: kept
    sites = sites_of(tmp_path, notes=one + one + other + one)
    assert [(s.name, s.pc) for s in sites] == [("n", PC), ("other", PC)]


def test_same_probe_at_three_addresses_groups_into_one_probe(tmp_path: Path) -> None:
    notes = (stapsdt_note(PC, 0, 0, "app", "req", "8@%rdi")
             + stapsdt_note(PC + 0x100, 0, 0, "app", "other", "")
             + stapsdt_note(PC + 0x20, 0, 0, "app", "req", "-4@-8(%rbp)")
             + stapsdt_note(PC + 0x40, 0, 0, "app", "req", "8@$5"))
    path = write(tmp_path, build_elf(notes=notes))
    probes = read_probes(path)
    assert [p.fullname for p in probes] == ["app:req", "app:other"]
    req = probes[0]
    assert isinstance(req, Probe) and req.binary == path
    assert [s.pc for s in req.sites] == [PC, PC + 0x20, PC + 0x40]
    assert [s.args_spec for s in req.sites] == ["8@%rdi", "-4@-8(%rbp)", "8@$5"]
    assert [s.args[0].kind for s in req.sites] == ["register", "memory", "constant"]
    assert len(probes[1].sites) == 1
    assert not req.has_semaphore
    js = req.to_json()
    assert js["provider"] == "app" and js["name"] == "req" and len(js["sites"]) == 3


def test_display_name_is_used_for_binary(tmp_path: Path) -> None:
    path = write(tmp_path, build_elf(notes=stapsdt_note(PC, 0, 0, "p", "n")))
    [probe] = read_probes(path, display="/usr/lib/shown.so")
    assert probe.binary == "/usr/lib/shown.so"


def test_note_with_another_name_is_skipped(tmp_path: Path) -> None:
    notes = (note(b"GNU\0", b"\x01\x02\x03\x04", 3)
             + stapsdt_note(PC, 0, 0, "p", "n", "8@%rax")
             + note(b"stapsdtx\0", stapsdt_desc(PC + 4, 0, 0, "q", "m", "")))
    sites = sites_of(tmp_path, notes=notes)
    assert [(s.provider, s.name) for s in sites] == [("p", "n")]


def test_note_index_counts_every_note_in_the_section(tmp_path: Path) -> None:
    notes = (note(b"GNU\0", b"abcd", 3)
             + stapsdt_note(PC, 0, 0, "p", "ok")
             + stapsdt_note(0x10, 0, 0, "p", "bad"))
    with pytest.raises(ElfError) as ei:
        sites_of(tmp_path, notes=notes)
    assert ei.value.note_index == 2
    assert "note #2" in str(ei.value)


def test_notes_of_32_bit_x86_elf_are_rejected_by_machine(tmp_path: Path) -> None:
    data = build_elf(notes=stapsdt_note(PC, 0, 0, "p", "n", is64=False), is64=False,
                     machine=EM_386)
    path = write(tmp_path, data)
    with pytest.raises(ElfError) as ei:
        ElfImage(path)
    assert ei.value.path == path


# --- rip-relative symbols ------------------------------------------------------------

def test_rip_relative_argument_resolved_from_symtab(tmp_path: Path) -> None:
    syms = [Symbol("counter", DATA.vaddr + 0x10),
            Symbol("seq_iter.6", DATA.vaddr + 0x30, bind=STB_LOCAL),
            Symbol("undef_only", 0, shndx=0),
            Symbol("crt.c", 0, bind=STB_LOCAL, type=STT_FILE, shndx=0xFFF1)]
    args = "-4@counter+4(%rip) 8@seq_iter.6(%rip) 8@%rdi 4@undef_only(%rip) 8@crt.c(%rip)"
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, 0, "p", "n", args), symbols=syms)
    a0, a1, a2, a3, a4 = site.args
    assert (a0.kind, a0.symbol, a0.displacement, a0.address) == (
        "rip_relative", "counter", 4, DATA.vaddr + 0x14)
    assert (a1.kind, a1.symbol, a1.address) == ("rip_relative", "seq_iter.6", DATA.vaddr + 0x30)
    assert a2.kind == "register"
    # an undefined symbol and an STT_FILE symbol are not data addresses
    assert a3.kind == "unavailable" and "undef_only" in (a3.reason or "")
    assert a4.kind == "unavailable" and "crt.c" in (a4.reason or "")


def test_missing_symbol_is_unavailable_not_an_error(tmp_path: Path) -> None:
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, 0, "p", "n", "8@nosuch(%rip) 1@%al"))
    assert site.args[0].kind == "unavailable"
    assert "nosuch" in (site.args[0].reason or "")
    assert site.args[1].kind == "register"


def test_duplicate_local_symbol_is_ambiguous(tmp_path: Path) -> None:
    # libbpf/usdt issue #13: `static volatile char ti` in two translation units.
    syms = [Symbol("ti", DATA.vaddr + 0x20, size=1, bind=STB_LOCAL),
            Symbol("ti", DATA.vaddr + 0x40, size=1, bind=STB_LOCAL),
            Symbol("same", DATA.vaddr + 0x50, bind=STB_LOCAL),
            Symbol("same", DATA.vaddr + 0x50, bind=STB_LOCAL)]
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, 0, "p", "n", "-1@ti(%rip) 8@same(%rip)"),
                      symbols=syms)
    ti, same = site.args
    assert ti.kind == "unavailable"
    assert "ambiguous" in (ti.reason or "")
    assert hex(DATA.vaddr + 0x20) in (ti.reason or "")
    assert hex(DATA.vaddr + 0x40) in (ti.reason or "")
    # two entries at one address are the same object, not an ambiguity
    assert (same.kind, same.address) == ("rip_relative", DATA.vaddr + 0x50)


def test_resolve_symbol_directly(tmp_path: Path) -> None:
    syms = [Symbol("g", 0x9100), Symbol("l", 0x9110, bind=STB_LOCAL)]
    img = ElfImage(write(tmp_path, build_elf(notes=b"", symbols=syms)))
    assert img.resolve_symbol("g") == (0x9100, None)
    assert img.resolve_symbol("l") == (0x9110, None)
    addr, why = img.resolve_symbol("absent")
    assert addr is None and why and "absent" in why


# --- files apptrace must refuse -------------------------------------------------------

@pytest.mark.parametrize("kw, fragment", [
    (dict(e_type=ET_REL), "ET_REL"),
    (dict(e_type=ET_CORE), "ET_CORE"),
    (dict(machine=EM_AARCH64), "EM_AARCH64"),
    (dict(machine=EM_386), "EM_386"),
    (dict(little_endian=False), "big-endian"),
    (dict(is64=False, machine=EM_386), "EM_386"),
], ids=["ET_REL", "ET_CORE", "aarch64", "i386-machine-in-elf64", "big-endian", "elf32-i386"])
def test_wrong_kind_of_elf_is_an_elf_error_naming_the_path(tmp_path: Path, kw: dict,
                                                           fragment: str) -> None:
    big = kw.get("little_endian") is False
    small = kw.get("is64") is False
    notes = stapsdt_note(PC, 0, 0, "p", "n", little_endian=not big, is64=not small)
    path = write(tmp_path, build_elf(notes=notes, **kw))
    with pytest.raises(ElfError) as ei:
        read_probes(path)
    assert ei.value.path == path
    assert str(ei.value).startswith(path + ": ")
    assert fragment in str(ei.value)


def test_et_exec_is_accepted(tmp_path: Path) -> None:
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, 0, "p", "n"), e_type=ET_EXEC)
    assert site.file_offset == 0x1010


def test_elf32_class_is_rejected_even_with_x86_64_machine(tmp_path: Path) -> None:
    path = write(tmp_path, build_elf(notes=stapsdt_note(PC, 0, 0, "p", "n", is64=False),
                                     is64=False))
    with pytest.raises(ElfError) as ei:
        ElfImage(path)
    assert ei.value.path == path


@pytest.mark.parametrize("byte, value", [(4, 0), (4, 3), (5, 0), (5, 7)],
                         ids=["EI_CLASS=0", "EI_CLASS=3", "EI_DATA=0", "EI_DATA=7"])
def test_invalid_ident_bytes(tmp_path: Path, byte: int, value: int) -> None:
    data = bytearray(build_elf(notes=stapsdt_note(PC, 0, 0, "p", "n")))
    data[byte] = value
    path = write(tmp_path, bytes(data))
    with pytest.raises(ElfError) as ei:
        read_probes(path)
    assert ei.value.path == path


def test_non_elf_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"root:x:0:0:root:/root:/bin/sh\n", "passwd")
    with pytest.raises(ElfError, match="not an ELF file") as ei:
        read_probes(path)
    assert ei.value.path == path and path in str(ei.value)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"", "empty")
    with pytest.raises(ElfError) as ei:
        read_probes(path)
    assert ei.value.path == path and path in str(ei.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ElfError) as ei:
        read_probes(tmp_path)
    assert ei.value.path == str(tmp_path) and "directory" in str(ei.value)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.so")
    with pytest.raises(ElfError) as ei:
        read_probes(path)
    assert ei.value.path == path


def test_only_magic(tmp_path: Path) -> None:
    path = write(tmp_path, b"\x7fELF", "magic")
    with pytest.raises(ElfError) as ei:
        read_probes(path)
    assert ei.value.path == path


def test_no_stapsdt_section_is_no_probes_error(tmp_path: Path) -> None:
    path = write(tmp_path, build_elf(notes=None), "plain.so")
    with pytest.raises(NoProbesError) as ei:
        read_probes(path)
    assert str(ei.value) == (
        f"no USDT probes in {path}; was it built with sys/sdt.h or dtrace support?")
    assert ei.value.path == path


def test_stapsdt_notes_in_a_differently_named_section_do_not_count(tmp_path: Path) -> None:
    data = build_elf(notes=stapsdt_note(PC, 0, 0, "p", "n"), note_section_name=".note.other")
    with pytest.raises(NoProbesError):
        read_probes(write(tmp_path, data))


def test_empty_stapsdt_section_gives_no_sites(tmp_path: Path) -> None:
    assert sites_of(tmp_path, notes=b"") == []


# --- malformed notes: a precise ElfError with the note's index ---------------------------

GOOD = stapsdt_note(PC, 0, 0, "p", "good", "8@%rdi")
ADDRS = struct.pack("<QQQ", PC + 4, 0, 0)

MALFORMED = {
    "desc-too-short": (note(b"stapsdt\0", ADDRS[:20]), "too short"),
    "desc-only-addresses": (note(b"stapsdt\0", ADDRS), "too short"),
    "no-NULs": (note(b"stapsdt\0", ADDRS + b"provnameargsxyz"), "NUL"),
    "last-string-unterminated": (note(b"stapsdt\0", ADDRS + b"prov\0name\08@%rax"), "NUL"),
    "only-two-strings": (note(b"stapsdt\0", ADDRS + b"prov\0name\0"), "NUL"),
    "empty-provider": (note(b"stapsdt\0", ADDRS + b"\0name\0\0"), "empty"),
    "empty-name": (note(b"stapsdt\0", ADDRS + b"prov\0\0\0"), "empty"),
    "non-utf8-name": (note(b"stapsdt\0", ADDRS + b"prov\0\xff\xfe\0\0"), "UTF-8"),
    "wrong-note-type": (note(b"stapsdt\0", stapsdt_desc(PC, 0, 0, "p", "n", ""), 1), "type 1"),
    "namesz-past-section": (note(b"stapsdt\0", b"", namesz=0x1000, pad=False), "past the end"),
    "descsz-past-section": (note(b"stapsdt\0", stapsdt_desc(PC, 0, 0, "p", "n", ""),
                                 descsz=0x400), "past the end"),
    "pc-before-every-segment": (stapsdt_note(0x100, 0, 0, "p", "n"), "outside every"),
    "pc-in-data-segment": (stapsdt_note(DATA.vaddr + 4, 0, 0, "p", "n"),
                           "outside every executable segment"),
    "pc-huge": (stapsdt_note(2**64 - 1, 0, 0, "p", "n"), "outside every"),
    "semaphore-outside": (stapsdt_note(PC, 0, 0x7000_0000, "p", "n"), "semaphore"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_second_note_names_path_and_index(tmp_path: Path, name: str) -> None:
    bad, fragment = MALFORMED[name]
    path = write(tmp_path, build_elf(notes=GOOD + bad))
    with pytest.raises(ElfError) as ei:
        ElfImage(path).sites()
    err = ei.value
    assert err.path == path
    assert err.note_index == 1
    assert str(err).startswith(f"{path}, stapsdt note #1: ")
    assert fragment in str(err)


def test_trailing_garbage_after_last_note(tmp_path: Path) -> None:
    path = write(tmp_path, build_elf(notes=GOOD + b"\x01\x02\x03\x04"))
    with pytest.raises(ElfError) as ei:
        ElfImage(path).sites()
    assert ei.value.path == path and ei.value.note_index == 1


def test_zero_padding_after_last_note_is_fine(tmp_path: Path) -> None:
    sites = sites_of(tmp_path, notes=GOOD + b"\0" * 8)
    assert [s.name for s in sites] == ["good"]


def test_wrong_namesz_never_crashes(tmp_path: Path) -> None:
    # namesz 7 (no NUL) and 12 (runs into the descriptor): decoded or refused,
    # but only ever through ElfError.
    desc = stapsdt_desc(PC, 0, 0, "p", "n", "")
    for namesz in (0, 1, 7, 9, 12, 16):
        data = build_elf(notes=GOOD + note(b"stapsdt\0", desc, namesz=namesz, pad=False))
        path = write(tmp_path, data, f"ns{namesz}.so")
        try:
            sites = ElfImage(path).sites()
        except ElfError as err:
            assert err.path == path
        else:
            assert sites[0].name == "good"


# --- fuzzing -------------------------------------------------------------------------------

_FUZZ_DIR = tempfile.mkdtemp(prefix="apptrace-notes-fuzz-")
atexit.register(shutil.rmtree, _FUZZ_DIR, True)

_names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
_args = st.sampled_from(["", "8@%rdi", "-4@-8(%rbp) 8@$1", "8@x(%rip)", "1@%ah 4f@%xmm0"])
_one_note = st.builds(
    lambda off, sema, prov, name, args: stapsdt_note(PC + off, 0, sema, prov, name, args),
    st.integers(0, TEXT.size - 1), st.sampled_from([0, SEMA]), _names, _names, _args)
_sections = st.lists(_one_note, min_size=1, max_size=4).map(b"".join)


def _check(data: bytes, *, allow_no_probes: bool = False) -> None:
    fd, path = tempfile.mkstemp(dir=_FUZZ_DIR, suffix=".so")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            sites = ElfImage(path).sites()
        except ElfError as err:
            assert err.path == path and path in str(err)
            if err.note_index is not None:
                assert f"note #{err.note_index}" in str(err)
        except NoProbesError as err:
            assert allow_no_probes, f"section exists, yet NoProbesError: {err}"
            assert err.path == path
        else:
            for s in sites:
                assert isinstance(s, Site)
                assert s.provider and s.name
                assert TEXT.offset <= s.file_offset < TEXT.offset + TEXT.size
    finally:
        os.unlink(path)


_fuzz = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(section=_sections, edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                         max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10_000)))
def test_fuzz_mutated_note_section(section: bytes, edits: list[tuple[int, int]],
                                   cut: int | None) -> None:
    buf = bytearray(section)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    if cut is not None:
        del buf[cut % (len(buf) + 1):]
    _check(build_elf(notes=bytes(buf)))


@_fuzz
@given(section=st.binary(max_size=400))
def test_fuzz_random_note_section(section: bytes) -> None:
    _check(build_elf(notes=section))


@_fuzz
@given(section=_sections, field=st.sampled_from([0, 4, 8]),
       value=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)))
def test_fuzz_note_header_fields(section: bytes, field: int, value: int) -> None:
    buf = bytearray(section)
    struct.pack_into("<I", buf, field, value)   # namesz, descsz or type of the first note
    _check(build_elf(notes=bytes(buf)))


@_fuzz
@given(cut=st.integers(0, 10_000))
def test_fuzz_truncated_file(cut: int) -> None:
    data = build_elf(notes=GOOD + stapsdt_note(PC + 8, 0, SEMA, "p", "two", "8@%rax"),
                     symbols=[Symbol("x", DATA.vaddr)], base_addr=DATA.vaddr + 0x100)
    _check(data[: cut % (len(data) + 1)], allow_no_probes=True)


def test_truncated_file_concrete(tmp_path: Path) -> None:
    """Truncations inside the ELF or program headers must be ElfErrors (these work)."""
    data = build_elf(notes=GOOD)
    for cut in (0, 3, 4, 16, 40, 63, 64, 100, 119):
        path = write(tmp_path, data[:cut], f"cut{cut}")
        with pytest.raises(ElfError) as ei:
            ElfImage(path).sites()
        assert ei.value.path == path


def test_symbol_globals_resolve_for_stb_global(tmp_path: Path) -> None:
    syms = [Symbol("gv", DATA.vaddr + 0x60, bind=STB_GLOBAL)]
    [site] = sites_of(tmp_path, notes=stapsdt_note(PC, 0, 0, "p", "n", "8@gv-8(%rip)"),
                      symbols=syms)
    assert site.args[0].address == DATA.vaddr + 0x58


@pytest.mark.parametrize("path", ["/usr/bin/python3.11", "/bin/true"])
def test_addresses_and_functions_agree_with_pyelftools(path: str) -> None:
    """offset <-> vaddr through every PT_LOAD (its first byte in, the byte
    after its file part out) and the function symbols, checked against
    pyelftools on real binaries (mutation testing found these unchecked)."""
    from elftools.elf.elffile import ELFFile

    if not os.path.exists(path):
        missing(f"{path} is not on this machine (make setup installs it)")
    img = ElfImage(path)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        funcs: dict[str, int] = {}
        for secname in (".dynsym", ".symtab"):
            sec = elf.get_section_by_name(secname)
            for sym in sec.iter_symbols() if sec is not None else ():
                if sym["st_info"]["type"] in ("STT_FUNC", "STT_LOOS") and \
                        sym["st_shndx"] != "SHN_UNDEF":
                    funcs.setdefault(sym.name.split("@", 1)[0], sym["st_value"])
    assert len(loads) >= 2
    ends = {s["p_offset"] + s["p_filesz"] for s in loads}
    for s in loads:
        off, va, size = s["p_offset"], s["p_vaddr"], s["p_filesz"]
        assert img.offset_to_vaddr(off) == va
        assert img.offset_to_vaddr(off + size - 1) == va + size - 1
        starts = {t["p_offset"] for t in loads if t is not s}
        if off + size not in starts:
            assert img.offset_to_vaddr(off + size) in (None, *(
                t["p_vaddr"] + off + size - t["p_offset"] for t in loads
                if t["p_offset"] <= off + size < t["p_offset"] + t["p_filesz"]))
        want_exec = bool(s["p_flags"] & 1)
        assert img.vaddr_to_offset(va, executable=want_exec) == off
    assert max(ends) not in {s["p_offset"] for s in loads}
    assert img.offset_to_vaddr(max(ends)) is None
    got = img.functions()
    assert set(got) == {k for k in funcs if k} and all(got[k] == funcs[k] for k in got)
    if path.endswith("python3.11"):
        assert "PyObject_GetAttr" in got and "_PyEval_EvalFrameDefault" in got


# --- the section header table, byte by byte (mutation-testing survivors) -------

_E_SHOFF, _E_SHNUM, _E_SHSTRNDX = 0x28, 0x3C, 0x3E
_SH_SIZE, _SH_LINK, _SHDR = 0x20, 0x28, 64


def _layout(data: bytes) -> tuple[int, int, int]:
    """(e_shoff, e_shnum, e_shstrndx) of a little-endian ELF64 image."""
    return (struct.unpack_from("<Q", data, _E_SHOFF)[0],
            struct.unpack_from("<H", data, _E_SHNUM)[0],
            struct.unpack_from("<H", data, _E_SHSTRNDX)[0])


def _section_rows(tmp_path: Path, data: bytes, name: str = "s.so") -> list[tuple[str, int, int]]:
    with ElfImage(write(tmp_path, data, name)) as img:
        return [(s.name, s.number, s.offset) for s in img._section_table()]


def test_extended_section_numbering(tmp_path: Path) -> None:
    """e_shnum 0 and e_shstrndx SHN_XINDEX: the count is in section 0's
    sh_size and the name table's index in its sh_link (files with more than
    65279 sections use this)."""
    data = build_elf(notes=GOOD)
    plain = _section_rows(tmp_path, data, "plain.so")
    shoff, shnum, shstrndx = _layout(data)
    ext = bytearray(data)
    struct.pack_into("<H", ext, _E_SHNUM, 0)
    struct.pack_into("<H", ext, _E_SHSTRNDX, 0xFFFF)
    struct.pack_into("<Q", ext, shoff + _SH_SIZE, shnum)
    struct.pack_into("<I", ext, shoff + _SH_LINK, shstrndx)
    assert _section_rows(tmp_path, bytes(ext), "ext.so") == plain
    assert [n for n, *_ in plain][:3] == ["", ".text", ".data"]
    assert [i for _, i, _ in plain] == list(range(shnum))
    # A count that runs past the end of the file.
    struct.pack_into("<Q", ext, shoff + _SH_SIZE, shnum + 1)
    with pytest.raises(ElfError, match=": section headers run past the end of the file$"):
        _section_rows(tmp_path, bytes(ext), "long.so")


def test_section_name_table_index_bounds(tmp_path: Path) -> None:
    data = build_elf(notes=GOOD)
    _shoff, shnum, shstrndx = _layout(data)
    assert shstrndx == shnum - 1  # elfwriter puts .shstrtab last
    for index, ok in ((shnum, False), (0xFFFE, False), (0, True)):
        bad = bytearray(data)
        struct.pack_into("<H", bad, _E_SHSTRNDX, index)
        if ok:  # section 0 as the name table: no names, but a valid table
            assert {n for n, *_ in _section_rows(tmp_path, bytes(bad))} == {""}
        else:
            with pytest.raises(ElfError, match=": section name table index out of range$"):
                _section_rows(tmp_path, bytes(bad))


def test_section_names_at_the_edges_of_the_name_table(tmp_path: Path) -> None:
    """A name table ending exactly at the end of the file is read; one
    running past it gives no names; a name without its NUL runs to the
    table's end; bytes that are not UTF-8 are replaced, not fatal."""
    data = build_elf(notes=GOOD)
    shoff, shnum, shstrndx = _layout(data)
    at = shoff + shstrndx * _SHDR
    noff, nsize = struct.unpack_from("<QQ", data, at + 0x18)
    # Move the name table to the very end of the file, without its last NUL.
    names = bytearray(data[noff:noff + nsize])
    last = names.rindex(b"\0", 0, len(names) - 1) + 1  # start of the last name
    names = names[:-1]
    names[last] = 0xFF  # not UTF-8
    moved = bytearray(data) + names
    struct.pack_into("<QQ", moved, at + 0x18, len(data), len(names))
    got = [n for n, *_ in _section_rows(tmp_path, bytes(moved), "edge.so")]
    want = [n for n, *_ in _section_rows(tmp_path, data, "orig.so")]
    # Only the name stored last changed: its first byte replaced, read to the end.
    [(new, old)] = [(g, w) for g, w in zip(got, want) if g != w]
    assert len(got) == len(want) and len(old) > 1 and new == "\ufffd" + old[1:]
    # One byte more than the file holds: no names at all.
    struct.pack_into("<Q", moved, at + 0x20, len(names) + 1)
    assert {n for n, *_ in _section_rows(tmp_path, bytes(moved), "past.so")} == {""}


def test_empty_and_one_byte_files(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match=": empty file, not an ELF file$"):
        ElfImage(write(tmp_path, b"", "empty"))
    with pytest.raises(ElfError) as one:
        ElfImage(write(tmp_path, b"\x7f", "one"))
    assert str(one.value).endswith(": not an ELF file")


def test_unopenable_path_says_why(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match=": cannot open: embedded null byte$"):
        ElfImage(str(tmp_path) + "/a\0b")


_TOP = 0xFFFF_FFFF_FFFF_FFF0  # above 2**63: read as unsigned


@pytest.mark.parametrize("desc, message", [
    (stapsdt_desc(PC, 0, 0, "p", "n", "")[:26], "descriptor of 26 bytes is too short"),
    (struct.pack("<QQQ", PC, 0, 0) + b"\0\0\0", "empty provider or probe name"),
    (struct.pack("<QQQ", PC, 0, 0) + b"p\0n\0", "provider, name and arguments are not three"
                                                " NUL-terminated strings"),
    (struct.pack("<QQQ", PC, 0, 0) + b"p\0n\0a", "provider, name and arguments are not three"
                                                 " NUL-terminated strings"),
    (stapsdt_desc(PC, 0, 0, b"\xff", "n", ""), "provider or name is not valid UTF-8"),
    (stapsdt_desc(_TOP, 0, 0, "p", "n", ""),
     f"probe p:n at {_TOP:#x} is outside every executable segment"),
    (stapsdt_desc(PC, 0, _TOP, "p", "n", ""),
     f"semaphore of p:n at {_TOP:#x} is outside every segment"),
], ids=["short", "empty-names", "two-strings", "unterminated", "utf8", "pc", "semaphore"])
def test_malformed_note_messages(tmp_path: Path, desc: bytes, message: str) -> None:
    """Each way a stapsdt descriptor can be wrong, by its exact message and note."""
    path = write(tmp_path, build_elf(notes=GOOD + note(b"stapsdt\0", desc)))
    with pytest.raises(ElfError) as ei:
        ElfImage(path).sites()
    assert str(ei.value) == f"{path}, stapsdt note #1: {message}"
    assert ei.value.note_index == 1 and ei.value.path == path


def test_shortest_descriptor_is_read(tmp_path: Path) -> None:
    """Three addresses and "p", "n", "" are read (27 bytes, the least the
    length check lets through, is the empty-names case above)."""
    desc = struct.pack("<QQQ", PC, 0, 0) + b"p\0n\0\0"
    [good, site] = ElfImage(write(tmp_path, build_elf(notes=GOOD + note(b"stapsdt\0", desc)))
                            ).sites()
    assert (site.provider, site.name, site.args) == ("p", "n", ())


_E_PHOFF, _E_PHNUM = 0x20, 0x38


def test_header_tables_ending_at_the_end_of_the_file(tmp_path: Path) -> None:
    """A header table that ends on the file's last byte is inside it; one byte
    less of file, or a table starting at its end, is not."""
    data = build_elf(notes=GOOD)
    shoff, shnum, _ = _layout(data)
    assert shoff + shnum * _SHDR == len(data)  # elfwriter puts them last
    assert len(ElfImage(write(tmp_path, data, "whole.so")).sites()) == 1
    cut = data[:-1]
    with pytest.raises(ElfError, match=f": section headers \\(offset {shoff:#x}\\) run past"):
        ElfImage(write(tmp_path, cut, "cut.so"))
    # No sections counted, yet a table offset one entry short of the end.
    short = bytearray(data[:shoff + _SHDR // 2])
    struct.pack_into("<H", short, _E_SHNUM, 0)
    with pytest.raises(ElfError, match="section headers .* run past the end of the file$"):
        ElfImage(write(tmp_path, bytes(short), "short.so"))
    at_end = bytearray(data)
    struct.pack_into("<Q", at_end, _E_SHOFF, len(data))
    with pytest.raises(ElfError, match="section headers .* run past the end of the file$"):
        ElfImage(write(tmp_path, bytes(at_end), "at_end.so"))

    # The program header table moved to the very end of the file.
    phoff, phnum = struct.unpack_from("<Q", data, _E_PHOFF)[0], \
        struct.unpack_from("<H", data, _E_PHNUM)[0]
    table = data[phoff:phoff + phnum * 56]
    moved = bytearray(data) + table
    struct.pack_into("<Q", moved, _E_PHOFF, len(data))
    with ElfImage(write(tmp_path, bytes(moved), "ph_end.so")) as img:
        assert len(img.sites()) == 1 and img.loads
    for name, end in (("ph_cut.so", len(moved) - 1), ("ph_at_end.so", None)):
        bad = bytearray(moved[:end])
        if end is None:
            struct.pack_into("<Q", bad, _E_PHOFF, len(bad))
        with pytest.raises(ElfError, match=r": program headers \(offset 0x[0-9a-f]+, 2 x 56"
                                           r" bytes\) run past the end of the file$"):
            ElfImage(write(tmp_path, bytes(bad), name))


def test_versioned_function_names(tmp_path: Path) -> None:
    """`name@VER` and `name@@VER` symbols count under their bare name; the
    first definition of a name wins."""
    from elfwriter import STT_FUNC, STT_OBJECT

    syms = [Symbol("plain", TEXT.vaddr + 0x10, type=STT_FUNC),
            Symbol("old@V1", TEXT.vaddr + 0x20, type=STT_FUNC),
            Symbol("new@@V2", TEXT.vaddr + 0x30, type=STT_FUNC),
            Symbol("old@@V2", TEXT.vaddr + 0x40, type=STT_FUNC),
            Symbol("data_not_func", DATA.vaddr, type=STT_OBJECT)]
    with ElfImage(write(tmp_path, build_elf(notes=GOOD, symbols=syms))) as img:
        assert img.functions() == {"plain": TEXT.vaddr + 0x10, "old": TEXT.vaddr + 0x20,
                                   "new": TEXT.vaddr + 0x30}


def test_note_headers_at_the_end_of_the_section(tmp_path: Path) -> None:
    """A note whose last byte is the section's last byte is read; fewer than
    12 bytes left over are trailing bytes (zeros are padding); each note
    counts for the index errors name."""
    two = GOOD + stapsdt_note(PC + 8, 0, 0, "p", "two", "")
    assert [s.name for s in sites_of(tmp_path, notes=two)] == ["good", "two"]
    assert [s.name for s in sites_of(tmp_path, notes=two + b"\0" * 11)] == ["good", "two"]
    # A last note of just its 12-byte header (empty name and descriptor).
    assert [s.name for s in sites_of(tmp_path, notes=two + note(b"", b""))] == ["good", "two"]
    with pytest.raises(ElfError) as ei:
        sites_of(tmp_path, notes=two + b"\0" * 10 + b"\1")
    assert str(ei.value).endswith("stapsdt note #2: trailing bytes after the last note")
    # Odd name and descriptor sizes: both padded to 4 bytes.
    for name in (b"other\0", b"abcd\0", b"abcdefg"):
        odd = note(name, b"123") + GOOD
        assert [s.name for s in sites_of(tmp_path, notes=odd)] == ["good"]
    with pytest.raises(ElfError, match="trailing bytes"):
        sites_of(tmp_path, notes=two + b"XX")  # not padding, though made of one byte
    with pytest.raises(ElfError) as ei:
        sites_of(tmp_path, notes=two + stapsdt_note(PC, 0, 0, "p", "x")[:-4])
    assert ei.value.note_index == 2 and "runs past the end of its section" in str(ei.value)


def _patched(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


_IMG = build_elf(notes=GOOD)


@pytest.mark.parametrize("data, message", [
    (b"\x7fELF\x02", "malformed ELF header (EI_CLASS 0, EI_DATA 0, 5 bytes)"),
    (_IMG[:6], "malformed ELF header (EI_CLASS 2, EI_DATA 1, 6 bytes)"),
    (_IMG[:63], "malformed ELF header (EI_CLASS 2, EI_DATA 1, 63 bytes)"),
    (_patched(_IMG, 4, "B", 3), f"malformed ELF header (EI_CLASS 3, EI_DATA 1, {len(_IMG)} bytes)"),
    (_patched(_IMG, 5, "B", 0), f"malformed ELF header (EI_CLASS 2, EI_DATA 0, {len(_IMG)} bytes)"),
    (_patched(_IMG, 16, "<H", ET_REL), "ELF type ET_REL cannot be traced"
                                      " (need an executable or shared object)"),
    (_patched(_IMG, 16, "<H", 0xFE00), "ELF type 0xfe00 cannot be traced"
                                      " (need an executable or shared object)"),
    (_patched(_IMG, 18, "<H", EM_AARCH64), "machine EM_AARCH64 is not supported (x86-64 only)"),
    (_patched(_IMG, 18, "<H", 0xBEEF), "machine 48879 is not supported (x86-64 only)"),
    (_patched(_patched(_IMG, 5, "B", 2), 16, ">H", 3), "big-endian ELF; this host is"
                                                      " little-endian"),
    (build_elf(notes=GOOD, is64=False), "32-bit ELF; this host traces 64-bit x86-64 objects"
                                        " only"),
], ids=["5-bytes", "6-bytes", "short-header", "class", "data", "rel", "unknown-type",
        "aarch64", "unknown-machine", "big-endian", "32-bit"])
def test_header_rejections_say_exactly_why(tmp_path: Path, data: bytes, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ElfError) as ei:
        ElfImage(path)
    assert str(ei.value) == f"{path}: {message}"
    assert ei.value.path == path


def test_header_only_files_at_the_size_limits(tmp_path: Path) -> None:
    """A 64-byte ELF64 file (no segments, no sections) is a readable header
    with no probes; a 52-byte ELF32 one gets the 32-bit message, not
    "malformed"; one byte less of either is malformed."""
    hdr = bytearray(_IMG[:64])
    struct.pack_into("<QQ", hdr, 0x20, 0, 0)      # e_phoff, e_shoff
    struct.pack_into("<HHHHHH", hdr, 0x34, 64, 56, 0, 64, 0, 0)  # no phdrs/shdrs
    with ElfImage(write(tmp_path, bytes(hdr), "hdr64")) as img:
        assert img.loads == [] and img.section(".note.stapsdt") is None
    with pytest.raises(ElfError, match=r": malformed ELF header \(EI_CLASS 2, EI_DATA 1, 63"):
        ElfImage(write(tmp_path, bytes(hdr[:63]), "hdr63"))
    elf32 = build_elf(notes=GOOD, is64=False)[:52]
    with pytest.raises(ElfError, match=": 32-bit ELF; "):
        ElfImage(write(tmp_path, elf32, "hdr52"))
    with pytest.raises(ElfError, match=r": malformed ELF header \(EI_CLASS 1, EI_DATA 1, 51"):
        ElfImage(write(tmp_path, elf32[:51], "hdr51"))


def _with_symbols(*names: str) -> bytes:
    return build_elf(notes=GOOD, symbols=[Symbol(n, DATA.vaddr + 8 * i)
                                          for i, n in enumerate(names)])


def _shdr_at(data: bytes, tmp_path: Path, name: str) -> int:
    """File offset of section ``name``'s header."""
    with ElfImage(write(tmp_path, data, "find.so")) as img:
        sec = img.section(name)
        assert sec is not None
        return _layout(data)[0] + sec.number * _SHDR


def _symbols(tmp_path: Path, data: bytes, name: str = "sym.so") -> dict[str, int]:
    with ElfImage(write(tmp_path, data, name)) as img:
        return {n: img.resolve_symbol(n)[0] or 0 for n in ("a", "b", "c\ufffd")}


def test_symbol_tables_at_their_edges(tmp_path: Path) -> None:
    data = _with_symbols("a", "b", "cQ").replace(b"cQ\0", b"c\xff\0")  # not UTF-8
    want = {"a": DATA.vaddr, "b": DATA.vaddr + 8, "c\ufffd": DATA.vaddr + 16}
    assert _symbols(tmp_path, data) == want
    at = _shdr_at(data, tmp_path, ".symtab")
    size = struct.unpack_from("<Q", data, at + _SH_SIZE)[0]
    # A partial entry at the end of the table is left out, not misread.
    assert _symbols(tmp_path, _patched(data, at + _SH_SIZE, "<Q", size + 5), "part.so") == want
    # The same table named .dynsym (a stripped binary): read all the same.
    dyn = data.replace(b".symtab\0", b".dynsym\0")
    assert _symbols(tmp_path, dyn, "dyn.so") == want
    # A table one byte past the end of the file.
    off = struct.unpack_from("<Q", data, at + 0x18)[0]
    past = _patched(data, at + _SH_SIZE, "<Q", len(data) - off + 1)
    with ElfImage(write(tmp_path, past, "past.so")) as img:
        with pytest.raises(ElfError, match=": section .symtab extends past the end of the file$"):
            img.resolve_symbol("a")
    # Linked to a section that does not exist; linked to section 0 (no names).
    _, shnum, _ = _layout(data)
    for link, ok in ((shnum, False), (0, True)):
        bad = _patched(data, at + _SH_LINK, "<I", link)
        with ElfImage(write(tmp_path, bad, f"link{link}.so")) as img:
            if ok:
                assert img.resolve_symbol("a")[0] is None
            else:
                with pytest.raises(ElfError, match=": section .symtab links to a missing"
                                                   " section$"):
                    img.resolve_symbol("a")
