"""Which JVMs to trace and where their ``libjvm.so`` is: by PID, by name,
system-wide, or a ``java`` command spawned and held until the probes are in.

Self-contained on purpose (procs, psutil, ELF notes only) so it can move into
a common target layer later. Paths are opened through ``/proc/PID/root`` so a
JVM in a container is traced through its own files.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
from dataclasses import dataclass
from typing import Optional, Sequence

from apptrace.engine.target import HeldCommand
from apptrace.errors import (
    ApptraceError,
    CommandNotFoundError,
    ElfError,
    JvmProbesMissingError,
    NoProbesError,
    NotAJvmError,
)
from apptrace.procs import ProcessRef, read_maps
from apptrace.usdt.notes import Site

__all__ = ["LibJvm", "JvmProcess", "libjvm_of", "find_jvms", "installed_libjvms",
           "running_libjvms", "libjvm_for_command", "java_executable", "load_libjvm", "HeldCommand",
           "GC_PROBES"]

# (provider, name) of every probe the GC tracer attaches, and whether a JDK
# without it can still be traced (the safepoint probes are private to HotSpot).
GC_PROBES: dict[tuple[str, str], bool] = {
    ("hotspot", "gc__begin"): True,
    ("hotspot", "gc__end"): True,
    ("hotspot", "mem__pool__gc__begin"): True,
    ("hotspot", "mem__pool__gc__end"): True,
    ("hotspot", "vmops__begin"): True,
    ("hotspot", "vmops__end"): True,
    ("hs_private", "safepoint__begin"): False,
    ("hs_private", "safepoint__end"): False,
}


@dataclass(frozen=True)
class LibJvm:
    """One libjvm.so file and the GC probe sites it has.

    ``path`` opens the file from here (maybe via /proc/PID/root); ``shown`` is
    the path a user recognises; ``key`` (device, inode) tells two paths of one
    file apart from two files.
    """

    path: str
    shown: str
    key: tuple[int, int]
    sites: dict[tuple[str, str], tuple[Site, ...]]

    @property
    def has_safepoint_probes(self) -> bool:
        return bool(self.sites.get(("hs_private", "safepoint__begin"))) and \
            bool(self.sites.get(("hs_private", "safepoint__end")))


@dataclass(frozen=True)
class JvmProcess:
    """A running JVM: its identity and its libjvm."""

    ref: ProcessRef
    libjvm: LibJvm

    @property
    def pid(self) -> int:
        return self.ref.pid


_VENDORS = ("Oracle's OpenJDK and Oracle JDK builds and Amazon Corretto are built without"
            " them; Debian/Ubuntu openjdk, Red Hat and Temurin x86-64 builds have them")


def load_libjvm(path: str, shown: Optional[str] = None) -> LibJvm:
    """Read a libjvm's GC probe sites; a JDK built without them gets a clear error."""
    from apptrace.usdt.notes import read_probes

    shown = shown or path
    try:
        st = os.stat(path)
    except OSError as err:
        raise ElfError(f"cannot open: {err.strerror}", path=shown) from err
    try:
        probes = read_probes(path, display=shown)
    except NoProbesError as err:
        raise JvmProbesMissingError(shown, f"it has no USDT notes (.note.stapsdt); {_VENDORS}"
                                    ) from err
    sites: dict[tuple[str, str], tuple[Site, ...]] = {}
    for p in probes:
        key = (p.provider, p.name)
        if key in GC_PROBES:
            sites[key] = tuple(p.sites)
    missing = [f"{p}:{n}" for (p, n), needed in GC_PROBES.items()
               if needed and not sites.get((p, n))]
    if missing:
        raise JvmProbesMissingError(
            shown, f"its USDT notes lack {', '.join(missing)}; {_VENDORS}")
    return LibJvm(path, shown, (st.st_dev, st.st_ino), sites)


