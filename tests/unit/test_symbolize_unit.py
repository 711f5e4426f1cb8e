"""apptrace.symbolize against real binaries compiled here (no root, no mocks).

Line numbers are found by searching the source text for ``MARK:`` comments,
so editing the programs below cannot silently break the expectations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from helpers import missing, require_symbolizer

from apptrace.errors import SymbolizerError
from apptrace.symbolize import StackFrame, Symbolizer, symbolizer_available

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / ".build" / "blazesym" / "include" / "blazesym.h"

C_SOURCE = r"""
#include <stdio.h>

static inline __attribute__((always_inline)) int bz_leaf(int x) {
    int y = x * 3;                      /* MARK:leaf_body */
    return y + 1;                       /* MARK:leaf_return */
}

__attribute__((noinline)) int bz_middle(int x) {   /* MARK:middle_def */
    int r = bz_leaf(x);                 /* MARK:middle_call */
    return r + 2;
}

__attribute__((noinline)) int bz_outer(int x) {    /* MARK:outer_def */
    int v = bz_middle(x + 1);           /* MARK:outer_call */
    return v;
}                                       /* MARK:outer_end */

int main(int argc, char **argv) {
    (void)argv;
    printf("%d\n", bz_outer(argc));
    return 0;
}
"""

CXX_SOURCE = r"""
namespace ns {
struct Klass {
    int base;
    int method(int x);
};

__attribute__((noinline)) int Klass::method(int x) {   // MARK:method_def
    return base + x;
}
}  // namespace ns

int main(int argc, char **) {
    ns::Klass k{argc};
    return k.method(argc) == 42;
}
"""


def marker_line(source: str, mark: str) -> int:
    """1-based line of the ``MARK:<mark>`` comment in ``source``."""
    pattern = re.compile(rf"MARK:{re.escape(mark)}\b")
    for number, text in enumerate(source.splitlines(), start=1):
        if pattern.search(text):
            return number
    raise AssertionError(f"marker {mark} not in source")


def symbols(path: Path) -> dict[str, tuple[int, int]]:
    """Function name -> (st_value, st_size) from .symtab."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        table = elf.get_section_by_name(".symtab")
        assert isinstance(table, SymbolTableSection), "test binary lost its .symtab"
        return {
            s.name: (s["st_value"], s["st_size"])
            for s in table.iter_symbols()
            if s["st_info"]["type"] == "STT_FUNC" and s["st_value"]
        }


def file_offset(path: Path, vaddr: int) -> int:
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and \
                    seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise AssertionError(f"{vaddr:#x} not in a PT_LOAD segment")


