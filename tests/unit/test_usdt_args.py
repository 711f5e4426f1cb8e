"""apptrace.usdt.args: every x86-64 argument form of shared/reference/usdt.md §(b).

Table tests pin the decoded fields of each form; property tests check that
no input, however odd, makes the parser raise or return something malformed.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apptrace.usdt.args import (
    KINDS,
    REGISTERS,
    Argument,
    parse_argument,
    parse_arguments,
    split_arguments,
)

U64 = 2**64


def one(token: str) -> Argument:
    args = parse_arguments(token)
    assert len(args) == 1, f"{token!r} split into {[a.spec for a in args]}"
    assert args[0].spec == token
    return args[0]


# --- 1. immediates ------------------------------------------------------------------------

@pytest.mark.parametrize("token, size, signed, value", [
    ("-4@$5", 4, True, 5),
    ("-4@$-9", 4, True, -9),
    ("4@$0", 4, False, 0),
    ("8@$1234", 8, False, 1234),
    ("-8@$-1", 8, True, -1),
    ("8@$9223372036854775806", 8, False, 9223372036854775806),
    # above INT64_MAX: must survive as the unsigned value (libbpf's %ld overflows here)
    ("8@$18446744073709551614", 8, False, 18446744073709551614),
    ("-8@$18446744073709551614", 8, True, -2),
    ("8@$-1", 8, False, U64 - 1),          # unsigned view of -1
    ("4@$-1", 4, False, 0xFFFFFFFF),       # truncated to the declared size
    ("-1@$255", 1, True, -1),
    ("1@$-56", 1, False, 200),
    ("-2@$-300", 2, True, -300),
    ("2@$65536", 2, False, 0),             # bits above SIZE are dropped
    ("8@$0x10", 8, False, 16),             # hex from hand-written asm
    ("-4@$-0x10", 4, True, -16),
    ("8@$0XFF", 8, False, 255),
])
def test_immediates(token: str, size: int, signed: bool, value: int) -> None:
    a = one(token)
    assert (a.kind, a.size, a.signed, a.is_float, a.value) == (
        "constant", size, signed, False, value)
    assert a.available and a.reason is None


@pytest.mark.parametrize("token", ["8@$18446744073709551616", "8@$-9223372036854775809",
                                   "8@$", "8@$abc", "8@$1.5", "8@$--1"])
def test_bad_immediates_are_unavailable(token: str) -> None:
    a = one(token)
    assert a.kind == "unavailable" and a.reason


# --- 2. registers ------------------------------------------------------------------------------

@pytest.mark.parametrize("token, size, signed, field, shift", [
    ("8@%rax", 8, False, "ax", 0),
    ("-8@%rbx", 8, True, "bx", 0),
    ("8@%r15", 8, False, "r15", 0),
    ("-4@%eax", 4, True, "ax", 0),
    ("4@%ebp", 4, False, "bp", 0),
    ("-4@%r8d", 4, True, "r8", 0),
    ("-2@%cx", 2, True, "cx", 0),
    ("2@%si", 2, False, "si", 0),
    ("2@%r9w", 2, False, "r9", 0),
    ("1@%al", 1, False, "ax", 0),
    ("-1@%sil", 1, True, "si", 0),
    ("1@%dil", 1, False, "di", 0),
    ("1@%bpl", 1, False, "bp", 0),
    ("1@%spl", 1, False, "sp", 0),
    ("1@%r10b", 1, False, "r10", 0),
    ("1@%r8b", 1, False, "r8", 0),
    # high-byte registers: bits 8..15
    ("1@%ah", 1, False, "ax", 8),
    ("1@%bh", 1, False, "bx", 8),
    ("-1@%ch", 1, True, "cx", 8),
    ("1@%dh", 1, False, "dx", 8),
    # instruction pointer as a plain register
    ("8@%rip", 8, False, "ip", 0),
    # the byte width before @ governs, not the register's name
    ("8@%eax", 8, False, "ax", 0),
    ("1@%rdx", 1, False, "dx", 0),
])
def test_registers(token: str, size: int, signed: bool, field: str, shift: int) -> None:
    a = one(token)
    assert (a.kind, a.size, a.signed, a.register, a.shift) == (
        "register", size, signed, field, shift)
    assert not a.is_float


def test_register_table_covers_the_reference_names() -> None:
    names = ("rax eax ax al ah rbx ebx bx bl bh rcx ecx cx cl ch rdx edx dx dl dh "
             "rsi esi si sil rdi edi di dil rbp ebp bp bpl rsp esp sp spl rip eip").split()
    names += [f"r{n}{s}" for n in range(8, 16) for s in ("", "d", "w", "b")]
    missing = [n for n in names if n not in REGISTERS]
    assert missing == []
    for n in names:
        field, shift, natural = REGISTERS[n]
        assert shift == (8 if n in ("ah", "bh", "ch", "dh") else 0)
        assert natural in (1, 2, 4, 8)
    assert REGISTERS["r12d"][2] == 4 and REGISTERS["r12w"][2] == 2 and REGISTERS["r12b"][2] == 1


@pytest.mark.parametrize("token", ["4f@%xmm0", "8f@%xmm1", "8@%xmm15", "8@%st0", "8@%st7",
                                   "8@%st(1)", "8@%ymm2"])
def test_fp_and_simd_registers_are_unavailable(token: str) -> None:
    a = one(token)
    assert a.kind == "unavailable"
    assert a.reason and "pt_regs" in a.reason and "FP" in a.reason


def test_xmm_float_keeps_its_declared_type() -> None:
    a = one("4f@%xmm0")
    assert (a.size, a.is_float, a.signed) == (4, True, False)


@pytest.mark.parametrize("token", ["8@%foo", "8@%r16", "8@%", "4@%e", "8@%rax)"])
def test_unknown_registers_are_unavailable(token: str) -> None:
    a = one(token)
    assert a.kind == "unavailable" and a.reason


# --- 3. memory operands ---------------------------------------------------------------------

@pytest.mark.parametrize("token, size, signed, base, index, scale, disp", [
    ("8@(%rsp)", 8, False, "sp", None, 1, 0),
    ("4@(%rax)", 4, False, "ax", None, 1, 0),
    ("-4@-1204(%rbp)", 4, True, "bp", None, 1, -1204),
    ("8@-8(%rbp)", 8, False, "bp", None, 1, -8),
    ("8@1600(%rax)", 8, False, "ax", None, 1, 1600),
    ("-4@24(%rsp)", 4, True, "sp", None, 1, 24),
    ("8@0x10(%r12)", 8, False, "r12", None, 1, 16),
    # SIB with displacement
    ("1@-96(%rbp,%rax,8)", 1, False, "bp", "ax", 8, -96),
    ("-4@16(%rbx,%rcx,4)", 4, True, "bx", "cx", 4, 16),
    # SIB without displacement
    ("8@(%rax,%rdx,8)", 8, False, "ax", "dx", 8, 0),
    ("1@(%rbp,%rax,8)", 1, False, "bp", "ax", 8, 0),
    ("2@(%r8,%r9,2)", 2, False, "r8", "r9", 2, 0),
    # base + index, no scale: scale 1
    ("4@(%rbx,%rcx)", 4, False, "bx", "cx", 1, 0),
    ("1@-96(%rbp,%rax)", 1, False, "bp", "ax", 1, -96),
    # several displacement terms are summed
    ("-4@-8+16(%rbp)", 4, True, "bp", None, 1, 8),
    ("8@4+4+4(%rdi)", 8, False, "di", None, 1, 12),
    ("8@16-24(%rsp)", 8, False, "sp", None, 1, -8),
    # float in memory: raw bits
    ("8f@-16(%rbp)", 8, False, "bp", None, 1, -16),
    ("4f@8(%rsp)", 4, False, "sp", None, 1, 8),
])
def test_memory(token: str, size: int, signed: bool, base: str, index: Optional[str],
                scale: int, disp: int) -> None:
    a = one(token)
    assert (a.kind, a.size, a.signed, a.base, a.index, a.scale, a.displacement) == (
        "memory", size, signed, base, index, scale, disp)
    assert a.is_float == ("f@" in token)


@pytest.mark.parametrize("token, why", [
    ("8@(%rax,%rcx,3)", "scale"),
    ("8@(%rax,%rsp)", "index"),
    ("8@(%eax)", "base"),
    ("8@(%ah)", "base"),
    ("8@(%xmm0)", "pt_regs"),
    ("8@(%rax,%rbx,2,4)", "address"),
    ("8@-8(%rbp)x", "parse"),
])
def test_bad_memory_operands_are_unavailable(token: str, why: str) -> None:
    a = one(token)
    assert a.kind == "unavailable"
    assert a.reason and why in a.reason


# --- 4. rip-relative globals -------------------------------------------------------------------

@pytest.mark.parametrize("token, size, signed, symbol, disp", [
    ("-4@global_max_action(%rip)", 4, True, "global_max_action", 0),
    ("-1@ti(%rip)", 1, True, "ti", 0),
    ("8@seq_iter.6(%rip)", 8, False, "seq_iter.6", 0),      # GCC local static suffix
    ("-4@CheckpointStats+40(%rip)", 4, True, "CheckpointStats", 40),
    ("4@glob-2(%rip)", 4, False, "glob", -2),
    ("8@24+mp_(%rip)", 8, False, "mp_", 24),                # glibc, -fPIC
    ("8@_ZN3foo3barE+0x8(%rip)", 8, False, "_ZN3foo3barE", 8),
    # absolute symbol without a register (form 16): same IP-delta read
    ("4@sym", 4, False, "sym", 0),
    ("4@sym+4", 4, False, "sym", 4),
])
def test_rip_relative(token: str, size: int, signed: bool, symbol: str, disp: int) -> None:
    a = one(token)
    assert (a.kind, a.size, a.signed, a.symbol, a.displacement) == (
        "rip_relative", size, signed, symbol, disp)
    assert a.address is None  # no resolver given


@pytest.mark.parametrize("token", ["8@(%rip)", "8@16(%rip)", "8@-sym(%rip)", "8@a+b(%rip)",
                                   "8@sym(%rip,%rax,8)"])
def test_bad_rip_relative_is_unavailable(token: str) -> None:
    a = one(token)
    assert a.kind == "unavailable" and a.reason


# --- 5. no size, segments, sizes ----------------------------------------------------------------

@pytest.mark.parametrize("token, kind, size", [
    ("%rdi", "register", 8),
    ("%eax", "register", 4),
    ("%ax", "register", 2),
    ("%al", "register", 1),
    ("%r9d", "register", 4),
    ("%ah", "register", 1),
    ("-8(%rbp)", "memory", 8),
    ("(%rax,%rbx,4)", "memory", 8),
    ("$5", "constant", 8),
])
def test_operands_without_size(token: str, kind: str, size: int) -> None:
    a = one(token)
    assert (a.kind, a.size, a.signed, a.is_float) == (kind, size, False, False)


def test_no_size_displacement_sum() -> None:
    a = one("-8+16(%rbp)")
    assert (a.kind, a.base, a.displacement, a.size) == ("memory", "bp", 8, 8)


@pytest.mark.parametrize("token", ["8@%fs:0x28", "8@%fs:(%rax)", "-4@%gs:16"])
def test_segment_operands_are_unavailable(token: str) -> None:
    a = one(token)
    assert a.kind == "unavailable" and a.reason and "segment" in a.reason


@pytest.mark.parametrize("token", ["3@%rax", "16@%rax", "0@$1", "-16@-8(%rbp)", "2f@%ax",
                                   "1f@$1"])
def test_bad_sizes_are_unavailable(token: str) -> None:
    a = one(token)
    assert a.kind == "unavailable" and a.reason


@pytest.mark.parametrize("token", ["8@", "8@ "])
def test_empty_operand_is_unavailable(token: str) -> None:
    [a] = parse_arguments(token + " 4@%eax")[:1]
    assert a.kind == "unavailable" and a.reason


# --- 6. whole strings: tokenising ------------------------------------------------------------

@pytest.mark.parametrize("text", ["", " ", "\t\n", ":", ":anything", ": 8@%rax"])
def test_empty_and_colon_strings_have_no_arguments(text: str) -> None:
    assert parse_arguments(text) == []


def test_bracket_aware_splitting() -> None:
    assert split_arguments("8@(%rbx, %rcx) -4@%eax") == ["8@(%rbx, %rcx)", "-4@%eax"]
    assert split_arguments("  -8@[sp, 120]\t4@$1  ") == ["-8@[sp, 120]", "4@$1"]
    assert split_arguments("8@( %rax , %rbx , 2 )") == ["8@( %rax , %rbx , 2 )"]
    a = one("8@(%rbx, %rcx)")
    assert (a.kind, a.base, a.index, a.scale) == ("memory", "bx", "cx", 1)


def test_real_note_string() -> None:
    # from a fixture built with sys/sdt.h at -O0
    text = "-1@-1(%rbp) 1@-2(%rbp) -2@-4(%rbp) 2@-6(%rbp) -4@-12(%rbp) 4@-16(%rbp)" \
           " -8@-24(%rbp) 8@-32(%rbp)"
    args = parse_arguments(text)
    assert [(a.size, a.signed, a.displacement) for a in args] == [
        (1, True, -1), (1, False, -2), (2, True, -4), (2, False, -6),
        (4, True, -12), (4, False, -16), (8, True, -24), (8, False, -32)]
    assert {a.base for a in args} == {"bp"}


def test_one_bad_token_does_not_affect_the_others() -> None:
    args = parse_arguments("8@%rdi 3@%rax -4@%esi 8@%xmm0 8@$1 8@%fs:0 -2@(%rbx,%rcx,2)")
    assert [a.kind for a in args] == ["register", "unavailable", "register", "unavailable",
                                      "constant", "unavailable", "memory"]
    assert [a.spec for a in args] == ["8@%rdi", "3@%rax", "-4@%esi", "8@%xmm0", "8@$1",
                                      "8@%fs:0", "-2@(%rbx,%rcx,2)"]
    assert args[2].register == "si" and args[4].value == 1 and args[6].scale == 2


# --- 7. to_json ----------------------------------------------------------------------------------

COMMON = {"spec", "size", "signed", "float", "kind"}


@pytest.mark.parametrize("token, extra", [
    ("-4@$5", {"value"}),
    ("8@%rdi", {"register"}),
    ("1@%ah", {"register", "shift"}),
    ("-4@16(%rbx,%rcx,4)", {"base", "index", "scale", "displacement"}),
    ("8@sym+8(%rip)", {"symbol", "displacement", "address"}),
    ("4f@%xmm0", {"reason"}),
    ("3@%rax", {"reason"}),
])
def test_to_json_keys(token: str, extra: set[str]) -> None:
    js = one(token).to_json()
    assert set(js) == COMMON | extra
    assert js["spec"] == token
    assert isinstance(js["size"], int) and isinstance(js["signed"], bool)
    assert isinstance(js["float"], bool)


def test_to_json_values() -> None:
    assert one("-4@16(%rbx,%rcx,4)").to_json() == {
        "spec": "-4@16(%rbx,%rcx,4)", "size": 4, "signed": True, "float": False,
        "kind": "memory", "base": "bx", "index": "cx", "scale": 4, "displacement": 16}
    assert one("1@%ah").to_json() == {
        "spec": "1@%ah", "size": 1, "signed": False, "float": False, "kind": "register",
        "register": "ax", "shift": 8}
    assert one("8@$18446744073709551614").to_json()["value"] == 18446744073709551614
    js = one("8f@-16(%rbp)").to_json()
    assert js["float"] is True and js["signed"] is False


# --- 8. resolver ---------------------------------------------------------------------------------

SYMS = {"counter": 0x4010, "seq_iter.6": 0x4080}


def resolver(name: str) -> tuple[Optional[int], Optional[str]]:
    if name == "ti":
        return None, "symbol 'ti' is ambiguous: 2 definitions at 0x4020, 0x4040"
    if name in SYMS:
        return SYMS[name], None
    return None, f"symbol {name!r} not in .symtab/.dynsym (stripped binary?)"


def test_resolver_fills_address_as_vaddr_plus_displacement() -> None:
    args = parse_arguments("-4@counter+4(%rip) 8@seq_iter.6(%rip) 8@-8+counter(%rip)", resolver)
    assert [(a.kind, a.symbol, a.address) for a in args] == [
        ("rip_relative", "counter", 0x4014),
        ("rip_relative", "seq_iter.6", 0x4080),
        ("rip_relative", "counter", 0x4008)]


def test_resolver_failures_become_unavailable_with_its_reason() -> None:
    args = parse_arguments("-1@ti(%rip) 8@%rdi 4@gone(%rip) 8@$3", resolver)
    assert [a.kind for a in args] == ["unavailable", "register", "unavailable", "constant"]
    assert args[0].reason == "symbol 'ti' is ambiguous: 2 definitions at 0x4020, 0x4040"
    assert args[2].reason == "symbol 'gone' not in .symtab/.dynsym (stripped binary?)"
    # the declared type survives for unavailable arguments
    assert (args[0].size, args[0].signed, args[0].spec) == (1, True, "-1@ti(%rip)")


def test_resolver_reason_fallback_when_resolver_gives_none() -> None:
    [a] = parse_arguments("8@x(%rip)", lambda name: (None, None))
    assert a.kind == "unavailable" and a.reason and "x" in a.reason


def test_resolver_not_called_for_other_kinds() -> None:
    calls: list[str] = []

    def spy(name: str) -> tuple[Optional[int], Optional[str]]:
        calls.append(name)
        return 0x1000, None

    args = parse_arguments("8@%rdi 8@$1 8@-8(%rbp) 8@a(%rip) 8@%xmm0", spy)
    assert calls == ["a"]
    assert args[3].address == 0x1000


def test_without_resolver_rip_relative_stays_unresolved() -> None:
    [a] = parse_arguments("8@counter(%rip)")
    assert a.kind == "rip_relative" and a.address is None


# --- 9. describe --------------------------------------------------------------------------------

@pytest.mark.parametrize("token, text", [
    ("-4@%ebx", "s32 bx"),
    ("1@%ah", "u8 ax>>8"),
    ("8@-8(%rbp)", "u64 *(bp-8)"),
    ("-8@$-1", "s64 $-1"),
    ("8f@-16(%rbp)", "f64 *(bp-16)"),
    ("8@(%rax)", "u64 *(ax)"),
    ("8@arr(,%r9,4)", "u64 *(&arr+r9*4)"),  # was "&arr++r9*4"
    ("4@arr+8(%rax,%rbx,2)", "u32 *(&arr+ax+bx*2+8)"),
    ("4@8(,%rbx,2)", "u32 *(bx*2+8)"),
    ("8@g(%rip)", "u64 *&g"),
    ("8@g-16(%rip)", "u64 *&g-16"),
    ("4@8(%rip)", "?(rip-relative operand without a symbol)"),
])
def test_describe(token: str, text: str) -> None:
    assert one(token).describe() == text


_RESOLVE = {"g": 0x4010, "arr": 0x5000}


@pytest.mark.parametrize("token, fields", [
    ("-4@$-5", {"signed": True, "kind": "constant", "value": -5}),
    ("-1@%ah", {"signed": True, "kind": "register", "register": "ax", "shift": 8}),
    ("2@%bx", {"kind": "register", "register": "bx"}),
    ("-4@-8(%rbp)", {"signed": True, "kind": "memory", "base": "bp", "index": None,
                     "scale": 1, "displacement": -8}),
    ("4@arr+8(%rax,%rbx,2)", {"kind": "memory", "base": "ax", "index": "bx", "scale": 2,
                              "displacement": 8, "symbol": "arr", "address": 0x5008}),
    ("8@g+16(%rip)", {"kind": "rip_relative", "symbol": "g", "displacement": 16,
                      "address": 0x4020}),
    ("8f@%xmm0", {"float": True, "kind": "unavailable",
                  "reason": "%xmm0 is not in pt_regs; uprobes cannot read FP/SIMD registers"}),
    ("8@nosuch(%rip)", {"kind": "unavailable", "reason": "no such symbol"}),
    ("-4f@g+4", {"signed": True, "float": True, "kind": "rip_relative", "symbol": "g",
                 "displacement": 4, "address": 0x4014}),  # a bare symbol, i386 style
])
def test_to_json(token: str, fields: dict[str, object]) -> None:
    """What `usdt list --json` prints per argument: every key, exactly."""
    [arg] = parse_arguments(token, lambda n: (_RESOLVE.get(n),
                                              None if n in _RESOLVE else "no such symbol"))
    size = int(token.split("@")[0].lstrip("-").rstrip("f"))
    want = {"spec": token, "size": size, "signed": False, "float": False, **fields}
    assert arg.to_json() == want


# --- 10. properties ------------------------------------------------------------------

def _check_args(args: Any) -> None:
    assert isinstance(args, list)
    for a in args:
        assert isinstance(a, Argument)
        assert a.kind in KINDS
        assert isinstance(a.spec, str) and a.spec
        if a.kind == "unavailable":
            assert isinstance(a.reason, str) and a.reason
        else:
            assert a.size in (1, 2, 4, 8), a
        if a.kind == "constant":
            bits = a.size * 8
            if a.signed and not a.is_float:
                assert -(1 << (bits - 1)) <= a.value < (1 << (bits - 1))  # type: ignore
            else:
                assert 0 <= a.value < (1 << bits)  # type: ignore[operator]
        if a.kind == "register":
            assert a.register and a.shift in (0, 8)
        if a.kind == "memory":
            assert a.base or a.index
            assert a.scale in (1, 2, 4, 8)
        if a.kind == "rip_relative":
            assert a.symbol
        js = a.to_json()
        assert js["kind"] == a.kind and js["spec"] == a.spec


PIECES = ["-", "+", "1", "2", "4", "8", "16", "3", "0", "0x", "f", "ff", "@", "%", "$", "(",
          ")", ",", " ", ":", ".", "rax", "eax", "ah", "r8d", "r9w", "r10b", "rip", "xmm0",
          "st", "fs", "sym", "mp_", "seq_iter.6", "18446744073709551614",
          "99999999999999999999999", "[", "]", "\t", "\0", "é"]

grammarish = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)

token = st.builds(
    lambda sign, size, f, operand: f"{sign}{size}{f}@{operand}",
    st.sampled_from(["", "-"]), st.sampled_from(["1", "2", "4", "8", "3", "16", "0"]),
    st.sampled_from(["", "f"]),
    st.one_of(
        st.builds(lambda r: "%" + r, st.sampled_from(sorted(REGISTERS) + ["xmm3", "st1", "zz"])),
        st.builds(lambda v: f"${v}", st.integers(-(2**70), 2**70)),
        st.builds(lambda d, b, i, s: f"{d}(%{b}{',%' + i if i else ''}{',' + s if s else ''})",
                  st.integers(-4096, 4096), st.sampled_from(sorted(REGISTERS)),
                  st.sampled_from(["", "rax", "rsp", "r9", "ecx"]),
                  st.sampled_from(["", "1", "2", "4", "8", "3"])),
        st.builds(lambda s, o: f"{s}{o:+d}(%rip)", st.sampled_from(["g", "a.1", "_x"]),
                  st.integers(-99, 99)),
        grammarish,
    ))


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_text_never_raises(text: str) -> None:
    _check_args(parse_arguments(text))


@settings(max_examples=1000, deadline=None)
@given(grammarish)
def test_grammar_biased_text_never_raises(text: str) -> None:
    _check_args(parse_arguments(text))


@settings(max_examples=1000, deadline=None)
@given(st.lists(token, min_size=1, max_size=12))
def test_token_lists_parse_one_argument_per_token(tokens: list[str]) -> None:
    text = " ".join(tokens)
    args = parse_arguments(text, resolver)
    _check_args(args)
    # tokens without blanks or brackets of their own map 1:1 onto arguments
    if not any(c in t for t in tokens for c in " \t\n\r\x0b\x0c()[]") and \
            not text.lstrip().startswith(":"):
        assert [a.spec for a in args] == [t.strip() for t in tokens if t.strip()]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(REGISTERS)), st.sampled_from([1, 2, 4, 8]), st.booleans())
def test_every_register_with_every_size(reg: str, size: int, signed: bool) -> None:
    a = parse_argument(f"{'-' if signed else ''}{size}@%{reg}")
    field, shift, _ = REGISTERS[reg]
    assert (a.kind, a.size, a.signed, a.register, a.shift) == (
        "register", size, signed, field, shift)


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**64 - 1), st.sampled_from([1, 2, 4, 8]), st.booleans())
def test_immediate_is_value_modulo_size(v: int, size: int, signed: bool) -> None:
    a = parse_argument(f"{'-' if signed else ''}{size}@${v}")
    bits = size * 8
    assert a.kind == "constant" and a.value is not None
    assert a.value % (1 << bits) == v % (1 << bits)


@pytest.mark.parametrize("token, base, index, scale", [
    ("-4@fx_garr32(,%r9,4)", None, "r9", 4),     # GCC, non-PIC array element
    ("-2@fx_garr16(%r9,%r9)", "r9", "r9", 1),
    ("8@sym+16(%rbx)", "bx", None, 1),
])
def test_symbol_plus_registers_is_memory_resolved_like_rip_relative(
        token: str, base: Optional[str], index: Optional[str], scale: int) -> None:
    (a,) = parse_arguments(token, lambda name: (0x4000, None))
    assert (a.kind, a.base, a.index, a.scale) == ("memory", base, index, scale)
    assert a.symbol is not None and a.address == 0x4000 + a.displacement
    assert a.to_json()["symbol"] == a.symbol and a.to_json()["address"] == a.address
    (b,) = parse_arguments(token, lambda name: (None, "not here"))
    assert b.kind == "unavailable" and b.reason == "not here"


@pytest.mark.parametrize("token, reason", [
    ("-4@", "empty operand"),
    ("3@%eax", "size 3 is not 1, 2, 4 or 8"),
    ("-2f@-8(%rbp)", "float of size 2"),
    ("-4@%fs:0x28", "segment-relative operand"),
    ("8@$abc", "bad immediate '$abc'"),
    ("8@$0x10000000000000000", "immediate out of 64-bit range"),
    ("-8@$-9223372036854775809", "immediate out of 64-bit range"),
    ("-4@%foo", "unknown register '%foo'"),
    ("4f@%xmm1", "%xmm1 is not in pt_regs; uprobes cannot read FP/SIMD registers"),
    ("-8@8(%rax,%rbx,2,1)", "bad address '8(%rax,%rbx,2,1)'"),
    ("-4@8(%rax,%rbx,3)", "scale 3 is not 1/2/4/8"),
    ("-4@8(%foo)", "unknown register '%foo'"),
    ("-4@8(%eax)", "%eax cannot be a 64-bit base register"),
    ("-4@(%ah)", "%ah cannot be a 64-bit base register"),
    ("-4@8(%rax,%foo,2)", "unknown register '%foo'"),
    ("-4@8(%rax,%rsp,2)", "%rsp cannot be an index register"),
    ("-4@8(%rax,%ebx,2)", "%ebx cannot be an index register"),
    ("-4@8(%rip,%rbx,1)", "%rip with an index"),
    ("-4@8(%rip)", "rip-relative operand without a symbol"),
    ("-8@-16", "cannot parse operand '-16'"),
    ("-8@16()", "absolute address"),
    ("-4@8(%rax,%rip,1)", "%rip cannot be an index register"),
    ("-8@?8(%rax)", "cannot parse displacement '?8'"),
    ("-8@a+b(%rax)", "two symbols in 'a+b'"),
    ("-8@-a(%rax)", "negated symbol in '-a'"),
    ("-8@99999999999999999999999(%rax)",
     "displacement '99999999999999999999999' is out of the 64-bit range"),
])
def test_every_unavailable_branch_keeps_the_argument_shape(token: str, reason: str) -> None:
    """An argument that cannot be read still says its spec, size, signedness
    and float-ness (the decoder sizes its slot from them), and exactly why."""
    size_text = token.split("@")[0]
    want = {"spec": token, "size": int(size_text.lstrip("-").rstrip("f")),
            "signed": size_text.startswith("-"), "float": size_text.endswith("f"),
            "kind": "unavailable", "reason": reason}
    assert one(token).to_json() == want


def test_explicit_scale_of_one_and_base_less_index() -> None:
    a = one("8@8(%rax,%rbx,1)")
    assert (a.kind, a.base, a.index, a.scale, a.displacement) == ("memory", "ax", "bx", 1, 8)
    b = one("4@16(,%rcx,8)")
    assert (b.kind, b.base, b.index, b.scale) == ("memory", None, "cx", 8)
    assert b.to_json()["base"] is None


def test_symbol_addresses_at_the_ends_of_the_address_space() -> None:
    """symbol + displacement must land in [0, 2**64); both ends are inside."""
    top = (1 << 64) - 8

    def resolve(name: str) -> tuple[Optional[int], Optional[str]]:
        return {"zero": 0, "top": top}.get(name), None

    got = parse_arguments("8@zero(%rip) 8@zero-8(%rip) 8@top+7(%rip) 8@top+8(%rip)"
                          " -4@zero(,%rax,4) 8@gone(%rip)", resolve)
    assert [a.address for a in got] == [0, None, top + 7, None, 0, None]
    assert [a.reason for a in got] == [
        None, "symbol 'zero' + -8 is outside the address space", None,
        "symbol 'top' + 8 is outside the address space", None, "symbol 'gone' not found"]
    assert [(a.size, a.signed, a.is_float) for a in got] == [(8, False, False)] * 4 + [
        (4, True, False), (8, False, False)]
