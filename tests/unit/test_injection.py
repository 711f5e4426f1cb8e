"""Nothing from a traced binary reaches the generated BPF C (issue: note text in a C comment).

A crafted binary controls its stapsdt notes (provider, probe name, argument
specs), its symbol names and its file name. Each test here builds such a
binary with tests/elfwriter.py, twice: once with hostile text (C comment
ends, preprocessor lines, quotes, backslashes, escape sequences, all marked
``PWN``) and once with plain text of the same meaning (the same parsed kinds
and addresses). Both go through the real resolution and code generation of a
:class:`Session`; the C handed to the compiler is captured at the
``Program`` boundary. The hostile C must not contain any of the hostile text
and must be *identical* to the plain one: then nothing but numbers we made
can have come from the binary. Every integer literal must also fit 64 bits
(a crafted displacement must not break compilation of the whole session).

The real-kernel counterpart (a patched fixture that runs) is in
tests/integration/test_bad_input.py.
"""

from __future__ import annotations

import atexit
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from elfwriter import DATA, STT_FUNC, TEXT, Symbol, build_elf, stapsdt_note
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apptrace.bpf
from apptrace import capabilities
from apptrace.codegen import table_row
from apptrace.session import Session

MARK = "PWN"
PC = TEXT.vaddr + 0x10
SEMA = DATA.vaddr + 0x8

# (hostile argument token, plain token that parses to the same kind and address).
# Tokens are split on blanks outside parentheses, as sys/sdt.h writes them.
ARG_PAIRS = [
    ("8@*/PWN=1;/*", "8@bad0"),
    ("8@*/bpf_send_signal(9);/*PWN", "8@bad1"),
    ("-4@(%rdi */ e->a[0] = 7; PWN /*)", "-4@(%rdi bad)"),
    ("8@PWNmissing(%rip)", "8@okmissing(%rip)"),      # symbol not in .symtab
    ("8@PWN_data(%rip)", "8@ok_data(%rip)"),          # resolves: only numbers may follow
    ("4@PWN_data+8(%rdi)", "4@ok_data+8(%rdi)"),      # symbol + base register
    ('8@"PWN"', "8@bad2"),
    ("8@\\PWN\\", "8@bad3"),
    ("8@$PWN", "8@$bad"),
    ("-4@%PWN", "-4@%bad"),
    ("8@PWN\x1b]0;\x07", "8@bad4"),
    ("\n#define\tPWN", " bad5 bad6"),                 # a new line, then a directive
    ("8@%rdi", "8@%rdi"),
    ("-8@-8(%rbp)", "-8@-8(%rbp)"),
    ("-4@%xmm0", "-4@%xmm0"),
    ("8@99999999999999999999999(%rdi)", "8@99999999999999999999999(%rdi)"),
    ("8@-0x8000000000000000(%rdi,%rsi,8)", "8@-0x8000000000000000(%rdi,%rsi,8)"),
    ("8@PWN_far(%rip)", "8@ok_far(%rip)"),            # an address far from the probe
]
NAME_PAIRS = [
    ("p*/PWN/*", "pa"),
    ("p\n#define PWN 1\n", "pb"),
    ('p"PWN\\', "pc"),
    ("p\x1b]0;PWN\x07", "pd"),
    ("p'PWN'{}", "pe"),
]
FUNC_PAIRS = [("f*/PWN/*", "fa"), ("f\n#PWN", "fb"), ('f"PWN', "fc"), ("f\\PWN", "fd")]

_DIR = tempfile.mkdtemp(prefix="apptrace-inject-")
atexit.register(shutil.rmtree, _DIR, True)


class _Captured(Exception):
    def __init__(self, text: str) -> None:
        super().__init__("captured")
        self.text = text


class _Map:
    """A map that takes the values the engine fills in (and checks they pack)."""

    class spec:  # noqa: N801 - stands for MapSpec
        value_size = 1 << 16

    def update(self, key: bytes, value: bytes) -> None:
        assert len(value) <= self.spec.value_size


def _capture(texts: list[str]) -> Any:
    """Stands where the compiler would be (``Program.__init__``, however the engine
    imported the class): records the C of every program a session makes."""

    def init(self: Any, text: str, *args: Any, **kw: Any) -> None:
        texts.append(text)
        self.from_cache = True
        self.map = lambda name: _Map()
        self.close = self.detach = lambda: None
    return init


def _symbols(hostile: bool) -> list[Symbol]:
    data = "PWN_data" if hostile else "ok_data"
    far = "PWN_far" if hostile else "ok_far"
    syms = [Symbol(data, DATA.vaddr + 0x40), Symbol(far, (1 << 64) - 0x100)]
    for i, (bad, good) in enumerate(FUNC_PAIRS):
        syms.append(Symbol(bad if hostile else good, TEXT.vaddr + 0x100 + 0x10 * i,
                           type=STT_FUNC, shndx=1))
    return syms


