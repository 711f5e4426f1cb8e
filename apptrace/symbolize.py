"""Turn captured user-space addresses into function names, files and lines.

This is a cffi binding to blazesym-c (``libblazesym_c.so``, which the
apptrace package carries next to this module: setup.py builds it from the
pinned crate into every wheel and into the checkout). blazesym does the
DWARF/ELF work in Rust, far faster than anything we could do in Python, and
reads JIT perf maps too.

Why ABI mode (``ffi.dlopen``) rather than API mode (a compiled extension):

* Installing apptrace's wheel then needs no C compiler and no blazesym
  headers, and the library can be swapped at run time (``APPTRACE_BLAZESYM``).
* The cost ABI mode adds is per C call, and we make one call per batch of
  addresses.
* The usual ABI-mode risk, a cdef whose layout drifts from the real header,
  is covered by a unit test that compiles ``offsetof``/``sizeof`` against
  ``.build/blazesym/include/blazesym.h`` and compares them with cffi's view.

Reading the result is another matter: field by field through cffi costs
about 3 us per frame, eight times the blazesym call. So a small compiled
helper (``apptrace._blazepack``, cffi API mode, ``make blazepack``; it reads
the result structs and calls nothing) flattens each result into columns, and
a second one (``apptrace._frames``, a plain CPython extension built with it)
turns the columns into frames, untracked by the garbage collector; without
them, Python loops give the same frames, slower (``bench_symbolize`` shows
both). Frames are light shared tuples (see :class:`StackFrame`),
addresses go to blazesym ascending, and a big batch is looked up in chunks
on a worker thread while the previous chunk's frames are built.

Frame order: for every input address the frames come innermost first: the
inlined functions (deepest first, ``inlined=True``) and then the real
function that contains the code. A whole stack printed top-down therefore
reads innermost to outermost, like gdb's ``bt``.

Java and other JITs: with ``perf_map=True`` (the default) addresses in
anonymous memory are looked up in ``/tmp/perf-PID.map``. Creating that file
(perf-map-agent, ``jcmd PID Compiler.perfmap``, ``node --perf-basic-prof``,
``python -X perf``) is the caller's job. blazesym reads it by host PID under the
host's ``/tmp``, so a JIT in a container needs its map copied there.

Threading: blazesym's symbolizer is not thread-safe and cffi drops the GIL
during C calls, so every blazesym call on one :class:`Symbolizer` holds its
lock (the pipelining worker's too).
"""

from __future__ import annotations

import array
import contextlib
import ctypes.util
import gc
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, islice, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple, Optional

from apptrace.errors import SymbolizerError

__all__ = [
    "StackFrame",
    "Symbolizer",
    "library_path",
    "symbolizer_available",
]

ENV_VAR = "APPTRACE_BLAZESYM"
LIB_NAME = "libblazesym_c.so"
BUILD_HINT = (
    "install apptrace from its wheel, which carries the library; in a checkout run"
    f" `make blazesym` (needs cargo >= 1.88); or point {ENV_VAR} at an existing {LIB_NAME}"
)

# The subset of blazesym-c 0.1.10's include/blazesym.h that we use. Layouts
# were checked against the header (see tests/unit/test_symbolize_unit.py).
# ``syms[]`` instead of the header's ``syms[0]`` lets cffi index without a
# bounds check.
_CDEF_TYPES = """
typedef int16_t blaze_err;
typedef uint8_t blaze_symbolize_reason;
typedef struct blaze_symbolizer blaze_symbolizer;

typedef struct blaze_symbolize_code_info {
  const char *dir;
  const char *file;
  uint32_t line;
  uint16_t column;
  uint8_t reserved[10];
} blaze_symbolize_code_info;

typedef struct blaze_symbolize_inlined_fn {
  const char *name;
  struct blaze_symbolize_code_info code_info;
  uint8_t reserved[8];
} blaze_symbolize_inlined_fn;

typedef struct blaze_sym {
  const char *name;
  const char *module;
  uint64_t addr;
  size_t offset;
  ptrdiff_t size;
  struct blaze_symbolize_code_info code_info;
  size_t inlined_cnt;
  const struct blaze_symbolize_inlined_fn *inlined;
  blaze_symbolize_reason reason;
  uint8_t reserved[15];
} blaze_sym;

typedef struct blaze_syms {
  size_t cnt;
  struct blaze_sym syms[];
} blaze_syms;

typedef struct blaze_symbolizer_dispatch {
  char *(*dispatch_cb)(const char *maps_file, const char *symbolic_path, void *ctx);
  void *ctx;
} blaze_symbolizer_dispatch;

typedef struct blaze_symbolizer_opts {
  size_t type_size;
  const char *const *debug_dirs;
  size_t debug_dirs_len;
  bool auto_reload;
  bool code_info;
  bool inlined_fns;
  bool demangle;
  uint8_t _reserved1[4];
  const struct blaze_symbolizer_dispatch *process_dispatch;
  uint8_t reserved[8];
} blaze_symbolizer_opts;

typedef struct blaze_symbolize_src_process {
  size_t type_size;
  uint32_t pid;
  bool debug_syms;
  bool perf_map;
  bool no_map_files;
  bool no_vdso;
  uint8_t reserved[16];
} blaze_symbolize_src_process;

typedef struct blaze_symbolize_src_elf {
  size_t type_size;
  const char *path;
  bool debug_syms;
  uint8_t reserved[23];
} blaze_symbolize_src_elf;

typedef struct blaze_cache_src_process {
  size_t type_size;
  uint32_t pid;
  bool cache_vmas;
  uint8_t reserved[19];
} blaze_cache_src_process;
"""

