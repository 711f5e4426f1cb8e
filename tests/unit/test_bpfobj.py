"""Bytecode relocation and the compiled-object format (no kernel needed)."""

from __future__ import annotations

import struct

import pytest

from apptrace.bpfobj import CompiledObject, MapSpec, _bind, unbind
from apptrace.errors import ApptraceError


def insn(code: int, regs: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, regs, off, imm)


def test_map_fd_loads_are_unbound_and_bound_again() -> None:
    # r1 = map fd 7 (ld_imm64 pseudo map fd, 2 slots); r2 = 5; r1 = map fd 9; exit
    code = (insn(0x18, 0x11, 0, 7) + insn(0, 0, 0, 0) + insn(0xB7, 0x02, 0, 5)
            + insn(0x18, 0x11, 0, 9) + insn(0, 0, 0, 0) + insn(0x95))
    plain, relocs = unbind(code, {7: "ring", 9: "lost"})
    assert relocs == ((0, "ring"), (3, "lost"))
    assert struct.unpack_from("<i", plain, 4)[0] == 0
    assert struct.unpack_from("<i", plain, 3 * 8 + 4)[0] == 0
    assert plain[16:24] == code[16:24]  # other instructions untouched
    again = _bind(plain, relocs, {"ring": 7, "lost": 9})
    assert again == code


def test_ld_imm64_of_a_plain_constant_is_not_a_map() -> None:
    code = insn(0x18, 0x01, 0, 1234) + insn(0, 0, 0, 0) + insn(0x95)
    plain, relocs = unbind(code, {})
    assert relocs == () and plain == code


def test_unknown_map_fd_is_an_error() -> None:
    with pytest.raises(ApptraceError, match="unknown map fd 42"):
        unbind(insn(0x18, 0x11, 0, 42) + insn(0), {7: "ring"})


def test_json_round_trip() -> None:
    obj = CompiledObject((MapSpec("g0_rb", 27, 0, 0, 4096, 0),),
                         {"g0_multi": insn(0x95)}, {"g0_multi": ((0, "g0_rb"),)}, "GPL")
    assert CompiledObject.from_json(obj.to_json()) == obj
    bad = obj.to_json()
    bad["format"] = 99
    with pytest.raises(ValueError):
        CompiledObject.from_json(bad)
