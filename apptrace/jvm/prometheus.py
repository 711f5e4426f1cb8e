"""Serve a GC tracer's numbers on ``/metrics`` for Prometheus (``--prometheus``).

Built on the maintained ``prometheus-client``: a custom collector renders the
latest snapshot the tracing loop published (:meth:`GcMetrics.update`), so the
HTTP thread never touches BPF maps or the tracer while it decodes.

Names follow what JVM dashboards already use (the OpenTelemetry JVM
conventions in their Prometheus spelling, and Micrometer's
``jvm_gc_pause_seconds``): labels ``gc`` (the memory manager, e.g. "G1 Young
Generation") and ``action`` ("end of minor GC" / "end of major GC"), plus
``pid`` and ``main_class`` so one host's JVMs stay apart. What JMX cannot
give is extra: the safepoint (stop-the-world) time per pause and concurrent
cycles of ZGC and Shenandoah.

Histogram buckets are powers of two microseconds: they are bucket edges of
both the exact per-event statistics and the kernel's log-linear histogram,
so the two tracing modes export the same, exact, bucket counts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from apptrace.errors import OptionError
from apptrace.jvm.bpfgen import HIST_SUB
from apptrace.jvm.summary import GcSummary

__all__ = ["GcMetrics", "MetricsServer", "parse_listen", "BUCKET_EXPONENTS"]

# le = 2**k microseconds for k in this range: 8 us .. 33.5 s, then +Inf.
BUCKET_EXPONENTS = range(3, 26)


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6ADDR]:PORT``; PORT alone listens on every
    interface (a fleet's Prometheus scrapes each host)."""
    host, port = "0.0.0.0", text
    if text.startswith("["):
        end = text.find("]:")
        if end < 0:
            raise OptionError("--prometheus", text, "[HOST:]PORT, e.g. 9464 or 127.0.0.1:9464")
        host, port = text[1:end], text[end + 2:]
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    try:
        n = int(port)
    except ValueError:
        raise OptionError("--prometheus", text,
                          "[HOST:]PORT, e.g. 9464 or 127.0.0.1:9464") from None
    if not 0 <= n <= 65535:
        raise OptionError("--prometheus", text, "a port from 0 to 65535")
    return host or "0.0.0.0", n


@dataclass(frozen=True)
class _Snapshot:
    summary: GcSummary
    heap: dict[tuple[int, str], tuple[str, int, int, Optional[int]]]
    main_class: dict[int, str]


def _buckets(hist: tuple[int, ...], count: int) -> list[tuple[str, float]]:
    out = []
    for k in BUCKET_EXPONENTS:
        le = (1 << k) / 1e6
        out.append((repr(le), float(sum(hist[:k * HIST_SUB]))))
    out.append(("+Inf", float(count)))
    return out


def _action(full: bool) -> str:
    return "end of major GC" if full else "end of minor GC"


class GcMetrics:
    """A prometheus_client collector over the latest published snapshot."""

    def __init__(self) -> None:
        self._snap: Optional[_Snapshot] = None
        self._lock = threading.Lock()

    def update(self, tracer: Any) -> None:
        """Publish the tracer's current numbers (call from the tracing thread)."""
        summary = tracer.summary()
        heap = tracer.heap_after_gc()
        pids = {c.pid for c in summary.collectors} | {pid for pid, _ in heap}
        snap = _Snapshot(summary, dict(heap), {pid: tracer.main_class(pid) for pid in pids})
        with self._lock:
            self._snap = snap

    def describe(self) -> list[Any]:
        return []  # no fixed set: the families depend on the JVMs seen

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        with self._lock:
            snap = self._snap
        labels = ["pid", "main_class", "gc", "action"]
        pause = HistogramMetricFamily(
            "jvm_gc_pause_seconds", "Stop-the-world GC pauses (VM operation span), traced"
            " through HotSpot's USDT probes", labels=labels)
        count = CounterMetricFamily(
            "jvm_gc_pauses", "GC pauses by cause (cause 'unknown' in aggregation mode)",
            labels=[*labels, "cause"])
        safepoint = SummaryMetricFamily(
            "jvm_safepoint_duration_seconds", "Safepoint time of GC pauses, from the"
            " safepoint's begin (time to safepoint included) to its end", labels=labels)
        cycle = HistogramMetricFamily(
            "jvm_gc_cycle_seconds", "Concurrent collection cycles (ZGC, Shenandoah): not"
            " pauses", labels=["pid", "main_class", "gc"])
        used = GaugeMetricFamily(
            "jvm_memory_used_after_last_gc_bytes", "Memory pool usage after the latest"
            " collection", labels=["pid", "main_class", "pool", "type"])
        committed = GaugeMetricFamily(
            "jvm_memory_committed_after_last_gc_bytes", "Memory pool committed size after"
            " the latest collection", labels=["pid", "main_class", "pool", "type"])
        lost = CounterMetricFamily(
            "apptrace_jvm_gc_lost", "Pauses the tracer could not record (ring buffer or"
            " map full)")
        if snap is not None:
            from apptrace.jvm.gctrace import is_heap_pool

            for c in snap.summary.collectors:
                main = snap.main_class.get(c.pid, "unknown")
                if c.type == "cycle":
                    cycle.add_metric([str(c.pid), main, c.manager],
                                     _buckets(c.hist, c.count), c.total_ns / 1e9)
                    continue
                lv = [str(c.pid), main, c.manager, _action(c.full)]
                pause.add_metric(lv, _buckets(c.hist, c.count), c.total_ns / 1e9)
                causes = dict(c.causes)
                known = sum(causes.values())
                for cause, n in causes.items():
                    count.add_metric([*lv, cause], n)
                if c.count > known:
                    count.add_metric([*lv, "unknown"], c.count - known)
                if c.safepoint_count:
                    safepoint.add_metric(lv, c.safepoint_count, c.safepoint_total_ns / 1e9)
            for (pid, pool), (_mgr, u, comm, _mx) in sorted(snap.heap.items()):
                lv = [str(pid), snap.main_class.get(pid, "unknown"), pool,
                      "heap" if is_heap_pool(pool) else "non_heap"]
                used.add_metric(lv, u)
                committed.add_metric(lv, comm)
            lost.add_metric([], snap.summary.lost)
        yield from (pause, count, safepoint, cycle, used, committed, lost)


class MetricsServer:
    """``/metrics`` over HTTP on a thread of its own, until :meth:`close`."""

    def __init__(self, listen: str, metrics: GcMetrics) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from apptrace.errors import ApptraceError

        host, port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics)  # type: ignore[arg-type]
        try:
            started = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise ApptraceError(f"cannot serve metrics on {listen}: {err.strerror or err}",
                                hint="choose another port, or HOST:PORT") from err
        self._server: Optional[Any] = started[0] if isinstance(started, tuple) else None
        self.host = host
        self.port = self._server.server_address[1] if self._server is not None else port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