_CDEF = _CDEF_TYPES + """
blaze_err blaze_err_last(void);
const char *blaze_err_str(blaze_err err);
const char *blaze_symbolize_reason_str(blaze_symbolize_reason reason);

blaze_symbolizer *blaze_symbolizer_new_opts(const struct blaze_symbolizer_opts *opts);
void blaze_symbolizer_free(blaze_symbolizer *symbolizer);

void blaze_symbolize_cache_process(blaze_symbolizer *symbolizer,
                                   const struct blaze_cache_src_process *cache);

const struct blaze_syms *blaze_symbolize_process_abs_addrs(blaze_symbolizer *symbolizer,
    const struct blaze_symbolize_src_process *src,
    const uint64_t *abs_addrs, size_t abs_addr_cnt);
const struct blaze_syms *blaze_symbolize_elf_virt_offsets(blaze_symbolizer *symbolizer,
    const struct blaze_symbolize_src_elf *src,
    const uint64_t *virt_offsets, size_t virt_offset_cnt);
const struct blaze_syms *blaze_symbolize_elf_file_offsets(blaze_symbolizer *symbolizer,
    const struct blaze_symbolize_src_elf *src,
    const uint64_t *file_offsets, size_t file_offset_cnt);
void blaze_syms_free(const struct blaze_syms *syms);
"""

_BLAZE_ERR_OK = 0
_BLAZE_ERR_PERMISSION_DENIED = -1
_BLAZE_ERR_NOT_FOUND = -2


class _Where(NamedTuple):
    """What every frame of one function (or one inlined call) shares."""

    symbol: Optional[str]
    file: Optional[str]
    inlined: bool
    module: Optional[str]
    reason: Optional[str]


