"""The program layer: the BPF program for a set of probe strings, attached.

From the plan (:mod:`apptrace.engine.plan`) it renders the C
(:mod:`apptrace.codegen`), compiles or loads it from the compile cache
(:class:`apptrace.bpf.Program`), attaches every site (one uprobe_multi link
per binary, or perf events), raises semaphores in either mode, arms the exec
gate of a held command, and opens each group's ring. :meth:`close` releases
all of it. Counters kept in the kernel (losses, folded stacks) are read here.

A probe family with its own C uses :class:`apptrace.bpf.Program` directly
(compile, load, attach, maps) and :class:`TaskHooks` for the same exec gate.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Optional, Sequence

from apptrace.bpf import Program
from apptrace.codegen import (
    CTL_HELD,
    CTL_NO_SHORTCUT,
    CTL_STOP_EXEC,
    MAX_TABLE_ARGS,
    GroupPlan,
    render,
    render_base,
    render_generic,
    table_row,
    table_strings,
)
from apptrace.engine.attach import Resolver, quiet_offset
from apptrace.engine.filter import reader_exprs
from apptrace.engine.plan import PROBE_AT, Group, cookie
from apptrace.engine.target import HeldCommand
from apptrace.errors import ApptraceError
from apptrace.options import MIN_EVENTS_PER_RING, check_event_fits
from apptrace.ringbuf import RingReader
from apptrace.semaphores import ProcMemSemaphores

__all__ = ["TraceProgram", "TaskHooks", "attach_sites", "ring_pages", "prepare", "generic_shapes",
           "TABLE_THRESHOLD"]

TABLE_THRESHOLD = 16  # argument layouts in one group before specs go in a map
# Groups of several probes get a spare ring that the probes which rarely need
# it use when the main one is full (codegen._spare_c); False only to measure.
FAIR_SHARE = True
RING_BUDGET_KB = 32 * 1024   # split across probe strings unless a size is given
_SPEC_ARG = struct.Struct("<BBBBHHqQ")  # struct apptrace_arg
_STR_SPEC = struct.Struct("<BBBxI")     # one slot of struct gN_strspec
# Shapes a generic group program is compiled for: a group's argument and
# string-slot counts round up to these, so a few compiled objects serve
# every probe string (the padding costs a skipped table entry per hit).
NARGS_SHAPES = (0, 4, 8, 12)
NSTR_SHAPES = (0, 1, 2, 4, 8, 12)
_FOLD_KEY = struct.Struct("<IIIi16s")   # struct gN_key: pid, probe, site, stack id, comm
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def ring_pages(rings: int, ringbuf_kb: Optional[int] = None) -> int:
    """Pages per ring buffer: a power of two. By default 32 MiB shared by the
    rings, each between 1 and 16 MiB: room for ~0.2 s of a million events a
    second while the reader is descheduled."""
    kb = ringbuf_kb or min(16 * 1024, max(1024, RING_BUDGET_KB // max(rings, 1)))
    pages = max(1, kb * 1024 // 4096)
    return 1 << (pages - 1).bit_length()


SPARE_MIN_PAGES = 16  # 64 KiB: ~740 small records; a hot probe takes one budget of them per burst


def spare_pages(pages: int, event_bytes: int) -> int:
    """A fair group's spare ring: a quarter of its main ring, at least 64 KiB,
    and room for a few events (a power of two pages, like every ring)."""
    need = -(-event_bytes * MIN_EVENTS_PER_RING // 4096)
    n = max(pages // 4, need, SPARE_MIN_PAGES)
    return 1 << (n - 1).bit_length()


def generic_shapes(*, str_size: int = 64, stack_depth: int = 32) -> list[str]:
    """The C of every common generic program: the session base (with and
    without the entry hold), each argument shape with 0, 1 or 2 strings, with
    and without stacks, and stack folding."""
    texts = [render_base(hold_at_entry=False), render_base(hold_at_entry=True)]
    for nargs in NARGS_SHAPES:
        for nstr in (0, 1, 2):
            for stack in (0, stack_depth):
                texts.append(render_generic(GroupPlan(0, nargs, nstr, str_size, stack, 1, 1,
                                                      [], multi=True, table=nargs > 0)))
            # a glob (several probes in one ring) without stacks
            texts.append(render_generic(GroupPlan(0, nargs, nstr, str_size, 0, 1, 1, [],
                                                  multi=True, table=nargs > 0, fair=True,
                                                  spare_pages=1)))
    texts.append(render_generic(GroupPlan(0, 0, 0, str_size, stack_depth, 1, 1, [],
                                          multi=True, fold=True)))
    return texts


def prepare(extra: Sequence[str] = (),
            progress: Optional[Callable[[int, int, bool], None]] = None) -> tuple[int, int]:
    """Compile the common generic programs (and ``extra`` C texts, such as the
    probe families' defaults) into the compile cache, so that later traces
    never wait for clang. Returns (compiled now, already cached);
    ``progress(i, n, compiled)`` after each."""
    from apptrace.bpf import ensure_compiled

    texts = generic_shapes() + list(extra)
    done = 0
    for i, text in enumerate(texts):
        compiled = ensure_compiled(text)
        done += compiled
        if progress is not None:
            progress(i + 1, len(texts), compiled)
    return done, len(texts) - done


def attach_sites(prog: Program, g: Group, entry: str, pid: int, *, multi: bool) -> None:
    """Attach every site of a group to the program's entry functions: one
    uprobe_multi link per binary for ``{entry}_multi`` (the cookie says which
    probe, site and reader), or one perf event per site for ``{entry}_c<cookie>``."""
    if multi:
        fd = prog.load(f"{entry}_multi", multi=True)
        by_binary: dict[str, list[tuple[int, int, int]]] = {}
        for pi, p in enumerate(g.probes):
            for si, s in enumerate(p.sites):
                by_binary.setdefault(s.binary, []).append(
                    (s.file_offset, s.ref_ctr_offset, cookie(pi, si, s.reader)))
        for binary, rows in by_binary.items():
            prog.attach_multi(fd, binary, [r[0] for r in rows], [r[1] for r in rows],
                              [r[2] for r in rows], pid, g.retprobe, g.spec.text)
        return
    for pi, p in enumerate(g.probes):
        for si, s in enumerate(p.sites):
            ck = cookie(pi, si, s.reader)
            fd = prog.load(f"{entry}_c{ck:x}")
            prog.attach_perf(fd, s.binary, s.file_offset, pid, s.ref_ctr_offset,
                             g.retprobe, p.info.label)


class TaskHooks:
    """The rename and exec hooks every program rendered by :mod:`apptrace.codegen`
    carries (``TASK_HOOKS``): comm caches follow renames, and a held command's
    launcher is not traced until its exec (where it may be stopped)."""

    def __init__(self, prog: Program) -> None:
        self.prog = prog

    def ctl(self, slot: int, value: int) -> None:
        self.prog.map("apptrace_ctl").update(_U32.pack(slot), _U64.pack(value))

    def attach(self, child: Optional[HeldCommand], *, stop_at_exec: bool = False) -> None:
        if child is not None:
            self.ctl(CTL_HELD, child.pid)
            self.ctl(CTL_STOP_EXEC, int(stop_at_exec))
        try:
            self.prog.attach_raw_tracepoint(
                self.prog.load("apptrace_on_rename", raw_tracepoint=True), "task_rename")
        except ApptraceError:
            self.ctl(CTL_NO_SHORTCUT, 1)  # no rename tracking: copy comm every time
        if child is not None:
            self.prog.attach_raw_tracepoint(
                self.prog.load("apptrace_on_exec", raw_tracepoint=True), "sched_process_exec")


class TraceProgram:
    """The generated program of a session's groups, loaded and attached."""

    def __init__(self, groups: list[Group], resolver: Resolver, *, multi: bool,
                 str_max: int, stack_depth: int, ringbuf_kb: Optional[int],
                 arg_tables: Optional[bool], hold_at_entry: bool = False) -> None:
        """Each group is its own generic program (its C depends only on its
        shape, so it comes from the compile cache whatever the probes) when
        the kernel has uprobe_multi, unless ``arg_tables=False`` asks for
        generated readers; the others share one generated program."""
        self.groups = groups
        self.resolver = resolver
        self.multi = multi
        self.hold_at_entry = hold_at_entry
        self.procmem: Optional[ProcMemSemaphores] = None
        self._procmem_later: list[tuple[str, int]] = []  # a held command's, after exec
        self.base = Program(render_base(hold_at_entry=hold_at_entry))
        self.hooks = TaskHooks(self.base)
        self._progs: dict[int, tuple[Program, str]] = {}  # gid -> (program, map prefix)
        self.compiled = 0  # programs bcc had to compile (the rest came from the cache)
        self.compiled += not self.base.from_cache
        shared = {"apptrace_ctl": self.base.map("apptrace_ctl")}
        try:
            legacy = []
            pages = ring_pages(sum(1 for g in groups if not g.fold), ringbuf_kb)
            for g in groups:
                stack = stack_depth if g.spec.stack else 0
                g.str_size = (max(str_max, g.str_size) + 7) & ~7
                plan = GroupPlan(g.gid, g.nargs, g.nstr, g.str_size, stack, pages,
                                 len(g.probes), g.reader_plans, multi=multi, fold=g.fold)
                plan.fair = FAIR_SHARE and not g.fold and len(g.probes) > 1
                if plan.fair:
                    plan.spare_pages = spare_pages(pages, plan.event_struct().size)
                if g.where is not None:  # per-reader C: not a generic program
                    plan.filters = [(r.c, r.fault_mask, r.uses_comm)
                                    for r in reader_exprs(g.where, g)]
                generic = (multi and arg_tables is not False and g.nargs <= MAX_TABLE_ARGS
                           and plan.filters is None)
                if generic and not g.fold:
                    plan.nargs = min(n for n in NARGS_SHAPES if n >= g.nargs)
                    plan.nstr = min(n for n in NSTR_SHAPES if n >= g.nstr)
                    plan.table = plan.nargs > 0
                else:
                    tables_ok = g.nstr == 0 and 0 < g.nargs <= MAX_TABLE_ARGS and not g.fold
                    plan.table = tables_ok and (len(g.reader_plans) > TABLE_THRESHOLD
                                                if arg_tables is None else arg_tables)
                if not multi:
                    plan.site_cookies = sorted({cookie(pi, si, s.reader)
                                                for pi, p in enumerate(g.probes)
                                                for si, s in enumerate(p.sites)})
                if not plan.fold:
                    check_event_fits(plan.event_struct().size, plan.ringbuf_pages * 4096)
                g.plan = plan
                if generic:
                    self._progs[g.gid] = (self._generic(plan, shared), "g0")
                else:
                    legacy.append(plan)
            if legacy:
                prog = Program(render(legacy), shared=shared)
                self.compiled += not prog.from_cache
                for plan in legacy:
                    self._progs[plan.gid] = (prog, plan.name)
            for g in groups:
                assert g.plan is not None
                if g.plan.table:
                    self._fill_specs(g)
        except BaseException:
            self.close()
            raise

    def _generic(self, plan: GroupPlan, shared: dict[str, Any]) -> Program:
        """The group's program from its shape alone; real sizes set at load."""
        shape = GroupPlan(0, plan.nargs, plan.nstr, plan.str_max, plan.stack_depth, 1, 1,
                          [], multi=True, fold=plan.fold, table=plan.table,
                          stack_entries=plan.stack_entries, fair=plan.fair,
                          spare_pages=1 if plan.fair else 0)
        n = max(len(plan.readers), 1)
        prog = Program(render_generic(shape), shared=shared,
                       sizes={"g0_rb": plan.ringbuf_pages * 4096,
                              "g0_lost": max(plan.nprobes, 1),
                              "g0_share": max(plan.nprobes, 1),
                              "g0_rs": plan.spare_bytes,
                              "g0_specs": n, "g0_strs": n})
        self.compiled += not prog.from_cache
        return prog

    @property
    def from_cache(self) -> bool:
        """Nothing had to be compiled: every program came from the cache."""
        return self.compiled == 0

    def program_of(self, g: Group) -> tuple[Program, str]:
        """The program holding a group, and the prefix of its maps' names."""
        return self._progs[g.gid]

    def _fill_specs(self, g: Group) -> None:
        """Write each reader's argument (and string) specs into the group's maps."""
        assert g.plan is not None
        prog, name = self.program_of(g)
        specs = prog.map(f"{name}_specs")
        strs = prog.map(f"{name}_strs") if g.plan.nstr else None
        for rid, (reads, vaddr) in enumerate(g.plan.readers):
            rows = table_row(reads, vaddr)
            value = b"".join(_SPEC_ARG.pack(*row) for row in rows)
            value += bytes(specs.spec.value_size - len(value))
            specs.update(_U32.pack(rid), value)
            if strs is not None:
                slots = table_strings(reads, g.plan.nstr)
                strs.update(_U32.pack(rid), b"".join(_STR_SPEC.pack(*row) for row in slots))

    # -- attaching -------------------------------------------------------------

    def attach(self, pid: Optional[int], child: Optional[HeldCommand], *,
               semaphores: str = "kernel") -> None:
        """Attach every site (filtered to ``pid`` when given) and raise semaphores."""
        upid = pid if pid is not None else -1
        self.hooks.attach(child, stop_at_exec=semaphores == "procmem" and child is not None)
        if child is not None and self.hold_at_entry:
            self._attach_entry_hold(child)
        if semaphores == "procmem" and pid is not None:
            self.procmem = ProcMemSemaphores(pid)
        self._attach_companions(upid, child)
        for g in self.groups:
            self._attach_group(g, upid, child)

    def _attach_group(self, g: Group, pid: int, child: Optional[HeldCommand]) -> None:
        assert g.plan is not None
        prog, name = self.program_of(g)
        attach_sites(prog, g, name, pid, multi=self.multi)
        if self.procmem is not None:
            for p in g.probes:
                for s in p.sites:
                    if s.semaphore_offset:
                        self._raise_procmem(s.binary, s.semaphore_offset, child)
        if not g.fold:
            if g.plan.fair:
                g.spare = RingReader(prog.map_fd(f"{name}_rs"), g.plan.spare_bytes,
                                     g.record_struct(), probe_offset=PROBE_AT)
            g.ring = RingReader(prog.map_fd(f"{name}_rb"), g.plan.ringbuf_pages * 4096,
                                g.record_struct(), probe_offset=PROBE_AT)

    def _attach_entry_hold(self, child: HeldCommand) -> None:
        """Stop the spawned command at its ELF entry point, once, for a map snapshot."""
        img = self.resolver.image(child.exe)
        entry = img.vaddr_to_offset(img.entry, executable=True)
        if entry is None:
            self.hold_at_entry = False
            return
        fd = self.base.load("apptrace_hold_at_entry")
        self.base.attach_perf(fd, child.exe, entry, child.pid, 0, False, "entry hold")

    def _raise_procmem(self, binary: str, offset: int, child: Optional[HeldCommand]) -> None:
        """A held command's semaphores are raised after its exec, not in the launcher."""
        assert self.procmem is not None
        if child is not None and child.held:
            self._procmem_later.append((binary, offset))
        else:
            self.procmem.add(binary, offset)

    def raise_after_exec(self) -> None:
        """Called while the command is stopped right after its exec."""
        assert self.procmem is not None
        for binary, offset in self._procmem_later:
            self.procmem.add(binary, offset)
        self._procmem_later.clear()

    def _attach_companions(self, pid: int, child: Optional[HeldCommand]) -> None:
        """Raise semaphores a probe needs without sending their events.

        A no-op uprobe placed where the program runs once (``.fini``) carries
        the semaphore as its ``ref_ctr_offset``: the kernel raises it in every
        process that maps the binary, and the probe's own sites stay unhit.
        """
        done: set[tuple[str, int]] = set()
        for g in self.groups:
            for p in g.probes:
                for binary, sem in p.companions:
                    if (binary, sem) in done:
                        continue
                    done.add((binary, sem))
                    if self.procmem is not None:
                        self._raise_procmem(binary, sem, child)
                        continue
                    where = quiet_offset(self.resolver.image(binary))
                    if where is None:
                        continue
                    label = f"{p.info.label} (companion semaphore)"
                    fd = self.base.load("apptrace_noop", multi=self.multi)
                    if self.multi:
                        self.base.attach_multi(fd, binary, [where], [sem], [0], pid, False,
                                               label)
                    else:
                        self.base.attach_perf(fd, binary, where, pid, sem, False, label)

    # -- kernel-side counters ----------------------------------------------------

    def lost(self, g: Group) -> list[int]:
        """Events the ring had no room for, per probe of the group."""
        prog, name = self.program_of(g)
        m = prog.map(f"{name}_lost")
        return [m.sum_u64(_U32.pack(pi)) for pi in range(len(g.probes))]

    def fold_rows(self) -> list[tuple[Group, tuple[Any, ...], int]]:
        """(group, (pid, probe, site, stack id, comm), count) for every counted stack."""
        rows = []
        for g in self.groups:
            if g.fold and g.gid in self._progs:
                prog, name = self.program_of(g)
                counts = prog.map(f"{name}_counts")
                for key in list(counts.keys()):
                    value = counts.lookup(key)
                    if value is not None:
                        rows.append((g, _FOLD_KEY.unpack(key), _U64.unpack_from(value)[0]))
        return rows

    def stack(self, g: Group, stack_id: int) -> tuple[int, ...]:
        """The addresses of one stack the kernel counted."""
        prog, name = self.program_of(g)
        raw = prog.map(f"{name}_stacks").lookup(_U32.pack(stack_id))
        if raw is None:
            return ()
        return tuple(a for a in struct.unpack(f"<{len(raw) // 8}Q", raw) if a)

    # -- teardown ------------------------------------------------------------------

    def _programs(self) -> list[Program]:
        out = [self.base]
        for prog, _ in self._progs.values():
            if all(prog is not p for p in out):
                out.append(prog)
        return out

    def detach(self) -> None:
        """Nothing fires after this; maps and rings stay readable."""
        for prog in self._programs():
            prog.detach()

    def lower_semaphores(self) -> None:
        if self.procmem is not None:
            procmem, self.procmem = self.procmem, None
            procmem.close()

    def close(self) -> None:
        """Lower procmem semaphores, close rings, detach, free programs and maps."""
        try:
            self.lower_semaphores()
        finally:
            for g in self.groups:
                if g.ring is not None:
                    g.ring.close()
                    g.ring = None
                if g.spare is not None:
                    g.spare.close()
                    g.spare = None
            # Groups first: they borrow the base program's control map.
            for prog in reversed(self._programs()):
                prog.close()
            self._progs.clear()