def _mapped_libjvm(pid: int) -> Optional[tuple[str, str]]:
    for m in read_maps(pid):
        if m.file_backed and os.path.basename(m.path) == "libjvm.so":
            return m.path, f"/proc/{pid}/root{m.path}"
    return None


def libjvm_of(pid: int) -> JvmProcess:
    """The JVM with this PID, or a clear error (not a JVM, no probes, gone)."""
    ref = ProcessRef.from_pid(pid)
    found = _mapped_libjvm(pid)
    if found is None:
        raise NotAJvmError(pid, ref.name)
    shown, real = found
    return JvmProcess(ref, load_libjvm(real, shown))


def _is_candidate(name: str, cmdline: Sequence[str], want: str) -> bool:
    """The process name, or a main class (``com.example.Main`` or its last
    part) or jar (``app.jar`` or its path) among the arguments."""
    if name == want or (cmdline and os.path.basename(cmdline[0]) == want):
        return True
    return any(word == want or word.rsplit(".", 1)[-1] == want
               or os.path.basename(word) == want for word in cmdline[1:])


def find_jvms(name: str) -> list[int]:
    """PIDs of running JVMs whose process name, main class or jar is ``name``."""
    import psutil

    out = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            info = p.info
            if info["pid"] == me:
                continue
            if not _is_candidate(info["name"] or "", info["cmdline"] or [], name):
                continue
            if _mapped_libjvm(info["pid"]) is not None:
                out.append(info["pid"])
        except (psutil.Error, ApptraceError):
            continue
    return sorted(out)


def installed_libjvms() -> list[str]:
    """libjvm.so of every JDK installed in the usual places."""
    pats = ["/usr/lib/jvm/*/lib/server/libjvm.so", "/usr/lib/jvm/*/jre/lib/*/server/libjvm.so",
            "/opt/*/lib/server/libjvm.so", "/opt/java/*/lib/server/libjvm.so"]
    home = os.environ.get("JAVA_HOME")
    if home:
        pats.insert(0, os.path.join(home, "lib/server/libjvm.so"))
    out: list[str] = []
    for pat in pats:
        out.extend(sorted(glob.glob(pat)))
    return out


def running_libjvms(pids: Optional[Sequence[int]] = None) -> list[tuple[int, str, str]]:
    """(pid, path shown, path to open) of libjvm.so for running processes."""
    if pids is None:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    out = []
    for pid in pids:
        try:
            found = _mapped_libjvm(pid)
        except ApptraceError:
            continue
        if found is not None:
            out.append((pid, found[0], found[1]))
    return out


def java_executable(command: Sequence[str]) -> str:
    """The file a ``java ...`` command runs (PATH searched once, here)."""
    if not command:
        raise ApptraceError("no command given")
    exe = command[0] if "/" in command[0] else shutil.which(command[0])
    if exe is None or not os.path.exists(exe):
        raise CommandNotFoundError(command[0])
    return exe


def libjvm_for_command(command: Sequence[str]) -> LibJvm:
    """The libjvm.so a ``java ...`` command will load, known before it runs."""
    real = os.path.realpath(java_executable(command))
    home = os.path.dirname(os.path.dirname(real))
    for arg in command[1:]:
        if arg.startswith("-XXaltjvm="):
            alt = arg.split("=", 1)[1]
            cand = alt if alt.endswith(".so") else os.path.join(alt, "libjvm.so")
            if os.path.exists(cand):
                return load_libjvm(cand)
    for rel in ("lib/server/libjvm.so", "jre/lib/amd64/server/libjvm.so",
                "lib/client/libjvm.so"):
        cand = os.path.join(home, rel)
        if os.path.exists(cand):
            return load_libjvm(cand)
    raise ApptraceError(
        f"cannot tell which libjvm.so {shlex.join(command[:1])} would load ({real} is not"
        f" a JDK's bin/java)", hint="run the JDK's java directly after --, or trace"
        " with --all")