class StackFrame(tuple):  # type: ignore[type-arg]
    """One logical frame: a real function, or a function inlined into one.

    ``reason`` is set only when the address could not be symbolized (then
    ``symbol`` is None); it is blazesym's explanation, e.g. "address is
    unmapped".

    Immutable and light on purpose: a frame is a 4-tuple (addr, offset, line,
    shared part), and the name, file, module and flags of a function are one
    shared object for all its frames. Symbolizing a million addresses a second
    leaves about 0.3 us per frame for Python; a frozen dataclass costs 1 us to
    build. Compare frames with ``==`` (by value) and change one with
    :meth:`replace`.
    """

    __slots__ = ()
    _fields = ("addr", "symbol", "offset", "file", "line", "inlined", "module", "reason")

    def __new__(cls, addr: int, symbol: Optional[str], offset: int, file: Optional[str],
                line: Optional[int], inlined: bool, module: Optional[str],
                reason: Optional[str] = None) -> StackFrame:
        return tuple.__new__(cls, (addr, offset, line or 0,
                                   _Where(symbol, file, bool(inlined), module, reason)))

    addr: int = property(itemgetter(0))  # type: ignore[assignment]
    offset: int = property(itemgetter(1))  # type: ignore[assignment]

    @property
    def line(self) -> Optional[int]:
        return self[2] or None

    @property
    def symbol(self) -> Optional[str]:
        return self[3].symbol  # type: ignore[no-any-return]

    @property
    def file(self) -> Optional[str]:
        return self[3].file  # type: ignore[no-any-return]

    @property
    def inlined(self) -> bool:
        return self[3].inlined  # type: ignore[no-any-return]

    @property
    def module(self) -> Optional[str]:
        return self[3].module  # type: ignore[no-any-return]

    @property
    def reason(self) -> Optional[str]:
        return self[3].reason  # type: ignore[no-any-return]

    def _asdict(self) -> dict[str, Any]:
        w = self[3]
        return {"addr": self[0], "symbol": w.symbol, "offset": self[1], "file": w.file,
                "line": self[2] or None, "inlined": w.inlined, "module": w.module,
                "reason": w.reason}

    def replace(self, **changes: Any) -> StackFrame:
        """A copy with some fields changed (``dataclasses.replace`` for frames)."""
        d = self._asdict()
        unknown = set(changes) - set(d)
        if unknown:
            raise TypeError(f"StackFrame has no field {sorted(unknown)[0]!r}")
        d.update(changes)
        return StackFrame(**d)

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickling: the constructor's arguments
        return tuple(self._asdict().values())

    def __repr__(self) -> str:
        return "StackFrame(" + ", ".join(f"{k}={v!r}" for k, v in self._asdict().items()) + ")"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; ``reason`` appears only on unsymbolized frames."""
        d = self._asdict()
        if d["reason"] is None:
            del d["reason"]
        return d

    def __str__(self) -> str:
        name = self.symbol if self.symbol is not None else "??"
        text = f"{self.addr:#x} {name}"
        if self.offset:
            text += f"+{self.offset:#x}"
        if self.inlined:
            text += " [inlined]"
        if self.file is not None:
            text += f" {self.file}:{self.line}" if self.line else f" {self.file}"
        elif self.module is not None:
            text += f" ({self.module})"
        return text


# --------------------------------------------------------------------------
# Loading the library


# What one address symbolizes to: inlined frames (innermost first), then the
# function. Tuples, because results are cached and handed out again.
Frames = Sequence[StackFrame]
_Call = Callable[[Any, int], Any]  # (uint64_t addresses, count) -> blaze_syms result
_Filed = Callable[[int, list[Frames]], None]  # (index of a chunk's first address, its groups)


class _Binding:
    """An opened libblazesym_c plus the per-library constants we derive from it."""

    def __init__(self, path: str) -> None:
        try:
            import cffi  # deferred: the rest of apptrace works without it
        except ImportError as exc:
            raise SymbolizerError(f"cffi is not installed: {exc}",
                                  hint="pip install cffi") from exc
        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        try:
            lib = ffi.dlopen(path)
        except OSError as exc:
            raise SymbolizerError(
                f"cannot load blazesym library {path}: {exc}", hint=BUILD_HINT
            ) from exc
        self.path = path
        self.ffi = ffi
        self.lib = lib
        self.null = ffi.NULL
        self.opts_size = ffi.sizeof("struct blaze_symbolizer_opts")
        self.src_process_size = ffi.sizeof("struct blaze_symbolize_src_process")
        self.src_elf_size = ffi.sizeof("struct blaze_symbolize_src_elf")
        self.cache_process_size = ffi.sizeof("struct blaze_cache_src_process")
        # The reason strings are static in the library: decode each once.
        self.reasons = [
            ffi.string(lib.blaze_symbolize_reason_str(r)).decode("utf-8", "replace")
            for r in range(256)
        ]
        self.pack = _load_pack()
        self.frames = _load_frames() if self.pack is not None else None
        self.text: dict[bytes, str] = {}  # decoded names and modules, shared by all results

    def err_text(self, code: int) -> str:
        raw: bytes = self.ffi.string(self.lib.blaze_err_str(code))
        return raw.decode("utf-8", "replace")


PACK_ENV_VAR = "APPTRACE_BLAZEPACK"


def _load_pack() -> Any:
    """The compiled result reader (``make blazepack``), or None for the ABI-mode loop.

    ``APPTRACE_BLAZEPACK=0`` turns it off (to compare the two paths).
    """
    if os.environ.get(PACK_ENV_VAR) == "0":
        return None
    try:
        from apptrace import _blazepack  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _blazepack


def _load_frames() -> Any:
    """The C frame builder (``make blazepack``, apptrace/_frames.c), or None
    for the Python loops; also off with ``APPTRACE_BLAZEPACK=0``."""
    if os.environ.get(PACK_ENV_VAR) == "0":
        return None
    try:
        from apptrace import _frames  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _frames


_bindings: dict[str, _Binding] = {}
_bindings_lock = threading.Lock()


def _packaged_lib() -> Path:
    return Path(__file__).resolve().parent / LIB_NAME


def library_path() -> str:
    """Where libblazesym_c is loaded from; raises SymbolizerError if nowhere.

    The library the package carries comes first (wheels and the checkout's
    editable install have it), then the system linker's. An explicit
    ``APPTRACE_BLAZESYM`` overrides both and is never second-guessed: a wrong
    value is an error, not a reason to pick some other library.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        if not os.path.isfile(env):
            raise SymbolizerError(
                f"{ENV_VAR}={env} does not exist or is not a file", hint=BUILD_HINT
            )
        return os.path.abspath(env)
    packaged = _packaged_lib()
    if packaged.is_file():
        return str(packaged)
    found = ctypes.util.find_library("blazesym_c")
    if found:
        return found
    raise SymbolizerError(
        f"blazesym library ({LIB_NAME}) not found: this apptrace has no {packaged},"
        f" {ENV_VAR} is unset and the system linker knows no libblazesym_c",
        hint=BUILD_HINT,
    )


def _binding() -> _Binding:
    path = library_path()
    with _bindings_lock:
        b = _bindings.get(path)
        if b is None:
            b = _bindings[path] = _Binding(path)
        return b


def _describe_version(path: str) -> str:
    """Best-effort version text for `apptrace doctor`; never raises."""
    parts = []
    try:
        marks = sorted(Path(path).parent.glob(".version-*"))
        if marks:
            parts.append("blazesym-c " + marks[-1].name[len(".version-"):])
    except OSError:
        pass
    try:
        with open(path, "rb") as f:
            # Rust panic locations embed the core crate's registry path.
            m = re.search(rb"blazesym-(\d+\.\d+\.\d+)", f.read())
        if m:
            parts.append("blazesym " + m.group(1).decode())
    except OSError:
        pass
    return ", ".join(parts) if parts else "version unknown"