def compile_program(tmp: Path, source: str, name: str, compiler: str) -> Path:
    if shutil.which(compiler) is None:
        missing(f"{compiler} is not installed")
    ext = ".cc" if compiler == "g++" else ".c"
    src = tmp / f"{name}{ext}"
    src.write_text(source)
    out = tmp / name
    subprocess.run([compiler, "-g", "-O0", "-fno-omit-frame-pointer", str(src), "-o", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def c_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_symbolizer()
    return compile_program(tmp_path_factory.mktemp("bzc"), C_SOURCE, "bzprog", "gcc")


@pytest.fixture(scope="module")
def cxx_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_symbolizer()
    return compile_program(tmp_path_factory.mktemp("bzcxx"), CXX_SOURCE, "bzcxx", "g++")


@pytest.fixture(scope="module")
def symz() -> Iterator[Symbolizer]:
    require_symbolizer()
    with Symbolizer() as s:
        yield s


def whole_function(symz: Symbolizer, prog: Path, name: str) -> list[list[StackFrame]]:
    start, size = symbols(prog)[name]
    assert size > 0
    return symz.symbolize_elf(str(prog), range(start, start + size))


# --------------------------------------------------------------------------


def test_function_entry_name_file_line(symz: Symbolizer, c_prog: Path) -> None:
    syms = symbols(c_prog)
    groups = symz.symbolize_elf(str(c_prog), [syms["bz_middle"][0], syms["bz_outer"][0]])
    assert len(groups) == 2
    for group, func, mark in ((groups[0], "bz_middle", "middle_def"),
                              (groups[1], "bz_outer", "outer_def")):
        assert len(group) == 1
        frame = group[0]
        assert frame.symbol == func
        assert frame.offset == 0
        assert frame.addr == syms[func][0]
        assert not frame.inlined
        assert frame.file is not None and os.path.basename(frame.file) == "bzprog.c"
        assert os.path.isabs(frame.file), "dir and file should be joined"
        assert frame.line == marker_line(C_SOURCE, mark)
        assert frame.module == str(c_prog)
        assert frame.reason is None


def test_offsets_and_lines_inside_function(symz: Symbolizer, c_prog: Path) -> None:
    start, size = symbols(c_prog)["bz_outer"]
    groups = whole_function(symz, c_prog, "bz_outer")
    assert [g[0].offset for g in groups] == list(range(size))
    assert {g[0].symbol for g in groups} == {"bz_outer"}
    lines = {g[0].line for g in groups}
    assert marker_line(C_SOURCE, "outer_call") in lines
    assert min(lines) == marker_line(C_SOURCE, "outer_def")  # type: ignore[type-var]
    assert max(lines) == marker_line(C_SOURCE, "outer_end")  # type: ignore[type-var]


def test_inlined_frames_innermost_first(symz: Symbolizer, c_prog: Path) -> None:
    groups = whole_function(symz, c_prog, "bz_middle")
    inlined = [g for g in groups if len(g) > 1]
    assert inlined, "always_inline bz_leaf produced no inlined frames"
    leaf_lines = {marker_line(C_SOURCE, "leaf_body"), marker_line(C_SOURCE, "leaf_return")}
    seen_leaf_lines = set()
    for group in inlined:
        assert len(group) == 2
        inner, outer = group
        assert (inner.symbol, inner.inlined) == ("bz_leaf", True)
        assert (outer.symbol, outer.inlined) == ("bz_middle", False)
        assert inner.addr == outer.addr
        assert inner.offset == 0 and outer.offset > 0
        assert inner.file is not None and os.path.basename(inner.file) == "bzprog.c"
        assert inner.line in leaf_lines
        seen_leaf_lines.add(inner.line)
        # The outer frame shows where the inlined call sits in bz_middle.
        assert outer.line == marker_line(C_SOURCE, "middle_call")
        assert inner.module == outer.module == str(c_prog)
    assert seen_leaf_lines == leaf_lines
    # Outside the inlined range there is a single, non-inlined frame.
    assert all(not g[0].inlined for g in groups if len(g) == 1)


def test_inlined_fns_off(c_prog: Path) -> None:
    with Symbolizer(inlined_fns=False) as s:
        start, size = symbols(c_prog)["bz_middle"]
        groups = s.symbolize_elf(str(c_prog), range(start, start + size))
    assert all(len(g) == 1 and g[0].symbol == "bz_middle" for g in groups)


def test_code_info_off_gives_names_only(c_prog: Path) -> None:
    start, size = symbols(c_prog)["bz_middle"]
    with Symbolizer(code_info=False) as s:
        groups = s.symbolize_elf(str(c_prog), [start, start + size - 1])
    for g in groups:
        assert len(g) == 1
        assert g[0].symbol == "bz_middle"
        assert g[0].file is None and g[0].line is None


def test_cxx_demangled(symz: Symbolizer, cxx_prog: Path) -> None:
    start, _ = symbols(cxx_prog)["_ZN2ns5Klass6methodEi"]
    [[frame]] = symz.symbolize_elf(str(cxx_prog), [start])
    assert frame.symbol == "ns::Klass::method(int)"
    assert frame.file is not None and os.path.basename(frame.file) == "bzcxx.cc"
    assert frame.line == marker_line(CXX_SOURCE, "method_def")


def test_cxx_mangled_when_demangle_off(cxx_prog: Path) -> None:
    start, _ = symbols(cxx_prog)["_ZN2ns5Klass6methodEi"]
    with Symbolizer(demangle=False) as s:
        [[frame]] = s.symbolize_elf(str(cxx_prog), [start])
    assert frame.symbol == "_ZN2ns5Klass6methodEi"


def test_file_offsets_match_virt_offsets(symz: Symbolizer, c_prog: Path) -> None:
    syms = symbols(c_prog)
    vaddrs = [syms["bz_middle"][0] + 3, syms["bz_outer"][0] + 5, syms["main"][0]]
    offsets = [file_offset(c_prog, v) for v in vaddrs]
    by_vaddr = symz.symbolize_elf(str(c_prog), vaddrs)
    by_offset = symz.symbolize_elf_file_offsets(str(c_prog), offsets)
    assert [[(f.symbol, f.line, f.offset) for f in g] for g in by_offset] == \
        [[(f.symbol, f.line, f.offset) for f in g] for g in by_vaddr]
    assert [g[-1].addr for g in by_offset] == offsets


def test_unknown_address_yields_reason(symz: Symbolizer, c_prog: Path) -> None:
    syms = symbols(c_prog)
    # Below the first section: nothing can claim these. (Past the end of the
    # image blazesym would report the sizeless linker symbol `_end`.)
    groups = symz.symbolize_elf(str(c_prog), [0x10, syms["main"][0], 0x18])
    assert [len(g) for g in groups] == [1, 1, 1]
    for g in (groups[0], groups[2]):
        frame = g[0]
        assert frame.symbol is None and frame.file is None and frame.line is None
        assert frame.reason, "an unsymbolized frame should say why"
        assert frame.to_json()["reason"] == frame.reason
    assert groups[1][0].symbol == "main"


def test_empty_input(symz: Symbolizer, c_prog: Path) -> None:
    assert symz.symbolize_elf(str(c_prog), []) == []
    assert symz.symbolize_process(os.getpid(), []) == []
    assert symz.symbolize_stack(os.getpid(), []) == []


def test_repeated_addresses(symz: Symbolizer, c_prog: Path) -> None:
    syms = symbols(c_prog)
    a, b = syms["bz_middle"][0], syms["bz_outer"][0]
    groups = symz.symbolize_elf(str(c_prog), [a, b, a, a])
    assert [g[0].symbol for g in groups] == ["bz_middle", "bz_outer", "bz_middle", "bz_middle"]
    # Repeats share one immutable result (the cache hands out the same tuple).
    assert groups[0] == groups[2] and isinstance(groups[0], tuple)


def test_bad_addresses(symz: Symbolizer, c_prog: Path) -> None:
    for bad in ([-1], [1 << 64], ["0x10"]):
        with pytest.raises(SymbolizerError):
            symz.symbolize_elf(str(c_prog), bad)  # type: ignore[arg-type]


def test_auto_reload_sees_rebuilt_file(tmp_path: Path) -> None:
    """With auto_reload a binary rebuilt at the same path is re-read."""
    require_symbolizer()
    first = compile_program(tmp_path, C_SOURCE, "prog", "gcc")
    start = symbols(first)["bz_outer"][0]
    with Symbolizer(auto_reload=True) as s:
        [[before]] = s.symbolize_elf(str(first), [start])
        assert before.symbol == "bz_outer"
        renamed = C_SOURCE.replace("bz_outer", "bz_renamed")
        (tmp_path / "v2").mkdir()
        rebuilt = compile_program(tmp_path / "v2", renamed, "prog", "gcc")
        os.replace(rebuilt, first)
        [[after]] = s.symbolize_elf(str(first), [symbols(first)["bz_renamed"][0]])
    assert after.symbol == "bz_renamed"


def test_to_json_keys(symz: Symbolizer, c_prog: Path) -> None:
    [[frame]] = symz.symbolize_elf(str(c_prog), [symbols(c_prog)["main"][0]])
    d = frame.to_json()
    assert set(d) == {"addr", "symbol", "offset", "file", "line", "inlined", "module"}
    assert d["symbol"] == "main" and d["inlined"] is False
    assert "main" in str(frame)


def test_debug_link_found_through_debug_dirs(tmp_path: Path, c_prog: Path) -> None:
    """A stripped binary gets file/line back from a .debug file in debug_dirs."""
    if shutil.which("objcopy") is None:
        missing("objcopy is not installed")
    bindir, dbgdir = tmp_path / "bin", tmp_path / "dbg"
    bindir.mkdir()
    dbgdir.mkdir()
    stripped = bindir / "bzprog"
    debug = dbgdir / "bzprog.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(c_prog), str(debug)], check=True)
    subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={debug}",
                    str(c_prog), str(stripped)], check=True)
    start = symbols(c_prog)["bz_outer"][0]
    with Symbolizer() as plain:
        [[frame]] = plain.symbolize_elf(str(stripped), [start])
    assert frame.symbol == "bz_outer" and frame.file is None
    with Symbolizer(debug_dirs=[str(dbgdir)]) as s:
        [[frame]] = s.symbolize_elf(str(stripped), [start])
    assert frame.symbol == "bz_outer"
    assert frame.line == marker_line(C_SOURCE, "outer_def")


