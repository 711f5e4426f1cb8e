"""In-kernel aggregation against what the traced fixture itself reports.

``agg_calls N`` calls ``fx_alloc(size, kind)`` and fires
``apptrace_fx:req(size, kind, strlen(kind), i)`` with sizes from a fixed
table, printing each; counts, sums, extremes and histograms computed in the
kernel must equal those computed here from its output.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apptrace.agg import Aggregator
from apptrace.errors import ExpressionError, OptionError

pytestmark = pytest.mark.bpf

N = 48
REQ = "usdt:{exe}:apptrace_fx:req(long,str[arg2],long,long)"
ALLOC = "uprobe:{exe}:fx_alloc(long,str)"


def _allocs(lines: list[str]) -> list[tuple[int, str, int]]:
    out = []
    for ln in lines:
        if ln.startswith("alloc "):
            _, size, kind, i = ln.split()
            out.append((int(size), kind, int(i)))
    return out


def run_agg(exe: Path, probe: str, n: int = N, **kw: Any) -> tuple[Any, list[tuple[int, str, int]]]:
    """Aggregate a whole run of agg_calls N (spawned, held until attached)."""
    agg = Aggregator(command=[str(exe), str(n)], command_stdout=subprocess.PIPE, **kw)
    try:
        agg.add(probe.format(exe=exe))
        agg.start()
        while agg.wait(0.2):
            pass
        agg.detach()
        res = agg.read()
        child = agg._target.child
        assert child is not None and child.proc.stdout is not None
        lines = child.proc.stdout.read().decode().splitlines()
        assert agg.exit_status == 0
    finally:
        agg.close()
    return res, _allocs(lines)


@pytest.fixture(scope="module")
def exe(fixtures_dir: Path) -> Path:
    return fixtures_dir / "agg_calls_pie"


def _bucket(v: int) -> tuple[Any, Any]:
    if v < 0:
        return (None, 0)
    if v == 0:
        return (0, 1)
    k = v.bit_length() - 1
    return (1 << k, 1 << (k + 1))


@pytest.mark.parametrize("probe", [ALLOC, REQ], ids=["uprobe", "usdt"])
def test_counts_sums_extremes_per_size(exe: Path, probe: str) -> None:
    res, allocs = run_agg(exe, probe, keys="arg0", sum="arg0", min="arg0 * 2",
                          max="arg0 + 1", avg="arg0")
    assert len(allocs) == N
    want = collections.Counter(size for size, _, _ in allocs)
    assert {r.key[0]: r.count for r in res.rows} == dict(want)
    for r in res.rows:
        size = r.key[0]
        assert (r.sum, r.min, r.max, r.avg) == (size * want[size], 2 * size, size + 1, size)
    assert res.not_counted == 0 and res.count == N
    assert res.stats == (("sum", "arg0"), ("min", "arg0 * 2"), ("max", "arg0 + 1"),
                         ("avg", "arg0"))


def test_log2_and_linear_histograms(exe: Path) -> None:
    res, allocs = run_agg(exe, ALLOC, hist="arg0")
    (row,) = res.rows
    want = collections.Counter(_bucket(size) for size, _, _ in allocs)
    got = {(b.lo, b.hi): b.count for b in row.hist.buckets if b.count}
    assert got == dict(want) and row.count == N

    res, allocs = run_agg(exe, ALLOC, hist="arg0:0:5000:1000", keys="arg1")
    for r in res.rows:
        sizes = [s for s, kind, _ in allocs if kind == r.key[0]]
        want = collections.Counter(
            (None, 0) if s < 0 else (5000, None) if s >= 5000 else (s // 1000 * 1000,
                                                                     s // 1000 * 1000 + 1000)
            for s in sizes)
        got = {(b.lo, b.hi): b.count for b in r.hist.buckets if b.count}
        assert got == dict(want), r.key
    assert {r.key[0] for r in res.rows} == {"none", "tiny", "small", "page", "big"}


def test_string_keys_are_bounded_and_marked(exe: Path) -> None:
    kinds = collections.Counter(("none", "tiny", "small", "small", "page", "page", "big",
                                 "big") * (N // 8))
    # str[arg2]: HotSpot-style (pointer, length) strings; and NUL-terminated str.
    for probe in (REQ, ALLOC):
        res, allocs = run_agg(exe, probe, keys="arg1,comm", str_max=4)
        assert collections.Counter(k for _, k, _ in allocs) == kinds
        assert res.key_str_max == 4
        got = {r.key: (r.count, r.truncated) for r in res.rows}
        assert got == {("none", "agg_calls_pie"): (6, ()), ("tiny", "agg_calls_pie"): (6, ()),
                       ("smal", "agg_calls_pie"): (12, ("arg1",)),
                       ("page", "agg_calls_pie"): (12, ()), ("big", "agg_calls_pie"): (12, ())}
        text = res.format()
        assert "cut at 4 bytes" in text and "smal..." in text
        res, _ = run_agg(exe, probe, keys="arg1")
        assert {r.key[0]: r.count for r in res.rows} == dict(kinds)
        assert all(not r.truncated for r in res.rows)


def test_filter_matches_python(exe: Path) -> None:
    where = 'arg0 > 16 && (prefix(arg1, "sm") || arg1 == "big") || arg3 % 7 == 0'
    res, allocs = run_agg(exe, REQ, keys="arg3", where=where)

    def passes(size: int, kind: str, i: int) -> bool:
        return size > 16 and (kind.startswith("sm") or kind == "big") or i % 7 == 0

    assert sorted(r.key[0] for r in res.rows) == [i for s, k, i in allocs if passes(s, k, i)]
    assert all(r.count == 1 for r in res.rows)


def test_per_probe_and_stack_keys(fixtures_dir: Path) -> None:
    loop = fixtures_dir / "agg_loop_pie"
    agg = Aggregator(command=[str(loop), "5000"], command_stdout=subprocess.PIPE,
                     keys="probe")
    with agg:
        agg.add(f"usdt:{loop}:apptrace_fx:*")
        agg.start()
        while agg.wait(0.2):
            pass
        agg.detach()
        res = agg.read()
        assert agg._target.child is not None
        out = agg._target.child.proc.stdout.read().decode()  # type: ignore[union-attr]
    rare = int(out.split("rare ")[1].split()[0])
    assert {r.key[0]: r.count for r in res.rows} == {"usdt:apptrace_fx:hot": 5000,
                                                     "usdt:apptrace_fx:rare": rare}

    exe = fixtures_dir / "agg_calls_pie"
    res, _ = run_agg(exe, "uprobe:{exe}:fx_lat", n=12, keys="ustack")
    lats = 12 + 4 + 8 + 3 * 4   # calls of fx_lat for 12 iterations (see agg_calls.c)
    assert res.count == lats
    by_depth = {r.key[0].count("fx_lat"): r.count for r in res.rows}
    assert all(r.key[0][-1] != "fx_lat" and "main" in r.key[0] for r in res.rows)
    assert by_depth[1] == 12 + 3      # top-level calls, plain and jumping
    assert sum(by_depth.values()) == lats


def test_full_map_is_counted(exe: Path) -> None:
    res, allocs = run_agg(exe, ALLOC, keys="arg0", max_keys=3)
    assert len(res.rows) == 3
    assert res.count + res.not_counted == N and res.not_counted > 0
    assert "hits not counted: the map holds at most 3 keys" in res.format()


def test_intervals_add_up_exactly(exe: Path) -> None:
    agg = Aggregator(command=[str(exe), "1600"], command_stdout=subprocess.DEVNULL,
                     keys="arg1", intervals=True)
    results = []
    with agg:
        agg.add(ALLOC.format(exe=exe))
        agg.start()
        while agg.wait(0.1):  # the run lasts ~1 s (sleeps in fx_lat)
            results.append(agg.read_interval())
        agg.detach()
        results.append(agg.read_interval())
    assert len(results) >= 3
    assert [r.interval for r in results] == list(range(1, len(results) + 1))
    total = collections.Counter()
    for r in results:
        for row in r.rows:
            total[row.key[0]] += row.count
    assert sum(total.values()) == 1600
    assert total == collections.Counter({"none": 200, "tiny": 200, "small": 400, "page": 400,
                                         "big": 400})
    with pytest.raises(Exception, match="read_interval"):
        Aggregator(keys="arg0", intervals=True).read()


@pytest.mark.parametrize("kw,column,words", [
    ({"where": "arg0 >"}, 7, "ends too early"),
    ({"sum": "arg0 + comm"}, 8, "is a string"),
    ({"where": "arg0 > 1 && arg1 == 2"}, 13, "no arg1 here (arguments: arg0)"),
    ({"where": 'arg0 == "x"'}, 6, "compare a string name"),
    ({"hist": "arg9"}, 1, "no arg9 here"),
    ({"max": "pid + foo"}, 7, "unknown name 'foo'"),
])
def test_bad_expressions_name_the_column(exe: Path, kw: dict[str, str], column: int,
                                         words: str) -> None:
    with pytest.raises(ExpressionError) as info:  # syntax at once, names at start
        with Aggregator(path=str(exe), **kw) as agg:
            agg.add(f"uprobe:{exe}:fx_alloc(long)")
            agg.start()
    assert info.value.column == column and words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_options() -> None:
    with pytest.raises(OptionError, match="max_keys"):
        Aggregator(keys="arg0", max_keys=0)
    with pytest.raises(OptionError, match="each key once"):
        Aggregator(keys="pid,pid")


# -- the command line -------------------------------------------------------------------

APPTRACE = [sys.executable, "-m", "apptrace"]


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPTRACE, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_count_table_and_json_intervals(exe: Path) -> None:
    r = cli("trace", "--count", "arg1", "--sum", "arg0", ALLOC.format(exe=exe), "--", exe, N)
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.strip()]
    assert lines[0][:2] == [str(N), "hits"] and lines[1] == ["arg1", "count", "sum(arg0)"]
    rows = {t[0]: (int(t[1]), int(t[2])) for t in lines[2:]}
    assert rows == {"big": (12, 993216), "page": (12, 49158), "small": (12, 696),
                    "none": (6, 0), "tiny": (6, 6)}
    assert "Traceback" not in r.stderr and "command exited with status 0" in r.stderr

    r = cli("trace", "--json", "--interval", "0.1", "--count", "--hist", "arg0",
            ALLOC.format(exe=exe), "--", exe, 1600)   # ~1 s
    assert r.returncode == 0, r.stderr
    objs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(objs) >= 3 and [o["interval"] for o in objs] == list(range(1, len(objs) + 1))
    assert sum(o["count"] for o in objs) == 1600
    assert sum(b["count"] for o in objs for row in o["rows"]
               for b in row["hist"]["buckets"]) == 1600
    assert all(o["type"] == "aggregate" and o["keys"] == [] for o in objs)


def test_cli_errors_are_one_message(exe: Path) -> None:
    r = cli("trace", "--count", "--where", "arg0 >> >", ALLOC.format(exe=exe), "--", exe, 1)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "apptrace: error: column 9: where: expected a number, a name, a string or '('",
        "  arg0 >> >", "          ^"]
    r = cli("trace", "--count", "bogus", ALLOC.format(exe=exe), "--", exe, 1)
    assert r.returncode == 2 and "arg0..arg11" in r.stderr and "Traceback" not in r.stderr
    r = cli("trace", "--hist", "arg0:1:0:1", ALLOC.format(exe=exe), "--", exe, 1)
    assert r.returncode == 2 and "MIN < MAX" in r.stderr
    r = cli("trace", "--count", "--stack", ALLOC.format(exe=exe), "--", exe, 1)
    assert r.returncode == 2 and "--count ustack" in r.stderr
    r = cli("trace", "--count", "--interval", "0", ALLOC.format(exe=exe), "--", exe, 1)
    assert r.returncode == 2 and "--interval" in r.stderr
    r = cli("trace", "--count")
    assert r.returncode == 2 and "probe string" in r.stderr