def symbolizer_available() -> tuple[bool, str]:
    """(ok, detail) for `apptrace doctor`: load blazesym and create a symbolizer."""
    try:
        path = library_path()
        Symbolizer().close()
    except SymbolizerError as exc:
        return False, str(exc)
    return True, f"{path} ({_describe_version(path)})"


# --------------------------------------------------------------------------
# The symbolizer


class Symbolizer:
    """Thread-safe wrapper (a lock around every call, blazesym's symbolizer is not thread-safe).

    One instance caches parsed ELF/DWARF data and cached process maps for its
    whole life and never evicts; recreate it now and then in long-running
    tools to bound memory.

    ``auto_reload`` is off by default, unlike in blazesym itself: it makes
    blazesym stat the backing file for every address of a process lookup
    (about 4 us each, a 10x slowdown). Without it a file that changes on disk
    while this Symbolizer lives is still read from the cached copy. Process
    lookups go through /proc/PID/map_files, so a new process of a rebuilt
    binary is unaffected; turn it on when calling :meth:`symbolize_elf` on
    files that get rebuilt in place.
    """

    def __init__(self, *, code_info: bool = True, inlined_fns: bool = True,
                 demangle: bool = True, debug_dirs: Optional[Sequence[str]] = None,
                 auto_reload: bool = False) -> None:
        b = _binding()
        ffi = b.ffi
        self._b = b
        self._lock = threading.Lock()  # one blazesym call at a time
        self._cache_lock = threading.Lock()  # the result cache, filed while blazesym runs
        self._code_info = code_info
        self._cached_pids: set[int] = set()
        self._ptr: Any = None
        self._pool: Any = None
        self._auto_reload = auto_reload
        self._results: dict[tuple[Any, ...], dict[int, Frames]] = {}
        self._result_count = 0
        self._maps_seen: dict[int, bytes] = {}

        opts = ffi.new("struct blaze_symbolizer_opts *")
        opts.type_size = b.opts_size
        # A zeroed opts struct turns everything off; say what we want.
        opts.auto_reload = auto_reload
        opts.code_info = code_info
        opts.inlined_fns = inlined_fns and code_info
        opts.demangle = demangle
        keep: list[Any] = []
        if debug_dirs is not None:
            cstrs = [ffi.new("char[]", os.fsencode(d)) for d in debug_dirs]
            arr = ffi.new("const char *[]", cstrs or 1)  # non-NULL even when empty
            keep = [cstrs, arr]
            opts.debug_dirs = arr
            opts.debug_dirs_len = len(cstrs)
        with self._lock:
            ptr = b.lib.blaze_symbolizer_new_opts(opts)
            if ptr == b.null:
                raise self._last_error("cannot create symbolizer")
        del keep  # blazesym copied the directory list
        self._ptr = ffi.gc(ptr, b.lib.blaze_symbolizer_free)

    # -- lifecycle

    def close(self) -> None:
        """Free blazesym's caches now rather than at garbage collection."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        with self._lock:
            if self._ptr is not None:
                self._b.ffi.release(self._ptr)
                self._ptr = None

    def __enter__(self) -> Symbolizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public calls

    def cache_process(self, pid: int) -> None:
        """Snapshot the process's memory map so it can be symbolized after it exits.

        Call it when a PID is first seen, and again after it loads libraries
        (the snapshot is not refreshed). A PID reused by a new process keeps
        the old snapshot until this is called again.
        """
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            maps = b""
        if maps and self._maps_seen.get(pid) != maps:
            self._maps_seen[pid] = maps
            self._forget_process(pid)  # the same address may now mean something else
        b = self._b
        cache = b.ffi.new("struct blaze_cache_src_process *")
        cache.type_size = b.cache_process_size
        cache.pid = pid
        cache.cache_vmas = True
        with self._lock:
            b.lib.blaze_symbolize_cache_process(self._live(), cache)
            err = b.lib.blaze_err_last()
            if err != _BLAZE_ERR_OK:
                raise self._error(err, f"caching the maps of process {pid}")
            self._cached_pids.add(pid)

    def symbolize_process(self, pid: int, addrs: Sequence[int], *, perf_map: bool = True,
                          return_addresses: bool = False) -> list[Frames]:
        """Symbolize absolute addresses of a live (or cached) process.

        With ``return_addresses`` every address is looked up at ``addr - 1``
        so that a call's return address maps to the call's line; the frames
        still report the original address.
        """
        adjust = 1 if return_addresses else 0
        return self._cached(("p", pid, adjust, perf_map), addrs,
                            lambda: self._process_call(pid, perf_map), adjust)

    def symbolize_stack(self, pid: int, stack: Sequence[int], *,
                        perf_map: bool = True) -> list[StackFrame]:
        """Symbolize a captured user stack (innermost first) into a flat frame list.

        Frame 0 is the exact instruction pointer; every later entry is a
        return address and is looked up one byte earlier. Zero entries (the
        padding of BPF stack buffers) are skipped.
        """
        addrs = [a for a in stack if a]
        if not addrs:
            return []
        adjust = [0 if i == 0 and stack[0] else 1 for i in range(len(addrs))]
        frames: list[StackFrame] = []
        for group in self._process(pid, addrs, adjust, perf_map):
            frames.extend(group)
        return frames

    def symbolize_elf(self, path: str, virt_offsets: Sequence[int]) -> list[Frames]:
        """Symbolize addresses in an ELF file's own address space (as ``nm``/``readelf`` show)."""
        return self._cached(("v", path), virt_offsets,
                            lambda: self._elf_call(path, file_offsets=False))

    def symbolize_elf_file_offsets(self, path: str,
                                   file_offsets: Sequence[int]) -> list[Frames]:
        """Symbolize file offsets into an ELF (what address normalization produces)."""
        return self._cached(("f", path), file_offsets,
                            lambda: self._elf_call(path, file_offsets=True))

    # -- internals

    CACHE_LIMIT = 1 << 20  # addresses remembered per symbolizer before starting over

    def _cached(self, key: tuple[Any, ...], addrs: Sequence[int],
                make_call: Callable[[], _Call], adjust: int = 0) -> list[Frames]:
        """Answer repeated addresses from memory; ask blazesym only for new ones.

        Tracing symbolizes the same hot addresses over and over; frames are
        immutable, so a result can be handed out again. A process's entries
        are dropped when its memory map changes (see :meth:`cache_process`).
        ``make_call`` gives the blazesym call for this source; ``adjust`` is
        subtracted from each address for the lookup only.
        """
        b = self._b
        kept = not (self._auto_reload and key[0] != "p")
        if not kept:
            known: dict[int, Frames] = {}  # the caller wants files rebuilt in place noticed
        else:
            with self._cache_lock:
                found = self._results.get(key)
                if found is None:
                    if self._result_count > self.CACHE_LIMIT:
                        self._results.clear()
                        self._result_count = 0
                    found = self._results[key] = {}
            known = found
            # All known is the hot path of a tracer; a batch whose first
            # address is new is most likely new throughout (skip that pass).
            try:
                if addrs and addrs[0] in known:
                    out = list(map(known.get, addrs))
                    if None not in out:
                        return out  # type: ignore[return-value]
            except TypeError as exc:
                raise _bad_addresses(exc) from exc
        if b.frames is None:
            return self._cached_py(known, addrs, make_call, adjust, kept)
        # In C, one pass: the cached groups in place, the distinct new
        # addresses sorted (blazesym looks ascending addresses up about 30%
        # faster) with the caller's int objects as their keys.
        try:
            out, values, adj, keys, order = b.frames.plan(addrs, known, adjust)
        except (TypeError, OverflowError) as exc:
            raise _bad_addresses(exc) from exc
        if keys:
            filed: Optional[_Filed] = None
            if kept:
                def file_chunk(k: int, groups: list[Frames]) -> None:
                    # Each chunk is filed while blazesym looks up the next.
                    with self._cache_lock:
                        known.update(zip(keys[k:k + len(groups)], groups))
                        self._result_count += len(groups)
                filed = file_chunk
            with _gc_paused():
                groups = self._run_packed(make_call(), values, adj, len(keys), filed)
                b.frames.fill(out, order, groups)
        return out

    def _cached_py(self, known: dict[int, Frames], addrs: Sequence[int],
                   make_call: Callable[[], _Call], adjust: int, kept: bool) -> list[Frames]:
        """:meth:`_cached` without the compiled helpers (same frames, slower)."""
        try:
            missing = sorted(set(addrs).difference(known))
        except TypeError as exc:
            raise _bad_addresses(exc) from exc
        with _gc_paused():
            if missing:
                self._run(make_call(), missing, [adjust] * len(missing) if adjust else None,
                          known)
                if kept:
                    with self._cache_lock:
                        self._result_count += len(missing)
            return list(map(known.__getitem__, addrs))

    def _forget_process(self, pid: int) -> None:
        with self._cache_lock:
            for key in [k for k in self._results if k[0] == "p" and k[1] == pid]:
                del self._results[key]

    def _live(self) -> Any:
        if self._ptr is None:
            raise SymbolizerError("symbolizer is closed")
        return self._ptr

    def _error(self, err: int, what: str, pid: Optional[int] = None) -> SymbolizerError:
        hint = None
        if pid is not None and err == _BLAZE_ERR_NOT_FOUND:
            hint = (f"process {pid} does not exist; to symbolize a process after it exits,"
                    " call cache_process() while it runs")
        elif err == _BLAZE_ERR_PERMISSION_DENIED:
            hint = "reading another process's memory maps needs root (or CAP_SYS_PTRACE)"
        return SymbolizerError(f"blazesym: {self._b.err_text(err)} ({what})", code=err,
                               hint=hint)

    def _last_error(self, what: str) -> SymbolizerError:
        return self._error(self._b.lib.blaze_err_last(), what)

    def _process(self, pid: int, addrs: Sequence[int], adjust: Optional[Sequence[int]],
                 perf_map: bool) -> list[Frames]:
        if not addrs:
            return []
        return self._run(self._process_call(pid, perf_map), addrs, adjust)

    def _process_call(self, pid: int, perf_map: bool) -> _Call:
        """The blazesym call that looks up absolute addresses of process ``pid``."""
        b = self._b
        src = b.ffi.new("struct blaze_symbolize_src_process *")
        src.type_size = b.src_process_size
        src.pid = pid
        src.debug_syms = self._code_info
        src.perf_map = perf_map
        src.no_map_files = self._map_files_unusable(pid)

        def call(arr: Any, n: int) -> Any:
            what = f"symbolizing {n} addresses of process {pid}"
            with self._lock:
                res = b.lib.blaze_symbolize_process_abs_addrs(self._live(), src, arr, n)
                if res == b.null:
                    err = b.lib.blaze_err_last()
                    if err == _BLAZE_ERR_PERMISSION_DENIED and not src.no_map_files:
                        # /proc/PID/map_files needs CAP_SYS_ADMIN (or
                        # CAP_CHECKPOINT_RESTORE); the paths in /proc/PID/maps do not.
                        src.no_map_files = True
                        res = b.lib.blaze_symbolize_process_abs_addrs(self._live(), src, arr, n)
                        if res == b.null:
                            err = b.lib.blaze_err_last()
                    if res == b.null:
                        raise self._error(err, what, pid)
            return res

        return call

    def _map_files_unusable(self, pid: int) -> bool:
        """True when blazesym must use the paths in maps instead of /proc/PID/map_files.

        That is the case for a cached process that has exited (its map_files
        are gone, and a zombie's maps are empty) and for callers that may not
        read map_files at all.
        """
        if pid in self._cached_pids:
            try:
                with open(f"/proc/{pid}/maps", "rb") as f:
                    if not f.read(1):
                        return True
            except OSError:
                return True
        return not _can_read_map_files()

    def _elf_call(self, path: str, *, file_offsets: bool) -> _Call:
        """The blazesym call that looks up virtual or file offsets in ELF ``path``."""
        b = self._b
        src = b.ffi.new("struct blaze_symbolize_src_elf *")
        cpath = b.ffi.new("char[]", os.fsencode(path))
        src.type_size = b.src_elf_size
        src.path = cpath
        src.debug_syms = self._code_info
        fn = (b.lib.blaze_symbolize_elf_file_offsets if file_offsets
              else b.lib.blaze_symbolize_elf_virt_offsets)

        keep = (src, cpath)  # src.path points into cpath: both live as long as call

        def call(arr: Any, n: int) -> Any:
            with self._lock:
                res = fn(self._live(), keep[0], arr, n)
                if res == b.null:
                    raise self._last_error(f"symbolizing {n} addresses in {path}")
            return res

        return call

    CHUNK = 2048  # addresses per blazesym call when a batch is pipelined

    def _run(self, call: _Call, addrs: Sequence[int], adjust: Optional[Sequence[int]],
             into: Optional[dict[int, Frames]] = None) -> list[Frames]:
        """Frames for ``addrs`` (each looked up at ``addr - adjust[i]``), in
        order; with ``into``, put in that dict instead (see :func:`_convert`)."""
        adj = None
        if adjust is not None:
            try:  # 0 is no return address (see plan() in _frames.c): looked up as is
                adj = bytes(d if a >= d else 0 for a, d in zip(addrs, adjust))
            except TypeError as exc:
                raise _bad_addresses(exc) from exc
            lookup: Sequence[int] = [a - d for a, d in zip(addrs, adj)]
        else:
            lookup = addrs
        arr = _addr_array(self._b, lookup)
        return self._pipelined(call, arr, len(lookup), adj, addrs, into)

    def _run_packed(self, call: _Call, values: bytearray, adj: Optional[bytearray],
                    n: int, filed: Optional[_Filed] = None) -> list[Frames]:
        """Frames for ``n`` lookup addresses packed as uint64 (each already
        minus its byte of ``adj``; frames report it added back), in order."""
        arr = self._b.ffi.from_buffer("uint64_t[]", values)
        return self._pipelined(call, arr, n, bytes(adj) if adj is not None else None,
                               range(n), None, filed)

    def _pipelined(self, call: _Call, arr: Any, n: int, adj: Optional[bytes],
                   keys: Sequence[int], into: Optional[dict[int, Frames]],
                   filed: Optional[_Filed] = None) -> list[Frames]:
        """blazesym calls in chunks on a worker thread, each chunk's frames
        built here while the next chunk is looked up.

        A blazesym call does not hold the GIL, so on a second core the lookup
        of one chunk and the Python work of the previous one overlap; calls
        stay one at a time (the lock). Small batches are done in one call.
        ``arr`` holds the ``n`` lookup addresses; frames report each plus its
        byte of ``adj``; ``keys`` are what ``into`` files groups under.
        ``filed(k, groups)`` is told of each chunk's groups (starting at
        index ``k``) as soon as they are built.
        """
        b = self._b
        step = self.CHUNK
        if n < 2 * step:
            groups = _convert(b, call(arr, n), arr, keys, adj, into)
            if filed is not None:
                filed(0, groups)
            return groups

        def native(k: int) -> Any:
            return call(arr + k, min(step, n - k))

        out: list[Frames] = []
        starts = range(0, n, step)
        pending = self._worker().submit(native, 0)
        try:
            for i, k in enumerate(starts):
                res = pending.result()
                pending = None
                if i + 1 < len(starts):
                    pending = self._worker().submit(native, starts[i + 1])
                groups = _convert(b, res, arr + k, keys[k:k + step],
                                  adj[k:k + step] if adj is not None else None, into)
                if filed is not None:
                    filed(k, groups)
                out.extend(groups)
        finally:
            if pending is not None:  # an error: free what the worker still returns
                try:
                    b.lib.blaze_syms_free(pending.result())
                except SymbolizerError:
                    pass
        return out

    def _worker(self) -> Any:
        """The one thread that makes pipelined blazesym calls (made on first use)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="apptrace-blazesym")
        return self._pool

def _bad_addresses(exc: Exception) -> SymbolizerError:
    return SymbolizerError(f"addresses must be integers in [0, 2**64): {exc}")


def _addr_array(b: _Binding, addrs: Sequence[int]) -> Any:
    """A uint64_t[] for blazesym (an array.array fills it at C speed)."""
    try:
        packed = array.array("Q", addrs)
    except (OverflowError, TypeError) as exc:
        raise _bad_addresses(exc) from exc
    return b.ffi.from_buffer("uint64_t[]", packed)  # keeps `packed` alive


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector while a batch of frames is built.

    Frames and their groups cannot form cycles. Built in Python each is a
    tracked container, and tens of thousands of them trigger dozens of
    collections (now and then a full one over every cached frame). Built in
    C they are untracked, but their allocations still count towards the
    collector's thresholds and would make it walk the rest of the program's
    objects mid-batch. The collector is restored as it was, so one
    collection covers the whole batch afterwards.
    """
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_map_files_ok: Optional[bool] = None


