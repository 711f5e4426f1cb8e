"""In-kernel aggregation: counts, sums, extremes, histograms and latencies of
probe hits, kept in BPF maps (nothing crosses a ring buffer, nothing is lost
on the way). Two probe families, peers of :class:`apptrace.Session`:

- :class:`Aggregator` (``apptrace trace --count/--sum/--hist...``)
- :class:`Latency` (``apptrace latency``): entry/exit pairs timed per thread

Results are immutable: :class:`AggregateResult`, :class:`LatencyResult`.
"""

from __future__ import annotations

from apptrace.agg.aggregate import AggregateHandle, Aggregator
from apptrace.agg.latency import Latency
from apptrace.agg.results import (
    AggregateResult,
    Bucket,
    Histogram,
    LatencyResult,
    LatencyRow,
    Row,
)
from apptrace.agg.spec import HistSpec, parse_hist, parse_keys

__all__ = ["Aggregator", "AggregateHandle", "Latency", "AggregateResult", "Row", "Histogram",
           "Bucket", "HistSpec", "parse_hist", "parse_keys", "LatencyResult", "LatencyRow"]
