"""Corrupt ELF and program headers: every failure is an ElfError, never a crash.

tests/unit/test_notes.py fuzzes the stapsdt notes; this module fuzzes what
comes before them (the ELF header and the program header table), where
offsets and counts pyelftools follows blindly used to raise OverflowError,
and the kinds of path a user can give instead of a file (FIFOs, devices,
directories), which used to block or raise OSError.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from elfwriter import DATA, TEXT, Symbol, build_elf, stapsdt_note
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apptrace.errors import ApptraceError, ElfError, ElfNotFoundError, NoProbesError
from apptrace.usdt import list_probes, read_probes
from apptrace.usdt.notes import ElfImage

PC = TEXT.vaddr + 0x10
NOTES = (stapsdt_note(PC, 0, DATA.vaddr + 8, "p", "one", "8@%rdi -4@x+4(%rip)")
         + stapsdt_note(PC + 4, 0, 0, "p", "two", "8@%rax"))
IMAGE = build_elf(notes=NOTES, symbols=[Symbol("x", DATA.vaddr + 0x20), Symbol(
    "fx_func", TEXT.vaddr + 0x40, type=2, shndx=1)])

# (offset, size) of every Elf64_Ehdr field after e_ident, and of every Elf64_Phdr field.
EHDR_FIELDS = [(16, 2), (18, 2), (20, 4), (24, 8), (32, 8), (40, 8), (48, 4), (52, 2),
               (54, 2), (56, 2), (58, 2), (60, 2), (62, 2)]
PHDR_FIELDS = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8)]
PHDRS = [64 + 56 * i + off for i in range(2) for off, _ in PHDR_FIELDS]
PHDR_SIZES = [size for _ in range(2) for _, size in PHDR_FIELDS]

_DIR = tempfile.mkdtemp(prefix="apptrace-elf-fuzz-")
atexit.register(shutil.rmtree, _DIR, True)


def _exercise(data: bytes) -> None:
    """Read everything USDT and uprobe resolution read; only our errors may escape."""
    fd, path = tempfile.mkstemp(dir=_DIR, suffix=".so")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            with ElfImage(path) as img:
                for site in img.sites():
                    assert img.vaddr_to_offset(site.address, executable=True) == \
                        site.file_offset
                img.functions()
                img.resolve_symbol("x")
                img.offset_to_vaddr(TEXT.offset + 0x10)
        except (ElfError, NoProbesError) as err:
            assert path in str(err)
    finally:
        os.unlink(path)


def _values(size: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    edges = [0, 1, 2, 56, 64, len(IMAGE) - 1, len(IMAGE), 1 << (8 * size - 1), top - 1, top]
    return st.one_of(st.sampled_from([v & top for v in edges]), st.integers(0, top))


_fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _put(buf: bytearray, off: int, size: int, value: int) -> None:
    buf[off:off + size] = value.to_bytes(size, "little")


@_fuzz
@given(data=st.data(), picks=st.lists(st.integers(0, len(EHDR_FIELDS) - 1), min_size=1,
                                      max_size=3))
def test_fuzz_elf_header_fields(data: st.DataObject, picks: list[int]) -> None:
    buf = bytearray(IMAGE)
    for i in picks:
        off, size = EHDR_FIELDS[i]
        _put(buf, off, size, data.draw(_values(size)))
    _exercise(bytes(buf))


@_fuzz
@given(data=st.data(), picks=st.lists(st.integers(0, len(PHDRS) - 1), min_size=1,
                                      max_size=4))
def test_fuzz_program_header_fields(data: st.DataObject, picks: list[int]) -> None:
    buf = bytearray(IMAGE)
    for i in picks:
        _put(buf, PHDRS[i], PHDR_SIZES[i], data.draw(_values(PHDR_SIZES[i])))
    _exercise(bytes(buf))


@_fuzz
@given(edits=st.lists(st.tuples(st.integers(4, 64 + 2 * 56 - 1), st.integers(0, 255)),
                      min_size=1, max_size=12))
def test_fuzz_header_bytes(edits: list[tuple[int, int]]) -> None:
    buf = bytearray(IMAGE)
    for pos, val in edits:
        buf[pos] = val
    _exercise(bytes(buf))


@pytest.mark.parametrize("field, value", [
    ((32, 8), 1 << 63),          # e_phoff with its top bit set: was OverflowError
    ((32, 8), (1 << 64) - 1),
    ((40, 8), 1 << 63),          # e_shoff
    ((56, 2), 0xFFFF),           # e_phnum far past the file
    ((54, 2), 0),                # e_phentsize 0
    ((54, 2), 0xFFFF),
    ((60, 2), 0xFFFF),           # e_shnum
])
def test_header_offsets_past_the_file_are_elf_errors(tmp_path: Path,
                                                     field: tuple[int, int],
                                                     value: int) -> None:
    buf = bytearray(IMAGE)
    _put(buf, *field, value)
    path = tmp_path / "bad.so"
    path.write_bytes(bytes(buf))
    with pytest.raises(ElfError) as info:
        with ElfImage(str(path)) as img:
            img.sites()
    assert str(path) in str(info.value)


@pytest.mark.parametrize("off", [8, 16, 32, 40, 48])  # p_offset, p_vaddr, p_filesz...
def test_program_header_with_top_bit_values(tmp_path: Path, off: int) -> None:
    buf = bytearray(IMAGE)
    _put(buf, 64 + off, 8, 1 << 63)
    path = tmp_path / "bad.so"
    path.write_bytes(bytes(buf))
    try:
        read_probes(path)
    except (ElfError, NoProbesError):
        pass


# --- what is not a regular file ---------------------------------------------------------

def _fifo(tmp_path: Path) -> str:
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    return path


def _no_block(fn, *args) -> BaseException:  # type: ignore[no-untyped-def]
    """Run fn on a thread; it must raise (not block) within 5 s."""
    box: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            box.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), f"{fn.__name__}{args} blocked"
    assert box, f"{fn.__name__}{args} did not raise"
    return box[0]


@pytest.mark.parametrize("make, kind", [
    (_fifo, "a FIFO"),
    (lambda p: "/dev/null", "a character device"),
    (lambda p: "/dev/zero", "a character device"),
    (lambda p: str(p), "a directory"),
])
def test_only_regular_files_are_read(tmp_path: Path, make, kind: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    for fn, args in ((read_probes, (path,)), (ElfImage, (path,)), (list_probes, ([path],))):
        err = _no_block(fn, *args)
        assert isinstance(err, ElfError), repr(err)
        assert f"is {kind}, not a regular file" in str(err)


def test_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        read_probes(tmp_path / "missing")
    assert isinstance(info.value, ElfNotFoundError) and isinstance(info.value, ApptraceError)


def test_non_utf8_and_nul_paths(tmp_path: Path) -> None:
    odd = os.fsdecode(bytes(tmp_path) + b"/bin\xff\xfe")
    with open(odd, "wb") as f:
        f.write(IMAGE)
    assert [p.name for p in read_probes(odd)] == ["one", "two"]
    with pytest.raises(ElfError):
        read_probes(str(tmp_path) + "/a\0b")