def _can_read_map_files() -> bool:
    """Whether this process may resolve /proc/PID/map_files links (checked once)."""
    global _map_files_ok
    if _map_files_ok is None:
        try:
            names = os.listdir("/proc/self/map_files")
            if names:
                os.readlink(f"/proc/self/map_files/{names[0]}")
            _map_files_ok = True
        except OSError:
            _map_files_ok = False
    return _map_files_ok


def _convert(b: _Binding, res: Any, arr: Any, addrs: Sequence[int],
             adjust: Optional[Sequence[int]],
             into: Optional[dict[int, Frames]] = None) -> list[Frames]:
    """Copy a blaze_syms result into Python objects, then free it. ``arr`` is
    the address array blazesym was given, ``addrs`` what frames report. With
    ``into``, each address's frames go in that dict instead (any order)."""
    try:
        if b.pack is not None:
            return _unpack(b, res, arr, addrs, adjust, into)
        out = _copy_syms(b, res, addrs, adjust)
        if into is None:
            return out
        into.update(zip(addrs, out))
        return []
    finally:
        b.lib.blaze_syms_free(res)


_new_frame = tuple.__new__
_NAME, _MODULE = 1, 2  # string kinds of the compiled reader


def _unpack(b: _Binding, res: Any, arr: Any, keys_in: Sequence[int],
            adjust: Optional[Sequence[int]], into: Optional[dict[int, Frames]]) -> list[Frames]:
    """The fast path: the compiled helper flattens the result into columns
    and interned tables; Python builds frames with C-level loops (map/zip)."""
    pk = b.pack
    ffi, lib = pk.ffi, pk.lib
    cast, addr_of = ffi.cast, b.ffi.cast
    ptr = cast("const struct blaze_syms *", int(addr_of("uintptr_t", res)))
    inputs = cast("const uint64_t *", int(addr_of("uintptr_t", arr)))
    cnt = len(keys_in)
    nf = lib.apptrace_frame_count(ptr)
    addrs = ffi.new("uint64_t[]", nf)
    offsets = ffi.new("uint64_t[]", nf)
    lines = ffi.new("uint32_t[]", nf)
    where_ids = ffi.new("uint32_t[]", nf)
    groups = ffi.new("uint32_t[]", cnt)
    keys = ffi.new("uint64_t[]", cnt)
    strs = ffi.new("const char *[]", 4 * nf + 1)
    kinds = ffi.new("uint8_t[]", 4 * nf + 1)
    paths = ffi.new("uint32_t[]", 2 * (nf + 1))
    wheres = ffi.new("uint32_t[]", 5 * (nf + 1))
    sizes = ffi.new("size_t[4]")
    adj = ffi.new("uint8_t[]", bytes(adjust)) if adjust is not None else ffi.NULL
    build = b.frames.build if b.frames is not None else None
    if lib.apptrace_pack(ptr, inputs, adj, into is not None and build is None, nf, addrs,
                         offsets, lines,
                         where_ids, keys, groups, strs, kinds, paths, wheres, sizes) != 0:
        raise SymbolizerError("out of memory while reading a blazesym result")
    nstr, npath, nwhere, singles = sizes[0], sizes[1], sizes[2], sizes[3]

    # The few distinct strings: names and modules decoded (and shared across
    # results), directory and file names kept as bytes to be joined.
    text = b.text
    if len(text) > 1 << 16:
        text.clear()
    raw = list(map(ffi.string, ffi.unpack(strs, nstr + 1)[1:]))
    kind = ffi.unpack(kinds, nstr + 1)
    strings: list[Any] = [None]
    for i, r in enumerate(raw, 1):
        k = kind[i]
        if k == _NAME or k == _MODULE:
            t = text.get(r)
            if t is None:
                t = text[r] = r.decode("utf-8", "replace") if k == _NAME else os.fsdecode(r)
            strings.append(t)
        else:
            strings.append(r)
    pv = ffi.unpack(paths, 2 * (npath + 1))
    files: list[Optional[str]] = [None]
    for i in range(1, npath + 1):
        d, f = pv[2 * i], pv[2 * i + 1]
        files.append(os.fsdecode(os.path.join(strings[d], strings[f]) if d else strings[f]))
    wv = ffi.unpack(wheres, 5 * (nwhere + 1))
    reasons = b.reasons
    where: list[Any] = [None]
    for i in range(5, 5 * nwhere + 5, 5):
        name = strings[wv[i]]
        where.append(_Where(name, files[wv[i + 1]], bool(wv[i + 3]), strings[wv[i + 2]],
                            None if name is not None else reasons[wv[i + 4]]))

    if build is not None:  # frames and groups made (and untracked) in C
        def at(col: Any) -> int:
            return int(ffi.cast("uintptr_t", col))

        return build(StackFrame, nf, at(addrs), at(offsets), at(lines), at(where_ids), where,
                     cnt, at(groups), at(keys), keys_in, into) or []
    frames = map(_new_frame, repeat(StackFrame), zip(
        ffi.unpack(addrs, nf), ffi.unpack(offsets, nf), ffi.unpack(lines, nf),
        map(where.__getitem__, ffi.unpack(where_ids, nf))))
    with _gc_paused():
        if into is not None:  # one-frame groups first: zip makes them at C speed
            # The caller's own int objects as keys: later lookups match by identity.
            into.update(zip(map(keys_in.__getitem__, ffi.unpack(keys, cnt)), chain(
                zip(islice(frames, singles)),
                map(tuple, map(islice, repeat(frames), ffi.unpack(groups + singles,
                                                                  cnt - singles))))))
            return []
        if nf == cnt:
            return list(zip(frames))
        return list(map(tuple, map(islice, repeat(frames), ffi.unpack(groups, cnt))))