def _binary(sites: list[tuple[int, int, list[int]]], hostile: bool, tag: str) -> str:
    """An ELF with one note per (provider pair, name pair, argument pairs) site."""
    k = 0 if hostile else 1
    notes = b""
    for n, (prov, name, args) in enumerate(sites):
        spec = " ".join(ARG_PAIRS[a][k] for a in args)
        notes += stapsdt_note(PC + 4 * n, 0, SEMA if n % 2 else 0, NAME_PAIRS[prov][k],
                              NAME_PAIRS[name][k] + str(n), spec)
    fname = f"{tag}-{MARK}\n\"\\*\x1b.so" if hostile else f"{tag}-ok.so"
    path = Path(_DIR) / fname
    path.write_bytes(build_elf(notes=notes, symbols=_symbols(hostile)))
    return str(path)


def _generated_c(path: str, specs: list[str], monkeypatch: Any, **kw: Any) -> str:
    texts: list[str] = []
    monkeypatch.setattr(apptrace.bpf.Program, "__init__", _capture(texts))

    def stop(*args: Any, **kw: Any) -> None:  # every program is made: stop before attaching
        raise _Captured("\n".join(texts))

    from apptrace.engine.program import TraceProgram

    monkeypatch.setattr(TraceProgram, "attach", stop)
    monkeypatch.setattr(capabilities, "has_trace_privileges", lambda: True)
    s = Session(path=path, **kw)
    for spec in specs:
        s.add(spec.replace("BIN", path))
    with pytest.raises(_Captured) as info:
        s.start()
    # Table-driven groups send the same specs as map values: numbers that must pack.
    for reads, vaddr in _reader_plans(s):
        for row in table_row(reads, vaddr):
            struct.pack("<BBBBHHqQ", *row)
    return info.value.text


def _reader_plans(s: Session) -> list[Any]:
    """Every group's (reads, site vaddr) readers, wherever the engine keeps groups."""
    found = []
    for holder in (s, getattr(s, "_engine", None), getattr(s, "_plan", None)):
        for g in getattr(holder, "_groups", None) or getattr(holder, "groups", None) or []:
            found.extend(getattr(g, "reader_plans", []))
    assert found, "no argument readers found: the test no longer sees the plan"
    return found


_LITERAL = re.compile(r"(?<![\w.])(-?\d+)(ULL|LL|u)?\b")


def _check(hostile_c: str, plain_c: str) -> None:
    assert MARK not in hostile_c
    for bad in ("*/PWN", "#define", '"PWN', "\x1b", "bpf_send_signal(9)"):
        assert bad not in hostile_c
    assert hostile_c == plain_c
    for m in _LITERAL.finditer(hostile_c):
        v = int(m.group(1))
        assert -(1 << 63) <= v < (1 << 64), m.group(0)


SPECS = ["usdt:BIN:*:*", "uprobe:BIN:f*", "uretprobe:BIN:f*(long)"]
_sites = st.lists(st.tuples(st.integers(0, len(NAME_PAIRS) - 1),
                            st.integers(0, len(NAME_PAIRS) - 1),
                            st.lists(st.integers(0, len(ARG_PAIRS) - 1), max_size=6)),
                  min_size=1, max_size=6)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sites=_sites, multi=st.booleans(), tables=st.sampled_from([None, True, False]))
def test_fuzz_hostile_notes_and_names_never_reach_the_c(monkeypatch: Any,
                                                        sites: list[tuple[int, int, list[int]]],
                                                        multi: bool,
                                                        tables: bool | None) -> None:
    hostile = _binary(sites, True, "h")
    plain = _binary(sites, False, "p")
    kw = {"multi": multi, "arg_tables": tables}
    _check(_generated_c(hostile, SPECS, monkeypatch, **kw),
           _generated_c(plain, SPECS, monkeypatch, **kw))


def test_every_hostile_token_in_one_probe(monkeypatch: Any) -> None:
    """All tokens at once, typed as strings too (string slots take another code path)."""
    every = list(range(len(ARG_PAIRS)))[:12]
    rest = list(range(len(ARG_PAIRS)))[12:]
    sites = [(0, 1, every), (2, 3, rest), (4, 0, [])]
    for specs in (SPECS, ["usdt:BIN:*:*(str,str,str,str,str,str)"]):
        _check(_generated_c(_binary(sites, True, "all"), specs, monkeypatch),
               _generated_c(_binary(sites, False, "all"), specs, monkeypatch))


def test_hostile_reasons_stay_in_python(monkeypatch: Any) -> None:
    """The reason an argument is unavailable is still reported, from Python."""
    from apptrace.usdt import read_probes

    path = _binary([(0, 0, [0, 3, 12])], True, "reason")
    [probe] = read_probes(path)
    args = probe.sites[0].args
    assert [a.available for a in args] == [False, False, True]
    assert MARK in (args[0].reason or "") and MARK in (args[1].reason or "")
    # Generated readers say "unavailable" in a comment of their own; the
    # generic (table-driven) program has no per-argument C at all.
    c = _generated_c(path, ["usdt:BIN:*:*"], monkeypatch, arg_tables=False)
    assert MARK not in c and "unavailable" in c
    assert MARK not in _generated_c(path, ["usdt:BIN:*:*"], monkeypatch)
