"""engine/decode's value conversion, without a kernel: the raw 64-bit slots
and string buffers a record carries, turned into what a probe string's types
say (mutation testing found these only reached through subprocesses)."""

from __future__ import annotations

import struct

import pytest

from apptrace.engine.decode import string_value, value
from apptrace.engine.plan import Slot
from apptrace.probes import ArgType

STR = ArgType("str", "str")
SIZE = 8  # bytes per string slot in these records


def strs(*slots: bytes) -> bytes:
    return b"".join(s.ljust(SIZE, b"\0")[:SIZE] for s in slots)


def test_nul_terminated_strings_per_slot() -> None:
    buf = strs(b"first", b"second\0x", b"full8byt")
    assert [string_value(STR, buf, i, SIZE, ()) for i in range(3)] == [
        "first", "second", "full8byt"]
    assert string_value(STR, strs(b"\xffok"), 0, SIZE, ()) == "\ufffdok"
    # A slot with no NUL ends at the slot, not in the next one.
    assert string_value(STR, strs(b"full8byt", b"next"), 0, SIZE, ()) == "full8byt"


def test_bytes_n_keeps_nuls_and_stops_at_n() -> None:
    t = ArgType("bytes", "bytes", 5)
    buf = strs(b"ab", b"a\0b\0cdefg")
    assert string_value(t, buf, 0, SIZE, ()) == b"ab\0\0\0"
    assert string_value(t, buf, 1, SIZE, ()) == b"a\0b\0c"


@pytest.mark.parametrize("length, text", [
    (3, "a\0b"),        # the length argument, not a NUL, ends it
    (0, ""),
    (8, "a\0bcdefg"),   # the whole slot
    (99, "a\0bcdefg"),  # longer than the slot: the slot
    ((1 << 64) - 1, ""),  # -1 as a u64: nothing, not the whole slot
    (1 << 63, ""),      # negative as s64
])
def test_str_of_length_argument(length: int, text: str) -> None:
    t = ArgType("str", "str", len_arg=1)
    buf = strs(b"zzzz", b"a\0bcdefg")
    assert string_value(t, buf, 1, SIZE, (7, length)) == text
    assert string_value(t, strs(b"\xffbc", b"next"), 0, SIZE, (0, 3)) == "\ufffdbc"


def test_str_length_argument_missing_gives_nothing() -> None:
    t = ArgType("str", "str", len_arg=2)
    assert string_value(t, strs(b"abc"), 0, SIZE, (1, 2)) == ""


def _slot(t: ArgType | None, *, is_float: bool = False, size: int = 8, signed: bool = False,
          str_slot: int = -1) -> Slot:
    return Slot(None, is_float, size, signed, t, str_slot)


def test_value_by_type() -> None:
    u64 = (1 << 64) - 1
    assert value(u64, _slot(ArgType("s8", "int", 1, True))) == -1
    assert value(0x17F, _slot(ArgType("u8", "int", 1, False))) == 0x7F
    assert value(0x80, _slot(ArgType("s8", "int", 1, True))) == -128
    assert value(0x7F, _slot(ArgType("s8", "int", 1, True))) == 127
    assert value(u64, _slot(ArgType("s32", "int", 4, True))) == -1
    assert value(u64, _slot(None, signed=True)) == -1
    assert value(u64, _slot(None)) == u64
    assert value(1 << 63, _slot(None, signed=True)) == -(1 << 63)
    assert value((1 << 63) - 1, _slot(None, signed=True)) == (1 << 63) - 1
    f64 = struct.unpack("<Q", struct.pack("<d", 2.5))[0]
    f32 = struct.unpack("<I", struct.pack("<f", -1.5))[0]
    assert value(f64, _slot(ArgType("double", "float", 8))) == 2.5
    assert value(f32 | (0xDEAD << 32), _slot(ArgType("float", "float", 4))) == -1.5
    assert value(f64, _slot(None, is_float=True, size=8)) == 2.5
    assert value(f32, _slot(None, is_float=True, size=4)) == -1.5
    # A string slot: from the string buffer, not the 64-bit value.
    assert value(12345, _slot(STR, str_slot=1), strs(b"x", b"yes"), (), SIZE) == "yes"
    assert value(1, _slot(ArgType("bytes", "bytes", 3), str_slot=0), strs(b"ab\0c"), (),
                 SIZE) == b"ab\0"
    # A string type without a slot (the BPF side could not read it): the raw value.
    assert value(12345, _slot(STR)) == 12345


def test_session_shortcuts_build_the_probe_strings() -> None:
    """Session.usdt/uprobe/uretprobe are probe strings by another name."""
    import os

    from apptrace.session import Session

    s = Session(pid=os.getpid())
    try:
        cases = [
            (s.usdt("prov", "name"), "usdt:prov:name", None, False, 0),
            (s.usdt("prov", "name", binary="/bin/x", types="u32,str", stack=True),
             "usdt:/bin/x:prov:name(u32,str)", "/bin/x", True, 2),
            (s.uprobe("libc", "malloc"), "uprobe:libc:malloc", "libc", False, 0),
            (s.uprobe("libc", "malloc", types="size_t", stack=True),
             "uprobe:libc:malloc(size_t)", "libc", True, 1),
            (s.uretprobe("libc", "malloc"), "uretprobe:libc:malloc", "libc", False, 0),
            (s.uretprobe("libc", "malloc", type="ptr", stack=True),
             "uretprobe:libc:malloc(ptr)", "libc", True, 1),
        ]
        for h, text, binary, stack, ntypes in cases:
            assert (h.spec.text, h.spec.binary, h.spec.stack, len(h.spec.types)) == (
                text, binary, stack, ntypes)
    finally:
        s.close()
