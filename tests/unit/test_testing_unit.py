"""apptrace.testing without a kernel: how probes and arguments are matched,
what failure messages say, saving and loading runs (every kind of value),
and the errors for files that are not saved runs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from apptrace.errors import OptionError, RunFileError, TraceAssertionError
from apptrace.events import Event, ProbeInfo, Unavailable
from apptrace.jvm import GcPause, PoolUsage
from apptrace.ssl import Chunk, Connection, Gap
from apptrace.symbolize import StackFrame
from apptrace.testing import Run, RunStats, load

BIN = "/opt/app/bin/server"
DONE = ProbeInfo("usdt", BIN, "myapp:request__done", "usdt:myapp:request__done(str,int)")
START = ProbeInfo("usdt", BIN, "myapp:request__start", "usdt:myapp:request__start")
MALLOC = ProbeInfo("uprobe", "/usr/lib/x86_64-linux-gnu/libc.so.6", "malloc",
                   "uprobe:libc:malloc(long)")


def ev(probe: ProbeInfo, ts: int, *args: object, **kw: object) -> Event:
    return Event(ts, 42, 42, "server", probe, tuple(args), **kw)  # type: ignore[arg-type]


def make_run(**kw: object) -> Run:
    events = (ev(START, 1000, "GET /a"), ev(DONE, 2000, "/a", 200),
              ev(START, 3000, "GET /b"), ev(DONE, 4000, "/b", 404),
              ev(MALLOC, 5000, 64))
    stats = RunStats(events=5, per_probe={"usdt:myapp:request__done": 2,
                                          "usdt:myapp:request__start": 2,
                                          "uprobe:malloc": 1, "uprobe:free": 0})
    base: dict[str, object] = dict(argv=(BIN, "2"), pid=42, exit_status=0, stdout=b"ok\n",
                                   probes=(DONE.spec, START.spec, MALLOC.spec,
                                           "uprobe:libc:free"),
                                   events=events, stats=stats, duration_s=0.5)
    base.update(kw)
    return Run(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("selector, n", [
    ("myapp:request__done", 2), ("usdt:myapp:request__done", 2),
    ("usdt:myapp:request__done(str,int)", 2), (f"usdt:{BIN}:myapp:request__done", 2),
    ("myapp:*", 4), ("usdt:*", 4), ("myapp:request__?one", 2), ("malloc", 1),
    ("uprobe:malloc", 1), ("uprobe:libc:malloc", 1), ("uprobe:libc:malloc(long)", 1),
    ("uprobe:libm:malloc", 0), ("usdt:/other/bin:myapp:request__done", 0), ("done", 0),
])
def test_a_probe_is_named_as_traced_by_label_or_by_glob(selector: str, n: int) -> None:
    assert make_run().count(selector) == n


@pytest.mark.parametrize("args, n", [
    (("/a", 200), 1), (("/a",), 1), ((..., 404), 1), ((..., ...), 2), ({1: 404}, 1),
    ((str, int), 2), ((re.compile(r"^/[ab]$"),), 2), ((re.compile(rb"/a"),), 0),
    ((lambda p: p.endswith("b"),), 1), ((..., 200, ...), 0), (("/a", 200.0), 1),
])
def test_arguments_match_by_value_type_pattern_or_predicate(args: object, n: int) -> None:
    assert make_run().count("myapp:request__done", args=args) == n  # type: ignore[arg-type]


def test_a_failure_lists_what_fired_and_why_each_event_did_not_match() -> None:
    run = make_run()
    with pytest.raises(TraceAssertionError) as info:
        run.assert_fired("myapp:request__done", count=2, where=lambda e: e.args[1] == 200)
    text = str(info.value)
    assert isinstance(info.value, AssertionError)
    assert text.splitlines() == [
        "expected myapp:request__done to fire 2 times where lambda e: e.args[1] == 200;"
        " it fired once",
        "what fired (the events of myapp:request__done, in order; + matched, - did not):",
        "  +     0.001 ms server[42] usdt:myapp:request__done '/a' 200",
        "  -     0.003 ms server[42] usdt:myapp:request__done '/b' 404    <- where() is false",
        "per probe: uprobe:free 0, uprobe:malloc 1, usdt:myapp:request__done 2,"
        " usdt:myapp:request__start 2",
    ]


def test_messages_for_probes_that_were_not_traced_or_never_fired() -> None:
    run = make_run()
    with pytest.raises(TraceAssertionError, match=r"'myapp:nope' names none of the probes"
                                                  r" traced: uprobe:free, uprobe:malloc"):
        run.assert_fired("myapp:nope")
    with pytest.raises(TraceAssertionError, match=r"uprobe:free attached but never fired"):
        run.assert_fired("free")
    lost = make_run(stats=RunStats(events=5, lost=7, lost_per_probe={"uprobe:malloc": 7}))
    with pytest.raises(TraceAssertionError, match=r"note: 7 events were lost in the kernel"
                                                  r" \(ring buffer full\), so counts may be"
                                                  r" short: uprobe:malloc 7"):
        lost.assert_fired("malloc", count=8)


def test_a_raising_predicate_is_reported_not_raised() -> None:
    with pytest.raises(TraceAssertionError, match=r"<- where\(\) raised IndexError"):
        make_run().assert_fired("myapp:request__start", where=lambda e: e.args[5] == 1)
    with pytest.raises(TraceAssertionError, match=r"arg 0: .* raised ZeroDivisionError"):
        make_run().assert_fired("malloc", args=(lambda v: v / 0,))


def test_an_unreadable_argument_never_matches_a_value() -> None:
    run = make_run(events=(ev(DONE, 1, Unavailable("register xmm0"), 200),))
    assert run.count("myapp:request__done", args=(..., 200)) == 1
    with pytest.raises(TraceAssertionError, match=r"arg 0 is unavailable \(register xmm0\),"
                                                  r" expected a str"):
        run.assert_fired("myapp:request__done", args=(str,))


def test_order_and_not_fired() -> None:
    run = make_run()
    got = run.assert_order("myapp:request__start", ("myapp:request__done", {1: 404}), "malloc")
    assert [e.ts_ns for e in got] == [1000, 4000, 5000]
    with pytest.raises(TraceAssertionError, match=r"step 2 \(myapp:request__start\) did not"
                                                  r" happen after: .* '/b' 404"):
        run.assert_order(("myapp:request__done", {1: 404}), "myapp:request__start")
    run.assert_not_fired("myapp:request__done", args=(..., 500))
    with pytest.raises(TraceAssertionError, match="not to fire with args"):
        run.assert_not_fired("myapp:request__done", args=(..., 404))
    with pytest.raises(OptionError):
        run.assert_fired("malloc", count=1, at_least=1)


def test_run_and_its_counts_are_immutable() -> None:
    run = make_run()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.exit_status = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        RunStats.from_json({"per_probe": {"a": 1}}).per_probe["a"] = 2  # type: ignore[index]
    assert isinstance(run.events, tuple) and isinstance(run.events[0], tuple)


def _tls_items() -> tuple[object, ...]:
    conn = Connection(1, 42, 0xdead, "openssl", 5, ("127.0.0.1", 5000), ("::1", 443))
    return (Chunk(10, 42, 42, "server", "openssl", "SSL_write", "write", conn, 0,
                  b"GET / HTTP/1.1\r\n\r\n\x00\xff", 20, 0),
            Gap(11, 42, 42, "server", "openssl", "SSL_write", "write", conn, 20, 5, "lost"),
            Chunk(12, 42, 42, "server", "openssl", "SSL_read", "read", conn, 0, b"HTTP/1.1 200",
                  12, 0, peek=True))


def _gc() -> tuple[object, ...]:
    pool = PoolUsage("G1 Young Generation", "G1 Eden Space", True, 0, None, 100, 200, 0, 200)
    return (GcPause(1, 5_000_001, 7, 8, "G1CollectForAllocation", "G1 Young Generation",
                    ("G1 Young Generation",), False, 5_000_000, 5_100_000, 4_900_000,
                    5_000_000, "G1 Evacuation Pause", 100, 0, (pool,), ttsp_ns=1000,
                    causes=("G1 Evacuation Pause",)),)


def test_every_kind_of_value_survives_save_and_load(tmp_path: Path) -> None:
    frames = (StackFrame(0x401000, "inner", 4, "/src/a.c", 42, True, BIN),
              StackFrame(0x7f00, None, 0, None, None, False, None, "address is unmapped"))
    events = (ev(DONE, 1, "caf\u00e9", -(2**63), 2**64 - 1, 1.5, math.inf, b"\x00\x01",
                 Unavailable("fault"), truncated=(0,), stack=frames, raw_stack=(1, 2)),
              ev(MALLOC, 2, math.nan))
    run = make_run(events=events, tls=_tls_items(), tls_lost=3, gc=_gc(), gc_lost=1,
                   warnings=("stack of 42: unmapped",), exit_status=-9, stdout=b"\xff\n",
                   finished=False)
    back = load(run.save(tmp_path / "run.jsonl"))
    nan_free = [e for e in back.events if e.probe == DONE]
    assert nan_free == [events[0]]
    assert math.isnan(back.events[1].args[0])
    assert back.events[0].stack == frames and back.events[0].probe == DONE
    assert (back.tls, back.gc, back.stats, back.stdout) == (run.tls, run.gc, run.stats,
                                                            run.stdout)
    assert (back.exit_status, back.finished, back.warnings) == (-9, False, run.warnings)
    assert back.sent() == b"GET / HTTP/1.1\r\n\r\n\x00\xff" + bytes(5)
    assert back.max_pause_ms == 5.0
    assert back.pauses[0].kind == run.pauses[0].kind  # type: ignore[attr-defined]
    assert all(json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines())


@pytest.mark.parametrize("content, line, message", [
    ("", 0, "empty file: not a saved apptrace run"),
    ("{nope\n", 1, "not JSON"),
    ('{"format": "other"}\n', 1, 'not a saved apptrace run (no "format": "apptrace-run"'),
    ('{"format": "apptrace-run", "version": 99}\n', 1, "saved by format version 99;"
                                                       " this apptrace reads version 1"),
    ('{"format": "apptrace-run", "version": 1}\n{"t": "event"}\n', 2,
     "cannot read this record (KeyError"),
    ('{"format": "apptrace-run", "version": 1}\n\n{"t": "odd"}\n', 3,
     "unknown record type 'odd'"),
])
def test_files_that_are_not_saved_runs_name_the_line(tmp_path: Path, content: str, line: int,
                                                     message: str) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(RunFileError) as info:
        load(p)
    where = f"{p}:{line}: " if line else f"{p}: "
    assert str(info.value).startswith(where + message), str(info.value)
    assert info.value.line == line and isinstance(info.value, ValueError)
    with pytest.raises(RunFileError, match="cannot open: No such file or directory"):
        load(tmp_path / "missing.jsonl")


def test_tls_and_gc_failures_show_what_was_there() -> None:
    run = make_run(tls=_tls_items(), tls_lost=2, gc=_gc())
    with pytest.raises(TraceAssertionError) as info:
        run.assert_sent(b"POST")
    lines = str(info.value).splitlines()
    assert lines[0] == "expected b'POST' to be sent over TLS; it was not"
    assert lines[1] == "connection 1 (tcp 127.0.0.1:5000 -> [::1]:443) sent 25 bytes:"
    assert lines[2] == r"  b'GET / HTTP/1.1\r\n\r\n\x00\xff\x00\x00\x00\x00\x00'"
    assert lines[3] == "  with 1 gap(s) the capture does not have: 5 bytes at 20 (lost)"
    assert lines[4] == "note: 2 TLS records were lost (ring buffer full)"
    assert run.assert_sent(re.compile(rb"GET (\S+)")) == b"GET /"
    assert run.assert_sent("HTTP/1.1") == b"HTTP/1.1"
    with pytest.raises(TraceAssertionError, match="nothing was received on any connection"):
        run.assert_received(b"HTTP")  # the only read was a peek: not part of the stream
    with pytest.raises(TraceAssertionError, match=r"expected no GC pause over 1 ms; 1 of 1"
                                                  r" were \(the longest 5.000 ms\)"):
        run.assert_gc(max_pause_ms=1)
    with pytest.raises(TraceAssertionError, match="no GC data was recorded"):
        make_run().assert_gc()
