"""The tracing engine: :class:`Session` resolves probes, compiles, attaches, reads.

Every probe family (USDT, uprobes, TLS, JVM GC, test harness) is a client of
this class: it adds probe strings, then reads :class:`Event` objects (or
decoded batches, for throughput) until the target exits or it stops.

Lifecycle: ``Session(...)`` → ``add()``/``usdt()``/``uprobe()``/``uretprobe()``
→ ``start()`` (implicit on first read) → ``events()``/``poll()``/``run()`` →
``close()`` (or leave the ``with`` block). A session is single-use.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import dataclasses
import fnmatch
import gc
import os
import select
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from apptrace import capabilities
from apptrace.codegen import (
    CTL_HELD,
    CTL_NO_SHORTCUT,
    CTL_STOP_EXEC,
    FLAG_ARG_FAILED,
    FLAG_COMM_SAME,
    FLAG_STR_TRUNC_SHIFT,
    HEADER,
    MAX_TABLE_ARGS,
    ArgRead,
    GroupPlan,
    render,
    table_row,
)
from apptrace.errors import (
    ApptraceError,
    CommandNotFoundError,
    ElfError,
    NoProbesError,
    OptionError,
    ProbeNotFoundError,
    ProbeSpecError,
    SessionStateError,
    SpawnError,
    TracePermissionError,
)
from apptrace.events import Event, ProbeInfo, RawBatch, Stats, Unavailable, make_event
from apptrace.options import (
    BATCH_MS,
    RING_KB,
    STACK_DEPTH,
    STR_MAX,
    check_event_fits,
    check_int,
    check_seconds,
)
from apptrace.probes import ArgType, ProbeSpec, parse_probe
from apptrace.procs import ProcessRef, check_executable, mapped_objects, resolve_binary
from apptrace.semaphores import ProcMemSemaphores
from apptrace.usdt.args import Argument
from apptrace.usdt.companions import companions_of
from apptrace.usdt.notes import ElfImage, Probe

__all__ = ["Session", "ProbeHandle"]

_UPROBE_REGS = ("di", "si", "dx", "cx", "r8", "r9")
_DEFAULT_UPROBE_TYPE = ArgType("ptr", "int", 8, False, hex=True)
_DEFAULT_RET_TYPE = ArgType("long", "int", 8, True)
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_HEADER_FIELDS = len(HEADER.unpack(bytes(HEADER.size)))
TABLE_THRESHOLD = 16  # argument layouts in one group before specs go in a map
_SPEC_ARG = struct.Struct("<BBBBHHqQ")  # struct apptrace_arg
_FOLD_KEY = struct.Struct("<IIIi16s")   # struct gN_key: pid, probe, site, stack id, comm
_U32 = struct.Struct("<I")
_XMM_REASON = ("floating-point values travel in xmm registers, which uprobes cannot read"
               " (x86-64 ABI)")


def _string_value(t: ArgType, strs: bytes, slot: int, size: int,
                  raw_args: tuple[int, ...]) -> Any:
    """A string slot's value: text up to a NUL, ``str[argN]``'s bytes, or ``bytes[N]``."""
    raw = strs[slot * size:(slot + 1) * size]
    if t.kind == "bytes":
        return raw[:t.size]
    if t.len_arg is not None:
        n = raw_args[t.len_arg] if t.len_arg < len(raw_args) else 0
        if n >> 63:
            n -= 1 << 64
        return raw[:max(0, min(n, size))].decode("utf-8", "replace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _quiet_offset(img: ElfImage) -> Optional[int]:
    """A file offset where a binary's code runs at most once per process: .fini."""
    sec = img.section(".fini")
    if sec is not None and sec.offset:
        return int(sec.offset)
    return img.vaddr_to_offset(img.elf.header["e_entry"], executable=True) or None


def _str_read(r: ArgRead, t: Optional[ArgType], nargs: int, spec: ProbeSpec) -> ArgRead:
    """Add a string slot's shape (length argument, fixed size) to an argument read."""
    if r.str_slot < 0 or t is None:
        return r
    if t.kind == "bytes":
        return ArgRead(r.usdt, r.reg, r.str_slot, str_bytes=t.size)
    if t.len_arg is not None:
        if t.len_arg >= nargs:
            raise ProbeSpecError(spec.text, f"{t.name}: the probe has {nargs} argument(s)")
        return ArgRead(r.usdt, r.reg, r.str_slot, str_len_arg=t.len_arg)
    return r
_PROBE_AT = struct.calcsize(HEADER.format[:4])  # offset of the probe index: ts, pid, tid


@dataclass
class _Slot:
    """How Python presents one argument slot of one site."""

    unavailable: Optional[str]   # reason, when the BPF side cannot read it
    is_float: bool
    size: int
    signed: bool
    type: Optional[ArgType]
    str_slot: int = -1


@dataclass
class _Site:
    binary: str       # path to attach (may be /proc/PID/root/...)
    file_offset: int
    ref_ctr_offset: int
    semaphore_offset: int
    reader: int
    slots: list[_Slot]
    vaddr: int = 0    # the site's address in the ELF (anchors stacks of exited processes)


@dataclass
class _Probe:
    info: ProbeInfo
    sites: list[_Site] = field(default_factory=list)
    # (binary, semaphore offset) raised for this probe without attaching its sites
    companions: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class ProbeHandle:
    """What ``Session.add`` returns: the spec now, the resolved probes after start."""

    spec: ProbeSpec
    probes: list[ProbeInfo] = field(default_factory=list)
    _session: Any = None
    fold: bool = False

    @property
    def count(self) -> int:
        """Events delivered so far for this probe string."""
        s = self._session.stats() if self._session else None
        return sum(s.per_probe.get(p.label, 0) for p in self.probes) if s else 0


