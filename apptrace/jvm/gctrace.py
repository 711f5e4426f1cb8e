"""GC pauses and concurrent cycles of HotSpot JVMs, from their USDT probes.

A peer of :class:`apptrace.session.Session` with its own BPF program (see
:mod:`apptrace.jvm.bpfgen`) and decoder. One program per libjvm.so build is
compiled (cached), loaded and attached to that file's probe sites with
uprobe_multi links, filtered to the traced PIDs (or system-wide for
``all_jvms``).

The pause model (measured against GC logs on JDK 17 and 25):

- a *pause* is one VM operation that collected (a ``gc__begin`` span or pool
  events inside it), inside its safepoint;
- ``duration_ns`` is the VM operation's span (``vmops__begin`` to
  ``vmops__end``): it contains every part of the collection the GC log times,
  also the pool accounting JDK 21+ does outside the ``gc__begin`` span;
  ``gc_ns`` is the ``gc__begin/end`` span, ``safepoint_ns`` the whole
  stop-the-world window including time to safepoint;
- young or full comes from the memory managers (``MarkSweepCompact``,
  ``PS MarkSweep``, ``G1 Old Generation``), not from ``gc__begin``'s
  argument, which is 0 for JDK 17's full collections inside an allocation;
- a *cycle* is a concurrent collection (ZGC, Shenandoah): pool events outside
  any VM operation, per thread and manager.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

from apptrace import capabilities
from apptrace.errors import ApptraceError, OptionError
from apptrace.jvm import bpfgen
from apptrace.jvm.hsperf import HsPerfData, find_hsperfdata
from apptrace.jvm.summary import _YOUNG, Accumulator, GcSummary
from apptrace.jvm.target import (
    HeldCommand,
    JvmProcess,
    LibJvm,
    find_jvms,
    installed_libjvms,
    java_executable,
    libjvm_for_command,
    libjvm_of,
    load_libjvm,
    running_libjvms,
)
from apptrace.options import RING_KB, check_int
from apptrace.procs import ProcessRef

__all__ = ["PoolUsage", "GcPause", "GcCycle", "GcEvent", "GcTracer", "gc", "is_heap_pool",
           "FULL_MANAGERS", "YOUNG_MANAGERS", "pause_kind", "format_event", "heap_text",
           "size_text", "lost_in", "heap_usage"]

FULL_MANAGERS = frozenset({"MarkSweepCompact", "PS MarkSweep", "G1 Old Generation",
                           "G1 Full GC"})
_NON_HEAP_PREFIXES = ("CodeHeap", "Code Cache", "Metaspace", "Compressed Class Space")
_NO_GC = ("", "No GC")
_MAX_UNSET = (1 << 64) - 1


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def is_heap_pool(name: str) -> bool:
    """Heap pools (Eden, Old Gen, ZHeap...) count in heap before/after; code
    cache and metaspace pools do not."""
    return not name.startswith(_NON_HEAP_PREFIXES)


@dataclass(frozen=True)
class PoolUsage:
    """One memory pool around one collection (bytes; None where not reported)."""

    manager: str
    name: str
    heap: bool
    init: int
    max: Optional[int]
    used_before: Optional[int]
    committed_before: Optional[int]
    used_after: Optional[int]
    committed_after: Optional[int]

    def to_json(self) -> dict[str, Any]:
        return {"manager": self.manager, "pool": self.name, "heap": self.heap,
                "init": self.init, "max": self.max, "used_before": self.used_before,
                "committed_before": self.committed_before, "used_after": self.used_after,
                "committed_after": self.committed_after}


@dataclass(frozen=True)
class GcPause:
    """One stop-the-world GC pause."""

    ts_ns: int                    # CLOCK_MONOTONIC: safepoint begin (else the operation's)
    end_ns: int
    pid: int
    tid: int
    vm_op: Optional[str]
    manager: str                  # "G1 Young Generation"; "Copy+MarkSweepCompact"
    managers: tuple[str, ...]
    full: bool
    duration_ns: int
    safepoint_ns: Optional[int]
    gc_ns: Optional[int]
    vm_op_ns: Optional[int]
    cause: Optional[str]
    heap_before: Optional[int]
    heap_after: Optional[int]
    pools: tuple[PoolUsage, ...]
    full_arg: bool = False        # gc__begin's own argument (unreliable on JDK 17)
    ttsp_ns: Optional[int] = None  # safepoint begin to the operation's start
    causes: tuple[str, ...] = ()  # per collection, when a pause ran two (young, then full)

    type = "pause"

    @property
    def kind(self) -> str:
        """What the GC log would call it: Young, Full, Remark, Cleanup, else the
        VM operation (a ZGC or Shenandoah pause: ``ZMarkStart``...)."""
        return pause_kind(self.vm_op, self.managers, self.full)

    def to_json(self) -> dict[str, Any]:
        return {"ts_ns": self.ts_ns, "pid": self.pid, "type": "pause", "vm_op": self.vm_op,
                "manager": self.manager, "full": self.full, "duration_ns": self.duration_ns,
                "safepoint_ns": self.safepoint_ns, "cause": self.cause,
                "heap_before": self.heap_before, "heap_after": self.heap_after,
                "pools": [p.to_json() for p in self.pools],
                "tid": self.tid, "end_ns": self.end_ns, "gc_ns": self.gc_ns,
                "vm_op_ns": self.vm_op_ns, "ttsp_ns": self.ttsp_ns,
                "managers": list(self.managers), "full_arg": self.full_arg,
                "kind": self.kind, "causes": list(self.causes)}


@dataclass(frozen=True)
class GcCycle:
    """One concurrent collection cycle (ZGC, Shenandoah): not a pause."""

    ts_ns: int
    end_ns: int
    pid: int
    tid: int
    manager: str
    duration_ns: int
    cause: Optional[str]
    heap_before: Optional[int]
    heap_after: Optional[int]
    pools: tuple[PoolUsage, ...]

    type = "cycle"
    vm_op = None
    full = False
    safepoint_ns = None

    def to_json(self) -> dict[str, Any]:
        return {"ts_ns": self.ts_ns, "pid": self.pid, "type": "cycle", "vm_op": None,
                "manager": self.manager, "full": False, "duration_ns": self.duration_ns,
                "safepoint_ns": None, "cause": self.cause, "heap_before": self.heap_before,
                "heap_after": self.heap_after, "pools": [p.to_json() for p in self.pools],
                "tid": self.tid, "end_ns": self.end_ns}


GcEvent = Union[GcPause, GcCycle]

YOUNG_MANAGERS = _YOUNG


def pause_kind(vm_op: Optional[str], managers: Sequence[str], full: bool) -> str:
    """Young, Full, Remark, Cleanup, Young+Full (one pause, two collections),
    or the VM operation's name."""
    op = vm_op or ""
    young = any(m in YOUNG_MANAGERS for m in managers)
    if full:
        return "Young+Full" if young else "Full"
    if op.endswith("Remark"):
        return "Remark"
    if op.endswith("Cleanup"):
        return "Cleanup"
    if young:
        return "Young"
    return op or "unknown"


