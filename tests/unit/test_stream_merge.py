"""EventStream's merge of several rings, without the kernel.

The rings here are in-memory queues with a real eventfd for epoll: what is
under test is the stream's own rules (time order across rings, holding back
what was stamped after a drain began, flushing, the batch interval, counts),
which the kernel's timing cannot make happen on demand. The same stream over
real BPF rings is traced in tests/integration/test_engine_layers.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from helpers import fails_after

from apptrace.engine.stream import EventStream, Source


@dataclass(frozen=True)
class Ev:
    ts_ns: int
    ring: str
    pidx: int


class MemoryRing:
    """What EventStream uses of a RingReader: fd, pending(), drain(), decode_errors."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.queued: list[tuple[Any, ...]] = []
        self.decode_errors: dict[int, int] = {}
        self.drains = 0

    def push(self, ts_ns: int, pidx: int = 0) -> None:
        self.queued.append((ts_ns, "rec", None, pidx))
        os.eventfd_write(self.fd, 1)

    def pending(self) -> bool:
        return bool(self.queued)

    def drain(self) -> list[tuple[Any, ...]]:
        self.drains += 1
        out, self.queued = self.queued, []
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        return out

    def close(self) -> None:
        os.close(self.fd)


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def decode(self, records: list[tuple[Any, ...]]) -> list[Any]:
        return [Ev(r[0], self.name, r[3]) for r in records]


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def two_rings(**kw: Any) -> tuple[EventStream, MemoryRing, MemoryRing]:
    a, b = MemoryRing(), MemoryRing()
    stream = EventStream([Source(a, Named("a"), ["p:a0", "p:a1"], name="ring-a"),  # type: ignore[arg-type]
                          Source(b, Named("b"), ["p:b"], name="ring-b")],  # type: ignore[arg-type]
                         batch_ms=0, **kw)
    return stream, a, b


def test_two_rings_merge_in_time_order() -> None:
    """Events of two rings come out by timestamp, not ring by ring."""
    stream, a, b = two_rings()
    t = now_ns() - 1_000_000
    for i in range(0, 10, 2):
        a.push(t + i)
        b.push(t + i + 1)
    got = stream.poll(0)
    assert [e.ts_ns - t for e in got] == list(range(10))
    assert [e.ring for e in got] == ["a", "b"] * 5
    stream.close()


def test_event_stamped_after_the_drain_began_waits() -> None:
    """An event stamped after the drain began may have a peer in a ring
    already read: it is held for the next poll, and flush hands it out."""
    stream, a, b = two_rings()
    past = now_ns() - 1_000_000
    later = now_ns() + 60_000_000_000  # as if stamped while the rings were read
    a.push(later)
    b.push(past)
    assert [e.ts_ns for e in stream.poll(0)] == [past]
    assert stream.poll(0) == []  # still held: its time has not come
    b.push(past + 1)
    assert [e.ts_ns for e in stream.poll(0)] == [past + 1]
    assert [e.ts_ns for e in stream.poll(0, flush=True)] == [later]
    assert stream.poll(0, flush=True) == []
    stream.close()


def test_target_gone_hands_out_everything() -> None:
    """Once the target is gone nothing more can arrive: no event is held."""
    alive = [True]
    stream, a, b = two_rings(alive=lambda: alive[0])
    later = now_ns() + 60_000_000_000
    a.push(later)
    assert stream.poll(0) == []
    alive[0] = False
    assert [e.ts_ns for e in stream.poll(0)] == [later]
    stream.close()


def test_flush_drains_inside_the_batch_interval() -> None:
    """Within the batch interval a poll reads nothing (and does not sleep
    past its timeout); a flush reads at once."""
    a, b = MemoryRing(), MemoryRing()
    stream = EventStream([Source(a, Named("a"), ["p:a"]),  # type: ignore[arg-type]
                          Source(b, Named("b"), ["p:b"])],  # type: ignore[arg-type]
                         batch_ms=60_000)
    assert stream.poll(0) == []  # the first drain: the interval starts now
    a.push(now_ns() - 1000)
    t0 = time.monotonic()
    with fails_after(10):
        assert stream.poll(0.05) == []
    assert a.drains == 1
    got = stream.poll(0, flush=True)
    assert time.monotonic() - t0 < 5
    assert [e.ring for e in got] == ["a"] and a.drains == 2
    stream.close()


def test_counts_per_probe_as_the_rings_drain() -> None:
    """Every record is counted under its probe's label; a probe index the
    ring has no label for is counted under the ring's name."""
    stream, a, b = two_rings()
    t = now_ns() - 1_000_000
    a.push(t, 0)
    a.push(t + 1, 1)
    a.push(t + 2, 1)
    a.push(t + 3, 7)  # no such probe
    b.push(t + 4, 3)  # one label: every record is that probe's
    b.push(t + 5, 0)
    assert len(stream.poll(0)) == 6
    assert stream.counts.events == 6
    assert stream.counts.per_probe == {"p:a0": 1, "p:a1": 2, "ring-a": 1, "p:b": 2}
    a.push(t + 6, 0)
    stream.poll(0)
    assert stream.counts.events == 7 and stream.counts.per_probe["p:a0"] == 2
    stream.close()