class _Group:
    def __init__(self, gid: int, handle: ProbeHandle) -> None:
        self.gid = gid
        self.handle = handle
        self.probes: list[_Probe] = []
        self.readers: dict[str, int] = {}
        self.reader_plans: list[tuple[tuple[ArgRead, ...], int]] = []
        self.nargs = 0
        self.nstr = 0
        self.str_size = 0  # bytes per string slot (str_max, or more for bytes[N])
        self.plan: Optional[GroupPlan] = None
        self.ring: Any = None
        self.converters: dict[tuple[int, int], tuple[ProbeInfo, list[Any]]] = {}
        # When every site shows each slot as a plain 64-bit integer, struct decodes
        # the arguments with their sign ('q'/'Q') and an event's args are a slice.
        self.signs: Optional[tuple[bool, ...]] = None

    def direct_signs(self) -> Optional[tuple[bool, ...]]:
        """Per slot, signed or not, if no slot of any site needs a conversion."""
        signs: list[Optional[bool]] = [None] * self.nargs
        for p in self.probes:
            for site in p.sites:
                if len(site.slots) != self.nargs:
                    return None
                for i, sl in enumerate(site.slots):
                    t = sl.type
                    if sl.unavailable is not None or sl.is_float or sl.str_slot >= 0:
                        return None
                    if t is None:
                        signed = sl.signed
                    elif t.kind == "int" and t.size == 8:
                        signed = t.signed
                    else:
                        return None
                    if signs[i] is not None and signs[i] != signed:
                        return None
                    signs[i] = signed
        return tuple(bool(x) for x in signs)


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
    descriptor; None: inherited). ``batch_ms``: the rings are drained at most this often. ``arg_tables``:
    force (True/False) the table-driven argument reader instead of choosing
    by the number of layouts. ``multi``: force uprobe_multi links on or off.
    """

    def __init__(self, *, pid: Optional[int] = None, path: Optional[str] = None,
                 command: Optional[Sequence[str]] = None, semaphores: str = "kernel",
                 str_max: int = 64, ringbuf_kb: Optional[int] = None, stack_depth: int = 32,
                 symbolize: bool = True, multi: Optional[bool] = None,
                 arg_tables: Optional[bool] = None, batch_ms: float = 5.0,
                 command_stdout: Optional[int] = None) -> None:
        given = {k: v for k, v in (("pid", pid), ("path", path), ("command", command))
                 if v is not None}
        if len(given) > 1:
            raise OptionError("target", given, "at most one of pid, path, command")
        if semaphores not in ("kernel", "procmem"):
            raise OptionError("semaphores", semaphores, "'kernel' or 'procmem'")
        if semaphores == "procmem" and pid is None and command is None:
            raise OptionError("semaphores", semaphores,
                              "'kernel' without a pid or command: procmem writes one"
                              " process's memory")
        str_max = check_int("str_max", str_max, *STR_MAX)
        if ringbuf_kb is not None:
            ringbuf_kb = check_int("ringbuf_kb", ringbuf_kb, *RING_KB)
        stack_depth = check_int("stack_depth", stack_depth, *STACK_DEPTH)
        batch_ms = check_seconds("batch_ms", batch_ms, allow_zero=True, hi=BATCH_MS[1],
                                 unit="milliseconds")
        self.target: Optional[ProcessRef] = ProcessRef.from_pid(pid) if pid is not None \
            else None
        self.path = resolve_binary(path) if path is not None else None
        if self.path is not None:
            ElfImage(self.path).close()  # a clear error now for a non-ELF path
        self.command = list(command) if command is not None else None
        self.command_stdout = command_stdout
        self._command_exe: Optional[str] = None  # resolved at start()
        self.semaphore_mode = semaphores
        self.str_max = max(8, (int(str_max) + 7) & ~7)
        self.ringbuf_kb = ringbuf_kb
        self.stack_depth = stack_depth
        self.symbolize = symbolize
        self.multi = capabilities.has_uprobe_multi() if multi is None else multi
        # Many argument layouts (``usdt:hotspot*:*``) make generated C slow to
        # compile; past a threshold a group's specs go in a map instead.
        self.arg_tables = arg_tables
        self.batch_interval = max(0.0, batch_ms / 1000)
        self._last_drain = 0.0
        self._drain_started_ns = 0
        self._held: list[Event] = []  # decoded, stamped after the last drain began
        self._handles: list[ProbeHandle] = []
        self._groups: list[_Group] = []
        self._program: Any = None
        self._child: Optional[subprocess.Popen[bytes]] = None
        self._release_fd: Optional[int] = None
        self._procmem: Optional[ProcMemSemaphores] = None
        self._procmem_later: list[tuple[str, int]] = []  # a command's, raised after exec
        self._state = "new"
        self._stats = Stats()
        self._epoll: Optional[select.epoll] = None
        self._images: dict[str, ElfImage] = {}
        self._probes_cache: dict[str, list[Probe]] = {}
        self._symbolizer: Any = None
        self._lock = threading.RLock()
        self.attach_seconds = 0.0
        self.exit_status: Optional[int] = None
        self._final_stats: Optional[Stats] = None
        self._comms: dict[bytes, str] = {}
        self._thread_names: dict[int, str] = {}  # tid -> comm of its latest full record
        self._hold_armed = False
        self._folded_final: dict[str, int] = {}
        self._final_warnings: list[str] = []

    # -- building -----------------------------------------------------------

    def add(self, spec: str, *, stack: bool = False, fold: bool = False) -> ProbeHandle:
        """Add a probe string (``usdt:...``, ``uprobe:...``, ``uretprobe:...``).

        ``stack`` captures the user stack with each event. ``fold`` counts
        identical (process, stack) pairs in the kernel instead of sending
        events; read them with :meth:`folded`.
        """
        if self._state != "new":
            raise SessionStateError("probes must be added before the session starts")
        h = ProbeHandle(parse_probe(spec, stack=stack or fold), _session=self, fold=fold)
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

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- resolution -----------------------------------------------------------

    def _image(self, path: str) -> ElfImage:
        img = self._images.get(path)
        if img is None:
            img = self._images[path] = ElfImage(path)
        return img

    def _usdt_probes(self, path: str, display: str) -> list[Probe]:
        if path not in self._probes_cache:
            from apptrace.usdt.notes import group_sites

            self._probes_cache[path] = group_sites(display, self._image(path).sites())
        return self._probes_cache[path]

    def _binaries(self, spec: ProbeSpec) -> list[tuple[str, str]]:
        """(path to open/attach, path to show) candidates for a spec."""
        pid = self.target.pid if self.target else None
        if spec.binary:
            p = resolve_binary(spec.binary, pid)
            shown = p[len(f"/proc/{pid}/root"):] if pid and p.startswith("/proc/") else p
            return [(p, shown)]
        if self.target is not None:
            return [(real, shown) for shown, real in mapped_objects(self.target.pid)]
        if self.path is not None:
            return [(self.path, self.path)]
        if self._command_exe is not None:
            return [(self._command_exe, self._command_exe)]
        raise ProbeNotFoundError(f"{spec.text}: no binary given and no target to search",
                                 probe=spec.text,
                                 hint="name the binary (usdt:BINARY:PROVIDER:NAME) or give"
                                      " -p PID, --path BIN or a command")

    def _resolve(self, h: ProbeHandle, g: _Group) -> None:
        spec = h.spec
        candidates = self._binaries(spec)
        named = spec.binary is not None or self.target is None
        if spec.kind == "usdt":
            for path, shown in candidates:
                try:
                    probes = self._usdt_probes(path, shown)
                except (NoProbesError, ElfError):
                    if named:
                        raise
                    continue
                for p in probes:
                    if fnmatch.fnmatchcase(p.provider, spec.provider or "*") and \
                            fnmatch.fnmatchcase(p.name, spec.name):
                        self._add_usdt(g, spec, path, p)
        else:
            for path, shown in candidates:
                self._add_uprobes(g, spec, path, shown)
        if not g.probes:
            where = ", ".join(shown for _, shown in candidates[:3])
            what = (f"USDT probe matches {spec.provider}:{spec.name}" if spec.kind == "usdt"
                    else f"function matches {spec.name}")
            raise ProbeNotFoundError(
                f"{spec.text}: no {what} in {where}", probe=spec.text,
                hint="list them with `apptrace usdt list " + (candidates[0][1] if candidates
                                                               else "BINARY") + "`"
                if spec.kind == "usdt" else "check the symbol name (nm -D)")
        h.probes = [p.info for p in g.probes]

    def _qualify_labels(self) -> None:
        """Probes of one name in two binaries get labels that name the binary, so
        their counts and JSON stay apart."""
        binaries: dict[tuple[str, str], set[str]] = {}
        for g in self._groups:
            for p in g.probes:
                binaries.setdefault((p.info.kind, p.info.name), set()).add(p.info.binary)
        for g in self._groups:
            for p in g.probes:
                if len(binaries[(p.info.kind, p.info.name)]) > 1:
                    p.info = dataclasses.replace(p.info, qualified=True)
            g.handle.probes = [p.info for p in g.probes]

    def _reader(self, g: _Group, reads: tuple[ArgRead, ...], vaddr: int) -> int:
        """Dedup readers by the C they produce (rip-relative deltas differ per site)."""
        key_vaddr = vaddr if any(r.usdt is not None and r.usdt.symbol is not None
                                 for r in reads) else 0
        key = repr((reads, key_vaddr))
        rid = g.readers.get(key)
        if rid is None:
            rid = g.readers[key] = len(g.reader_plans)
            g.reader_plans.append((reads, key_vaddr))
        return rid

    def _add_usdt(self, g: _Group, spec: ProbeSpec, path: str, p: Probe) -> None:
        info = ProbeInfo("usdt", p.binary, p.fullname, spec.text, len(p.sites))
        probe = _Probe(info)
        for provider, name in companions_of(p.provider, p.name):
            for other in self._usdt_probes(path, p.binary):
                if (other.provider, other.name) == (provider, name):
                    probe.companions.extend(sorted({(path, s.semaphore_offset)
                                                    for s in other.sites
                                                    if s.semaphore_offset}))
        for s in p.sites:
            n = max(len(s.args), len(spec.types))
            reads: list[ArgRead] = []
            slots: list[_Slot] = []
            nstr = 0
            for i in range(n):
                t = spec.types[i] if i < len(spec.types) else None
                a: Optional[Argument] = s.args[i] if i < len(s.args) else None
                if a is None:
                    reads.append(ArgRead(usdt=Argument("", 8, False, False, "unavailable",
                                                       reason="no such argument")))
                    slots.append(_Slot(f"this site has {len(s.args)} arguments", False, 8,
                                       False, t))
                    continue
                slot = -1
                if t is not None and t.kind in ("str", "bytes") and a.available:
                    slot, nstr = nstr, nstr + 1
                reads.append(_str_read(ArgRead(usdt=a, str_slot=slot), t, n, spec))
                slots.append(_Slot(a.reason if not a.available else None, a.is_float, a.size,
                                   a.signed, t, slot))
            g.nargs = max(g.nargs, n)
            g.nstr = max(g.nstr, nstr)
            g.str_size = max([g.str_size] + [r.str_bytes for r in reads])
            rid = self._reader(g, tuple(reads), s.address)
            ref = s.semaphore_offset if self.semaphore_mode == "kernel" else 0
            probe.sites.append(_Site(path, s.file_offset, ref, s.semaphore_offset, rid, slots,
                                     s.address))
        g.probes.append(probe)

    def _add_uprobes(self, g: _Group, spec: ProbeSpec, path: str, shown: str) -> None:
        img = self._image(path)
        targets: list[tuple[str, int]] = []
        if spec.offset is not None:
            targets.append((spec.name, spec.offset))
        else:
            sym, _, off = spec.name.partition("+")
            extra = int(off, 0) if off else 0
            funcs = img.functions()
            names = [sym] if sym in funcs else sorted(
                n for n in funcs if fnmatch.fnmatchcase(n, sym))
            for name in names:
                foff = img.vaddr_to_offset(funcs[name] + extra, executable=True)
                if foff is None:
                    continue
                targets.append((name + (f"+{off}" if off else ""), foff))
        vaddrs = {foff: img.offset_to_vaddr(foff) for _, foff in targets}
        ret = spec.kind == "uretprobe"
        types = spec.types or ((_DEFAULT_RET_TYPE,) if ret else (_DEFAULT_UPROBE_TYPE,) * 6)
        regs = iter(("ax",) if ret else _UPROBE_REGS)
        reads, slots, nstr = [], [], 0
        for i, t in enumerate(types):
            slot = -1
            if t is not None and t.kind == "float":
                # The x86-64 ABI passes floating-point values in xmm registers;
                # a uprobe sees only the integer registers (pt_regs).
                reads.append(ArgRead())
                slots.append(_Slot(_XMM_REASON, False, 8, False, t))
                continue
            reg = next(regs, None)
            if reg is None:
                raise ProbeSpecError(spec.text, "at most 6 integer arguments (1 return value)"
                                     " are in registers")
            if t is not None and t.kind in ("str", "bytes"):
                slot, nstr = nstr, nstr + 1
            reads.append(_str_read(ArgRead(reg=reg, str_slot=slot), t, len(types), spec))
            slots.append(_Slot(None, False, 8, False, t or _DEFAULT_UPROBE_TYPE, slot))
        g.nargs = max(g.nargs, len(types))
        g.nstr = max(g.nstr, nstr)
        g.str_size = max([g.str_size] + [r.str_bytes for r in reads])
        rid = self._reader(g, tuple(reads), 0)
        for name, foff in targets:
            probe = _Probe(ProbeInfo(spec.kind, shown, name, spec.text, 1))
            probe.sites.append(_Site(path, foff, 0, 0, rid, slots, vaddrs[foff] or 0))
            g.probes.append(probe)

    # -- starting -------------------------------------------------------------

    def _spawn(self) -> None:
        """Start the command held before exec: a tiny Python waits on a pipe, then
        execs the command in place (same PID), so probes attached to the PID
        see ``main``. It execs the file the probes were resolved in (an ELF
        file found on PATH, past wrapper scripts), with ``argv`` as given."""
        assert self.command is not None and self._command_exe is not None
        r, w = os.pipe()
        hold = ("import os, sys\n"
                "fd = int(sys.argv[1])\n"
                "if os.read(fd, 1) != b'g': sys.exit(125)\n"
                "os.close(fd)\n"
                "try:\n"
                "    os.execv(sys.argv[2], sys.argv[3:])\n"
                "except OSError as e:\n"
                "    sys.stderr.write(f'apptrace: cannot run {sys.argv[3]}: {e.strerror}\\n')\n"
                "    sys.exit(127 if e.errno == 2 else 126)\n")
        try:
            self._child = subprocess.Popen([sys.executable, "-S", "-c", hold, str(r),
                                            self._command_exe, *self.command], pass_fds=(r,),
                                           stdout=self.command_stdout)
        except OSError as err:
            os.close(r)
            os.close(w)
            raise SpawnError(f"cannot start {shlex.join(self.command)}: {err.strerror or err}",
                             command=self.command[0], errno=err.errno or 0) from err
        os.close(r)
        self._release_fd = w
        self.target = ProcessRef.from_pid(self._child.pid)

    def _release(self) -> None:
        if self._release_fd is None:
            return
        try:
            os.write(self._release_fd, b"go\n")
        except OSError:
            pass
        os.close(self._release_fd)
        self._release_fd = None
        assert self._child is not None and self._command_exe is not None
        if self._procmem is not None:
            self._raise_after_exec()
            return
        # Return once the command has replaced the holding shim, so that
        # /proc/PID describes the command (its maps, its exe) from now on.
        want = os.path.realpath(self._command_exe)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self._child.poll() is None:
            try:
                if os.path.realpath(f"/proc/{self._child.pid}/exe") == want:
                    break
            except OSError:
                break
            time.sleep(0.0005)

    def _raise_after_exec(self) -> None:
        """The exec hook stopped the command before its first instruction: raise
        its semaphores in the new image, then let it run."""
        assert self._child is not None and self._procmem is not None
        pid = self._child.pid
        deadline = time.monotonic() + 10.0
        while True:
            got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
            if got == pid and os.WIFSTOPPED(status):
                break
            if got == pid:  # it could not exec (or died) before running
                self.exit_status = os.waitstatus_to_exitcode(status)
                self._child.returncode = self.exit_status
                return
            if time.monotonic() > deadline:
                raise SpawnError(f"{shlex.join(self.command or [])} did not reach its exec"
                                 " within 10 s", command=(self.command or [""])[0])
            time.sleep(0.0005)
        try:
            for binary, offset in self._procmem_later:
                self._procmem.add(binary, offset)
            self._procmem_later.clear()
        finally:
            os.kill(pid, signal.SIGCONT)

    RING_BUDGET_KB = 32 * 1024   # split across probe strings unless ringbuf_kb is given

    def _ring_pages(self, rings: int) -> int:
        """Pages per ring buffer: a power of two. By default 32 MiB shared by the
        rings, each between 1 and 16 MiB: room for ~0.2 s of a million events a
        second while the reader is descheduled."""
        kb = self.ringbuf_kb or min(16 * 1024, max(1024, self.RING_BUDGET_KB // max(rings, 1)))
        pages = max(1, kb * 1024 // 4096)
        return 1 << (pages - 1).bit_length()

    @staticmethod
    def _fill_specs(prog: Any, plan: GroupPlan) -> None:
        """Write each reader's argument specs into the group's spec map."""
        specs = prog.map(f"{plan.name}_specs")
        for rid, (reads, vaddr) in enumerate(plan.readers):
            rows = table_row(reads, vaddr)
            value = b"".join(_SPEC_ARG.pack(*row) for row in rows)
            value += bytes(specs.spec.value_size - len(value))
            specs.update(struct.pack("<I", rid), value)

    def _attach_entry_hold(self, prog: Any) -> None:
        """Stop the spawned command at its ELF entry point, once, for a snapshot."""
        assert self._command_exe is not None and self._child is not None
        exe = self._command_exe
        img = self._image(exe)
        entry = img.vaddr_to_offset(img.elf.header["e_entry"], executable=True)
        if entry is None:
            return
        fd = prog.load("apptrace_hold_at_entry")
        prog.attach_perf(fd, exe, entry, self._child.pid, 0, False, "entry hold")
        self._hold_armed = True

    def _snapshot_after_loader(self) -> None:
        """At the entry stop, snapshot the command's maps, then let it run: a
        command that exits at once still has its libraries symbolized."""
        assert self._child is not None and self._symbolizer is not None
        if not self._hold_armed:
            return
        pid = self._child.pid
        deadline = time.monotonic() + 5.0
        stopped = False
        while time.monotonic() < deadline:
            try:
                got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return
            if got == pid and os.WIFSTOPPED(status):
                stopped = True
                break
            if got == pid:  # it exited before reaching its entry point
                self.exit_status = os.waitstatus_to_exitcode(status)
                self._child.returncode = self.exit_status
                return
            time.sleep(0.0005)
        try:
            self._symbolizer.watch(pid, force=True)
        finally:
            if stopped:
                os.kill(pid, signal.SIGCONT)

    def start(self) -> None:
        """Resolve every probe, compile once, attach, then release a held command."""
        if self._state != "new":
            if self._state == "closed":
                raise SessionStateError("this session is closed; sessions are single-use")
            return
        if not self._handles:
            raise SessionStateError("no probes added")
        if not capabilities.has_trace_privileges():
            raise TracePermissionError("not allowed to load BPF programs or attach uprobes")
        t0 = time.monotonic()
        self._state = "starting"
        _live.add(self)
        try:
            if self.command is not None:
                try:
                    self._command_exe = resolve_binary(self.command[0])
                except ProbeNotFoundError as err:
                    raise CommandNotFoundError(self.command[0]) from err
                check_executable(self._command_exe, self.command[0])
            elif self.target is not None:
                self.target.check()
            # A command's probes resolve against its binary before it runs.
            for i, h in enumerate(self._handles):
                g = _Group(i, h)
                self._resolve(h, g)
                self._groups.append(g)
            self._qualify_labels()
            if self.command is not None:
                self._spawn()
            self._compile_and_attach()
            if self._wants_stacks and self.symbolize:
                tracker = self._tracker()  # made now, so polling keeps maps fresh
                if self.target is not None and self._child is None:
                    tracker.watch(self.target.pid, force=True)
            self._release()
            if self._child is not None and self._symbolizer is not None:
                self._snapshot_after_loader()
            self._state = "running"
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.monotonic() - t0

    def _compile_and_attach(self) -> None:
        from apptrace.bpf import Program
        from apptrace.ringbuf import RingReader

        plans = []
        pages = self._ring_pages(sum(1 for g in self._groups if not g.handle.fold))
        for g in self._groups:
            stack = self.stack_depth if g.handle.spec.stack else 0
            g.str_size = (max(self.str_max, g.str_size) + 7) & ~7
            plan = GroupPlan(g.gid, g.nargs, g.nstr, g.str_size, stack,
                             pages, len(g.probes), g.reader_plans,
                             multi=self.multi, fold=g.handle.fold)
            tables_ok = (g.nstr == 0 and 0 < g.nargs <= MAX_TABLE_ARGS and not plan.fold)
            plan.table = tables_ok and (len(g.reader_plans) > TABLE_THRESHOLD
                                        if self.arg_tables is None else self.arg_tables)
            if not self.multi:
                plan.site_cookies = sorted({self._cookie(pi, si, s.reader)
                                            for pi, p in enumerate(g.probes)
                                            for si, s in enumerate(p.sites)})
            if not plan.fold:
                check_event_fits(plan.event_struct().size, plan.ringbuf_pages * 4096)
            g.plan = plan
            plans.append(plan)
        hold = self._child is not None and self._wants_stacks and self.symbolize
        self._program = prog = Program(render(plans, hold_at_entry=hold))
        pid = self.target.pid if self.target else -1
        self._attach_task_hooks(prog)
        if hold:
            self._attach_entry_hold(prog)
        for plan in plans:
            if plan.table:
                self._fill_specs(prog, plan)
        if self.semaphore_mode == "procmem" and self.target is not None:
            self._procmem = ProcMemSemaphores(self.target.pid)
        self._attach_companions(prog, pid)
        self._epoll = select.epoll()
        for g in self._groups:
            assert g.plan is not None
            retprobe = g.handle.spec.kind == "uretprobe"
            if self.multi:
                fd = prog.load(f"{g.plan.name}_multi", multi=True)
                by_binary: dict[str, list[tuple[int, int, int]]] = {}
                for pi, p in enumerate(g.probes):
                    for si, s in enumerate(p.sites):
                        by_binary.setdefault(s.binary, []).append(
                            (s.file_offset, s.ref_ctr_offset, self._cookie(pi, si, s.reader)))
                for binary, rows in by_binary.items():
                    prog.attach_multi(fd, binary, [r[0] for r in rows], [r[1] for r in rows],
                                      [r[2] for r in rows], pid, retprobe,
                                      g.handle.spec.text)
            else:
                for pi, p in enumerate(g.probes):
                    for si, s in enumerate(p.sites):
                        ck = self._cookie(pi, si, s.reader)
                        fd = prog.load(f"{g.plan.name}_c{ck:x}")
                        prog.attach_perf(fd, s.binary, s.file_offset, pid, s.ref_ctr_offset,
                                         retprobe, p.info.label)
            if self._procmem is not None:
                for p in g.probes:
                    for s in p.sites:
                        if s.semaphore_offset:
                            self._raise_procmem(s.binary, s.semaphore_offset)
            if g.plan.fold:
                continue
            ring_fd = prog.map_fd(f"{g.plan.name}_rb")
            record = g.plan.event_struct()
            g.signs = g.direct_signs() if g.plan.nstr == 0 else None
            if g.signs:
                fmt = record.format
                cut = len(HEADER.format)
                record = struct.Struct(fmt[:cut] + "".join("q" if x else "Q" for x in g.signs)
                                       + fmt[cut + len(f"{g.nargs}Q"):])
            g.ring = RingReader(ring_fd, g.plan.ringbuf_pages * 4096, record,
                                probe_offset=_PROBE_AT)
            self._epoll.register(ring_fd, select.EPOLLIN)

    def _ctl(self, slot: int, value: int) -> None:
        assert self._program is not None
        self._program.map("apptrace_ctl").update(_U32.pack(slot), _U64.pack(value))

    def _attach_task_hooks(self, prog: Any) -> None:
        """Renames invalidate the comm shortcut; a held command's launcher is not
        traced, and its exec ends the hold (stopping it there for procmem)."""
        if self._child is not None:
            self._ctl(CTL_HELD, self._child.pid)
            self._ctl(CTL_STOP_EXEC, int(self.semaphore_mode == "procmem"))
        try:
            prog.attach_raw_tracepoint(prog.load("apptrace_on_rename", raw_tracepoint=True),
                                       "task_rename")
        except ApptraceError:
            self._ctl(CTL_NO_SHORTCUT, 1)  # no rename tracking: copy comm every time
        if self._child is not None:
            prog.attach_raw_tracepoint(prog.load("apptrace_on_exec", raw_tracepoint=True),
                                       "sched_process_exec")

    def _raise_procmem(self, binary: str, semaphore_offset: int) -> None:
        """A spawned command's semaphores are raised after its exec, not in the launcher."""
        assert self._procmem is not None
        if self._child is not None and self._release_fd is not None:
            self._procmem_later.append((binary, semaphore_offset))
        else:
            self._procmem.add(binary, semaphore_offset)

    def _attach_companions(self, prog: Any, pid: int) -> None:
        """Raise semaphores a probe needs without sending their events.

        A no-op uprobe placed where the program runs once (``.fini``) carries
        the semaphore as its ``ref_ctr_offset``: the kernel raises it in every
        process that maps the binary, and the probe's own sites stay unhit.
        """
        done: set[tuple[str, int]] = set()
        for g in self._groups:
            for p in g.probes:
                for binary, sem in p.companions:
                    if (binary, sem) in done:
                        continue
                    done.add((binary, sem))
                    if self._procmem is not None:
                        self._raise_procmem(binary, sem)
                        continue
                    where = _quiet_offset(self._image(binary))
                    if where is None:
                        continue
                    fd = prog.load("apptrace_noop", multi=self.multi)
                    if self.multi:
                        prog.attach_multi(fd, binary, [where], [sem], [0], pid, False,
                                          f"{p.info.label} (companion semaphore)")
                    else:
                        prog.attach_perf(fd, binary, where, pid, sem, False,
                                         f"{p.info.label} (companion semaphore)")

    @staticmethod
    def _cookie(probe: int, site: int, reader: int) -> int:
        if site > 0xFFFF or reader > 0xFFFF:
            raise OptionError("sites or argument layouts in one probe string",
                              max(site, reader) + 1, "at most 65536: narrow the probe string")
        return (probe << 32) | (site << 16) | reader

    # -- reading --------------------------------------------------------------

    def target_alive(self) -> bool:
        if self._child is not None:
            if self.exit_status is None:
                self.exit_status = self._child.poll()
            return self.exit_status is None
        if self.target is not None:
            return self.target.alive()
        return True

    def poll_raw(self, timeout: Optional[float] = None) -> list[RawBatch]:
        """Wait up to ``timeout`` seconds for data; return records in batches.

        The throughput interface: tuples straight from ``struct``, one
        :class:`RawBatch` per probe string, no per-event Python objects.
        """
        return [RawBatch(tuple(p.info for p in g.probes), g.nargs, recs)
                for g, recs in self._poll_groups(timeout)]

    def _poll_groups(self, timeout: Optional[float]) -> list[tuple[_Group, list[tuple[Any, ...]]]]:
        self.start()
        assert self._epoll is not None
        if self._symbolizer is not None and self.target is not None and self.target_alive():
            # Keep the memory-map snapshot fresh (libraries loaded since, JIT maps).
            self._symbolizer.watch(self.target.pid)
        # Drain at most once per batch interval. Each time the reader catches up,
        # the kernel queues a wake-up for the next event (an irq_work on the
        # traced CPU); a reader that keeps catching up makes the traced program
        # pay that on almost every hit. Batching keeps it to one per interval.
        now = time.monotonic()
        early = self._last_drain + self.batch_interval - now
        if early > 0:
            if timeout is not None and timeout < early:
                if timeout > 0:
                    time.sleep(timeout)
                return []
            time.sleep(early)
            if timeout is not None:
                timeout -= early
        if timeout is None or timeout > 0:
            if not any(g.ring.pending() for g in self._groups if g.ring is not None):
                self._epoll.poll(timeout if timeout is not None else -1)
        self._last_drain = time.monotonic()
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: events stamped before this
        # instant were reserved before any ring below is read.
        self._drain_started_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out = []
        with self._lock:
            for g in self._groups:
                if g.ring is None:
                    continue
                recs = g.ring.drain()
                if recs:
                    self._stats.events += len(recs)
                    per_probe = self._stats.per_probe
                    for pidx, n in collections.Counter(r[3] for r in recs).items():
                        label = g.probes[pidx].info.label
                        per_probe[label] = per_probe.get(label, 0) + n
                    out.append((g, recs))
        return out

    def poll(self, timeout: Optional[float] = None, *, flush: bool = False) -> list[Event]:
        """Wait up to ``timeout`` seconds; return the events that arrived, in time order.

        Each probe string has its own ring, and the rings are drained one after
        the other; an event that lands in an already-drained ring while a later
        one is read would come out of order (a function's return before its
        entry). So only events stamped before the drain began are returned;
        later ones wait for the next call. ``flush`` (or the target being gone)
        returns everything: call ``poll(0, flush=True)`` once before closing a
        session whose target still runs (``events()`` does this itself).
        """
        # A target already gone before this drain can add nothing later.
        final = flush or not self.target_alive()
        batches = self._poll_groups(timeout)
        events = self._held
        self._held = []
        for g, recs in batches:
            events.extend(self._decode(g, recs))
        if sum(1 for g in self._groups if g.ring is not None) < 2:
            return events  # one ring keeps its own order
        events.sort(key=lambda e: e.ts_ns)
        if final:
            return events
        cut = self._drain_started_ns
        ready = bisect.bisect_right([e.ts_ns for e in events], cut)
        self._held = events[ready:]
        return events[:ready]

    def events(self, timeout: Optional[float] = None, *, idle: float = 0.2) -> Iterator[Event]:
        """Yield events until ``timeout`` seconds pass (None: until the target exits)."""
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, allow_zero=True)
        idle = check_seconds("idle", idle)
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                yield from self.poll(0, flush=True)  # what has arrived by the deadline
                return
            alive = self.target_alive()
            got = self.poll(min(idle, remaining) if remaining is not None else idle)
            yield from got
            if not alive and not got:
                # The target is gone and its last events are drained.
                return

    def run(self, callback: Callable[[Event], Any], *, duration: Optional[float] = None,
            count: Optional[int] = None) -> Stats:
        """Call ``callback`` per event until duration/count is reached or the target exits."""
        if duration is not None:
            duration = check_seconds("duration", duration)
        if count is not None:
            count = check_int("count", count, 1)
        n = 0
        for ev in self.events(duration):
            callback(ev)
            n += 1
            if count is not None and n >= count:
                break
        return self.stats()

    def _decode(self, g: _Group, recs: list[tuple[Any, ...]]) -> list[Event]:
        """Records → Events, with the cyclic garbage collector paused.

        Events hold no cycles, but each is a new container object: with the
        collector running, building a batch of 100k of them triggers collections
        that walk every live event, and costs four times the decoding itself.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._decode_batch(g, recs)
        finally:
            if enabled:
                gc.enable()

    def _decode_batch(self, g: _Group, recs: list[tuple[Any, ...]]) -> list[Event]:
        """Per-site converters are built once; in the common case (no faulted
        reads, no strings, plain integers) an event's arguments are a slice."""
        plan = g.plan
        assert plan is not None
        nh = _HEADER_FIELDS
        nargs = plan.nargs
        has_str = plan.nstr > 0
        stack_base = nh + nargs + (1 if has_str else 0)
        out: list[Event] = []
        probes = g.probes
        comms = self._comms
        thread_names = self._thread_names
        convs = g.converters
        append = out.append
        direct = g.signs is not None
        end = nh + nargs
        for rec in recs:
            ts, pid, tid, pidx, site, flags, nstack, comm = rec[:nh]
            key = (pidx, site)
            conv = convs.get(key)
            if conv is None:
                conv = convs[key] = self._converters(probes[pidx], site)
            info, fns = conv
            if flags & FLAG_COMM_SAME:
                flags &= ~FLAG_COMM_SAME
                name = thread_names.get(tid) or self._thread_name(pid, tid)
            else:
                known = comms.get(comm)
                if known is None:
                    known = comms[comm] = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
                name = thread_names[tid] = known
            truncated: tuple[int, ...] = ()
            if flags or has_str:
                raw = rec[nh:end]
                if direct:  # back to the raw 64-bit values the slow path expects
                    raw = tuple([v & 0xFFFFFFFFFFFFFFFF for v in raw])
                args, truncated = self._slow_args(probes[pidx], site, raw,
                                                  rec[end] if has_str else b"", flags,
                                                  g.str_size)
            elif direct:
                args = rec[nh:end]
            else:
                args = tuple([f(v) if f else v for f, v in zip(fns, rec[nh:])])
            stack_ips = None
            if plan.stack_depth:
                stack_ips = tuple(rec[stack_base:stack_base + max(0, nstack) // 8])
            append(make_event(ts, pid, tid, name, info, args, site, stack_ips, truncated))
        if plan.stack_depth and self.symbolize:
            anchors = []
            for r in recs:
                sites = probes[r[3]].sites
                st = sites[min(r[4], len(sites) - 1)]
                anchors.append((st.binary, st.vaddr))
            out = self._tracker().symbolize(out, anchors)
        return out

    def _thread_name(self, pid: int, tid: int) -> str:
        """A thread's name when its record carried none and we never saw one
        (only if its earlier record was read through poll_raw)."""
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
                name = f.read().strip().decode("utf-8", "replace")
        except OSError:
            name = "?"
        self._thread_names[tid] = name
        return name

    def _converters(self, p: _Probe, site: int) -> tuple[ProbeInfo, list[Any]]:
        """For one site: a function per argument slot (None: the raw value as is)."""
        s = p.sites[site] if site < len(p.sites) else p.sites[0]
        fns: list[Any] = []
        for slot in s.slots:
            if slot.unavailable is not None:
                gone = Unavailable(slot.unavailable)
                fns.append(lambda v, gone=gone: gone)
            elif slot.type is None and not slot.is_float and not slot.signed:
                fns.append(None)
            else:
                fns.append(lambda v, slot=slot: self._value(v, slot, b"", 0))
        return p.info, fns

    def _slow_args(self, p: _Probe, site: int, raw: tuple[int, ...], strs: bytes,
                   flags: int, str_size: int) -> tuple[tuple[Any, ...], tuple[int, ...]]:
        """Arguments with strings, faults or truncation; and the truncated indexes."""
        s = p.sites[site] if site < len(p.sites) else p.sites[0]
        args: list[Any] = []
        truncated: list[int] = []
        for i, slot in enumerate(s.slots):
            if slot.unavailable is not None:
                args.append(Unavailable(slot.unavailable))
            elif flags & (1 << i) & FLAG_ARG_FAILED:
                self._stats.read_faults += 1
                args.append(Unavailable("memory read faulted"))
            else:
                args.append(self._value(raw[i], slot, strs, flags, raw, str_size))
                if slot.str_slot >= 0 and flags & (1 << (FLAG_STR_TRUNC_SHIFT + slot.str_slot)):
                    self._stats.truncated_strings += 1
                    truncated.append(i)
        return tuple(args), tuple(truncated)

    def _value(self, v: int, slot: _Slot, strs: bytes, flags: int,
               raw_args: tuple[int, ...] = (), str_size: int = 0) -> Any:
        t = slot.type
        if t is not None and t.kind in ("str", "bytes") and slot.str_slot >= 0:
            return _string_value(t, strs, slot.str_slot, str_size, raw_args)
        if t is not None and t.kind == "float" or (t is None and slot.is_float):
            size = t.size if t is not None else slot.size
            if size == 4:
                return _F32.unpack(struct.pack("<I", v & 0xFFFFFFFF))[0]
            return _F64.unpack(_U64.pack(v))[0]
        if t is not None and t.kind == "int":
            bits = t.size * 8
            v &= (1 << bits) - 1
            if t.signed and v >> (bits - 1):
                v -= 1 << bits
            return v
        if slot.signed and v >> 63:
            return v - (1 << 64)
        return v

    @property
    def _wants_stacks(self) -> bool:
        return any(h.spec.stack for h in self._handles)

    def _tracker(self) -> Any:
        if self._symbolizer is None:
            from apptrace.stacks import StackTracker

            self._symbolizer = StackTracker()
        return self._symbolizer


    # -- statistics and teardown ------------------------------------------------

    def stats(self) -> Stats:
        """Delivered, lost and per-probe counts; lost and folded counts are read
        from the kernel (after close: as they were at close)."""
        with self._lock:
            c = self._stats  # what the rings delivered, counted as they drained
            if self._program is None:
                return self._final_stats or Stats(c.events, 0, c.truncated_strings,
                                                  c.read_faults, dict(c.per_probe), {})
            out = Stats(c.events, 0, c.truncated_strings, c.read_faults, dict(c.per_probe), {})
            for g in self._groups:
                assert g.plan is not None
                lost = self._program.map(f"{g.plan.name}_lost")
                for pi, p in enumerate(g.probes):
                    n = lost.sum_u64(_U32.pack(pi))
                    if n:
                        out.lost_per_probe[p.info.label] = n
                    out.lost += n
                if g.ring is not None:  # records of the wrong size: not a full ring
                    for pi, n in g.ring.decode_errors.items():
                        label = (g.probes[pi].info.label if 0 <= pi < len(g.probes)
                                 else g.handle.spec.text)
                        per = out.decode_errors_per_probe
                        per[label] = per.get(label, 0) + n
                        out.decode_errors += n
                for p in g.probes:  # attached but silent shows as 0, not as missing
                    out.per_probe.setdefault(p.info.label, 0)
            for g, key, count in self._fold_rows():
                out.per_probe[g.probes[key[1]].info.label] += count
                out.events += count
            self._final_stats = out
            return out

    def _fold_rows(self) -> list[tuple[_Group, tuple[Any, ...], int]]:
        """(group, (pid, probe, site, stack id, comm), count) for every counted stack."""
        rows = []
        for g in self._groups:
            if g.handle.fold and g.plan is not None:
                counts = self._program.map(f"{g.plan.name}_counts")
                for key in list(counts.keys()):
                    value = counts.lookup(key)
                    if value is not None:
                        rows.append((g, _FOLD_KEY.unpack(key), _U64.unpack_from(value)[0]))
        return rows

    def folded(self) -> dict[str, int]:
        """Stacks counted in the kernel, as folded lines (``comm;outer;...;inner``)
        mapped to counts: the input of flamegraph.pl and speedscope."""
        with self._lock:
            if self._program is None:
                return dict(self._folded_final)
            rows = self._fold_rows()
            events, anchors, counts = [], [], []
            for g, (pid, probe, site_id, stack_id, comm_raw), count in rows:
                assert g.plan is not None
                p = g.probes[probe]
                site = p.sites[min(site_id, len(p.sites) - 1)]
                ips: tuple[int, ...] = ()
                if stack_id >= 0:
                    raw = self._program.map(f"{g.plan.name}_stacks").lookup(
                        _U32.pack(stack_id))
                    if raw is not None:
                        words = struct.unpack(f"<{len(raw) // 8}Q", raw)
                        ips = tuple(a for a in words if a)
                comm = comm_raw.split(b"\0", 1)[0].decode("utf-8", "replace")
                events.append(Event(0, pid, pid, comm, p.info, (), site_id, None, ips))
                anchors.append((site.binary, site.vaddr))
                counts.append((count, stack_id))
            if self.symbolize and events:
                events = self._tracker().symbolize(events, anchors)
            out: dict[str, int] = {}
            for ev, (count, sid) in zip(events, counts):
                names = [(f.symbol or f"{f.addr:#x}").replace(";", ":")
                         for f in reversed(ev.stack or ())]
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
        return self._child

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
        """Detach everything; drop procmem semaphores; free the BPF module."""
        if self._state == "closed":
            return
        if self._program is not None:
            try:
                self.detach()
                self.stats()
                if any(g.handle.fold for g in self._groups):
                    self.folded()  # keep the counts readable after close
            except Exception:  # noqa: BLE001 - best effort before teardown
                pass
        self._state = "closed"
        _live.discard(self)
        errors: list[BaseException] = []
        if self._procmem is not None:
            try:
                self._procmem.close()
            except ApptraceError as err:
                errors.append(err)
            self._procmem = None
        for g in self._groups:
            if g.ring is not None:
                g.ring.close()
                g.ring = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._program is not None:
            self._program.close()
            self._program = None
        if self._release_fd is not None:
            os.close(self._release_fd)  # never released: the holder exits on EOF
            self._release_fd = None
        if self._child is not None:
            self._stop_child()
        if self._symbolizer is not None:
            self._final_warnings = list(self._symbolizer.errors)
            self._symbolizer.close()
            self._symbolizer = None
        for img in self._images.values():
            img.close()
        self._images.clear()
        self._probes_cache.clear()
        if errors:
            raise errors[0]

    def _stop_child(self) -> None:
        """A spawned command does not outlive its session: SIGTERM, then SIGKILL."""
        assert self._child is not None
        if self._child.poll() is None:
            self._child.terminate()
            try:
                self._child.wait(5)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        if self.exit_status is None:
            self.exit_status = self._child.returncode

    def wait_child(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the spawned command to exit; its status."""
        if self._child is None:
            return None
        try:
            self.exit_status = self._child.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_status

