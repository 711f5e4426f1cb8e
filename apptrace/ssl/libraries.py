"""Which TLS libraries a process (or a file) has, and where their functions are.

A TLS implementation is recognised by its exported symbols, never by a file
name or a version number: OpenSSL (and look-alikes such as BoringSSL or
LibreSSL) by ``SSL_read`` + ``SSL_write``, whether in ``libssl`` or linked
into an executable (node); GnuTLS by ``gnutls_record_send``; NSS by NSPR's
``PR_Write`` together with ``SSL_ImportFD`` in its ``libssl3``. Every
function a library lacks (``SSL_read_ex`` before OpenSSL 1.1.1,
``gnutls_record_send2`` before GnuTLS 3.6) is reported as missing, not an
error. Files are opened through ``/proc/PID/root`` so containers work.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from apptrace.errors import ApptraceError, ElfError
from apptrace.procs import mapped_objects
from apptrace.ssl._kernel import FUNCS
from apptrace.usdt.notes import ElfImage

__all__ = ["TlsLibrary", "Hook", "inspect_file", "libraries_of_pid", "libraries_of_files",
           "needed_libraries", "system_libraries", "KINDS"]

KINDS = ("openssl", "gnutls", "nss", "nss-ssl")

# Control hooks: symbol -> (BPF program, return probe?)
_CONTROL = {
    "openssl": {"SSL_set_fd": "ssl_ctl_set_fd", "SSL_set_rfd": "ssl_ctl_set_fd",
                "SSL_set_wfd": "ssl_ctl_set_fd", "SSL_set_bio": "ssl_ctl_set_bio",
                "SSL_free": "ssl_ctl_free"},
    "gnutls": {"gnutls_transport_set_int2": "ssl_ctl_set_fd",
               "gnutls_transport_set_ptr": "ssl_ctl_set_ptr",
               "gnutls_transport_set_ptr2": "ssl_ctl_set_ptr",
               "gnutls_deinit": "ssl_ctl_free"},
    "nss": {"PR_Close": "ssl_ctl_nss_close"},
    "nss-ssl": {},
}
_RET_CONTROL = {"nss-ssl": {"SSL_ImportFD": "ssl_ctl_nss_import"}}
_LIB_OF_KIND = {"openssl": 0, "gnutls": 1, "nss": 2}

# What marks each kind in a symbol table (all must be present).
_MARKERS = {
    "openssl": (b"SSL_read", b"SSL_write"),
    "gnutls": (b"gnutls_record_send", b"gnutls_record_recv"),
    "nss": (b"PR_Write", b"PR_Read"),
    "nss-ssl": (b"SSL_ImportFD",),
}
_VERSION = re.compile(rb"OpenSSL \d+\.\d+\.\d+[a-z]*(?:-[\w.]+)? +\d+ \w+ \d{4}")

SEARCHED = ("OpenSSL (SSL_read/SSL_write in libssl or in any mapped object)",
            "GnuTLS (gnutls_record_send/recv)",
            "NSS (PR_Read/PR_Write in libnspr4 with SSL_ImportFD in libssl3)")


@dataclass(frozen=True)
class Hook:
    """One probe to attach: a function's file offset and the program to run."""

    symbol: str
    file_offset: int
    program: str
    retprobe: bool = False


@dataclass(frozen=True)
class TlsLibrary:
    """One object with TLS functions: what is hooked in it and what it lacks."""

    kind: str                          # "openssl" | "gnutls" | "nss" | "nss-ssl"
    path: str                          # as the process sees it
    open_path: str                     # the path opened and attached
    static: bool                       # TLS linked into an executable
    functions: tuple[str, ...]         # data functions hooked
    missing: tuple[str, ...]           # data functions this object lacks
    hooks: tuple[Hook, ...] = field(default=(), repr=False)
    file_id: tuple[int, int] = (0, 0)  # (st_dev, st_ino): one attach per file

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "path": self.path, "static": self.static,
                "functions": list(self.functions), "missing": list(self.missing)}

    def describe(self) -> str:
        where = "linked into the executable" if self.static else "shared library"
        if self.kind == "nss-ssl":
            return f"nss: {self.path} (SSL_ImportFD: marks NSPR descriptors that are TLS)"
        text = f"{self.kind}: {self.path} ({where}): {', '.join(self.functions)}"
        if self.missing:
            text += f"; not in this build: {', '.join(self.missing)}"
        return text


def _symbol_bytes(img: ElfImage) -> bytes:
    """The symbol string tables (.dynstr, .strtab), where exported names live."""
    out = []
    for name in (".dynstr", ".strtab"):
        sec = img.section(name)
        if sec is not None:
            try:
                out.append(img._section_bytes(sec))  # noqa: SLF001 - same package family
            except ElfError:
                continue
    return b"\0".join(out)


