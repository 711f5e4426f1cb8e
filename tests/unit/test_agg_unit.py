"""Aggregation pieces that need no kernel: option parsing, histogram buckets
(the C bucket function checked against Python with a C compiler), percentiles,
result text and JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from apptrace.agg.bpfgen import LOG2_C
from apptrace.agg.results import (
    AggregateResult,
    Bucket,
    Histogram,
    LatencyResult,
    LatencyRow,
    Row,
    format_count,
    format_ns,
    linear_histogram,
    log2_histogram,
)
from apptrace.agg.spec import HistSpec, parse_hist, parse_keys
from apptrace.errors import ExpressionError, OptionError


def test_keys() -> None:
    assert parse_keys("arg0,comm") == ("arg0", "comm")
    assert parse_keys(["pid", "ustack"]) == ("pid", "ustack")
    assert parse_keys("") == ()
    assert parse_keys(None) == ()
    for bad, words in (("arg12", "arg0..arg11"), ("bogus", "arg0..arg11"),
                       ("comm,comm", "each key once")):
        with pytest.raises(OptionError, match=words):
            parse_keys(bad)


def test_hist_specs() -> None:
    assert parse_hist("arg0") == HistSpec("arg0")
    h = parse_hist("arg0 / 1000:0:100:10")
    assert h.linear == (0, 100, 10) and h.nbuckets == 12 and h.text() == "arg0 / 1000:0:100:10"
    assert parse_hist("arg1:0:10:3").nbuckets == 4 + 2  # the last step is cut at MAX
    for bad, words in (("arg0:1:2", "EXPR:MIN:MAX:STEP"), ("arg0:5:1:1", "MIN < MAX"),
                       ("arg0:0:10:0", "STEP > 0"), ("arg0:a:b:c", "integers"),
                       ("arg0:0:100000:1", "at most 1000 buckets")):
        with pytest.raises(OptionError, match=words):
            parse_hist(bad)
    with pytest.raises(ExpressionError) as info:
        parse_hist("arg0 +:0:10:1")
    assert info.value.column == 7


def _py_bucket(v: int) -> int:
    return 0 if v < 0 else 1 if v == 0 else 2 + v.bit_length() - 1


def test_log2_bucket_c_matches_python(tmp_path: Path) -> None:
    values = [-(1 << 63), -5, -1, 0, 1, 2, 3, 4, 7, 8, 1023, 1024, 1025, 4096, 4097,
              (1 << 32) - 1, 1 << 32, (1 << 62) + 5, (1 << 63) - 1]
    src = tmp_path / "b.c"
    calls = "\n".join(f'printf("%u\\n", agg_log2_bucket((s64){v}LL));' if v > -(1 << 63)
                      else 'printf("%u\\n", agg_log2_bucket((s64)(-9223372036854775807LL - 1)));'
                      for v in values)
    src.write_text("#include <stdio.h>\n#include <stdint.h>\ntypedef uint64_t u64;"
                   " typedef int64_t s64; typedef uint32_t u32;\n#define __always_inline inline\n"
                   + LOG2_C + "\nint main(void) {\n" + calls + "\nreturn 0; }\n")
    exe = tmp_path / "b"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert got == [_py_bucket(v) for v in values]


def test_log2_histogram_buckets() -> None:
    counts = [0] * 65
    for v in (0, 1, 5, 6, 4096, 4097, -3):
        counts[_py_bucket(v)] += 1
    h = log2_histogram(counts)
    assert h.buckets[0] == Bucket(None, 0, 1)           # the negative value
    assert Bucket(0, 1, 1) in h.buckets and Bucket(4, 8, 2) in h.buckets
    assert Bucket(4096, 8192, 2) in h.buckets and h.total == 7
    assert log2_histogram([0] * 65) == Histogram("log2", ())
    lines = h.format()
    assert lines[0].startswith("(..., 0)") and any(ln.startswith("[4K, 8K)") for ln in lines)


def test_linear_histogram_and_percentiles() -> None:
    h = linear_histogram([2, 1, 0, 3, 4], 0, 30, 10)
    assert h.buckets == (Bucket(None, 0, 2), Bucket(0, 10, 1), Bucket(10, 20, 0),
                         Bucket(20, 30, 3), Bucket(30, None, 4))
    assert h.percentile(0.5) == Bucket(20, 30, 3)     # 5th of 10
    assert h.percentile(0.2) == Bucket(None, 0, 2)
    assert h.percentile(0.3) == Bucket(0, 10, 1)
    assert h.percentile(1.0) == Bucket(30, None, 4)
    assert Histogram("log2", ()).percentile(0.5) is None


def test_latency_row_bounds() -> None:
    counts = [0] * 65
    for ns in (100, 120, 130, 1000, 1_500_000):
        counts[_py_bucket(ns)] += 1
    row = LatencyRow((), 5, 1_501_350, 100, 1_500_000, log2_histogram(counts))
    # ranks: [64, 128) holds the 1st and 2nd (100, 120), [128, 256) the 3rd (130)
    assert row.percentile(0.4) == Bucket(64, 128, 2)
    assert row.percentile(0.5) == Bucket(128, 256, 1)
    assert row.percentile_bound(0.5) == 256
    assert row.percentile_bound(0.99) == 1_500_000  # the bucket ends above the max
    res = LatencyResult((), (row,), "uprobe:b:f", "uretprobe:b:f", unmatched_exits=2,
                        abandoned=3)
    text = res.format()
    assert "count 5" in text and "2 exits without an entry" in text and "3 entries left" in text
    d = json.loads(json.dumps(res.to_json()))
    assert d["rows"][0]["p99"]["bound"] == 1_500_000 and d["abandoned"] == 3


def test_aggregate_text_and_json() -> None:
    rows = (Row(("java", 4096), 3, 12288), Row(("javac", 8), 10, 80, truncated=("comm",)))
    res = AggregateResult(("comm", "arg0"), rows, (("sum", "arg0"),), not_counted=4,
                          max_keys=2, key_str_max=16)
    text = res.format()
    lines = text.splitlines()
    assert "13 hits" in lines[0] and "cut at 16 bytes" in lines[0]
    assert lines[1].split() == ["comm", "arg0", "count", "sum(arg0)"]
    assert lines[2].split() == ["javac...", "8", "10", "80"]   # most counted first
    assert "4 hits not counted" in text and "at most 2 keys" in text
    d = json.loads(json.dumps(res.to_json()))
    assert d["rows"][1] == {"key": {"comm": "javac", "arg0": 8}, "count": 10, "sum": 80,
                            "truncated": ["comm"]}
    assert res.row("java", 4096) == rows[0] and res.count == 13


def test_number_formats() -> None:
    assert format_count(4096) == "4K" and format_count(4097) == "4097"
    assert format_count(1 << 20) == "1M" and format_count(0) == "0"
    assert format_ns(512) == "512ns" and format_ns(1_048_576) == "1.05ms"
    assert format_ns(2_500_000_000) == "2.5s"
