"""The one module that imports bcc, and the kernel calls bcc gets wrong or lacks.

bcc compiles our generated C; the bytecode is then loaded (and cached) by
:mod:`apptrace.bpfobj` with raw ``bpf(2)``, so bcc is not even imported when
the cache has the program. Attaching goes around bcc's Python:
- ``bpf_attach_uprobe`` is declared here with its real 7 parameters (bcc's
  ``libbcc.py`` declares 6, so ``ref_ctr_offset`` is stack garbage there);
- uprobe_multi links are made with the raw ``bpf(BPF_LINK_CREATE)`` syscall:
  libbcc links Debian's libbpf 1.1, whose ``bpf_link_create`` options predate
  uprobe_multi (libbpf 1.3);
- the ring buffer is read by mapping it ourselves (see :mod:`apptrace.ringbuf`),
  so events are decoded in batches instead of one ctypes callback each.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import importlib.util
import os
import re
import struct
import sys
import tempfile
from typing import Any, Iterator, Optional, Sequence

from apptrace.bpfobj import (
    BPF_PROG_TYPE_RAW_TRACEPOINT,
    BpfMap,
    CompiledObject,
    LoadedObject,
    MapSpec,
    cache_get,
    cache_key,
    cache_put,
    map_info,
    unbind,
)
from apptrace.errors import (
    ApptraceError,
    AttachError,
    BccUnavailableError,
    BpfError,
    SemaphoreConflictError,
    TracePermissionError,
)
from apptrace.syscall import (
    BPF_LINK_CREATE,
    BPF_RAW_TRACEPOINT_OPEN,
    BPF_TRACE_UPROBE_MULTI,
    bpf,
    has_trace_privileges,
)

__all__ = ["import_bcc", "Program", "compile_c", "ensure_compiled", "close_links", "self_test",
           "attach_uprobe_perf",
           "attach_uprobe_multi"]

_bcc: Any = None


# Where Debian (and a bcc built from source with its default prefix) puts the
# ``bcc`` package. bcc is pure Python over ctypes, so one copy serves every
# Python 3; it is not on PyPI (PyPI's 'bcc' is an unrelated project).
_BCC_DIRS = ("/usr/lib/python3/dist-packages", "/usr/local/lib/python3/dist-packages")
_LIBBCC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_BCC_HINT = "apt-get install python3-bpfcc"


def _libbcc_version() -> str | None:
    """The version libbcc.so.0 resolves to (``0.26.0``), or None if there is none."""
    for d in _LIBBCC_DIRS:
        real = os.path.realpath(os.path.join(d, "libbcc.so.0"))
        if os.path.isfile(real):
            m = re.search(r"\.so\.(\d+(?:\.\d+)*)$", real)
            return m.group(1) if m else ""
    return None


def _bcc_package_version(pkg: str) -> str | None:
    try:
        with open(os.path.join(pkg, "version.py"), encoding="utf-8") as f:
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def _load_system_bcc() -> Any:
    """Load the system's ``bcc`` package by itself, without the rest of dist-packages.

    A venv does not see Debian's dist-packages; adding that whole directory
    to sys.path would also bring Debian's old copies of unrelated packages.
    Only a ``bcc`` whose version is libbcc's is taken: the two are one
    release (python3-bpfcc depends on the exact libbpfcc).
    """
    libver = _libbcc_version()
    found = [os.path.join(d, "bcc") for d in _BCC_DIRS
             if os.path.isfile(os.path.join(d, "bcc", "__init__.py"))]
    if not found:
        missing = "python3-bpfcc" if libver is not None else "python3-bpfcc libbpfcc"
        raise BccUnavailableError(
            "bcc's Python module is not installed (looked in this Python's path and "
            + ", ".join(_BCC_DIRS) + ")",
            hint=f"apt-get install {missing}; PyPI's 'bcc' is an unrelated package")
    if libver is None:
        raise BccUnavailableError(f"found {found[0]} but not libbcc.so.0",
                                  hint="apt-get install libbpfcc")
    versions = {pkg: _bcc_package_version(pkg) for pkg in found}
    pkg = next((p for p, v in versions.items() if v == libver or not libver), None)
    if pkg is None:
        have = ", ".join(f"{p} {v or '(version unknown)'}" for p, v in versions.items())
        raise BccUnavailableError(
            f"bcc's Python module ({have}) does not match libbcc {libver}",
            hint="apt-get install --reinstall python3-bpfcc libbpfcc")
    spec = importlib.util.spec_from_file_location(
        "bcc", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        # Leave no half-initialized bcc (nor its submodules) for a later import.
        for name in [n for n in sys.modules if n == "bcc" or n.startswith("bcc.")]:
            del sys.modules[name]
        raise
    return module


def _import_bcc_module() -> Any:
    try:
        import bcc  # noqa: PLC0415
    except ModuleNotFoundError as err:
        if err.name != "bcc":
            raise
    else:
        return bcc
    return _load_system_bcc()


def import_bcc() -> Any:
    """bcc from this Python's path, else the system's copy; or say which package to install."""
    global _bcc
    if _bcc is None:
        try:
            bcc = _import_bcc_module()
        except BccUnavailableError:
            raise
        except (ImportError, OSError) as err:  # OSError: libbcc.so.0 did not load
            raise BccUnavailableError(f"cannot import bcc ({err})", hint=_BCC_HINT) from err
        lib = bcc.libbcc.lib
        lib.bpf_attach_uprobe.restype = ctypes.c_int
        lib.bpf_attach_uprobe.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_int,
                                          ctypes.c_uint32]
        lib.bpf_num_tables.restype = ctypes.c_size_t
        lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
        lib.bpf_table_name.restype = ctypes.c_char_p
        lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _bcc = bcc
    return _bcc


def _compiler_id() -> str:
    """What the cache key needs to know about the compiler, without importing bcc."""
    for lib in ("/usr/lib/x86_64-linux-gnu/libbcc.so.0", "/usr/lib/libbcc.so.0"):
        try:
            st = os.stat(lib)
            return f"{os.path.realpath(lib)}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            continue
    return "bcc"


def compile_c(text: str) -> CompiledObject:
    """Compile with bcc and keep the bytecode; bcc's own maps are dropped."""
    bcc = import_bcc()
    lib = bcc.libbcc.lib
    try:
        with _captured_stderr() as noise:
            b = bcc.BPF(text=text.encode())
    except Exception as err:  # bcc raises bare Exception; clang's text went to fd 2

        if not has_trace_privileges():
            raise TracePermissionError(f"cannot load BPF programs ({err})") from err
        raise _compile_error(noise.text(), err) from err
    try:
        maps, fd_names = [], {}
        for i in range(lib.bpf_num_tables(b.module)):
            name = lib.bpf_table_name(b.module, i)
            fd = lib.bpf_table_fd(b.module, name)
            mtype, key, value, entries, flags = map_info(fd)
            maps.append(MapSpec(name.decode(), mtype, key, value, entries, flags))
            fd_names[fd] = name.decode()
        functions, relocs = {}, {}
        for i in range(lib.bpf_num_functions(b.module)):
            fname = lib.bpf_function_name(b.module, i)
            start = lib.bpf_function_start(b.module, fname)
            size = lib.bpf_function_size(b.module, fname)
            if not start or not size:
                continue
            code, where = unbind(ctypes.string_at(start, size), fd_names)
            functions[fname.decode()] = code
            relocs[fname.decode()] = where
        license = (lib.bpf_module_license(b.module) or b"GPL").decode()
        return CompiledObject(tuple(maps), functions, relocs, license)
    finally:
        b.cleanup()


