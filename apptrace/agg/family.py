"""What the aggregation and latency families share: a target, probe strings
resolved to sites, one program attached to them, per-CPU maps read back.

A peer of :class:`apptrace.Session` built from the engine layers: the target
(:class:`~apptrace.engine.target.Target`), the attach points
(:class:`~apptrace.engine.attach.Resolver`), its own C compiled and attached
with :class:`apptrace.bpf.Program`, and the exec gate of a held command
(:class:`~apptrace.engine.program.TaskHooks`). No ring buffer: results stay
in the kernel's maps until read.
"""

from __future__ import annotations

import atexit
import ctypes
import errno as _errno
import struct
import time
import weakref
from typing import Any, Iterator, Optional, Sequence

from apptrace import capabilities
from apptrace.agg.bpfgen import AggPlan, decode_key
from apptrace.bpf import Program
from apptrace.bpfobj import BpfMap, possible_cpus
from apptrace.engine.attach import Resolver, quiet_offset
from apptrace.engine.plan import Group, cookie
from apptrace.engine.program import TaskHooks, attach_sites
from apptrace.engine.target import HeldCommand, Stdout, Target
from apptrace.errors import (
    ApptraceError,
    BpfError,
    OptionError,
    SessionStateError,
)
from apptrace.events import ProbeInfo
from apptrace.semaphores import ProcMemSemaphores
from apptrace.syscall import bpf

__all__ = ["KernelFamily", "percpu_values", "delete_key", "epoch_rows"]

BPF_MAP_DELETE_ELEM = 3
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
GRACE_S = 0.002  # after flipping the epoch: longer than any program runs

_live: "weakref.WeakSet[KernelFamily]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # procmem semaphores must not stay raised
    for f in list(_live):
        f.close()


def percpu_values(m: BpfMap, raw: bytes) -> Iterator[bytes]:
    """Each CPU's value in a per-CPU map lookup's bytes."""
    step = (m.spec.value_size + 7) & ~7
    for off in range(0, len(raw), step):
        yield raw[off:off + m.spec.value_size]


def epoch_rows(m: BpfMap, plan: AggPlan, epoch: Optional[int]
               ) -> Iterator[tuple[int, list[Any], Iterator[bytes]]]:
    """(key flags, key values, each CPU's value) of every row of ``m`` counted
    in ``epoch`` (None: every row). An interval's rows are deleted as they
    are read, so the half of the maps it used starts empty next time."""
    for raw_key in list(m.keys()):
        ep, kflags, kvals = decode_key(plan, raw_key)
        if epoch is not None and ep != epoch:
            continue
        raw = m.lookup(raw_key)
        if epoch is not None:
            delete_key(m, raw_key)
        if raw is not None:
            yield kflags, kvals, percpu_values(m, raw)


def delete_key(m: BpfMap, key: bytes) -> bool:
    """Delete one key; False if it was not there."""
    k = ctypes.create_string_buffer(key, max(len(key), 1))
    attr = ctypes.create_string_buffer(144)
    struct.pack_into("<IIQ", attr, 0, m.fd, 0, ctypes.addressof(k))
    ret, err = bpf(BPF_MAP_DELETE_ELEM, attr)
    if ret < 0 and err != _errno.ENOENT:
        raise BpfError(f"map {m.spec.name}: delete failed", errno=err)
    return ret >= 0


