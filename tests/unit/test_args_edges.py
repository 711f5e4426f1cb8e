"""USDT argument specs at their edges: what mutation testing found untested.

Each case pins a boundary or a default that a one-character change in
apptrace/usdt/args.py would move without any other test noticing: the ends
of the 64-bit displacement range, upper-case hex, the ``f`` marker's case, a
bare operand's defaults, segment-relative operands, and the size, sign and
float flag kept on an argument that cannot be read.
"""

from __future__ import annotations

import pytest

from apptrace.usdt.args import parse_argument

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@pytest.mark.parametrize("disp", [INT64_MIN, INT64_MAX, 0])
def test_displacements_at_the_ends_of_the_range_are_read(disp: int) -> None:
    a = parse_argument(f"-8@{disp}(%rbp)")
    assert (a.kind, a.displacement, a.base) == ("memory", disp, "bp")


@pytest.mark.parametrize("disp", [INT64_MIN - 1, INT64_MAX + 1, -(1 << 64), 1 << 64])
def test_displacements_past_the_range_are_unavailable(disp: int) -> None:
    a = parse_argument(f"-8@{disp}(%rbp)")
    assert a.kind == "unavailable" and "64-bit range" in (a.reason or "")
    assert (a.size, a.signed, a.is_float) == (8, True, False)


def test_upper_case_hex_terms_add_up() -> None:
    assert parse_argument("8@0X1F(%rbp)").displacement == 31
    assert parse_argument("8@0x1f+0X10(%rbp)").displacement == 47
    assert parse_argument("8@-0XA(%rbp)").displacement == -10


def test_float_marker_is_lower_case_only() -> None:
    assert parse_argument("8f@%rax").is_float
    bad = parse_argument("8F@%rax")
    assert bad.kind == "unavailable" and not bad.is_float


def test_a_bare_operand_is_an_unsigned_8_byte_integer() -> None:
    a = parse_argument("%rax")
    assert (a.kind, a.size, a.signed, a.is_float, a.register) == ("register", 8, False, False,
                                                                  "ax")


@pytest.mark.parametrize("spec", ["8@%fs:0x28", "-4@%gs:16"])
def test_segment_relative_operands_say_so(spec: str) -> None:
    a = parse_argument(spec)
    assert a.kind == "unavailable" and a.reason == "segment-relative operand"


@pytest.mark.parametrize("spec, reason, flags", [
    ("-8@", "empty operand", (8, True, False)),
    ("3@%rax", "size 3 is not 1, 2, 4 or 8", (3, False, False)),
    ("-2f@%ax", "float of size 2", (2, True, True)),
    ("-4@x+y(%rip)", "two symbols in 'x+y'", (4, True, False)),
    ("4@-x(%rip)", "negated symbol in '-x'", (4, False, False)),
])
def test_unreadable_arguments_keep_size_sign_and_kind(spec: str, reason: str,
                                                      flags: tuple[int, bool, bool]) -> None:
    a = parse_argument(spec)
    assert a.kind == "unavailable" and a.reason == reason
    assert (a.size, a.signed, a.is_float) == flags
    assert a.spec == spec