def derived_manager(vm_op: Optional[str]) -> str:
    """The JMX collector name of a pause that reported no pools."""
    op = vm_op or ""
    if op.startswith("G1"):
        return "G1 Concurrent GC"
    if op.startswith("Z"):
        if "Old" in op:
            return "ZGC Major Pauses"
        if "Young" in op:
            return "ZGC Minor Pauses"
        return "ZGC Pauses"
    if op.startswith("Shenandoah"):
        return "Shenandoah Pauses"
    return op or "unknown"


class _Attachment:
    """One compiled program on one libjvm file, attached for some PIDs."""

    def __init__(self, lib: LibJvm, aggregate: bool, multi: bool, ring_pages: int) -> None:
        from apptrace.bpf import Program
        from apptrace.ringbuf import RingReader

        self.lib = lib
        self.aggregate = aggregate
        self.multi = multi
        self.rows = bpfgen.spec_rows(lib.sites)
        self.prog = Program(bpfgen.render(lib.sites, aggregate=aggregate,
                                          ring_pages=ring_pages, per_site=not multi))
        self.ring: Optional[RingReader] = None
        self._fds: dict[str, int] = {}
        self.pids: list[int] = []
        self._read = 0
        try:
            specs = self.prog.map("specs")
            for cookie, (_key, _si, value) in enumerate(self.rows):
                specs.update(cookie.to_bytes(4, "little"), value)
            if not aggregate:
                self.ring = RingReader(self.prog.map_fd("events"), ring_pages * 4096,
                                       bpfgen.RECORD)
        except BaseException:
            self.prog.close()
            raise

    # End probes go in first and begin probes last, so that a pause already
    # running while we attach is never half-seen as a new one.
    _ORDER = (("hs_private", "safepoint__end"), ("hotspot", "vmops__end"),
              ("hotspot", "gc__end"), ("hotspot", "mem__pool__gc__end"),
              ("hotspot", "mem__pool__gc__begin"), ("hotspot", "gc__begin"),
              ("hotspot", "vmops__begin"), ("hs_private", "safepoint__begin"))

    def attach(self, pid: int) -> None:
        """Attach every probe for ``pid`` (-1: every process mapping the file)."""
        for key in self._ORDER:
            sites = self.lib.sites.get(key)
            if not sites:
                continue
            func = bpfgen.PROBE_FUNCS[key]
            label = f"{key[0]}:{key[1]}"
            cookies = [c for c, (k, _si, _v) in enumerate(self.rows) if k == key]
            if self.multi:
                fd = self._fds.get(func)
                if fd is None:
                    fd = self._fds[func] = self.prog.load(f"{func}_m", multi=True)
                self.prog.attach_multi(fd, self.lib.path, [s.file_offset for s in sites],
                                       [s.semaphore_offset for s in sites], cookies, pid,
                                       False, label)
            else:
                for s, cookie in zip(sites, cookies):
                    name = f"{func}_c{cookie}"
                    fd = self._fds.get(name)
                    if fd is None:
                        fd = self._fds[name] = self.prog.load(name)
                    self.prog.attach_perf(fd, self.lib.path, s.file_offset, pid,
                                          s.semaphore_offset, False, label)
        self.pids.append(pid)

    def consumed(self, n: int) -> None:
        """Tell the kernel how many records were read: it wakes the reader
        only when half the ring is waiting."""
        self._read += n
        try:
            self.prog.map("progress").update((1).to_bytes(4, "little"),
                                             self._read.to_bytes(8, "little"))
        except ApptraceError:
            pass

    def run_stats(self) -> tuple[int, int]:
        """(runs, nanoseconds) of this attachment's BPF programs, from the
        kernel's per-program statistics (counted only while BPF_ENABLE_STATS
        or kernel.bpf_stats_enabled is on; otherwise zeros)."""
        runs = ns = 0
        for fd in set(self._fds.values()):
            try:
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key == "run_cnt":
                            runs += int(value)
                        elif key == "run_time_ns":
                            ns += int(value)
            except (OSError, ValueError):
                continue
        return runs, ns

    def counters(self) -> dict[str, int]:
        m = self.prog.map("cnt")
        return {name: m.sum_u64(i.to_bytes(4, "little"))
                for i, name in enumerate(bpfgen.COUNTERS)}

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self.prog.close()