class KernelFamily:
    """A target, probe strings, one program; subclasses render the C and read maps."""

    def __init__(self, *, pid: Optional[int] = None, path: Optional[str] = None,
                 command: Optional[Sequence[str]] = None, command_stdout: Stdout = None,
                 semaphores: str = "kernel", multi: Optional[bool] = None) -> None:
        if semaphores not in ("kernel", "procmem"):
            raise OptionError("semaphores", semaphores, "'kernel' or 'procmem'")
        if semaphores == "procmem" and pid is None and command is None:
            raise OptionError("semaphores", semaphores,
                              "'kernel' without a pid or command: procmem writes one"
                              " process's memory")
        self._target = Target(pid=pid, path=path, command=command,
                              command_stdout=command_stdout)
        self.semaphores = semaphores
        self.multi = capabilities.has_uprobe_multi() if multi is None else multi
        self._resolver = Resolver(self._target, semaphores=semaphores)
        self._groups: list[Group] = []
        self._prog: Optional[Program] = None
        self._procmem: Optional[ProcMemSemaphores] = None
        self._procmem_later: list[tuple[str, int]] = []
        self._state = "new"
        self._started = 0.0
        self.attach_seconds = 0.0
        self._tracker: Any = None
        # Intervals: hits go to one of two halves of the maps (the epoch);
        # a read flips the epoch and reads the half no hit writes any more.
        self._epoch = 0
        self._interval = 0
        self._last_read = 0.0

    # -- what subclasses give -------------------------------------------------------

    def _render(self, groups: list[Group]) -> str:
        raise NotImplementedError

    def _entry(self, g: Group) -> str:
        """The name prefix of the group's entry functions (``<prefix>_multi``)."""
        raise NotImplementedError

    def _wants_stacks(self) -> bool:
        return False

    def _since_last_read(self) -> float:
        """Seconds a result covers: since attaching, or since the previous read."""
        now = time.monotonic()
        secs, self._last_read = now - (self._last_read or now), now
        return secs

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> KernelFamily:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_new(self) -> None:
        if self._state != "new":
            raise SessionStateError("probes must be added before the tracing starts")

    def start(self) -> None:
        """Resolve, compile once, attach every site, then let a held command run."""
        if not self._groups and self._state == "new":
            raise SessionStateError("no probes added")
        if not capabilities.may_start(self._state, "this aggregation"):
            return
        t0 = time.monotonic()
        self._state = "starting"
        _live.add(self)
        try:
            target = self._target
            target.resolve()
            self._resolver.resolve(self._groups)
            child = target.spawn() if target.command is not None else None
            self._prog = prog = Program(self._render(self._groups))
            TaskHooks(prog).attach(child, stop_at_exec=self.semaphores == "procmem"
                                   and child is not None)
            pid = target.pid
            if self.semaphores == "procmem" and pid is not None:
                self._procmem = ProcMemSemaphores(pid)
            upid = pid if pid is not None else -1
            self._attach_companions(upid, child)
            for g in self._groups:
                self._attach_group(g, upid, child)
            self._last_read = time.monotonic()  # the first result covers from here
            if self._wants_stacks() and pid is not None and child is None:
                self._stacks().watch(pid, force=True)
            hold = child is not None and self._wants_stacks() and self._hold_at_entry(child)
            if child is not None:
                later = self._raise_after_exec if self._procmem is not None else None
                child.release(stopped_at_exec=later)
                if hold:
                    # Stopped at its ELF entry: every DT_NEEDED library is mapped.
                    tracker = self._stacks()
                    child.at_stop(lambda: tracker.watch(child.pid, force=True))
            self._state = "running"
            self._started = time.monotonic()
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.monotonic() - t0

    def _attach_group(self, g: Group, pid: int, child: Optional[HeldCommand]) -> None:
        prog = self._prog
        assert prog is not None
        attach_sites(prog, g, self._entry(g), pid, multi=self.multi)
        if self._procmem is not None:
            for p in g.probes:
                for s in p.sites:
                    if s.semaphore_offset:
                        self._raise_procmem(s.binary, s.semaphore_offset, child)

    def _hold_at_entry(self, child: HeldCommand) -> bool:
        """Stop the spawned command once at its ELF entry point, so its memory
        map (with its libraries) is snapshotted for stacks of a short run. The
        C must contain :data:`apptrace.codegen.HOLD_AT_ENTRY`."""
        prog = self._prog
        assert prog is not None
        img = self._resolver.image(child.exe)
        entry = img.vaddr_to_offset(img.entry, executable=True)
        if entry is None:
            return False
        fd = prog.load("apptrace_hold_at_entry")
        prog.attach_perf(fd, child.exe, entry, child.pid, 0, False, "entry hold")
        return True

    def site_cookies(self, g: Group) -> list[int]:
        """The cookies of a group's per-site entries (kernels without uprobe_multi)."""
        if self.multi:
            return []
        return sorted({cookie(pi, si, s.reader) for pi, p in enumerate(g.probes)
                       for si, s in enumerate(p.sites)})

    def _raise_procmem(self, binary: str, offset: int, child: Optional[HeldCommand]) -> None:
        assert self._procmem is not None
        if child is not None and child.held:
            self._procmem_later.append((binary, offset))
        else:
            self._procmem.add(binary, offset)

    def _raise_after_exec(self) -> None:
        assert self._procmem is not None
        for binary, offset in self._procmem_later:
            self._procmem.add(binary, offset)
        self._procmem_later.clear()

    def _attach_companions(self, pid: int, child: Optional[HeldCommand]) -> None:
        """Semaphores a probe needs raised without attaching to their sites
        (see :mod:`apptrace.usdt.companions`)."""
        prog = self._prog
        assert prog is not None
        done: set[tuple[str, int]] = set()
        for g in self._groups:
            for p in g.probes:
                for binary, sem in p.companions:
                    if (binary, sem) in done:
                        continue
                    done.add((binary, sem))
                    if self._procmem is not None:
                        self._raise_procmem(binary, sem, child)
                        continue
                    where = quiet_offset(self._resolver.image(binary))
                    if where is None:
                        continue
                    label = f"{p.info.label} (companion semaphore)"
                    fd = prog.load("apptrace_noop", multi=self.multi)
                    if self.multi:
                        prog.attach_multi(fd, binary, [where], [sem], [0], pid, False, label)
                    else:
                        prog.attach_perf(fd, binary, where, pid, sem, False, label)

    # -- the target ------------------------------------------------------------------------

    @property
    def probes(self) -> list[ProbeInfo]:
        return [p.info for g in self._groups for p in g.probes]

    @property
    def pid(self) -> Optional[int]:
        return self._target.pid

    @property
    def exit_status(self) -> Optional[int]:
        """A spawned command's status once it ended (negative: the signal)."""
        return self._target.exit_status

    def target_alive(self) -> bool:
        return self._target.alive()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, less if the target exits; True while
        it runs. Keeps the memory-map snapshot fresh for stacks."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if not self._target.alive():
                return False
            if self._tracker is not None and self.pid is not None:
                self._tracker.watch(self.pid)
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))

    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0

    def _stacks(self) -> Any:
        if self._tracker is None:
            from apptrace.stacks import StackTracker

            self._tracker = StackTracker()
        return self._tracker

    # -- maps ----------------------------------------------------------------------------

    def _flip_epoch(self) -> int:
        """Send new hits to the other half; the half to read (nothing writes it)."""
        old = self._epoch
        self._epoch ^= 1
        self._map("agg_epoch").update(_U32.pack(0), _U32.pack(self._epoch))
        time.sleep(GRACE_S)  # hits that read the old epoch finish first
        self._interval += 1
        return old

    def _map(self, name: str) -> BpfMap:
        if self._prog is None:
            raise SessionStateError("not started, or closed")
        return self._prog.map(name)

    def _counter(self, name: str, index: int, *, reset: bool = False) -> int:
        """A per-CPU u64 array slot summed over CPUs (and zeroed, with ``reset``)."""
        m = self._map(name)
        key = _U32.pack(index)
        n = m.sum_u64(key)
        if reset and n:
            m.update(key, bytes(((m.spec.value_size + 7) & ~7) * possible_cpus()))
        return n

    def detach(self) -> None:
        """Stop counting: nothing fires after this; the maps stay readable."""
        if self._prog is not None:
            self._prog.detach()

    def close(self) -> None:
        """Detach, lower procmem semaphores, free the program, stop a spawned command."""
        if self._state == "closed":
            return
        self._state = "closed"
        _live.discard(self)
        errors: list[BaseException] = []
        if self._procmem is not None:
            procmem, self._procmem = self._procmem, None
            try:
                procmem.close()
            except ApptraceError as err:
                errors.append(err)
        if self._prog is not None:
            prog, self._prog = self._prog, None
            try:
                prog.close()
            except ApptraceError as err:
                errors.append(err)
        self._target.close()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        self._resolver.close()
        if errors:
            raise errors[0]
