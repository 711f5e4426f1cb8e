"""The event-stream layer: rings drained in batches, counted, decoded, merged.

Each ring is a :class:`Source` with the decoder that owns its record kind
(:class:`apptrace.engine.decode.ArgDecoder` for probe strings; a probe family
brings its own). The stream drains at most once per batch interval, counts
every record per probe as it drains, and merges the decoded objects of
several rings by their ``ts_ns``.
"""

from __future__ import annotations

import bisect
import collections
import gc
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from apptrace.ringbuf import RingReader

__all__ = ["Decoder", "Source", "EventStream"]


class Decoder(Protocol):
    """Turns one ring's records into objects that carry ``ts_ns``."""

    def decode(self, records: list[tuple[Any, ...]]) -> list[Any]: ...


@dataclass(eq=False)
class Source:
    """One ring, the decoder of its records, and a label per probe index
    (record field 3) for counting."""

    ring: RingReader
    decoder: Decoder
    labels: Sequence[str]
    name: str = ""
    key: Any = None  # the owner's handle (a Session's group)


@dataclass
class Counts:
    """What the rings delivered, counted as they drained."""

    events: int = 0
    per_probe: dict[str, int] = field(default_factory=dict)


class EventStream:
    """Drains a set of rings; ``poll`` returns their events in time order."""

    def __init__(self, sources: Sequence[Source], *, batch_ms: float = 5.0,
                 alive: Callable[[], bool] = lambda: True,
                 before_drain: Optional[Callable[[], None]] = None) -> None:
        self.sources = list(sources)
        self.batch_interval = max(0.0, batch_ms / 1000)
        self.alive = alive
        self.before_drain = before_drain
        self.counts = Counts()
        self.lock = threading.RLock()
        self._last_drain = 0.0
        self._drain_started_ns = 0
        self._held: list[Any] = []   # decoded, stamped after the last drain began
        self._epoll: Optional[select.epoll] = select.epoll()
        for s in self.sources:
            self._epoll.register(s.ring.fd, select.EPOLLIN)

    def drain(self, timeout: Optional[float], *, force: bool = False
              ) -> list[tuple[Source, list[tuple[Any, ...]]]]:
        """Wait up to ``timeout`` for data; the records of each ring, counted.
        ``force``: drain now even within the batch interval (a final read)."""
        if self._epoll is None:
            return []
        if self.before_drain is not None:
            self.before_drain()
        # Drain at most once per batch interval. Each time the reader catches up,
        # the kernel queues a wake-up for the next event (an irq_work on the
        # traced CPU); a reader that keeps catching up makes the traced program
        # pay that on almost every hit. Batching keeps it to one per interval.
        now = time.monotonic()
        early = self._last_drain + self.batch_interval - now
        if early > 0 and not force:
            if timeout is not None and timeout < early:
                if timeout > 0:
                    time.sleep(timeout)
                return []
            time.sleep(early)
            if timeout is not None:
                timeout -= early
        if timeout is None or timeout > 0:
            if not any(s.ring.pending() for s in self.sources):
                self._epoll.poll(timeout if timeout is not None else -1)
        self._last_drain = time.monotonic()
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: events stamped before this
        # instant were reserved before any ring below is read.
        self._drain_started_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out: list[tuple[Source, list[tuple[Any, ...]]]] = []
        # Records are new tuples: with the cyclic collector running, a drain of
        # 100k of them triggers collections that walk every one (they hold no
        # cycles). Paused for the drain, as the decoders do.
        enabled = gc.isenabled()
        gc.disable()
        try:
            with self.lock:
                self._drain_into(out)
        finally:
            if enabled:
                gc.enable()
        return out

    def _drain_into(self, out: list[tuple[Source, list[tuple[Any, ...]]]]) -> None:
        per_probe = self.counts.per_probe
        for s in self.sources:
            recs = s.ring.drain()
            if not recs:
                continue
            self.counts.events += len(recs)
            labels = s.labels
            if len(labels) == 1:  # one probe: no need to look at each record
                counted = {0: len(recs)}
            else:
                counted = collections.Counter([r[3] for r in recs])
            for pidx, n in counted.items():
                label = labels[pidx] if 0 <= pidx < len(labels) else s.name
                per_probe[label] = per_probe.get(label, 0) + n
            out.append((s, recs))

    def poll(self, timeout: Optional[float] = None, *, flush: bool = False) -> list[Any]:
        """Decoded events that arrived within ``timeout``, in time order.

        The rings are drained one after the other; an event that lands in an
        already-drained ring while a later one is read would come out of order
        (a function's return before its entry). So only events stamped before
        the drain began are returned; later ones wait for the next call.
        ``flush`` (or the target being gone) returns everything.
        """
        final = flush or not self.alive()  # a target gone before this drain adds nothing
        batches = self.drain(timeout, force=final)
        events = self._held
        self._held = []
        for s, recs in batches:
            events.extend(s.decoder.decode(recs))
        if len(self.sources) < 2:
            return events  # one ring keeps its own order
        events.sort(key=_ts)
        if final:
            return events
        ready = bisect.bisect_right([e.ts_ns for e in events], self._drain_started_ns)
        self._held = events[ready:]
        return events[:ready]

    def events(self, timeout: Optional[float] = None, *, idle: float = 0.2) -> Iterator[Any]:
        """Yield events until ``timeout`` seconds pass (None: until the target exits)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                yield from self.poll(0, flush=True)  # what has arrived by the deadline
                return
            alive = self.alive()
            got = self.poll(min(idle, remaining) if remaining is not None else idle)
            yield from got
            if not alive and not got:
                return  # the target is gone and its last events are drained

    def decode_errors(self) -> dict[tuple[Source, int], int]:
        """Records of the wrong size, per (source, probe index): a bug, not a full ring."""
        out: dict[tuple[Source, int], int] = {}
        for s in self.sources:
            for pidx, n in s.ring.decode_errors.items():
                out[(s, pidx)] = n
        return out

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


def _ts(e: Any) -> int:
    return int(e.ts_ns)