def _compile_error(noise: str, err: Exception) -> ApptraceError:
    """Say what failed: a map the kernel refused, missing kernel headers, or
    C that does not compile (our bug). Only the second is about headers."""
    m = re.search(r"could not open bpf map: (\S+), error: ([^\n]+)", noise)
    if m:
        name, why = m.group(1), m.group(2).strip()
        if name.endswith("_rb"):
            hint = ("a ring buffer must be a power-of-two number of pages the kernel"
                    " accepts (at most 2 GiB) and can allocate: lower --ring-mb")
        elif "too long" in why or "allocate" in why:
            hint = "the map is larger than the kernel allows: lower --ring-mb or --str-max"
        else:
            hint = "run `apptrace doctor`"
        code = next((c for c, text in _MAP_ERRNOS.items() if text in why), 0)
        return BpfError(f"the kernel refused BPF map {name}: {why}", errno=code, hint=hint)
    lines = [ln for ln in noise.splitlines() if "error:" in ln]
    first = lines[0].split("error:", 1)[1].strip() if lines else str(err)
    if "file not found" in first or "kernel headers" in noise:
        return BccUnavailableError(
            f"bcc cannot compile BPF programs here: {first}",
            hint="kernel headers must be usable: run `make setup` or `apptrace doctor`")
    return BccUnavailableError(
        f"bcc could not compile the generated program: {first}",
        hint="this is a bug in apptrace's code generator; please report it with this"
             " message")