def test_invalid_path_raises_blazesym_error(symz: Symbolizer, tmp_path: Path) -> None:
    with pytest.raises(SymbolizerError) as info:
        symz.symbolize_elf(str(tmp_path / "no-such-binary"), [0x1000])
    assert str(info.value).startswith("blazesym: ")
    assert "not found" in str(info.value)
    assert info.value.code == -2
    notelf = tmp_path / "not-elf"
    notelf.write_text("hello\n")
    with pytest.raises(SymbolizerError) as info:
        symz.symbolize_elf(str(notelf), [0x1000])
    assert info.value.code is not None and info.value.code < 0


def test_missing_library_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APPTRACE_BLAZESYM", str(tmp_path / "libblazesym_c.so"))
    with pytest.raises(SymbolizerError) as info:
        Symbolizer()
    assert "make blazesym" in (info.value.hint or "")
    ok, detail = symbolizer_available()
    assert not ok and "make blazesym" in detail


def test_unloadable_library_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "libblazesym_c.so"
    bogus.write_bytes(b"not a shared object")
    monkeypatch.setenv("APPTRACE_BLAZESYM", str(bogus))
    with pytest.raises(SymbolizerError) as info:
        Symbolizer()
    assert "make blazesym" in (info.value.hint or "")


def test_symbolizer_available() -> None:
    require_symbolizer()
    ok, detail = symbolizer_available()
    assert ok, detail
    assert "libblazesym_c" in detail