class GcTracer:
    """Trace the GC pauses of JVMs: one PID, several, all, or a spawned ``java``.

    ``pid``, ``name`` (process name, main class or jar), ``all_jvms`` or
    ``command``: exactly one. ``aggregate`` counts pauses in the kernel
    (histograms, counts, pool usage after GC) and delivers no events.

    Use as a context manager; iterate for events (until the traced JVMs exit),
    or call :meth:`poll`; :meth:`summary` at any time.
    """

    RESCAN_SECONDS = 2.0
    POLL_SECONDS = 0.05

    def __init__(self, *, pid: Optional[int] = None, name: Optional[str] = None,
                 all_jvms: bool = False, command: Optional[Sequence[str]] = None,
                 aggregate: bool = False, ring_kb: int = 1024,
                 multi: Optional[bool] = None, command_stdout: Optional[int] = None) -> None:
        given = [k for k, v in (("pid", pid), ("name", name), ("all_jvms", all_jvms or None),
                                ("command", command)) if v is not None]
        if len(given) != 1:
            raise OptionError("target", ", ".join(given) or None,
                              "exactly one of pid, name, all_jvms, command")
        if pid is not None:
            check_int("pid", pid, 1)
        if command is not None and not list(command):
            raise OptionError("command", command, "a command line, e.g. ['java', 'Main']")
        check_int("ring_kb", ring_kb, *RING_KB)
        self.pid = pid
        self.name = name
        self.all_jvms = all_jvms
        self.command = list(command) if command is not None else None
        self.command_stdout = command_stdout
        self.aggregate = aggregate
        self.multi = capabilities.has_uprobe_multi() if multi is None else multi
        pages = max(1, ring_kb * 1024 // 4096)
        self._ring_pages = 1 << (pages - 1).bit_length()
        self._attached: dict[tuple[int, int], _Attachment] = {}
        self._targets: dict[int, ProcessRef] = {}
        self._held: Optional[HeldCommand] = None
        self._epoll: Optional[select.epoll] = None
        self._state = "new"
        self._names: dict[tuple[int, int], str] = {}
        self._perf: dict[int, Optional[HsPerfData]] = {}
        self._perf_tried: dict[int, float] = {}
        self._first_seen: dict[int, float] = {}
        self._main_class: dict[int, str] = {}
        self._acc = Accumulator()
        self._heap_after: dict[tuple[int, str], tuple[str, int, int, Optional[int]]] = {}
        self._seen_pids: set[int] = set()
        self._checked: dict[int, float] = {}
        self._next_rescan = 0.0
        self._final: Optional[GcSummary] = None
        self._detached = False
        self._final_counters: dict[str, int] = {}
        self.start_ns = 0
        self.end_ns = 0
        self.attach_seconds = 0.0
        self.warnings: list[str] = []
        self.dropped_partial = 0
        self.pauses = 0
        self.cycles = 0

    # -- context manager ------------------------------------------------------

    def __enter__(self) -> GcTracer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- starting ---------------------------------------------------------------

    def _attachment(self, lib: LibJvm) -> _Attachment:
        att = self._attached.get(lib.key)
        if att is None:
            att = self._attached[lib.key] = _Attachment(lib, self.aggregate, self.multi,
                                                        self._ring_pages)
            if att.ring is not None and self._epoll is not None:
                self._epoll.register(att.ring.fd, select.EPOLLIN)
        return att

    def start(self) -> None:
        """Find the JVMs, compile, attach; a spawned command runs from here on."""
        if not capabilities.may_start(self._state, "this GC tracer"):
            return
        t0 = time.monotonic()
        self._state = "starting"
        self._epoll = select.epoll()
        try:
            if self.command is not None:
                exe = java_executable(self.command)
                lib = libjvm_for_command(self.command)
                att = self._attachment(lib)
                self._held = HeldCommand(self.command, exe, stdout=self.command_stdout)
                att.attach(self._held.pid)
                self._targets[self._held.pid] = ProcessRef(self._held.pid, 0.0,
                                                           os.path.basename(self.command[0]))
            elif self.all_jvms:
                self._attach_all()
            else:
                pids = [self.pid] if self.pid is not None else find_jvms(self.name or "")
                if not pids:
                    raise ApptraceError(f"no running JVM matches {self.name!r}",
                                        hint="match the process name, main class or jar"
                                             " (jps -l lists them)")
                jvms: list[JvmProcess] = [libjvm_of(p) for p in pids]
                for j in jvms:
                    self._attachment(j.libjvm).attach(j.pid)
                    self._targets[j.pid] = j.ref
                    self._learn(j.pid)
            self.start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if self._held is not None:
                self._held.release()
            self._state = "running"
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.monotonic() - t0

    def _attach_all(self) -> None:
        """Every libjvm on the machine: installed JDKs and those of running JVMs
        (via /proc/PID/root, so containers count), system-wide."""
        seen: set[str] = set()
        cands: list[tuple[str, str, Optional[int]]] = []
        for path in installed_libjvms():
            cands.append((path, path, None))
        for rpid, shown, real in running_libjvms():
            cands.append((real, shown, rpid))
            self._checked[rpid] = time.monotonic()
        for real, shown, pid in cands:
            try:
                key = os.stat(real)
            except OSError:
                continue
            ident = f"{key.st_dev}:{key.st_ino}"
            if ident in seen:
                if pid is not None:
                    self._learn(pid)
                continue
            seen.add(ident)
            self._attach_lib_systemwide(real, shown)
            if pid is not None:
                self._learn(pid)
        if not self._attached:
            why = f": {self.warnings[0]}" if self.warnings else ""
            raise ApptraceError("no JDK with HotSpot probes found (looked in /usr/lib/jvm,"
                                f" /opt, $JAVA_HOME and running JVMs){why}")

    def _attach_lib_systemwide(self, real: str, shown: str) -> None:
        try:
            lib = load_libjvm(real, shown)
        except ApptraceError as err:
            self.warnings.append(f"not traced: {err}")
            return
        if lib.key in self._attached:
            return
        self._attachment(lib).attach(-1)

    def _rescan(self) -> None:
        """--all: JVMs started since, with a libjvm not yet attached (a new JDK,
        a container's own). Each process is looked at until it maps libjvm or
        has run for 10 s (the launcher loads libjvm early)."""
        now = time.monotonic()
        if now < self._next_rescan:
            return
        self._next_rescan = now + self.RESCAN_SECONDS
        try:
            pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        except OSError:
            return
        fresh = []
        for pid in pids:
            first = self._checked.setdefault(pid, now)
            if first is None or now - first > 10.0:
                continue
            fresh.append(pid)
        for pid, shown, real in running_libjvms(fresh):
            self._checked[pid] = -1e9  # done
            try:
                st = os.stat(real)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in self._attached:
                self._attach_lib_systemwide(real, shown)
            self._learn(pid)
        alive = set(pids)
        for pid in list(self._checked):
            if pid not in alive:
                del self._checked[pid]

    def _learn(self, pid: int, force: bool = False) -> None:
        """Find a JVM's hsperfdata: its cause strings' addresses go to the
        kernel (read there during each pause); main class for labels."""
        if self._perf.get(pid) is not None:
            return
        now = time.monotonic()
        # A JVM still starting has no counters yet: try again soon; one that
        # has none after 2 s runs without them (-XX:-UsePerfData): rarely.
        interval = 0.01 if now - self._first_seen.setdefault(pid, now) < 2.0 else 1.0
        if not force and pid in self._perf and now - self._perf_tried.get(pid, 0.0) < interval:
            return
        self._perf_tried[pid] = now
        self._seen_pids.add(pid)
        where = find_hsperfdata(pid)
        perf: Optional[HsPerfData] = None
        if where is not None:
            try:
                perf = HsPerfData.from_file(where[0])
            except ApptraceError:
                perf = None
        main = perf.main_class if perf is not None else None
        if not main:
            main = _main_class_from_cmdline(pid)
        if main or pid not in self._main_class:
            self._main_class[pid] = main or "unknown"
        mapped = perf is not None and where is not None and where[1] != 0
        if perf is None or not mapped or "sun.gc.lastCause" not in perf.entries:
            # Not (yet) mapped by the JVM, or its GC counters not created yet:
            # keep looking while it starts, then settle for what there is.
            young = now - self._first_seen[pid] < 2.0
            self._perf[pid] = None if young else perf
            return
        self._perf[pid] = perf
        assert where is not None
        _, start, file_off = where

        def addr(name: str) -> int:
            e = perf.entries.get(name) if perf else None
            return start + e.offset - file_off if e is not None else 0

        value = bpfgen.PERF_VALUE.pack(addr("sun.gc.cause"), addr("sun.gc.lastCause"))
        for att in self._attached.values():
            try:
                att.prog.map("perf").update(pid.to_bytes(4, "little"), value)
            except ApptraceError:
                pass

    def _learn_targets(self) -> bool:
        """Look for the counters of targets that have none yet; True while a
        target that started less than 2 s ago is still without them."""
        waiting = False
        for pid in self._targets:
            if self._perf.get(pid) is None:
                self._learn(pid)
                waiting = waiting or (self._perf.get(pid) is None and
                                      time.monotonic() - self._first_seen[pid] < 2.0)
        return waiting

    def main_class(self, pid: int) -> str:
        if pid not in self._main_class:
            self._learn(pid)
        return self._main_class.get(pid, "unknown")

    def alive(self) -> bool:
        """Is any traced JVM still running (always True with ``all_jvms``)?"""
        if self.all_jvms:
            return True
        if self._held is not None:
            return self._held.alive()
        return any(r.alive() for r in self._targets.values())

    @property
    def exit_status(self) -> Optional[int]:
        return self._held.exit_status if self._held is not None else None

    @property
    def child_pid(self) -> Optional[int]:
        return self._held.pid if self._held is not None else None

    @property
    def libjvms(self) -> list[LibJvm]:
        return [a.lib for a in self._attached.values()]

    def poll(self, timeout: Optional[float] = None) -> list[GcEvent]:
        """Wait up to ``timeout`` seconds; the pauses and cycles that ended, oldest first."""
        self.start()
        if self._state == "closed":
            return []
        if self.all_jvms and not self._detached:
            self._rescan()
        self._learn_targets()
        assert self._epoll is not None
        rings = [a.ring for a in self._attached.values() if a.ring is not None]
        if timeout is None or timeout > 0:
            now = time.monotonic()
            deadline = None if timeout is None else now + timeout
            if self.all_jvms:
                deadline = min(deadline or now + self.RESCAN_SECONDS, now + self.RESCAN_SECONDS)
            # Records arrive without a wakeup (see bpfgen: a wakeup inside the
            # pause would lengthen it): look every POLL_SECONDS; a ring half
            # full still wakes us through the epoll.
            while not any(r.pending() for r in rings):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                # A JVM just started publishes its counters a little later;
                # look often then, so its first pauses have their cause.
                step = 0.01 if self._learn_targets() else self.POLL_SECONDS
                self._epoll.poll(step if left is None else min(left, step))
        out: list[GcEvent] = []
        for att in list(self._attached.values()):
            if att.ring is None:
                continue
            records = att.ring.drain()
            if not records:
                continue
            att.consumed(len(records))
            for rec in records:
                ev = self._decode(att, rec)
                if ev is not None:
                    out.append(ev)
        out.sort(key=lambda e: e.end_ns)
        return out

    def events(self, duration: Optional[float] = None) -> Iterator[GcEvent]:
        """Pauses and cycles until ``duration`` seconds pass or the JVMs exit."""
        self.start()
        deadline = None if duration is None else time.monotonic() + duration
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                yield from self.poll(0)
                return
            alive = self.alive()
            got = self.poll(0.2 if remaining is None else min(0.2, remaining))
            yield from got
            if not alive and not got:
                return

    def __iter__(self) -> Iterator[GcEvent]:
        return self.events()

    def _name(self, att: _Attachment, pid: int, ptr: int) -> str:
        if not ptr:
            return ""
        key = (pid, ptr)
        name = self._names.get(key)
        if name is not None:
            return name
        raw = att.prog.map("names").lookup(bpfgen.NAME_KEY.pack(pid, 0, ptr))
        if raw is None:
            return f"?{ptr:#x}"
        length, text = bpfgen.NAME_VALUE.unpack(raw)
        text = text.split(b"\0", 1)[0]
        if 0 < length < len(text):
            text = text[:length]
        name = self._names[key] = text.decode("utf-8", "replace")
        return name

    def _causes(self, pid: int, kind: int, mgr: int, first: bytes, second: bytes,
                end_now: bytes, end_last: bytes) -> tuple[str, ...]:
        """The cause of each collection in a pause (or of a cycle).

        ``sun.gc.cause`` is read in the kernel as each memory manager begins:
        right for nested collections too (Parallel's full for "Ergonomics"
        inside a scavenge for "Allocation Failure": at the end, the outer
        cause is back). A pause with no manager (ZGC, Shenandoah, JDK 17's
        G1 Remark) has the cause current at its end, if any: the last cause
        would be another collection's.
        """
        now, last = _text(end_now), _text(end_last)
        if not now and not last:
            # The kernel had no address for this JVM yet (its counters were
            # not published): read the file, right unless a GC ended since.
            found = self._cause_from_file(pid)
            return (found,) if found else ()
        if kind == bpfgen.KIND_CYCLE:
            found = now if now not in _NO_GC else last
            return (found,) if found not in _NO_GC else ()
        if mgr:
            return tuple(c for c in (_text(first), _text(second)) if c not in _NO_GC)
        return (now,) if now not in _NO_GC else ()

    def _cause_from_file(self, pid: int) -> Optional[str]:
        self._learn(pid, force=True)
        perf = self._perf.get(pid)
        if perf is None:
            return None
        perf.refresh()
        for name in ("sun.gc.cause", "sun.gc.lastCause"):
            v = perf.string(name)
            if v and v not in _NO_GC:
                return v
        return None

    def _decode(self, att: _Attachment, rec: tuple[Any, ...]) -> Optional[GcEvent]:
        (sp_b, sp_e, op_b, op_e, gc_b, gc_e, op_name, pid, tid, flags, npool, _ngc, _nb, _ne,
         kind, mgr, _mgr2, cause, cause2, end_cause, end_last) = rec[:21]
        raw_pools = rec[21:]
        begin = sp_b or op_b or gc_b
        if kind == bpfgen.KIND_PAUSE and not (flags & bpfgen.F_SP_SEEN):
            begin = op_b or gc_b
        if begin and begin < self.start_ns:
            self.dropped_partial += 1  # began before every probe was in
            return None
        if self._perf.get(pid) is None:
            self._learn(pid)
        pools = []
        nf = bpfgen.POOL_FIELDS
        for i in range(min(npool, bpfgen.MAX_POOLS)):
            m, p, init, mx, u0, c0, u1, c1, have = raw_pools[i * nf:(i + 1) * nf]
            pname = self._name(att, pid, p)
            pools.append(PoolUsage(self._name(att, pid, m), pname, is_heap_pool(pname), init,
                                   None if mx == _MAX_UNSET else mx,
                                   u0 if have & 1 else None, c0 if have & 1 else None,
                                   u1 if have & 2 else None, c1 if have & 2 else None))
        heap_before, heap_after, _ = heap_usage(pools)
        causes = self._causes(pid, kind, mgr, cause, cause2, end_cause, end_last)
        why = causes[0] if causes else None
        for p in pools:
            if p.used_after is not None:
                self._heap_after[(pid, p.name)] = (p.manager, p.used_after,
                                                   p.committed_after or 0, p.max)
        if kind == bpfgen.KIND_CYCLE:
            manager = self._name(att, pid, mgr)
            dur = max(0, op_e - op_b)
            self.cycles += 1
            self._acc.add(pid, manager, "cycle", dur, cause=why)
            return GcCycle(op_b, op_e, pid, tid, manager, dur, why, heap_before, heap_after,
                           tuple(pools))
        vm_op = self._name(att, pid, op_name) or None
        managers: list[str] = []
        for p in pools:
            if p.manager not in managers:
                managers.append(p.manager)
        manager = "+".join(managers) if managers else derived_manager(vm_op)
        full = any(m in FULL_MANAGERS for m in managers) or (
            not managers and "Full" in (vm_op or ""))
        sp_ns = sp_e - sp_b if flags & bpfgen.F_SP_SEEN else None
        op_ns = op_e - op_b if op_b and op_e else None
        gc_ns = gc_e - gc_b if flags & bpfgen.F_GC_SEEN and gc_e >= gc_b else None
        duration = op_ns if op_ns is not None else (gc_ns or 0)
        end = sp_e if sp_ns is not None else (op_e or gc_e)
        self.pauses += 1
        self._acc.add(pid, manager, "pause", duration, full=full, safepoint_ns=sp_ns,
                      vm_op=vm_op, cause=why)
        return GcPause(begin, end, pid, tid, vm_op, manager, tuple(managers), full, duration,
                       sp_ns, gc_ns, op_ns, why, heap_before, heap_after, tuple(pools),
                       bool(flags & bpfgen.F_FULL),
                       op_b - sp_b if sp_ns is not None and op_b >= sp_b else None, causes)

    # -- statistics ---------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Kernel-side counters summed over every attachment, plus records
        dropped because their pause began before tracing started."""
        if self._state == "closed":
            return dict(self._final_counters)
        out = {name: 0 for name in bpfgen.COUNTERS}
        for att in self._attached.values():
            try:
                for k, v in att.counters().items():
                    out[k] += v
            except ApptraceError:
                continue
            if att.ring is not None:
                out["decode_errors"] = out.get("decode_errors", 0) + sum(
                    att.ring.decode_errors.values())
        out["started_before_trace"] = self.dropped_partial
        return out

    def run_stats(self) -> tuple[int, int]:
        """Probe hits handled and kernel time spent in them, (runs, ns), summed
        over the programs; zeros unless the kernel's BPF statistics are on."""
        runs = ns = 0
        for att in self._attached.values():
            r, n = att.run_stats()
            runs += r
            ns += n
        return runs, ns

    @property
    def lost(self) -> int:
        """Pauses or cycles the kernel could not deliver or count (never silent)."""
        return lost_in(self.counters())

    def summary(self) -> GcSummary:
        """Per collector: count, total, percentiles, histogram, safepoint time."""
        if self._state == "closed" and self._final is not None:
            return self._final
        counters = self.counters()
        lost = lost_in(counters)
        if not self.aggregate:
            return self._acc.snapshot(lost, sorted(counters.items()))
        acc = Accumulator()
        for att in self._attached.values():
            self._read_aggregates(att, acc)
        return acc.snapshot(lost, sorted(counters.items()))

    def _read_aggregates(self, att: _Attachment, acc: Accumulator) -> None:
        agg = att.prog.map("agg")
        nb = bpfgen.HIST_BUCKETS
        for key in list(agg.keys()):
            raw = agg.lookup(key)
            if raw is None:
                continue
            pid, kindf, op, m0, m1 = bpfgen.AGG_KEY.unpack(key)
            vals = bpfgen.AGG_VALUE.unpack(raw[:bpfgen.AGG_VALUE.size])
            count, total, mx, spc, sps, spm = vals[:6]
            hist = vals[6:6 + nb]
            kind = kindf & 0xF  # the F_FULL bit rides above the kind
            if pid not in self._main_class:
                self._learn(pid)
            if kind == bpfgen.KIND_CYCLE:
                acc.merge_hist(pid, self._name(att, pid, m0), "cycle", full=False, count=count,
                               total_ns=total, max_ns=mx, hist=hist, sp_count=0,
                               sp_total_ns=0, sp_max_ns=0)
                continue
            vm_op = self._name(att, pid, op) or None
            managers = [self._name(att, pid, m) for m in (m0, m1) if m]
            manager = "+".join(managers) if managers else derived_manager(vm_op)
            full = any(m in FULL_MANAGERS for m in managers) or (
                not managers and "Full" in (vm_op or ""))
            acc.merge_hist(pid, manager, "pause", full=full, count=count, total_ns=total,
                           max_ns=mx, hist=hist, sp_count=spc, sp_total_ns=sps,
                           sp_max_ns=spm, vm_op=vm_op)

    def heap_after_gc(self) -> dict[tuple[int, str], tuple[str, int, int, Optional[int]]]:
        """(pid, pool) -> (manager, used, committed, max) after the latest collection."""
        if not self.aggregate or self._state == "closed":
            return dict(self._heap_after)
        out: dict[tuple[int, str], tuple[str, int, int, Optional[int]]] = {}
        for att in self._attached.values():
            heap = att.prog.map("heap")
            for key in list(heap.keys()):
                raw = heap.lookup(key)
                if raw is None:
                    continue
                pid, _, pool = bpfgen.HEAP_KEY.unpack(key)
                mgr, used, committed, mx, _init, _ts = bpfgen.HEAP_VALUE.unpack(raw)
                out[(pid, self._name(att, pid, pool))] = (
                    self._name(att, pid, mgr), used, committed,
                    None if mx == _MAX_UNSET else mx)
        self._heap_after = out
        return out

    @property
    def traced_pids(self) -> list[int]:
        return sorted(set(self._targets) | self._seen_pids)

    # -- teardown -----------------------------------------------------------------

    def detach(self) -> None:
        """Stop tracing but keep what was recorded: the rings can still be read
        (:meth:`poll`), and counts read after this are final."""
        self._detached = True
        for att in self._attached.values():
            att.prog.detach()

    def close(self) -> None:
        """Detach everything; a spawned command is stopped if still running."""
        if self._state == "closed":
            return
        self.end_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if self._attached and self._state == "running":
            try:
                self._final_counters = self.counters()
                if self.aggregate:
                    self.heap_after_gc()
                self._final = self.summary()
            except ApptraceError:
                pass
        self._state = "closed"
        for att in self._attached.values():
            att.close()
        self._attached.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._held is not None:
            self._held.stop()


# Pauses or cycles that never reached user space or a histogram: the ring was
# full, no per-thread state could be made, the aggregation map was full, or a
# record had the wrong size.
LOST_COUNTERS = ("ring_full", "no_state", "agg_full", "decode_errors")


def lost_in(counters: dict[str, int]) -> int:
    return sum(counters.get(k, 0) for k in LOST_COUNTERS)


def heap_usage(pools: Sequence[PoolUsage]
               ) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """Heap used before and after, and committed after, summed over heap
    pools. When one pause ran two collections (a young one escalated to
    full), each manager reported every pool: before is the first manager's,
    after the last one's."""
    managers: list[str] = []
    for p in pools:
        if p.heap and p.manager not in managers:
            managers.append(p.manager)
    if not managers:
        return None, None, None
    before = [p.used_before for p in pools
              if p.heap and p.manager == managers[0] and p.used_before is not None]
    after = [p.used_after for p in pools
             if p.heap and p.manager == managers[-1] and p.used_after is not None]
    committed = [p.committed_after for p in pools
                 if p.heap and p.manager == managers[-1] and p.committed_after is not None]
    return ((sum(before) if before else None), (sum(after) if after else None),
            (sum(committed) if committed else None))


def size_text(n: Optional[int]) -> str:
    """Bytes the way a GC log writes them: 152M, 900K."""
    if n is None:
        return "?"
    if n >= 10 << 30:
        return f"{n >> 30}G"
    if n >= 1 << 20:
        return f"{n >> 20}M"
    return f"{n >> 10}K"


def heap_text(ev: GcEvent) -> str:
    """``before->after(committed)`` over the heap pools, as the GC log prints it."""
    if ev.heap_before is None and ev.heap_after is None:
        return ""
    committed = heap_usage(ev.pools)[2]
    tail = f"({size_text(committed)})" if committed is not None else ""
    return f"{size_text(ev.heap_before)}->{size_text(ev.heap_after)}{tail}"


def format_event(ev: GcEvent, clock: str = "") -> str:
    """One line per pause or cycle, like a GC log line (``clock``: its time,
    as the caller wants it shown)."""
    causes = list(dict.fromkeys(getattr(ev, "causes", ()) or ((ev.cause,) if ev.cause else ())))
    cause = f" ({'; '.join(causes)})" if causes else ""
    heap = heap_text(ev)
    heap = f" {heap}" if heap else ""
    head = f"{clock} " if clock else ""
    if isinstance(ev, GcCycle):
        return (f"{head}{ev.pid} Cycle {ev.manager}{cause}{heap} {ev.duration_ns / 1e6:.3f}ms")
    sp = f" safepoint {ev.safepoint_ns / 1e6:.3f}ms" if ev.safepoint_ns is not None else ""
    op = f"; {ev.vm_op}" if ev.vm_op else ""
    return (f"{head}{ev.pid} Pause {ev.kind}{cause}{heap} {ev.duration_ns / 1e6:.3f}ms{sp}"
            f" [{ev.manager}{op}]")


def _main_class_from_cmdline(pid: int) -> Optional[str]:
    """The first argument of ``java`` that is neither an option nor its value."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    takes_value = {"-cp", "-classpath", "--class-path", "-p", "--module-path",
                   "--add-modules", "--add-opens", "--add-exports"}
    i = 1
    while i < len(args):
        a = args[i]
        if a in ("-jar", "-m", "--module") and i + 1 < len(args):
            return os.path.basename(args[i + 1])
        if a in takes_value:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a
    return None


def gc(*, pid: Optional[int] = None, name: Optional[str] = None, all_jvms: bool = False,
       command: Optional[Sequence[str]] = None, aggregate: bool = False,
       ring_kb: int = 1024) -> GcTracer:
    """Trace GC pauses: ``with apptrace.jvm.gc(pid=1234) as t: for p in t: ...``."""
    return GcTracer(pid=pid, name=name, all_jvms=all_jvms, command=command,
                    aggregate=aggregate, ring_kb=ring_kb)