_MAP_ERRNOS = {_errno.E2BIG: "Argument list too long", _errno.ENOMEM: "Cannot allocate memory",
               _errno.EINVAL: "Invalid argument", _errno.EPERM: "Operation not permitted"}


def ensure_compiled(text: str) -> bool:
    """Compile ``text`` into the cache unless it is there; True if bcc ran."""
    key = cache_key(text, _compiler_id())
    if cache_get(key) is not None:
        return False
    cache_put(key, compile_c(text))
    return True


def close_links(fds: Sequence[int]) -> None:
    """Close link and perf-event fds together: each detach waits for an RCU
    grace period, and closing them from several threads lets the kernel
    batch those waits (os.close releases the GIL)."""
    if len(fds) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(fds))) as pool:
            list(pool.map(_close_quietly, fds))
    else:
        for fd in fds:
            _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Program:
    """Our generated C as loaded programs and maps, plus everything attached to them.

    The bytecode comes from the compile cache when this exact C was compiled
    before on this kernel, else from bcc (and is then cached).
    """

    def __init__(self, text: str, *, sizes: Optional[dict[str, int]] = None,
                 shared: Optional[dict[str, BpfMap]] = None) -> None:
        key = cache_key(text, _compiler_id())
        obj = cache_get(key)
        self.from_cache = obj is not None
        if obj is None:
            obj = compile_c(text)
            cache_put(key, obj)
        self.obj = LoadedObject(obj, sizes=sizes, shared=shared)
        self._fds: list[int] = []
        self._evnames: list[bytes] = []

    def load(self, name: str, *, multi: bool = False, raw_tracepoint: bool = False) -> int:
        if raw_tracepoint:
            return self.obj.load(name, prog_type=BPF_PROG_TYPE_RAW_TRACEPOINT)
        return self.obj.load(name, expected_attach_type=BPF_TRACE_UPROBE_MULTI if multi else 0)

    def attach_raw_tracepoint(self, prog_fd: int, tracepoint: str) -> None:
        """Attach a raw-tracepoint program (``task_rename``, ``sched_process_exec``)."""
        name = ctypes.create_string_buffer(tracepoint.encode())
        attr = ctypes.create_string_buffer(144)
        struct.pack_into("<QI", attr, 0, ctypes.addressof(name), prog_fd)
        fd, err = bpf(BPF_RAW_TRACEPOINT_OPEN, attr)
        if fd < 0:
            raise AttachError(f"cannot attach to the {tracepoint} tracepoint:"
                              f" {os.strerror(err)}", errno=err, probe=tracepoint)
        self._fds.append(fd)

    def map(self, name: str) -> BpfMap:
        try:
            return self.obj.maps[name]
        except KeyError:
            raise BpfError(f"no BPF map {name} in the program") from None

    def map_fd(self, name: str) -> int:
        return self.map(name).fd

    def attach_perf(self, prog_fd: int, path: str, offset: int, pid: int,
                    ref_ctr_offset: int, retprobe: bool, probe: str) -> None:
        fd, evname = attach_uprobe_perf(prog_fd, path, offset, pid, ref_ctr_offset,
                                        retprobe, probe)
        self._fds.append(fd)
        self._evnames.append(evname)

    def attach_multi(self, prog_fd: int, path: str, offsets: Sequence[int],
                     ref_ctr_offsets: Sequence[int], cookies: Sequence[int], pid: int,
                     retprobe: bool, probe: str) -> None:
        self._fds.append(attach_uprobe_multi(prog_fd, path, offsets, ref_ctr_offsets,
                                             cookies, pid, retprobe, probe))

    def detach(self) -> None:
        """Detach every probe but keep the maps: counts read after this are final."""
        fds, self._fds = self._fds, []
        close_links(fds)
        if self._evnames:
            lib = import_bcc().libbcc.lib
            with _captured_stderr():
                for ev in self._evnames:
                    lib.bpf_detach_uprobe(ev)  # a tracefs entry, if bcc had to make one
            self._evnames.clear()

    def close(self) -> None:
        """Detach everything (links and perf events first), then the programs and maps."""
        self.detach()
        self.obj.close()