def test_closed_symbolizer(c_prog: Path) -> None:
    s = Symbolizer()
    with s:
        pass
    s.close()  # twice is fine
    with pytest.raises(SymbolizerError):
        s.symbolize_elf(str(c_prog), [0x1000])


def test_threads_share_one_symbolizer(c_prog: Path) -> None:
    """Four threads call blazesym through one Symbolizer at once (its lock keeps
    them apart): with ``auto_reload`` ELF lookups bypass the result cache, so
    every call below reaches the library."""
    start, size = symbols(c_prog)["bz_middle"]
    addrs = list(range(start, start + size)) * 20
    with Symbolizer(auto_reload=True) as s:
        expected = s.symbolize_elf(str(c_prog), addrs)
        results: list[object] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(10):
                    results.append(s.symbolize_elf(str(c_prog), addrs))
            except BaseException as exc:  # noqa: B036 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s._results == {}, "answered from the cache, not by blazesym"
    assert not errors
    assert len(results) == 40 and all(r == expected for r in results)
    assert any(f.inlined for g in expected for f in g)


def test_compiled_reader_and_abi_mode_give_the_same_frames(
        c_prog: Path, cxx_prog: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three readers agree frame for frame (inlined frames, unknown
    addresses, return addresses): the compiled reader with frames built in C
    (``make blazepack``), the compiled reader with frames built in Python,
    and the ABI-mode fallback."""
    import gc

    from apptrace import symbolize

    b = symbolize._binding()
    if b.pack is None or b.frames is None:
        missing("apptrace._blazepack or apptrace._frames is not built (make blazepack)")
    inputs = []
    for prog in (c_prog, cxx_prog):
        for start, size in symbols(prog).values():
            inputs.append((prog, list(range(start, start + max(size, 1)))))
    inputs.append((c_prog, [0, 1, 0x7FFF_FFFF_0000]))  # unknown: a reason each
    got: dict[tuple[str, int], list[object]] = {}
    for reader in ("c", "columns", "abi"):
        # A small chunk size: big batches are pipelined (a worker thread asks
        # blazesym for the next chunk while this one is read).
        for chunk in (Symbolizer.CHUNK, 8):
            monkeypatch.setattr(b, "pack", None if reader == "abi" else b.pack)
            monkeypatch.setattr(b, "frames", b.frames if reader == "c" else None)
            monkeypatch.setattr(Symbolizer, "CHUNK", chunk)
            with Symbolizer() as s:
                got[reader, chunk] = [s.symbolize_elf(str(p), a) for p, a in inputs]
                got[reader, chunk].append(
                    s.symbolize_stack(os.getpid(), [id(symbolize), id(b), 0, 1]))
                got[reader, chunk].append(s.symbolize_process(
                    os.getpid(), [id(symbolize), id(b), 0, 1, 2] * 9, return_addresses=True))
            monkeypatch.undo()
    first = got["c", Symbolizer.CHUNK]
    assert all(v == first for v in got.values())
    frames = [f for groups in first[:-2] for g in groups for f in g]  # type: ignore[attr-defined]
    assert any(f.inlined for f in frames) and any(f.reason for f in frames)
    assert any(f.file and f.line for f in frames)
    # Frames built in C cannot be in a cycle and are left out of the
    # collector's walks, with the tuples that group them.
    assert all(type(f) is StackFrame and not gc.is_tracked(f) for f in frames)
    assert not any(gc.is_tracked(g) for groups in first[:-2] for g in groups)  # type: ignore[attr-defined]


def test_frame_builder_rejects_bad_columns() -> None:
    """The C frame builder checks what it is given instead of reading past it."""
    from apptrace import symbolize

    b = symbolize._binding()
    if b.pack is None or b.frames is None:
        missing("apptrace._frames is not built (make blazepack)")
    ffi = b.pack.ffi
    cols = [ffi.new("uint64_t[]", [0x10, 0x10]), ffi.new("uint64_t[]", 2),
            ffi.new("uint32_t[]", 2), ffi.new("uint32_t[]", [1, 5])]
    at = [int(ffi.cast("uintptr_t", c)) for c in cols]
    where = [None, symbolize._Where("f", None, False, None, None)]
    groups, keys = ffi.new("uint32_t[]", [1, 1]), ffi.new("uint64_t[]", [0, 1])
    args = (2, *at, where, 2, int(ffi.cast("uintptr_t", groups)),
            int(ffi.cast("uintptr_t", keys)), [7, 8])
    with pytest.raises(ValueError, match="unknown function record"):
        b.frames.build(StackFrame, *args, None)
    cols[3][1] = 1
    assert b.frames.build(StackFrame, *args, None) == [
        (StackFrame(0x10, "f", 0, None, None, False, None),)] * 2
    into: dict[int, object] = {}
    assert b.frames.build(StackFrame, *args, into) is None and sorted(into) == [7, 8]
    groups[1] = 2  # three frames claimed, two given
    with pytest.raises(ValueError, match="exceed"):
        b.frames.build(StackFrame, *args, None)
    with pytest.raises(TypeError):
        b.frames.build(int, *args, None)


def test_stack_frame_is_a_value() -> None:
    f = StackFrame(0x1000, "fn", 4, "/src/a.c", 12, True, "/bin/a")
    assert (f.addr, f.symbol, f.offset, f.file, f.line, f.inlined, f.module, f.reason) == (
        0x1000, "fn", 4, "/src/a.c", 12, True, "/bin/a", None)
    assert f == StackFrame(0x1000, "fn", 4, "/src/a.c", 12, True, "/bin/a")
    assert f != f.replace(line=13) and f.replace(line=13).line == 13
    assert hash(f) == hash(StackFrame(0x1000, "fn", 4, "/src/a.c", 12, True, "/bin/a"))
    import pickle

    assert pickle.loads(pickle.dumps(f)) == f
    assert "symbol='fn'" in repr(f)
    with pytest.raises(TypeError):
        f.replace(nope=1)
    with pytest.raises(AttributeError):
        f.symbol = "other"  # type: ignore[misc]
    unknown = StackFrame(8, None, 0, None, None, False, None, "unmapped")
    assert unknown.line is None and unknown.to_json()["reason"] == "unmapped"
    assert "reason" not in f.to_json()


def test_cdef_layout_matches_header(tmp_path: Path) -> None:
    """ABI mode trusts our cdef: compare its layout with the real header's."""
    require_symbolizer()
    if not HEADER.is_file() or shutil.which("gcc") is None:
        missing(f"{HEADER} or gcc is missing")
    from apptrace import symbolize

    ffi = symbolize._binding().ffi
    checks: list[str] = []
    for struct in ("blaze_symbolize_code_info", "blaze_symbolize_inlined_fn", "blaze_sym",
                   "blaze_syms", "blaze_symbolizer_opts", "blaze_symbolize_src_process",
                   "blaze_symbolize_src_elf", "blaze_cache_src_process"):
        ctype = ffi.typeof(f"struct {struct}")
        checks.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for field, _ in ctype.fields:
            checks.append(f'printf("{struct}.{field} %zu\\n", '
                          f'offsetof(struct {struct}, {field}));')
    prog = tmp_path / "layout.c"
    prog.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <blazesym.h>\n"
                    "int main(void) {\n" + "\n".join(checks) + "\nreturn 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(HEADER.parent), str(prog), "-o", str(exe)],
                   check=True, capture_output=True)
    real = dict(line.split() for line in subprocess.check_output([str(exe)], text=True)
                .splitlines())
    ours = {}
    for key in real:
        struct, _, field = key.partition(".")
        if field:
            ours[key] = str(ffi.offsetof(f"struct {struct}", field))
        else:
            ours[key] = str(ffi.sizeof(f"struct {struct}"))
    assert ours == real


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_batch_planner_splits_cached_from_new() -> None:
    """The C planner behind the result cache: cached groups stay in place,
    new addresses come out distinct and ascending (minus the adjustment),
    keyed by the caller's own int objects, and fill() puts groups back."""
    import struct

    from apptrace import symbolize

    b = symbolize._binding()
    if b.frames is None:
        missing("apptrace._frames is not built (make blazepack)")
    big = 1 << 40
    a, c = big + 0x30, big + 0x10
    known = {big + 0x20: ("cached",)}
    addrs = [a, big + 0x20, c, a, c, c]
    out, values, adj, keys, order = b.frames.plan(addrs, known, 1)
    assert out == [None, ("cached",), None, None, None, None]
    assert list(struct.unpack(f"{len(values) // 8}Q", values)) == [c - 1, a - 1]
    assert adj == bytearray([1, 1])
    assert keys == [c, a] and keys[0] is c and keys[1] is a  # first occurrences
    assert list(struct.unpack("6I", order)) == [1, 0xFFFFFFFF, 0, 1, 0, 0]
    b.frames.fill(out, order, [("low",), ("high",)])
    assert out == [("high",), ("cached",), ("low",), ("high",), ("low",), ("low",)]
    # Nothing new: nothing to look up.
    assert b.frames.plan([big + 0x20], known, 0)[3] == []
    # Sorted on every byte, not just the low ones (radix passes).
    import random

    rnd = random.Random(7)
    many = [rnd.getrandbits(64) for _ in range(5000)] + [0, 1 << 63, (1 << 64) - 1]
    _, values, adj, keys, _ = b.frames.plan(many, {}, 0)
    assert adj is None
    assert list(struct.unpack(f"{len(values) // 8}Q", values)) == sorted(set(many))
    assert keys == sorted(set(many))

    for bad, err in (([-1], OverflowError), ([1 << 64], OverflowError), (["0x10"], TypeError),
                     ([1.5], TypeError)):
        with pytest.raises(err):
            b.frames.plan(bad, {}, 0)
    # 0 is no return address (junk from a stack walked without frame
    # pointers): looked up as is, not one byte early.
    _, values, adj, _, _ = b.frames.plan([0, 5], {}, 1)
    assert list(struct.unpack("2Q", values)) == [0, 4] and adj == bytearray([0, 1])
    with pytest.raises(ValueError, match="adjust"):
        b.frames.plan([5], {}, 256)
    with pytest.raises(TypeError):
        b.frames.plan(5, {}, 0)
    out, values, adj, keys, order = b.frames.plan([a], {}, 0)
    with pytest.raises(ValueError, match="not there"):
        b.frames.fill(out, order, [])
    with pytest.raises(ValueError, match="does not match"):
        b.frames.fill(out, order + order, [("x",)])