def test_events_stops_at_the_deadline_with_what_arrived() -> None:
    """events(timeout) yields what arrived, including what was stamped after
    its last drain began, and returns at the deadline."""
    stream, a, b = two_rings()
    t = now_ns()
    a.push(t - 10)
    b.push(t + 60_000_000_000)
    t0 = time.monotonic()
    with fails_after(10):
        got = list(stream.events(0.3, idle=0.05))
    took = time.monotonic() - t0
    assert [e.ring for e in got] == ["a", "b"]
    assert 0.25 < took < 5
    stream.close()


def test_events_end_when_the_target_is_gone_and_drained() -> None:
    """With no timeout, events() ends once the target is gone and a last
    drain finds nothing; what was queued before comes out first."""
    alive = [True]
    stream, a, b = two_rings(alive=lambda: alive[0])
    t = now_ns()
    a.push(t - 10)
    b.push(t - 5)
    seen = []
    with fails_after(10):
        for e in stream.events(None, idle=0.01):
            seen.append(e.ring)
            alive[0] = False
    assert seen == ["a", "b"]
    stream.close()


def test_decode_errors_per_source_and_probe() -> None:
    stream, a, b = two_rings()
    a.decode_errors[1] = 3
    b.decode_errors[0] = 1
    errors = stream.decode_errors()
    assert {(s.name, p): n for (s, p), n in errors.items()} == {("ring-a", 1): 3,
                                                                ("ring-b", 0): 1}
    fd = stream._epoll.fileno()  # type: ignore[union-attr]
    a.push(now_ns())
    stream.close()
    assert stream.poll(0) == [] and stream.drain(0) == []  # closed: rings no longer read
    try:
        os.fstat(fd)
    except OSError:
        pass
    else:
        raise AssertionError("close() left the epoll descriptor open")
    stream.close()  # twice is fine


# -- drain(): the batch interval and timeouts --------------------------------------------


def one_ring(batch_ms: float) -> tuple[EventStream, MemoryRing]:
    a = MemoryRing()
    return EventStream([Source(a, Named("a"), ["p:a"])], batch_ms=batch_ms), a  # type: ignore[arg-type]


def timed_drain(stream: EventStream, timeout: float | None) -> tuple[float, int]:
    t0 = time.monotonic()
    with fails_after(10):
        got = stream.drain(timeout)
    return time.monotonic() - t0, sum(len(recs) for _, recs in got)


def test_drain_waits_out_the_batch_interval() -> None:
    """Data that arrives within the interval is read when it ends, not at once."""
    stream, a = one_ring(500)
    assert timed_drain(stream, 0)[1] == 0  # the interval starts now
    a.push(now_ns())
    took, n = timed_drain(stream, 2.0)
    assert n == 1 and 0.4 <= took < 1.5
    stream.close()


def test_drain_inside_the_interval_sleeps_its_timeout_and_reads_nothing() -> None:
    stream, a = one_ring(10_000)
    timed_drain(stream, 0)
    a.push(now_ns())
    took, n = timed_drain(stream, 0.3)
    assert n == 0 and a.drains == 1 and 0.25 <= took < 2
    stream.close()


def test_drain_timeout_counts_the_interval_it_waited() -> None:
    """A timeout longer than the rest of the interval: the wait for data
    gets what is left of it, not the whole timeout again."""
    stream, a = one_ring(500)
    timed_drain(stream, 0)
    took, n = timed_drain(stream, 0.6)
    assert n == 0 and 0.55 <= took < 0.9
    stream.close()


def test_drain_without_timeout_waits_for_data() -> None:
    """drain(None) blocks until a ring has data (here 1.2 s later), and
    reads what is already there without waiting."""
    import threading

    stream, a = one_ring(0)
    a.push(now_ns())
    assert timed_drain(stream, None)[1] == 1
    threading.Timer(1.2, a.push, (now_ns(),)).start()
    took, n = timed_drain(stream, None)
    assert n == 1 and took >= 1.1
    stream.close()


def test_drain_leaves_the_collector_as_it_was() -> None:
    """The cyclic collector is paused while records are made, then restored."""
    import gc

    stream, a = one_ring(0)
    assert gc.isenabled()
    a.push(now_ns())
    assert timed_drain(stream, 0)[1] == 1 and gc.isenabled()
    gc.disable()
    try:
        a.push(now_ns())
        timed_drain(stream, 0)
        assert not gc.isenabled()
    finally:
        gc.enable()
    stream.close()


def test_probe_index_one_past_the_labels_counts_under_the_ring() -> None:
    stream, a, b = two_rings()
    a.push(now_ns() - 10, 2)  # ring a has labels 0 and 1 only
    stream.poll(0)
    assert stream.counts.per_probe == {"ring-a": 1}
    stream.close()


def test_events_ends_soon_after_the_target_is_gone() -> None:
    """With nothing left to read, a gone target ends events() within its
    idle time (0.2 s by default)."""
    stream, a, b = two_rings(alive=lambda: False)
    t0 = time.monotonic()
    with fails_after(10):
        assert list(stream.events()) == []
    assert time.monotonic() - t0 < 0.8
    stream.close()


def test_events_deadline_is_not_overrun() -> None:
    """Nothing arrives: events(0.3) returns at its deadline, however long
    the idle wait it was given, and its last read does not wait."""
    stream, a, b = two_rings()
    t0 = time.monotonic()
    with fails_after(20):
        assert list(stream.events(0.3, idle=5)) == []
    assert 0.25 <= time.monotonic() - t0 < 0.9
    stream.close()
