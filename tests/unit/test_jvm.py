"""apptrace.jvm without a kernel: GC log parsing and matching, histograms and
summaries, the hsperfdata reader, the generated C, metrics rendering."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from apptrace.errors import GcLogError, OptionError
from apptrace.jvm import bpfgen
from apptrace.jvm.gclog import compare_with_log, format_comparison, parse_gc_log, read_gc_log
from apptrace.jvm.gctrace import (
    GcCycle,
    GcPause,
    PoolUsage,
    format_event,
    heap_usage,
    pause_kind,
)
from apptrace.jvm.hsperf import HsPerfData
from apptrace.jvm.prometheus import GcMetrics, parse_listen
from apptrace.jvm.summary import Accumulator, format_summary, log2_histogram
from apptrace.usdt.args import parse_argument
from apptrace.usdt.notes import Site

# Lines as JDK 17 and 25 write them with
# -Xlog:gc*,safepoint:file=F:uptime,timenanos,tid,level,tags
SP = "Safepoint \"{op}\", Time since last: 1 ns, Reaching safepoint: {r} ns, {rest}Total: {t} ns"
LOG = "\n".join([
    "[0.007s][845577402666ns][21114][info][gc,init] Concurrent Workers: 1",
    "[0.861s][1000000000ns][21120][info][gc,start    ] GC(0) Pause Young (Normal)"
    " (G1 Evacuation Pause)",
    "[0.867s][1005000000ns][21120][info][gc          ] GC(0) Pause Young (Normal)"
    " (G1 Evacuation Pause) 12M->1M(256M) 5.352ms",
    "[0.867s][1005100000ns][21120][info][safepoint   ] "
    + SP.format(op="G1CollectForAllocation", r=36144, t=5484579,
                rest="Cleanup: 4757 ns, At safepoint: 5443678 ns, "),
    "[1.045s][2004000000ns][21864][info][gc          ] GC(52) Pause Young (System.gc())"
    " 94M->92M(252M) 7.234ms",
    "[1.076s][2030000000ns][21864][info][gc             ] GC(53) Pause Full (System.gc())"
    " 92M->20M(252M) 24.298ms",
    "[1.077s][2031000000ns][21864][info][safepoint      ] "
    + SP.format(op="ParallelGCSystemGC", r=10000, t=31510000,
                rest="At safepoint: 31500000 ns, "),
    "[0.376s][3000020000ns][22361][info][gc,phases   ] GC(0) Y: Pause Mark Start (Major)"
    " 0.025ms",
    "[0.376s][3000030000ns][22361][info][safepoint   ] "
    + SP.format(op="ZMarkStartYoungAndOld", r=114430, t=192796,
                rest="At safepoint: 75061 ns, Leaving safepoint: 3305 ns, ")
    + ", Threads: 1 runnable, 10 total",
    "[0.488s][4000020000ns][22353][info][gc,phases   ] GC(10) y: Pause Mark End 0.013ms",
    "[0.569s][5000080000ns][22507][info][gc          ] GC(0) Pause Init Mark (unload classes)"
    " 0.093ms",
    "[0.900s][6000000000ns][22507][info][gc          ] GC(7) Pause Degenerated GC (Mark)"
    " 256M->100M(256M) 8.610ms",
    "[0.950s][7000000000ns][22507][info][gc          ] GC(8) Pause Remark 50M->49M(256M)"
    " 0.703ms",
    "[0.960s][8000000000ns][22507][info][gc          ] GC(9) Pause Young (Mixed)"
    " (G1 Evacuation Pause) (Evacuation Failure: Allocation) 200M->100M(256M) 5.000ms",
])


def _pause(ts: int, end: int, dur: int, managers: tuple[str, ...] = ("G1 Young Generation",),
           sp: Optional[int] = None, pid: int = 7, cause: Optional[str] = None,
           before: Optional[int] = None, after: Optional[int] = None,
           vm_op: str = "G1CollectForAllocation") -> Any:
    return SimpleNamespace(type="pause", ts_ns=ts, end_ns=end, duration_ns=dur,
                           managers=managers, safepoint_ns=sp, pid=pid, cause=cause,
                           heap_before=before, heap_after=after, vm_op=vm_op)


def test_parse_every_pause_line_shape() -> None:
    log = parse_gc_log(LOG.splitlines())
    got = [(p.gc_id, p.kind, p.cause, p.duration_ns) for p in log.pauses]
    assert got == [
        (0, "Pause Young (Normal)", "G1 Evacuation Pause", 5_352_000),
        (52, "Pause Young", "System.gc()", 7_234_000),
        (53, "Pause Full", "System.gc()", 24_298_000),
        (0, "Pause Mark Start (Major)", None, 25_000),
        (10, "Pause Mark End", None, 13_000),
        (0, "Pause Init Mark (unload classes)", None, 93_000),
        (7, "Pause Degenerated GC (Mark)", None, 8_610_000),
        (8, "Pause Remark", None, 703_000),
        (9, "Pause Young (Mixed)", "G1 Evacuation Pause", 5_000_000),
    ]
    first = log.pauses[0]
    assert (first.ts_ns, first.heap_before, first.heap_after, first.heap_unit) == \
        (1_005_000_000, 12 << 20, 1 << 20, 1 << 20)
    assert [(s.vm_op, s.total_ns, s.reaching_ns) for s in log.safepoints] == [
        ("G1CollectForAllocation", 5484579, 36144), ("ParallelGCSystemGC", 31510000, 10000),
        ("ZMarkStartYoungAndOld", 192796, 114430)]


def test_lines_without_the_tags_decorator_are_read_by_their_text() -> None:
    text = ("[0.861s][1000ns] GC(0) Pause Young (Normal) (G1 Evacuation Pause)\n"
            "[0.867s][2000ns] GC(0) Pause Young (Normal) (G1 Evacuation Pause) 12M->1M(256M)"
            " 1.000ms\n"
            '[0.867s][3000ns] Safepoint "G1CollectForAllocation", Reaching safepoint: 1 ns,'
            " Total: 5 ns\n")
    log = parse_gc_log(text.splitlines())
    assert len(log.pauses) == 1 and len(log.safepoints) == 1


def test_a_log_without_timenanos_or_not_a_log_is_refused(tmp_path: Any) -> None:
    with pytest.raises(GcLogError, match="timenanos") as err:
        parse_gc_log(["[0.867s][info][gc] GC(0) Pause Young (Normal) (x) 12M->1M(256M) 5.3ms"])
    assert "-Xlog:gc*" in str(err.value)
    with pytest.raises(GcLogError, match="not a HotSpot unified log"):
        parse_gc_log(["hello", "world"])
    with pytest.raises(GcLogError, match="cannot read"):
        read_gc_log(str(tmp_path / "missing.log"))
    assert parse_gc_log([]).pauses == ()


def test_compare_counts_collections_and_matches_by_time() -> None:
    log = parse_gc_log(LOG.splitlines())
    traced = [
        # the G1 young pause around its line, with a safepoint
        _pause(1_000_000_000 - 50_000, 1_005_050_000, 5_400_000, sp=5_480_000,
               cause="G1 Evacuation Pause", before=12 << 20, after=(1 << 20) + 5),
        # Parallel's System.gc(): one pause, two managers, two log lines
        _pause(1_996_000_000, 2_030_500_000, 31_600_000, ("PS Scavenge", "PS MarkSweep"),
               sp=31_500_000, cause="System.gc()", before=95 << 20, after=20 << 20),
        # a traced pause no line falls in
        _pause(9_000_000_000, 9_001_000_000, 1_000_000),
    ]
    c = compare_with_log(traced, log, start_ns=0)
    assert (c.log_pauses, c.traced_pauses, c.traced_collections) == (9, 3, 4)
    assert c.matched_lines == 3 and len(c.unmatched_lines) == 6 and c.unmatched_pauses == 1
    assert not c.counts_equal
    kinds = {k.kind: k for k in c.kinds}
    assert kinds["Pause Young (Normal)"].error_median_ns == 48_000
    assert kinds["Pause Young + Pause Full"].error_median_ns == 31_600_000 - 31_532_000
    # safepoints pair with the first log line after each began: -4579 and -10000 ns
    assert c.safepoint is not None and c.safepoint.count == 2
    assert c.safepoint.error_median_ns == int((-4579 - 10000) / 2)
    assert c.causes_agree == 3 and c.causes_differ == ()
    assert (c.heap_agree, c.heap_differ) == (2, 0)
    text = "\n".join(format_comparison(c, "gc.log"))
    assert "counts DIFFERENT" in text and "causes: 3 agree" in text
    # the window: lines of collections that began before the trace are not counted
    late = compare_with_log(traced, log, start_ns=1_999_000_000)
    assert late.log_pauses == 7  # GC(52) began at 1.9968 s


def test_compare_picks_the_jvm_the_log_belongs_to() -> None:
    log = parse_gc_log(LOG.splitlines()[:4])
    mine = _pause(999_000_000, 1_006_000_000, 5_350_000, pid=42, sp=5_484_000)
    other = _pause(500_000_000, 501_000_000, 1_000_000, pid=43)
    c = compare_with_log([other, mine], log, start_ns=0)
    assert c.pid == 42 and c.counts_equal and c.traced_pauses == 1


def test_buckets_contain_their_durations() -> None:
    assert bpfgen.HIST_BUCKETS & (bpfgen.HIST_BUCKETS - 1) == 0  # the C masks the index
    durations = sorted(set(range(0, 20_000, 7))
                       | {10 ** k + d for k in range(4, 19) for d in (-1, 0, 1)})
    buckets = [bpfgen.bucket_of(ns) for ns in durations]
    assert buckets == sorted(buckets) and buckets[-1] < bpfgen.HIST_BUCKETS
    for ns, b in zip(durations, buckets):
        lo, hi = bpfgen.bucket_bounds(b)
        assert lo <= ns // 1000 < hi, (ns, b, lo, hi)


def test_summary_exact_and_from_the_kernel_histogram() -> None:
    acc = Accumulator()
    durations = [1_000_000 * (i + 1) for i in range(100)]  # 1..100 ms
    for d in durations:
        acc.add(7, "Copy", "pause", d, safepoint_ns=d + 10_000, cause="Allocation Failure")
    s = acc.snapshot()
    row = s.collectors[0]
    assert (row.count, row.total_ns, row.max_ns, row.exact) == (100, sum(durations),
                                                                100_000_000, True)
    assert (row.p50_ns, row.p90_ns, row.p99_ns) == (51_000_000, 90_000_000, 99_000_000)
    assert row.safepoint_total_ns == sum(durations) + 100 * 10_000
    agg = Accumulator()
    agg.merge_hist(7, "Copy", "pause", full=False, count=100, total_ns=sum(durations),
                   max_ns=100_000_000, hist=list(row.hist), sp_count=0, sp_total_ns=0,
                   sp_max_ns=0)
    est = agg.snapshot().collectors[0]
    assert not est.exact and est.p99_ns <= est.max_ns
    for exact, guess in ((row.p50_ns, est.p50_ns), (row.p90_ns, est.p90_ns)):
        assert abs(guess - exact) <= 0.25 * exact
    rows = log2_histogram(row.hist)
    assert rows[0][0] == 512 and rows[-1][1] == 131071 and sum(c for *_, c in rows) == 100
    text = "\n".join(format_summary(s, {7: "Main"}, 3.0))
    assert "100 pauses" in text and "Main" in text and "usecs" in text and "young" in text


def _pool(mgr: str, name: str, u0: int, u1: int, c1: int = 0) -> PoolUsage:
    return PoolUsage(mgr, name, True, 0, None, u0, u0, u1, c1)


def test_pause_kind_and_heap_of_a_young_escalated_to_full() -> None:
    pools = (_pool("Copy", "Eden Space", 100, 0, 10), _pool("Copy", "Tenured Gen", 50, 90, 20),
             _pool("MarkSweepCompact", "Eden Space", 0, 0, 10),
             _pool("MarkSweepCompact", "Tenured Gen", 90, 30, 20))
    assert heap_usage(pools) == (150, 30, 30)
    assert pause_kind("GenCollectForAllocation", ("Copy", "MarkSweepCompact"), True) == \
        "Young+Full"
    assert pause_kind("G1PauseRemark", ("G1 Concurrent GC",), False) == "Remark"
    assert pause_kind("ZMarkStart", (), False) == "ZMarkStart"
    p = GcPause(1, 2, 7, 8, "GenCollectForAllocation", "Copy+MarkSweepCompact",
                ("Copy", "MarkSweepCompact"), True, 3_000_000, 3_100_000, None, None,
                "Allocation Failure", 150 << 20, 30 << 20, pools)
    assert format_event(p, "12:00:00.000") == (
        "12:00:00.000 7 Pause Young+Full (Allocation Failure) 150M->30M(0K) 3.000ms"
        " safepoint 3.100ms [Copy+MarkSweepCompact; GenCollectForAllocation]")
    cyc = GcCycle(1, 2, 7, 9, "ZGC Cycles", 45_000_000, None, None, None, ())
    assert format_event(cyc) == "7 Cycle ZGC Cycles 45.000ms"
    assert p.to_json()["kind"] == "Young+Full" and cyc.to_json()["type"] == "cycle"


def _perfdata(entries: list[tuple[str, str, int, bytes]]) -> bytes:
    """An hsperfdata file as perfMemory.hpp lays it out (little endian)."""
    body = b""
    for name, dtype, units, value in entries:
        nm = name.encode() + b"\0"
        head = struct.calcsize("<iiibbbbi")
        name_off = head
        data_off = (head + len(nm) + 7) & ~7
        length = (data_off + len(value) + 7) & ~7
        vlen = len(value) if dtype == "B" else 0
        e = struct.pack("<iiibbbbi", length, name_off, vlen, ord(dtype), 0, units, 1, data_off)
        e += nm + bytes(data_off - head - len(nm)) + value
        body += e + bytes(length - len(e))
    prologue = b"\xca\xfe\xc0\xc0" + bytes([1, 2, 0, 1]) + struct.pack(
        "<iiqii", 32 + len(body), 0, 0, 32, len(entries))
    return prologue + body


def test_hsperfdata_reader() -> None:
    data = _perfdata([("sun.gc.cause", "B", 5, b"No GC".ljust(16, b"\0")),
                      ("sun.gc.lastCause", "B", 5, b"G1 Evacuation Pause".ljust(32, b"\0")),
                      ("sun.rt.javaCommand", "B", 5, b"GcLoad 3 3".ljust(32, b"\0")),
                      ("sun.gc.collector.0.invocations", "J", 4, struct.pack("<q", 17))])
    perf = HsPerfData(data, "x")
    assert perf.string("sun.gc.lastCause") == "G1 Evacuation Pause"
    assert perf.value("sun.gc.collector.0.invocations") == 17
    assert perf.main_class == "GcLoad" and perf.value("absent") is None
    e = perf.entries["sun.gc.cause"]
    assert data[e.offset:e.offset + 5] == b"No GC"  # the address the kernel reads at
    with pytest.raises(Exception, match="bad magic"):
        HsPerfData(b"\0" * 64)


def _site(spec: str, addr: int) -> Site:
    args = tuple(parse_argument(t) for t in spec.split()) if spec else ()
    return Site("hotspot", "x", addr, 0, 0, spec, addr, addr, 0, 0, args)


def test_generated_c_is_the_same_for_every_jdk() -> None:
    jdk17 = {("hotspot", "gc__begin"): (_site("1@%dil", 0x100),),
             ("hotspot", "mem__pool__gc__begin"): (_site("8@%r14 8@%rbx 8@%r13 8@%rdi 8@%r8"
                                                         " 8@%rax 8@%r9 8@%rdx", 0x200),)}
    jdk25 = {("hotspot", "gc__begin"): (_site("1@%dil", 0x300), _site("1@$1", 0x400)),
             ("hotspot", "mem__pool__gc__begin"): (_site("8@%r14 8@%rbx 8@%r13 8@%rdi 8@%r8"
                                                         " 8@%rax 8@%r9 8@%rdx", 0x500),)}
    a = bpfgen.render(jdk17, aggregate=False)
    assert a == bpfgen.render(jdk25, aggregate=False)  # one compiled object for both
    assert a == bpfgen.render({}, aggregate=False)     # so it can be compiled ahead
    assert a != bpfgen.render(jdk25, aggregate=True)
    per_site = bpfgen.render(jdk25, aggregate=False, per_site=True)
    rows = bpfgen.spec_rows(jdk25)
    assert [(k[1], si) for k, si, _ in rows] == [("gc__begin", 0), ("gc__begin", 1),
                                                 ("mem__pool__gc__begin", 0)]
    for cookie in range(len(rows)):
        assert f"_c{cookie}(struct pt_regs *ctx)" in per_site
    # the constant site's row carries the constant (kind, size, ..., value in disp)
    kind, size, _sign, _shift, _b, _i, disp, _sc = bpfgen.SPEC_ARG.unpack_from(rows[1][2])
    assert (kind, disp) == (1, 1)
    assert all(len(v) == bpfgen.SPEC_ARG.size * 12 for _, _, v in rows)


def test_prometheus_buckets_are_exact_power_of_two_edges() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    acc = Accumulator()
    for d in (7_000, 8_000, 9_500, 3_000_000, 3_000_000):
        acc.add(5, "G1 Young Generation", "pause", d, safepoint_ns=d, cause="G1 Evacuation Pause")
    acc.add(5, "G1 Old Generation", "pause", 40_000_000, full=True, cause="System.gc()")
    tracer = SimpleNamespace(summary=acc.snapshot, main_class=lambda pid: "Main",
                             heap_after_gc=lambda: {(5, "G1 Old Gen"): ("G1 Old Generation",
                                                                       1234, 4096, None)})
    metrics = GcMetrics()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics)  # type: ignore[arg-type]
    assert b"jvm_gc_pause_seconds_bucket" not in generate_latest(reg)  # nothing published yet
    metrics.update(tracer)
    samples = [s for f in text_string_to_metric_families(generate_latest(reg).decode())
               for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in samples if s.name == name
                    and all(s.labels.get(k) == v for k, v in labels.items()))

    young = {"gc": "G1 Young Generation", "action": "end of minor GC", "main_class": "Main"}
    assert value("jvm_gc_pause_seconds_bucket", le="8e-06", **young) == 1   # 7 us
    assert value("jvm_gc_pause_seconds_bucket", le="1.6e-05", **young) == 3
    assert value("jvm_gc_pause_seconds_bucket", le="+Inf", **young) == 5
    assert value("jvm_gc_pause_seconds_count", **young) == 5
    assert value("jvm_gc_pauses_total", cause="G1 Evacuation Pause", **young) == 5
    assert value("jvm_gc_pauses_total", cause="System.gc()", action="end of major GC") == 1
    assert value("jvm_safepoint_duration_seconds_count", **young) == 5
    assert value("jvm_memory_used_after_last_gc_bytes", pool="G1 Old Gen", type="heap") == 1234
    assert value("apptrace_jvm_gc_lost_total") == 0


@pytest.mark.parametrize("text,want", [("9464", ("0.0.0.0", 9464)),
                                       ("127.0.0.1:0", ("127.0.0.1", 0)),
                                       ("[::1]:9000", ("::1", 9000)),
                                       (":9000", ("0.0.0.0", 9000))])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["", "x", "host:port", "70000", "[::1]9000", "1:-1"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(OptionError, match="--prometheus"):
        parse_listen(text)
