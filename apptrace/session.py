"""Tracing with probe strings: :class:`Session`, a composition of the engine layers.

``Session(...)`` → ``add()``/``usdt()``/``uprobe()``/``uretprobe()`` →
``start()`` (implicit on first read) → ``events()``/``poll()``/``run()`` →
``close()`` (or leave the ``with`` block). A session is single-use.

Each step is one layer of :mod:`apptrace.engine` (see its docstring for the
map): the target (what is traced, and a command's lifecycle), the attach
points (probe strings to sites), the program (C, compile, attach,
semaphores), and the event stream (rings, decoding, merging). Probe families
with their own C (TLS, JVM GC) are peers of this class on the same layers.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from apptrace import capabilities
from apptrace.engine.attach import Resolver
from apptrace.engine.decode import ArgDecoder, DecodeCounts, ThreadNames
from apptrace.engine.plan import Group
from apptrace.engine.program import TraceProgram
from apptrace.engine.stream import EventStream, Source
from apptrace.engine.target import Stdout, Target
from apptrace.errors import ApptraceError, OptionError, SessionStateError
from apptrace.events import Event, ProbeInfo, RawBatch, Stats
from apptrace.options import BATCH_MS, RING_KB, STACK_DEPTH, STR_MAX, check_int, check_seconds
from apptrace.probes import ProbeSpec, parse_probe
from apptrace.procs import ProcessRef

__all__ = ["Session", "ProbeHandle"]


@dataclass
class ProbeHandle:
    """What ``Session.add`` returns: the spec now, the resolved probes after start."""

    spec: ProbeSpec
    probes: list[ProbeInfo] = field(default_factory=list)
    _session: Any = None
    fold: bool = False
    where: Optional[str] = None

    @property
    def count(self) -> int:
        """Events delivered so far for this probe string."""
        s = self._session.stats() if self._session else None
        return sum(s.per_probe.get(p.label, 0) for p in self.probes) if s else 0


_live: "weakref.WeakSet[Session]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # procmem semaphores must not stay raised
    for s in list(_live):
        s.close()


class Session:
    """A tracing session on one target.

    Exactly one of ``pid`` (a running process), ``path`` (a binary,
    system-wide: every process that maps it, including later ones) or
    ``command`` (spawned by the session and held until every probe is
    attached; terminated if still running when the session closes) may be
    given; with none, probes must name their binary and trace system-wide.

    ``command_stdout``: where the spawned command's stdout goes (a file
    descriptor or file; None: inherited). ``batch_ms``: the rings are drained
    at most this often. ``arg_tables``: force (True/False) the table-driven
    argument reader instead of choosing by the number of layouts. ``multi``:
    force uprobe_multi links on or off.
    """

    def __init__(self, *, pid: Optional[int] = None, path: Optional[str] = None,
                 command: Optional[Sequence[str]] = None, semaphores: str = "kernel",
                 str_max: int = 64, ringbuf_kb: Optional[int] = None, stack_depth: int = 32,
                 symbolize: bool = True, multi: Optional[bool] = None,
                 arg_tables: Optional[bool] = None, batch_ms: float = 5.0,
                 command_stdout: Stdout = None) -> None:
        if semaphores not in ("kernel", "procmem"):
            raise OptionError("semaphores", semaphores, "'kernel' or 'procmem'")
        if semaphores == "procmem" and pid is None and command is None:
            raise OptionError("semaphores", semaphores,
                              "'kernel' without a pid or command: procmem writes one"
                              " process's memory")
        str_max = check_int("str_max", str_max, *STR_MAX)
        if ringbuf_kb is not None:
            ringbuf_kb = check_int("ringbuf_kb", ringbuf_kb, *RING_KB)
        self.stack_depth = check_int("stack_depth", stack_depth, *STACK_DEPTH)
        batch_ms = check_seconds("batch_ms", batch_ms, allow_zero=True, hi=BATCH_MS[1],
                                 unit="milliseconds")
        self._target = Target(pid=pid, path=path, command=command,
                              command_stdout=command_stdout)
        if self._target.path is not None:
            from apptrace.usdt.notes import ElfImage

            ElfImage(self._target.path).close()  # a clear error now for a non-ELF path
        self.semaphore_mode = semaphores
        self.str_max = max(8, (int(str_max) + 7) & ~7)
        self.ringbuf_kb = ringbuf_kb
        self.symbolize = symbolize
        self.multi = capabilities.has_uprobe_multi() if multi is None else multi
        self.arg_tables = arg_tables
        self.batch_ms = batch_ms
        self._handles: list[ProbeHandle] = []
        self._groups: list[Group] = []
        self._resolver = Resolver(self._target, semaphores=semaphores)
        self._program: Optional[TraceProgram] = None
        self._stream: Optional[EventStream] = None
        self._names = ThreadNames()
        self._counts = DecodeCounts()
        self._symbolizer: Any = None
        self._lock = threading.RLock()
        self._state = "new"
        self.attach_seconds = 0.0
        self.compiled_programs = 0  # how many bcc compiled at start (0: all from the cache)
        self._final_stats: Optional[Stats] = None
        self._folded_final: dict[str, int] = {}
        self._final_warnings: list[str] = []

    # -- building -----------------------------------------------------------

    def add(self, spec: str, *, stack: bool = False, fold: bool = False,
            where: Optional[str] = None) -> ProbeHandle:
        """Add a probe string (``usdt:...``, ``uprobe:...``, ``uretprobe:...``).

        ``stack`` captures the user stack with each event. ``fold`` counts
        identical (process, stack) pairs in the kernel instead of sending
        events; read them with :meth:`folded`. ``where`` is a filter
        (:mod:`apptrace.expr`, e.g. ``'arg0 >= 4096 && comm == "java"'``) the
        kernel applies before a hit takes ring space.
        """
        if self._state != "new":
            raise SessionStateError("probes must be added before the session starts")
        if where is not None:
            from apptrace.expr import parse

            if fold:
                raise OptionError("where", where, "left out with fold (stacks are counted"
                                  " in the kernel without reading arguments)")
            parse(where)  # a syntax error names its column now
        h = ProbeHandle(parse_probe(spec, stack=stack or fold), _session=self, fold=fold,
                        where=where)
        self._handles.append(h)
        return h

    def usdt(self, provider: str, name: str, *, binary: Optional[str] = None,
             types: str = "", stack: bool = False) -> ProbeHandle:
        b = f"{binary}:" if binary else ""
        return self.add(f"usdt:{b}{provider}:{name}" + (f"({types})" if types else ""),
                        stack=stack)

    def uprobe(self, binary: str, symbol: str, *, types: str = "",
               stack: bool = False) -> ProbeHandle:
        return self.add(f"uprobe:{binary}:{symbol}" + (f"({types})" if types else ""),
                        stack=stack)

    def uretprobe(self, binary: str, symbol: str, *, type: str = "",
                  stack: bool = False) -> ProbeHandle:
        return self.add(f"uretprobe:{binary}:{symbol}" + (f"({type})" if type else ""),
                        stack=stack)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- starting: target → attach points → program → stream -------------------

    def start(self) -> None:
        """Resolve every probe, compile once, attach, then release a held command."""
        if not self._handles and self._state == "new":
            raise SessionStateError("no probes added")
        if not capabilities.may_start(self._state, "this session"):
            return
        t0 = time.monotonic()
        self._state = "starting"
        _live.add(self)
        try:
            target = self._target
            target.resolve()
            # A command's probes resolve against its file before it runs.
            self._groups = [Group(i, h.spec, fold=h.fold) for i, h in enumerate(self._handles)]
            for h, g in zip(self._handles, self._groups):
                g.where = h.where
            self._resolver.resolve(self._groups)
            for h, g in zip(self._handles, self._groups):
                h.probes = [p.info for p in g.probes]
            child = target.spawn() if target.command is not None else None
            stacks = self._wants_stacks and self.symbolize
            self._program = program = TraceProgram(
                self._groups, self._resolver, multi=self.multi, str_max=self.str_max,
                stack_depth=self.stack_depth, ringbuf_kb=self.ringbuf_kb,
                arg_tables=self.arg_tables, hold_at_entry=child is not None and stacks)
            self.compiled_programs = program.compiled
            program.attach(target.pid, child, semaphores=self.semaphore_mode)
            self._stream = self._make_stream()
            if stacks:
                tracker = self._tracker()  # made now, so polling keeps maps fresh
                if target.pid is not None and child is None:
                    tracker.watch(target.pid, force=True)
            if child is not None:
                procmem = program.procmem is not None
                child.release(stopped_at_exec=program.raise_after_exec if procmem else None)
                if program.hold_at_entry:
                    # Stopped at its ELF entry: every DT_NEEDED library is mapped.
                    tracker = self._tracker()
                    child.at_stop(lambda: tracker.watch(child.pid, force=True))
            self._state = "running"
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.monotonic() - t0

    def _make_stream(self) -> EventStream:
        symbolize = self._symbolize_batch if self.symbolize else None
        sources = []
        for g in self._groups:
            if g.ring is None:
                continue
            decoder = ArgDecoder(g, self._names, self._counts, symbolize=symbolize)
            labels = [p.info.label for p in g.probes]
            sources.append(Source(g.ring, decoder, labels, g.spec.text, g))
            if g.spare is not None:  # the ring rarer probes use when the main one is full
                sources.append(Source(g.spare, decoder, labels, g.spec.text, g))
        return EventStream(sources, batch_ms=self.batch_ms, alive=self.target_alive,
                           before_drain=self._refresh_maps)

    def _refresh_maps(self) -> None:
        """Keep the memory-map snapshot fresh (libraries loaded since, JIT maps)."""
        pid = self._target.pid
        if self._symbolizer is not None and pid is not None and self.target_alive():
            self._symbolizer.watch(pid)

    def _symbolize_batch(self, events: list[Event], anchors: list[tuple[str, int]]
                         ) -> list[Event]:
        return self._tracker().symbolize(events, anchors)  # type: ignore[no-any-return]

    @property
    def _wants_stacks(self) -> bool:
        return any(h.spec.stack for h in self._handles)

    def _tracker(self) -> Any:
        if self._symbolizer is None:
            from apptrace.stacks import StackTracker

            self._symbolizer = StackTracker()
        return self._symbolizer

    # -- reading --------------------------------------------------------------

    @property
    def target(self) -> Optional[ProcessRef]:
        """The process traced (a spawned command's once started), if any."""
        return self._target.process

    @property
    def path(self) -> Optional[str]:
        return self._target.path

    @property
    def command(self) -> Optional[list[str]]:
        return self._target.command

    @property
    def exit_status(self) -> Optional[int]:
        """A spawned command's status once it ended (negative: the signal)."""
        return self._target.exit_status

    def target_alive(self) -> bool:
        return self._target.alive()

    def _running_stream(self) -> EventStream:
        self.start()
        if self._stream is None:
            raise SessionStateError("this session is closed; sessions are single-use")
        return self._stream

    def poll_raw(self, timeout: Optional[float] = None) -> list[RawBatch]:
        """Wait up to ``timeout`` seconds for data; return records in batches.

        The throughput interface: tuples straight from ``struct``, one
        :class:`RawBatch` per probe string, no per-event Python objects.
        """
        return [RawBatch(tuple(p.info for p in s.key.probes), s.key.nargs, recs)
                for s, recs in self._running_stream().drain(timeout)]

    def poll(self, timeout: Optional[float] = None, *, flush: bool = False) -> list[Event]:
        """Wait up to ``timeout`` seconds; return the events that arrived, in time order.

        Only events stamped before the drain began are returned when several
        probe strings are traced (so a return never comes before its entry);
        later ones wait for the next call. ``flush`` (or the target being
        gone) returns everything: call ``poll(0, flush=True)`` once before
        closing a session whose target still runs (``events()`` does this).
        """
        return self._running_stream().poll(timeout, flush=flush)

    def events(self, timeout: Optional[float] = None, *, idle: float = 0.2) -> Iterator[Event]:
        """Yield events until ``timeout`` seconds pass (None: until the target exits)."""
        yield from self._running_stream().events(timeout, idle=idle)

    def run(self, callback: Callable[[Event], Any], *, duration: Optional[float] = None,
            count: Optional[int] = None) -> Stats:
        """Call ``callback`` per event until duration/count is reached or the target exits."""
        n = 0
        for ev in self.events(duration):
            callback(ev)
            n += 1
            if count is not None and n >= count:
                break
        return self.stats()

    # -- statistics -------------------------------------------------------------

    def stats(self) -> Stats:
        """Delivered, lost and per-probe counts; lost and folded counts are read
        from the kernel (after close: as they were at close)."""
        with self._lock:
            program, stream = self._program, self._stream
            if program is None:
                if self._final_stats is not None:
                    return self._final_stats
                return Stats(0, 0, self._counts.truncated_strings, self._counts.read_faults)
            c = stream.counts if stream is not None else None
            out = Stats(c.events if c else 0, 0, self._counts.truncated_strings,
                        self._counts.read_faults, dict(c.per_probe) if c else {}, {})
            for g in self._groups:
                for p, n in zip(g.probes, program.lost(g)):
                    if n:
                        out.lost_per_probe[p.info.label] = n
                    out.lost += n
                for p in g.probes:  # attached but silent shows as 0, not as missing
                    out.per_probe.setdefault(p.info.label, 0)
            if stream is not None:  # records of the wrong size: a bug, not a full ring
                for (src, pi), n in stream.decode_errors().items():
                    probes = src.key.probes
                    label = probes[pi].info.label if 0 <= pi < len(probes) else src.name
                    per = out.decode_errors_per_probe
                    per[label] = per.get(label, 0) + n
                    out.decode_errors += n
            for g, key, count in program.fold_rows():
                out.per_probe[g.probes[key[1]].info.label] += count
                out.events += count
            self._final_stats = out
            return out

    def folded(self) -> dict[str, int]:
        """Stacks counted in the kernel, as folded lines (``comm;outer;...;inner``)
        mapped to counts: the input of flamegraph.pl and speedscope."""
        with self._lock:
            program = self._program
            if program is None:
                return dict(self._folded_final)
            events, anchors, counts = [], [], []
            for g, (pid, probe, site_id, stack_id, comm_raw), count in program.fold_rows():
                p = g.probes[probe]
                site = p.sites[min(site_id, len(p.sites) - 1)]
                ips = program.stack(g, stack_id) if stack_id >= 0 else ()
                comm = comm_raw.split(b"\0", 1)[0].decode("utf-8", "replace")
                events.append(Event(0, pid, pid, comm, p.info, (), site_id, None, ips))
                anchors.append((site.binary, site.vaddr))
                counts.append((count, stack_id))
            if self.symbolize and events:
                events = self._tracker().symbolize(events, anchors)
            out: dict[str, int] = {}
            for ev, (count, sid) in zip(events, counts):
                if ev.stack is not None:
                    names = [(f.symbol or f"{f.addr:#x}").replace(";", ":")
                             for f in reversed(ev.stack)]
                else:  # not symbolized: the addresses, outermost first
                    names = [f"{a:#x}" for a in reversed(ev.raw_stack or ())]
                if sid < 0:
                    names = [f"[stack lost: {os.strerror(-sid)}]"]
                line = ";".join([ev.comm] + names)
                out[line] = out.get(line, 0) + count
            self._folded_final = out
            return out

    @property
    def warnings(self) -> list[str]:
        """Problems that cost detail but not events (stacks that could not be
        symbolized, a JVM perf map that could not be written), latest last."""
        if self._symbolizer is not None:
            self._final_warnings = list(self._symbolizer.errors)
        return list(self._final_warnings)

    @property
    def probes(self) -> list[ProbeInfo]:
        return [p.info for g in self._groups for p in g.probes]

    @property
    def child(self) -> Optional[subprocess.Popen[bytes]]:
        """The spawned command, if the session started one."""
        return self._target.child.proc if self._target.child is not None else None

    def wait_child(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the spawned command to exit; its status."""
        child = self._target.child
        return child.wait(timeout) if child is not None else None

    # -- teardown -------------------------------------------------------------------

    def detach(self) -> None:
        """Stop tracing: detach every probe, keep what was recorded readable.

        Events still in the rings come out of :meth:`poll` (``flush=True``);
        :meth:`stats` and :meth:`folded` read after this agree exactly, since
        nothing can fire in between.
        """
        if self._program is not None:
            with self._lock:
                self._program.detach()

    def close(self) -> None:
        """Detach everything; lower procmem semaphores; free the BPF program;
        terminate a spawned command that still runs."""
        if self._state == "closed":
            return
        if self._program is not None:
            try:
                self.detach()
                self.stats()
                if any(g.fold for g in self._groups):
                    self.folded()  # keep the counts readable after close
            except Exception:  # noqa: BLE001 - best effort before teardown
                pass
        self._state = "closed"
        _live.discard(self)
        errors: list[BaseException] = []
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._program is not None:
            try:
                self._program.close()
            except ApptraceError as err:
                errors.append(err)
            self._program = None
        self._target.close()
        if self._symbolizer is not None:
            self._final_warnings = list(self._symbolizer.errors)
            self._symbolizer.close()
            self._symbolizer = None
        self._resolver.close()
        if errors:
            raise errors[0]