def _copy_syms(b: _Binding, res: Any, addrs: Sequence[int],
               adjust: Optional[Sequence[int]]) -> list[Frames]:
    """The ABI-mode fallback: read every field we need out of the C result.

    Strings repeat a lot within one result (one module, a few source files,
    a function per several addresses), so each distinct byte string is
    decoded once and source paths are joined once.
    """
    string = b.ffi.string
    reasons = b.reasons
    syms = res.syms
    text: dict[bytes, str] = {}
    paths: dict[tuple[Optional[bytes], bytes], str] = {}
    frame = StackFrame

    def source(ci: Any) -> Optional[str]:
        f = ci.file
        if not f:
            return None
        d = ci.dir
        key = (string(d) if d else None, string(f))
        p = paths.get(key)
        if p is None:
            dir_b, file_b = key
            p = paths[key] = os.fsdecode(os.path.join(dir_b, file_b) if dir_b else file_b)
        return p

    out: list[Frames] = []
    append = out.append
    for i in range(res.cnt):
        s = syms[i]
        addr = addrs[i]
        name = s.name
        if not name:
            append((frame(addr, None, 0, None, None, False, None, reasons[s.reason]),))
            continue
        raw = string(name)
        symbol = text.get(raw)
        if symbol is None:
            symbol = text[raw] = raw.decode("utf-8", "replace")
        module = None
        if s.module:
            raw = string(s.module)
            module = text.get(raw)
            if module is None:
                module = text[raw] = os.fsdecode(raw)
        ci = s.code_info
        offset = s.offset + adjust[i] if adjust is not None else s.offset
        outer = frame(addr, symbol, offset, source(ci), ci.line or None, False, module)
        n = s.inlined_cnt
        if not n:
            append((outer,))
            continue
        group: list[StackFrame] = []
        inlined = s.inlined
        for j in range(n - 1, -1, -1):  # blazesym lists them outermost first
            fn = inlined[j]
            raw = string(fn.name)
            symbol = text.get(raw)
            if symbol is None:
                symbol = text[raw] = raw.decode("utf-8", "replace")
            ici = fn.code_info
            group.append(frame(addr, symbol, 0, source(ici), ici.line or None, True, module))
        group.append(outer)
        append(tuple(group))
    return out