def test_batch_of_cached_and_new_addresses(symz: Symbolizer, c_prog: Path) -> None:
    """One batch mixing addresses the cache has, new ones and repeats gives
    the same groups as asking for each address alone."""
    syms = symbols(c_prog)
    a, b, c = syms["bz_middle"][0], syms["bz_outer"][0], syms["main"][0]
    symz.symbolize_elf(str(c_prog), [b])  # b is cached now
    batch = [c, b, a, c, b, a, a]
    groups = symz.symbolize_elf(str(c_prog), batch)
    with Symbolizer() as fresh:
        alone = [fresh.symbolize_elf(str(c_prog), [x])[0] for x in batch]
    assert groups == alone
    assert [g[-1].symbol for g in groups] == ["main", "bz_outer", "bz_middle", "main",
                                             "bz_outer", "bz_middle", "bz_middle"]


def test_pipelined_batch_is_cached_whole(c_prog: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch looked up in chunks (each chunk filed in the cache while
    blazesym works on the next) is remembered whole: asking again calls
    blazesym no more and hands back the very same groups."""
    monkeypatch.setattr(Symbolizer, "CHUNK", 8)
    start, size = symbols(c_prog)["main"]
    addrs = list(range(start, start + size))
    assert len(addrs) > 3 * 8 + 1, "main too small to make several chunks"
    with Symbolizer() as s:
        first = s.symbolize_elf(str(c_prog), addrs)
        assert s._result_count == len(addrs)
        calls = []
        real = s._elf_call
        monkeypatch.setattr(s, "_elf_call", lambda *a, **k: calls.append(a) or real(*a, **k))
        again = s.symbolize_elf(str(c_prog), list(reversed(addrs)))
        assert calls == [] and s._result_count == len(addrs)
    assert all(x is y for x, y in zip(again, reversed(first)))
    assert all(g[-1].symbol == "main" for g in first)


def test_zero_return_address_does_not_sink_the_batch(symz: Symbolizer) -> None:
    """A 0 in a stack (junk where a program has no frame pointers) used to
    fail the whole batch ("addresses must be integers"), and every stack of
    that process fell back to "process exited before its memory map was
    read". It is an unknown frame with blazesym's reason; the rest resolve."""
    real = ctypes_addr()
    groups = symz.symbolize_process(os.getpid(), [real + 1, 0, real + 1],
                                    return_addresses=True)
    assert groups[0][-1].symbol and groups[0] == groups[2]
    [zero] = groups[1]
    assert zero.addr == 0 and zero.symbol is None and zero.reason
    assert "exited" not in zero.reason


def ctypes_addr() -> int:
    """The address of a libc function in this process."""
    import ctypes

    return ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value or 0


def test_stack_with_a_zero_entry_keeps_its_other_frames() -> None:
    """Found tracing `uprobe:libc:malloc --stack` on python3.11 (no frame
    pointers): stacks with a 0 entry showed every frame after the first as
    "process exited before its memory map was read", in a live process."""
    from apptrace.events import Event, ProbeInfo
    from apptrace.stacks import StackTracker

    real = ctypes_addr()
    probe = ProbeInfo("uprobe", "/lib/libc.so.6", "getpid", "uprobe:libc:getpid")
    events = [Event(1, os.getpid(), os.getpid(), "t", probe, (), raw_stack=(real, 0, real + 9)),
              Event(2, os.getpid(), os.getpid(), "t", probe, (), raw_stack=(real, real + 9))]
    tracker = StackTracker()
    try:
        first, second = tracker.symbolize(events)
    finally:
        tracker.close()
    assert first.stack is not None and second.stack is not None
    assert not tracker.errors
    assert [f.symbol for f in first.stack][:1] == [second.stack[0].symbol]
    assert first.stack[0].symbol and "getpid" in first.stack[0].symbol
    zero = [f for f in first.stack if f.addr == 0]
    assert len(zero) == 1 and zero[0].reason and "exited" not in zero[0].reason
    assert first.stack[-1] == second.stack[-1]  # the frame after the 0 resolved alike
