"""Latency pairs timed in the kernel, checked against the traced program.

``agg_calls N`` calls ``fx_lat`` recursively (each level sleeps 200 us after
its child returns) and, every 4th iteration, from a frame that longjmps
three levels back up; each call that returns prints its own duration. With
``wait`` the fixture waits for the test inside a call, so the tracer sees
that call's return without its entry.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import missing

from apptrace.agg import Latency
from apptrace.errors import OptionError, ProbeNotFoundError

pytestmark = pytest.mark.bpf

PY = "/usr/bin/python3.11"


@pytest.fixture(scope="module")
def exe(fixtures_dir: Path) -> Path:
    return fixtures_dir / "agg_calls_pie"


def _lats(lines: list[str]) -> list[tuple[int, int, int]]:
    """(depth, mode, ns) of each call that returned, as the fixture measured it."""
    return [(int(a), int(b), int(c)) for _, a, b, c in
            (ln.split() for ln in lines if ln.startswith("lat "))]


def _bucket(ns: int) -> int:
    return ns.bit_length() - 1   # log2 bucket [2^k, 2^(k+1))


def run_latency(exe: Path, n: int, **kw: Any) -> tuple[Any, list[str]]:
    lat = Latency(f"uprobe:{exe}:fx_lat(int,long,int)", command=[str(exe), str(n)],
                  command_stdout=subprocess.PIPE, **kw)
    with lat:
        lat.start()
        while lat.wait(0.2):
            pass
        lat.detach()
        res = lat.read()
        child = lat._target.child
        assert child is not None and child.proc.stdout is not None
        lines = child.proc.stdout.read().decode().splitlines()
        assert lat.exit_status == 0
    return res, lines


def _expected_calls(n: int) -> int:
    return sum(i % 3 + 1 for i in range(n)) + sum(1 for i in range(n) if i % 4 == 3)


def test_recursion_and_longjmp_pair_exactly(exe: Path) -> None:
    n = 24
    res, lines = run_latency(exe, n, by="arg0,arg2")
    calls = _lats(lines)
    jumps = sum(1 for i in range(n) if i % 4 == 3)
    assert len(calls) == _expected_calls(n)   # depth i%3: 1, 2 or 3 calls; 1 per jump
    # Every exit paired with its own entry: rows keyed by the entry's depth and
    # mode hold exactly the calls that returned with that depth and mode.
    want = collections.Counter((d, m) for d, m, _ in calls)
    assert {r.key: r.count for r in res.rows} == dict(want)
    assert (0, 2) not in want and (2, 1) in want  # jumped-over frames never return
    assert res.abandoned == 3 * jumps and res.unmatched_exits == 0 and res.in_flight == 0
    assert res.paired_by == "stack" and res.not_counted == 0
    for r in res.rows:
        mine = sorted(ns for d, m, ns in calls if (d, m) == r.key)
        # The kernel's duration spans the whole call (entry to return); the
        # fixture's is measured inside it, so it is a little shorter.
        assert r.min_ns >= mine[0] and r.max_ns >= mine[-1]
        assert r.total_ns >= sum(mine)
        assert r.total_ns - sum(mine) < len(mine) * 2_000_000, r
        # Histogram: each call in its own bucket or, past a bound, the next.
        lo = collections.Counter(_bucket(ns) for ns in mine)
        hi = collections.Counter(_bucket(ns + 2_000_000) for ns in mine)
        got = {b.lo.bit_length() - 1: b.count for b in r.hist.buckets if b.count}
        for k, c in got.items():
            sure = sum(1 for ns in mine if _bucket(ns) == _bucket(ns + 2_000_000) == k)
            assert sure <= c <= lo.get(k, 0) + hi.get(k, 0), (r.key, k, got, lo)
        assert r.count == len(mine) == sum(got.values())
        p50 = r.percentile(0.5)
        assert p50 is not None and p50.lo <= sorted(mine)[(len(mine) - 1) // 2] * 1.0 + 2e6


def test_attached_mid_call(exe: Path, spawn: Callable[..., Any]) -> None:
    """A call already running when the probes attach has no return probe
    either (the kernel sets a return probe up at the entry): nothing to pair,
    nothing counted wrong."""
    child = spawn([exe, 8, "wait"])   # waits inside a call of fx_lat
    with Latency(f"uprobe:{exe}:fx_lat", pid=child.pid, by="arg2") as lat:
        lat.start()
        child.send()
        lines = child.finish()
        lat.detach()
        res = lat.read()
    calls = _lats(lines)
    assert res.count == len(calls) == _expected_calls(8)
    assert {r.key[0]: r.count for r in res.rows} == {0: 15, 1: 2}
    assert res.abandoned == 6 and res.in_flight == 0 and res.unmatched_exits == 0
    assert "6 entries left without an exit" in res.format()


def test_intervals(exe: Path) -> None:
    lat = Latency(f"uprobe:{exe}:fx_lat", command=[str(exe), "600"],
                  command_stdout=subprocess.DEVNULL, intervals=True)
    results = []
    with lat:
        lat.start()
        while lat.wait(0.1):
            results.append(lat.read_interval())
        lat.detach()
        results.append(lat.read_interval())
    assert len(results) >= 3
    assert sum(r.count for r in results) == _expected_calls(600)
    assert sum(r.abandoned for r in results) == 3 * 150
    assert [r.interval for r in results] == list(range(1, len(results) + 1))


def _python() -> str:
    if not os.path.exists(PY):
        missing(f"{PY} (Debian's python3.11, built with USDT probes) is not installed")
    return PY


def test_usdt_pairs_in_cpython(spawn: Callable[..., Any]) -> None:
    """Two USDT probes: CPython's garbage collections (gc__start/gc__done), by
    generation, and its function calls (function__entry/return) by name,
    attached while two frames run (their returns have no entry)."""
    script = ("import gc, sys, time\ngc.disable()\n"
              "def wait(word):\n    print(word, flush=True)\n    sys.stdin.readline()\n"
              "def slow(): time.sleep(0.002)\n"
              "def fast(): pass\n"
              "wait('ready')\n"
              "for i in range(30): gc.collect(i % 3)\n"
              "for i in range(20): slow(); fast()\n"
              "wait('done')\n")
    child = spawn([_python(), "-c", script])
    gcs = Latency("usdt:python:gc__start(int)", "usdt:python:gc__done", pid=child.pid,
                  by="arg0")
    calls = Latency("usdt:python:function__entry(str,str,int)",
                    "usdt:python:function__return", pid=child.pid, by="arg1",
                    where='arg1 == "slow" || arg1 == "fast"')
    with gcs, calls:
        gcs.start()
        calls.start()
        child.send()    # <module> and wait('ready') are running: returns without entries
        assert child.readline() == "done"
        gcs.detach()
        calls.detach()
        res_gc, res = gcs.read(), calls.read()
    child.send()
    child.finish()
    assert {r.key[0]: r.count for r in res_gc.rows} == {0: 10, 1: 10, 2: 10}
    assert res_gc.paired_by == "depth" and res_gc.unmatched_exits == 0
    rows = {r.key[0]: r for r in res.rows}
    assert set(rows) == {"slow", "fast"}
    assert rows["slow"].count == 20 and rows["fast"].count == 20
    assert rows["slow"].min_ns >= 2_000_000 > rows["fast"].max_ns
    # wait('ready') returned without an entry; wait('done') is still running
    assert res.unmatched_exits == 1 and res.in_flight == 1


def test_bad_pairs() -> None:
    with pytest.raises(OptionError, match="pairs of USDT probes need"):
        Latency("usdt:python:gc__start")
    with pytest.raises(OptionError, match="a uretprobe is an exit"):
        Latency("uretprobe:libc:malloc")
    with pytest.raises(OptionError, match="arg0..arg11"):
        Latency("uprobe:libc:malloc", by="ustack")


APPTRACE = [sys.executable, "-m", "apptrace"]


def test_cli(exe: Path) -> None:
    r = subprocess.run([*APPTRACE, "latency", "--json", "--by", "arg0",
                        f"uprobe:{exe}:fx_lat", "--", str(exe), "12"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (obj,) = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert obj["type"] == "latency" and obj["count"] == 27 and obj["abandoned"] == 9
    assert {row["key"]["arg0"]: row["count"] for row in obj["rows"]} == {0: 12, 1: 8, 2: 7}
    assert all(row["p99"]["bound"] <= row["max_ns"] for row in obj["rows"])
    r = subprocess.run([*APPTRACE, "latency", f"uprobe:{exe}:fx_lat", "--", str(exe), "12"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "27 calls" in r.stdout and "p99 <" in r.stdout
    assert "9 entries left without an exit" in r.stdout
    r = subprocess.run([*APPTRACE, "latency", "usdt:python:gc__start", "-p", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "pairs of USDT probes need" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_symbol(exe: Path) -> None:
    with pytest.raises(ProbeNotFoundError):
        with Latency(f"uprobe:{exe}:no_such_function", path=str(exe)) as lat:
            lat.start()
