"""JVM garbage collection, traced through HotSpot's USDT probes (``apptrace jvm gc``).

A probe family of its own, a peer of :class:`apptrace.session.Session`:
its BPF C keeps per-thread state across the safepoint, VM operation, GC and
memory-pool probes and sends one record per pause (or, in aggregation mode,
only counts and histograms).

    with apptrace.jvm.gc(pid=1234) as tracer:
        for pause in tracer.events(duration=10):
            print(pause.vm_op, pause.duration_ns, pause.cause)
        print(tracer.summary().to_json())

No JVM flag is needed: the probes used are always compiled into JDKs built
with DTrace support (Debian/Ubuntu, Red Hat, Temurin); a JDK built without
them (Oracle's, Corretto) is reported as such.
"""

from __future__ import annotations

from apptrace.jvm.gclog import (
    GcLog,
    GcLogComparison,
    KindErrors,
    LogPause,
    LogSafepoint,
    compare_with_log,
    parse_gc_log,
    read_gc_log,
)
from apptrace.jvm.gctrace import (
    FULL_MANAGERS,
    GcCycle,
    GcEvent,
    GcPause,
    GcTracer,
    PoolUsage,
    gc,
    is_heap_pool,
)
from apptrace.jvm.hsperf import HsPerfData, find_hsperfdata, read_hsperfdata
from apptrace.jvm.summary import CollectorStats, GcSummary, format_log2, log2_histogram
from apptrace.jvm.target import JvmProcess, LibJvm, find_jvms, libjvm_of, load_libjvm

__all__ = [
    "gc", "GcTracer", "GcPause", "GcCycle", "GcEvent", "PoolUsage", "FULL_MANAGERS",
    "is_heap_pool", "GcSummary", "CollectorStats", "log2_histogram", "format_log2",
    "GcLog", "LogPause", "LogSafepoint", "GcLogComparison", "KindErrors", "parse_gc_log",
    "read_gc_log", "compare_with_log", "HsPerfData", "find_hsperfdata", "read_hsperfdata",
    "JvmProcess", "LibJvm", "find_jvms", "libjvm_of", "load_libjvm",
]