class _Noise:
    def __init__(self) -> None:
        self.data = b""

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Noise]:
    """Hold what bcc and clang write to fd 2 (the library must not print)."""
    noise = _Noise()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield noise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            noise.data = tmp.read()


def _attach_error(errno: int, probe: str, path: str, offset: int, ref: int,
                  offsets: Sequence[int] = ()) -> AttachError:
    import errno as E

    where = f"{path}+{offset:#x}"
    if errno in (E.EPERM, E.EACCES):
        return AttachError(f"permission denied attaching {probe} at {where}", errno=errno,
                           probe=probe, hint="tracing needs root (or CAP_BPF+CAP_PERFMON)")
    if errno == E.EINVAL and ref:
        return SemaphoreConflictError(
            f"the kernel refused {probe} at {where}: another uprobe already sits on this"
            f" site with a different semaphore offset (ref_ctr_offset {ref:#x})",
            errno=errno, probe=probe,
            hint="another tracer (bpftrace, bcc, perf, apptrace --semaphores procmem) holds"
                 " a plain uprobe here; stop it, or use --semaphores procmem")
    if errno == E.EINVAL and _semaphore_site(path, offsets or (offset,)):
        # The same refusal seen from the other side: we attach without a
        # ref_ctr_offset (procmem mode) where a uprobe with one already is.
        return SemaphoreConflictError(
            f"the kernel refused {probe} at {where}: this USDT site has a semaphore and"
            " another uprobe already sits on it with the kernel's semaphore handling"
            " (ref_ctr_offset); the kernel will not mix it with one without",
            errno=errno, probe=probe,
            hint="another tracer (apptrace in the default kernel mode, bpftrace, bcc) holds"
                 " this probe; stop it, or use --semaphores kernel as it does")
    if errno == E.ENOENT:
        return AttachError(f"{path} vanished while attaching {probe}", errno=errno,
                           probe=probe)
    if errno == E.ESRCH:
        return AttachError(f"the target process exited while attaching {probe}",
                           errno=errno, probe=probe)
    return AttachError(f"cannot attach {probe} at {where}: {os.strerror(errno)}",
                       errno=errno, probe=probe)