def _kinds_in(strtab: bytes) -> list[str]:
    return [kind for kind, marks in _MARKERS.items()
            if all(b"\0" + m + b"\0" in strtab for m in marks)]


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def inspect_file(open_path: str, shown: Optional[str] = None) -> list[TlsLibrary]:
    """The TLS libraries inside one ELF file (usually zero or one)."""
    shown = shown or open_path
    try:
        img = ElfImage(open_path, shown)
    except ElfError:
        return []
    try:
        strtab = _symbol_bytes(img)
        kinds = _kinds_in(b"\0" + strtab + b"\0")
        if not kinds:
            return []
        funcs = img.functions()
        static = img.executable or img.section(".interp") is not None
        fid = _file_id(open_path)
        out = []
        for kind in kinds:
            hooks: list[Hook] = []
            found: list[str] = []
            missing: list[str] = []
            for f in FUNCS:
                if _LIB_OF_KIND.get(kind) != f.lib:
                    continue
                off = _offset(img, funcs, f.name)
                if off is None:
                    missing.append(f.name)
                    continue
                found.append(f.name)
                hooks.append(Hook(f.name, off, f"ssl_enter_{f.id}"))
                hooks.append(Hook(f.name, off, "ssl_return", retprobe=True))
            for sym, prog in _CONTROL[kind].items():
                off = _offset(img, funcs, sym)
                if off is not None:
                    hooks.append(Hook(sym, off, prog))
            for sym, prog in _RET_CONTROL.get(kind, {}).items():
                off = _offset(img, funcs, sym)
                if off is not None:
                    hooks.append(Hook(sym, off, prog, retprobe=True))
            if kind != "nss-ssl" and not found:
                continue
            if kind == "nss-ssl" and not hooks:
                continue
            out.append(TlsLibrary(kind, shown, open_path, static, tuple(found),
                                  tuple(missing), tuple(hooks), fid))
        return out
    finally:
        img.close()


def _offset(img: ElfImage, funcs: dict[str, int], name: str) -> Optional[int]:
    vaddr = funcs.get(name)
    if not vaddr:
        return None
    return img.vaddr_to_offset(vaddr, executable=True)


def openssl_without_symbols(open_path: str) -> Optional[str]:
    """Signs of OpenSSL in a file that exports no OpenSSL symbols (linked in,
    then stripped: its functions cannot be found): its version string if
    present, else "OpenSSL" when libssl's source file names are there."""
    try:
        with open(open_path, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                m = _VERSION.search(data)  # type: ignore[call-overload]
                if m:
                    return m.group(0).decode("ascii", "replace")
                if data.find(b"ssl/ssl_lib.c") >= 0:
                    return "OpenSSL"
    except (OSError, ValueError):
        return None
    return None


def _finish_nss(libs: list[TlsLibrary]) -> list[TlsLibrary]:
    """NSPR alone does no TLS: keep NSS only where both halves are there."""
    kinds = {lib.kind for lib in libs}
    if "nss" in kinds and "nss-ssl" in kinds:
        return libs
    return [lib for lib in libs if lib.kind not in ("nss", "nss-ssl")]


def libraries_of_files(files: Iterable[tuple[str, str]],
                       skip: Optional[set[tuple[int, int]]] = None) -> list[TlsLibrary]:
    """TLS libraries among (shown path, path to open) pairs, one per file.

    ``skip``: (st_dev, st_ino) of files already looked at; every file looked
    at here is added to it (a rescan then reads only new files)."""
    out: list[TlsLibrary] = []
    seen: set[tuple[int, int]] = skip if skip is not None else set()
    for shown, real in files:
        try:
            fid = _file_id(real)
        except OSError:
            continue
        if fid in seen:
            continue
        seen.add(fid)
        out.extend(inspect_file(real, shown))
    kept = _finish_nss(out)
    for lib in out:
        if lib not in kept:
            seen.discard(lib.file_id)  # half of NSS: look again once the other half is there
    return kept


def libraries_of_pid(pid: int, skip: Optional[set[tuple[int, int]]] = None
                     ) -> tuple[list[TlsLibrary], list[str]]:
    """(TLS libraries mapped by PID, every object looked at)."""
    objects = mapped_objects(pid)
    return libraries_of_files(objects, skip), [shown for shown, _ in objects]


def needed_libraries(path: str) -> list[str]:
    """DT_NEEDED names of an ELF file, transitively, resolved as the dynamic
    linker's cache would (for a command that has not started yet)."""
    from apptrace.procs import resolve_binary

    out: list[str] = []
    todo = [path]
    seen: set[str] = set()
    while todo:
        cur = todo.pop()
        try:
            img = ElfImage(cur)
        except ElfError:
            continue
        try:
            dyn = img.elf.get_section_by_name(".dynamic")
            names = [t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED"] \
                if dyn is not None else []
        except Exception:  # noqa: BLE001 - pyelftools raises assorted errors on odd files
            names = []
        finally:
            img.close()
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            try:
                real = resolve_binary(name)
            except ApptraceError:
                continue
            out.append(real)
            todo.append(real)
    return out


def system_libraries() -> list[str]:
    """The TLS libraries the dynamic linker would load by name (for programs that
    dlopen them later, as Python's ssl module does)."""
    from apptrace.procs import resolve_binary

    out = []
    for name in ("libssl.so.3", "libssl.so.1.1", "libgnutls.so.30", "libnspr4.so",
                 "libssl3.so"):
        try:
            out.append(resolve_binary(name))
        except ApptraceError:
            continue
    return out
