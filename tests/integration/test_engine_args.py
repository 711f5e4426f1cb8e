"""Every USDT argument shape, decoded in the real kernel, against what the fixture printed.

Each fixture prints the exact values it hands to every probe. A test traces
one fixture run by PID with every probe of the binary in one Session, then
compares the Nth event of each probe with the Nth printed line of that probe
(the fixtures are single-threaded and one probe string is one ring buffer, so
per-probe order is preserved). Across the four usdt_args builds and the two
usdt_inline builds this is well over 100k events, all of which must match.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import OutputDrain

from apptrace.events import Event, Unavailable
from apptrace.session import Session
from apptrace.usdt.notes import read_probes

pytestmark = pytest.mark.bpf

# Loop iterations per usdt_args run: 10 probes fire per iteration, so the four
# builds give 4 * 10 * ARGS_COUNT >= 100k events on their own.
ARGS_COUNT = 2600
INLINE_COUNT = 5000

INT = int
FLT = float.fromhex
STR = str

# Printed column converters per probe, in argument order (fixtures/c/README.md).
ARGS_COLUMNS: dict[str, list[Callable[[str], Any]]] = {
    "widths": [INT] * 8,
    "stack": [INT] * 8,
    "consts": [INT] * 8,
    "globals": [INT] * 6,
    "deref": [INT] * 4,
    "floats": [FLT] * 4,
    "strs": [STR, STR],
    "sib": [INT] * 4,
    "many12": [INT] * 10 + [STR, INT],
    "xmm_arg": [FLT],
}

# Probe strings: untyped where the note's own size/sign says everything,
# `str` where the fixture prints the string a pointer points to.
ARGS_SPECS = {
    "widths": "usdt:apptrace_fx:widths",
    "stack": "usdt:apptrace_fx:stack",
    "consts": "usdt:apptrace_fx:consts",
    "globals": "usdt:apptrace_fx:globals",
    "deref": "usdt:apptrace_fx:deref",
    "floats": "usdt:apptrace_fx:floats",
    "strs": "usdt:apptrace_fx:strs(str,str)",
    "sib": "usdt:apptrace_fx:sib",
    "many12": "usdt:apptrace_fx:many12(-,-,-,-,-,-,-,-,-,-,str,-)",
    "xmm_arg": "usdt:apptrace_fx:xmm_arg",
}


def _trace_run(spawn: Any, binary: Path, count: int, specs: list[str],
               budget: float = 60.0, arg_tables: Optional[bool] = None,
               ) -> tuple[list[Event], Any, list[str], Session]:
    """Spawn BINARY COUNT wait, attach SPECS by PID, release, collect to exit."""
    child = spawn([binary, count, "wait"])
    s = Session(pid=child.pid, arg_tables=arg_tables)
    try:
        for spec in specs:
            s.add(spec)
        s.start()
        child.send("\n")
        drain = OutputDrain(child)
        t0 = time.monotonic()
        events = list(s.events(timeout=budget))
        assert time.monotonic() - t0 < budget, "events() did not end when the target exited"
        printed = drain.lines()
        stats = s.stats()
    finally:
        s.close()
    return events, stats, printed, s


def _by_probe(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for ev in events:
        out.setdefault(ev.probe.name.split(":", 1)[1], []).append(ev)
    return out


def _printed_by_probe(lines: list[str], names: set[str]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {n: [] for n in names}
    for line in lines:
        word, _, rest = line.partition(" ")
        if word in names:
            out[word].append(rest.split(" ") if rest else [])
    return out


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float):
        return isinstance(got, float) and got == want
    if isinstance(want, int):
        return isinstance(got, int) and not isinstance(got, bool) and got == want
    return isinstance(got, str) and got == want


@pytest.mark.parametrize("name, tables", [
    ("usdt_args_pie", None), ("usdt_args_nopie", None),
    ("usdt_args_o2_pie", None), ("usdt_args_o2_nopie", None),
    # The same comparison through the table-driven reader (many-layout groups).
    ("usdt_args_pie", True), ("usdt_args_o2_nopie", True)])
def test_usdt_args_every_shape_matches_printed(fixtures_dir: Path, spawn: Any,
                                               name: str, tables: Optional[bool]) -> None:
    binary = fixtures_dir / name
    # Every probe the binary has is covered by the specs below.
    in_binary = {p.name for p in read_probes(binary)}
    assert in_binary == set(ARGS_SPECS)

    events, stats, printed, s = _trace_run(spawn, binary, ARGS_COUNT,
                                           list(ARGS_SPECS.values()), arg_tables=tables)
    if tables:  # strings too: the table reader copies them as well
        assert all(g.plan.table for g in s._groups)  # type: ignore[union-attr]
    assert printed[-1] == "done"
    assert {p.name for p in s.probes} == {f"apptrace_fx:{n}" for n in ARGS_SPECS}
    assert all(p.binary.endswith(name) for p in s.probes)

    got = _by_probe(events)
    want = _printed_by_probe(printed, set(ARGS_COLUMNS))
    assert stats.lost == 0, stats
    assert stats.lost_per_probe == {}
    assert stats.read_faults == 0
    assert stats.truncated_strings == 0
    assert stats.events == len(events) == 10 * ARGS_COUNT

    mismatches: list[str] = []
    checked = 0
    known_bad = KNOWN_BAD.get(name, set())
    for probe, columns in ARGS_COLUMNS.items():
        rows = want[probe]
        evs = got.get(probe, [])
        assert len(rows) == ARGS_COUNT, f"{probe}: fixture printed {len(rows)} lines"
        assert len(evs) == ARGS_COUNT, f"{probe}: {len(evs)} events, {ARGS_COUNT} printed"
        assert stats.per_probe[f"usdt:apptrace_fx:{probe}"] == len(rows)
        for n, (ev, row) in enumerate(zip(evs, rows)):
            assert ev.pid == ev.tid == s.target.pid  # type: ignore[union-attr]
            assert len(ev.args) == len(columns), (probe, ev.args)
            if probe == "xmm_arg":
                # %xmm0 is not in pt_regs: unavailable with a reason, never 0.
                (arg,) = ev.args
                assert isinstance(arg, Unavailable), f"xmm_arg decoded as {arg!r}"
                assert arg.reason and "xmm" in arg.reason
                checked += 1
                continue
            expect = [conv(text) for conv, text in zip(columns, row)]
            for k, (g, w) in enumerate(zip(ev.args, expect)):
                if (probe, k) in known_bad:
                    continue  # see test_o2_nopie_symbol_indexed_operands
                checked += 1
                if not _same(g, w) and len(mismatches) < 40:
                    mismatches.append(f"{probe}#{n} arg{k}: got {g!r}, printed {w!r}")
    assert not mismatches, "\n".join(mismatches)
    assert checked == (sum(map(len, ARGS_COLUMNS.values())) - len(known_bad)) * ARGS_COUNT


# Argument cells to leave out of the comparison (none: every cell must match).
KNOWN_BAD: dict[str, set[tuple[str, int]]] = {}


def test_o2_nopie_symbol_indexed_operands(fixtures_dir: Path, spawn: Any) -> None:
    """`SYM(,%r9,4)` / `SYM(%r9,%r9)`: a global array indexed by a register (non-PIE)."""
    events, stats, printed, _ = _trace_run(spawn, fixtures_dir / "usdt_args_o2_nopie", 40,
                                           ["usdt:apptrace_fx:sib"])
    rows = [[int(v) for v in line.split(" ")[1:]] for line in printed
            if line.startswith("sib ")]
    assert len(rows) == len(events) == 40
    assert stats.lost == 0
    assert [list(ev.args) for ev in events] == rows


def _inline_site_specs(binary: Path) -> list[str]:
    [probe] = [p for p in read_probes(binary) if p.name == "inl"]
    return [site.args_spec for site in probe.sites]


@pytest.mark.parametrize("name, tables", [("usdt_inline_pie", None),
                                         ("usdt_inline_nopie", None),
                                         ("usdt_inline_pie", True)])
def test_usdt_inline_every_site(fixtures_dir: Path, spawn: Any, name: str,
                                tables: Optional[bool]) -> None:
    binary = fixtures_dir / name
    site_specs = _inline_site_specs(binary)
    assert len(site_specs) == 4, site_specs

    events, stats, printed, s = _trace_run(spawn, binary, INLINE_COUNT,
                                           ["usdt:apptrace_fx:inl"], arg_tables=tables)
    assert printed[-1] == "done"
    [info] = s.probes
    assert info.sites == 4
    rows = [line.split(" ")[1:] for line in printed if line.startswith("inl ")]
    assert len(rows) == 4 * INLINE_COUNT
    assert stats.lost == 0, stats
    assert stats.per_probe == {"usdt:apptrace_fx:inl": 4 * INLINE_COUNT}
    assert len(events) == len(rows)

    mismatches: list[str] = []
    for n, (ev, row) in enumerate(zip(events, rows)):
        if ev.args != (int(row[0]), int(row[1])) and len(mismatches) < 20:
            mismatches.append(f"event {n} (site {ev.site}): got {ev.args}, printed {row}")
    assert not mismatches, "\n".join(mismatches)

    # Each iteration runs site_regs, site_global, site_stack, site_const in
    # that order: the k-th event of every iteration comes from the same site,
    # the four sites are distinct, and together they are all sites of the probe.
    order = [ev.site for ev in events[:4]]
    assert sorted(order) == [0, 1, 2, 3]
    assert all(ev.site == order[n % 4] for n, ev in enumerate(events))
    # And the site index points at the note with that site's argument shape.
    assert site_specs[order[0]] == "-8@%rsi -4@%edx"
    assert "fx_inl_a" in site_specs[order[1]] and "fx_inl_b" in site_specs[order[1]]
    assert "(%rbp)" in site_specs[order[2]]
    assert site_specs[order[3]] == "-8@$-1234567890123 -4@$-42"
    assert {ev.args for ev in events[3::4]} == {(-1234567890123, -42)}