def _semaphore_site(path: str, offsets: Sequence[int]) -> bool:
    """Is any of these file offsets a USDT site with a semaphore? (only asked
    to explain a refusal, so reading the notes again costs nothing that matters)"""
    from apptrace.usdt.notes import ElfImage

    try:
        with ElfImage(path) as img:
            sema = {s.file_offset for s in img.sites() if s.semaphore_offset}
    except ApptraceError:
        return False
    return any(o in sema for o in offsets)


def attach_uprobe_perf(prog_fd: int, path: str, offset: int, pid: int, ref_ctr_offset: int,
                       retprobe: bool, probe: str) -> tuple[int, bytes]:
    """One perf-event uprobe through libbcc's 7-argument ``bpf_attach_uprobe``."""
    lib = import_bcc().libbcc.lib
    evname = b"apptrace_%d_%x_%d" % (os.getpid(), offset, len(path)) + os.urandom(4).hex().encode()
    with _captured_stderr():  # libbcc reports failures on fd 2; we raise instead
        ctypes.set_errno(0)
        fd = lib.bpf_attach_uprobe(prog_fd, 1 if retprobe else 0, evname, os.fsencode(path),
                                   offset, pid, ref_ctr_offset)
        err = ctypes.get_errno() or 22
        if fd < 0:
            lib.bpf_detach_uprobe(evname)  # bcc may have left a tracefs entry behind
    if fd < 0:
        raise _attach_error(err, probe, path, offset, ref_ctr_offset)
    return fd, evname


def attach_uprobe_multi(prog_fd: int, path: str, offsets: Sequence[int],
                        ref_ctr_offsets: Sequence[int], cookies: Sequence[int], pid: int,
                        retprobe: bool, probe: str) -> int:
    """One uprobe_multi link for every offset of one file (kernel >= 6.6)."""
    n = len(offsets)
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    offs = (ctypes.c_uint64 * n)(*offsets)
    refs = (ctypes.c_uint64 * n)(*ref_ctr_offsets)
    cks = (ctypes.c_uint64 * n)(*cookies)
    attr = ctypes.create_string_buffer(144)
    # union bpf_attr.link_create: prog_fd, target_fd, attach_type, flags, then
    # uprobe_multi { path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid }.
    struct.pack_into("<IIII", attr, 0, prog_fd, 0, BPF_TRACE_UPROBE_MULTI, 0)
    struct.pack_into("<QQQQIII", attr, 16, ctypes.addressof(cpath), ctypes.addressof(offs),
                     ctypes.addressof(refs) if any(ref_ctr_offsets) else 0,
                     ctypes.addressof(cks), n, 1 if retprobe else 0, max(pid, 0))
    fd, err = bpf(BPF_LINK_CREATE, attr)
    if fd < 0:
        bad = next((r for r in ref_ctr_offsets if r), 0)
        raise _attach_error(err, probe, path, offsets[0] if offsets else 0, bad, offsets)
    return fd


def self_test(compile_test: bool = True) -> tuple[bool, str]:
    """For ``apptrace doctor``: can bcc be imported and compile a uprobe program?"""
    try:
        bcc = import_bcc()
    except BccUnavailableError as err:
        return False, str(err)
    where = os.path.dirname(bcc.__file__)
    if not compile_test:
        return True, f"importable from {where}"
    text = ("#include <uapi/linux/ptrace.h>\n"
            "BPF_RINGBUF_OUTPUT(apptrace_selftest, 1);\n"
            "int apptrace_selftest_fn(struct pt_regs *ctx) { u64 v = ctx->ip;"
            " apptrace_selftest.ringbuf_output(&v, sizeof(v), 0); return 0; }\n")
    try:
        loaded = LoadedObject(compile_c(text))  # never from the cache: this checks bcc
        try:
            loaded.load("apptrace_selftest_fn")
        finally:
            loaded.close()
    except ApptraceError as err:
        return False, f"{err}"
    return True, f"compiles and loads uprobe programs (bcc from {where})"
