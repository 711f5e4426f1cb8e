"""Processes and the files they map: identity through psutil, maps from /proc.

A PID alone is not an identity: PIDs are reused. :class:`ProcessRef` keeps
pid + create time (psutil's notion), so a tracer notices when "its" process
is gone even if the number came back. Files a process maps are opened through
``/proc/PID/root`` so processes in other mount namespaces (containers) work.
"""

from __future__ import annotations

import os
import signal

from apptrace._records import record
from apptrace.errors import (
    BinaryNotFoundError,
    CommandNotFoundError,
    KernelThreadError,
    ProcessGoneError,
    ProcessNotFoundError,
    SpawnError,
    TracePermissionError,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["ProcessRef", "Mapping", "read_maps", "resolve_binary", "mapped_objects", "nspid",
           "proc_stat", "start_ticks", "check_executable", "TERMINATING_SIGNALS"]

PF_KTHREAD = 0x00200000  # task flag of kernel threads (include/linux/sched.h)

# Signals whose default action ends a process (SIGKILL and SIGSTOP aside, which
# cannot be caught, and the synchronous faults). What apptrace must clean up
# after: the CLI turns each into an orderly exit, procmem semaphore updates
# hold them off for their few instructions.
TERMINATING_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                 "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGVTALRM", "SIGPROF",
                                 "SIGPWR", "SIGIO", "SIGSTKFLT") if hasattr(signal, n)
) + tuple(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (``state`` is index 0).

    The name is skipped by its last ``)``: it may hold spaces and parentheses.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise ProcessNotFoundError(pid) from err
    except PermissionError as err:
        raise TracePermissionError(f"cannot read /proc/{pid}/stat") from err
    return raw[raw.rindex(b")") + 2:].decode("ascii", "replace").split()


def start_ticks(pid: int) -> int:
    """When PID started, in clock ticks since boot: with the PID, an identity
    that survives PID reuse and is the same whoever reads it."""
    return int(proc_stat(pid)[19])


@record
class ProcessRef:
    """A process as (pid, create time); compare with :meth:`alive`."""

    pid: int
    create_time: float
    name: str

    @classmethod
    def from_pid(cls, pid: int) -> ProcessRef:
        import psutil  # imported here: `usdt list` without -p does not need it

        if pid <= 0:  # 0 is the idle task; negatives are process groups to kill(2)
            raise ProcessNotFoundError(pid)
        try:
            p = psutil.Process(pid)
            ref = cls(pid, p.create_time(), p.name())
            zombie = p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess as err:
            raise ProcessNotFoundError(pid) from err
        except psutil.AccessDenied as err:
            raise TracePermissionError(f"not allowed to inspect process {pid}") from err
        except (ValueError, OverflowError) as err:  # out of range
            raise ProcessNotFoundError(pid) from err
        # A kernel thread has no user memory: a uprobe would attach to nothing
        # and wait forever, a USDT search would find no objects.
        if int(proc_stat(pid)[6]) & PF_KTHREAD:
            raise KernelThreadError(pid, ref.name)
        if zombie:
            raise ProcessGoneError(pid)
        return ref

    def alive(self) -> bool:
        import psutil

        try:
            p = psutil.Process(self.pid)
            return p.create_time() == self.create_time and p.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        except psutil.AccessDenied:
            return True

    def check(self) -> None:
        if not self.alive():
            raise ProcessGoneError(self.pid)

    @property
    def root(self) -> str:
        return f"/proc/{self.pid}/root"


@record
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str  # as the process sees it; "" for anonymous

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def read_maps(pid: int) -> list[Mapping]:
    """Parse /proc/PID/maps; a vanished process raises ProcessNotFoundError."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as err:
        raise ProcessNotFoundError(pid) from err
    except ProcessLookupError as err:
        raise ProcessGoneError(pid) from err
    except PermissionError as err:
        raise TracePermissionError(f"cannot read /proc/{pid}/maps") from err
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, end = parts[0].split("-")
        major, minor = parts[3].split(":")
        path = parts[5] if len(parts) > 5 else ""
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        out.append(Mapping(int(start, 16), int(end, 16), parts[1], int(parts[2], 16),
                           (int(major, 16), int(minor, 16)), int(parts[4]), path))
    return out


def mapped_objects(pid: int) -> list[tuple[str, str]]:
    """Distinct files mapped by PID: (path in the process, path to open from here)."""
    seen: dict[str, str] = {}
    for m in read_maps(pid):
        if m.file_backed and m.path not in seen:
            seen[m.path] = f"/proc/{pid}/root{m.path}"
    return list(seen.items())


_ldcache: Optional[list[tuple[str, str]]] = None


def _ld_cache() -> list[tuple[str, str]]:
    """(soname, path) pairs for this architecture from ``ldconfig -p``."""
    global _ldcache
    if _ldcache is None:
        import shutil
        import subprocess

        entries: list[tuple[str, str]] = []
        exe = shutil.which("ldconfig") or "/sbin/ldconfig"
        try:
            text = subprocess.run([exe, "-p"], capture_output=True, text=True,
                                  check=False).stdout
        except OSError:
            text = ""
        for line in text.splitlines()[1:]:
            line = line.strip()
            if " => " not in line:
                continue
            left, path = line.split(" => ", 1)
            soname = left.split(" (", 1)[0].strip()
            if "x86-64" in left or "64bit" in left:
                entries.append((soname, path.strip()))
        _ldcache = entries
    return _ldcache


def which_elf(name: str) -> Optional[str]:
    """The first ELF executable called ``name`` on ``PATH``.

    Wrapper scripts (pyenv's shims, for one) are skipped: probes live in the
    ELF file that finally runs, and a script has none.
    """
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        try:
            if not os.path.isfile(path) or not os.access(path, os.X_OK):
                continue
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return path
        except OSError:
            continue
    return None


def check_executable(path: str, shown: str) -> None:
    """A command must be an executable regular file: say so before spawning it,
    rather than letting exec fail in the child."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise CommandNotFoundError(shown) from err
    except OSError as err:
        raise SpawnError(f"cannot run {shown!r}: {err.strerror}", command=shown,
                         errno=err.errno or 0) from err
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise SpawnError(f"cannot run {shown!r}: {path} is {kind}", command=shown,
                         errno=21 if stat.S_ISDIR(st.st_mode) else 13)
    if not os.access(path, os.X_OK):
        raise SpawnError(f"cannot run {shown!r}: {path} is not executable", command=shown,
                         errno=13, hint="chmod +x it, or run it through its interpreter")


def resolve_binary(name: str, pid: Optional[int] = None) -> str:
    """Turn what a user typed into a file path.

    A path is taken as is. With a PID, a library name is matched against
    what that process maps (``libssl`` finds ``/usr/lib/.../libssl.so.3``).
    Otherwise a name that looks like a library (``libc``, ``libssl.so.3``)
    goes through the dynamic linker's cache (as ``dlopen`` would), and any
    other name is first an executable on ``PATH`` (``python3.11`` is
    ``/usr/bin/python3.11``, not ``libpython3.11.so``), then a library.
    """
    if "/" in name:
        path = name if pid is None or name.startswith("/proc/") else _in_root(pid, name)
        if not os.path.exists(path):
            raise BinaryNotFoundError(f"{name}: no such file", probe=name)
        return path
    # "python3.11" is the executable; "libc", "libssl.so.3", "ssl" name libraries.
    library = name.startswith("lib") or ".so" in name
    if pid is not None:
        mapped = mapped_objects(pid)
        for shown, real in mapped:  # an exact file name wins over a prefix
            if os.path.basename(shown) == name or \
                    os.path.basename(os.path.realpath(real)) == name:
                return real
        for shown, real in mapped:
            base = os.path.basename(shown)
            if base.startswith(name + ".so") or base.startswith("lib" + name + ".so") or (
                    name.endswith(".so") and base.startswith(name)):
                return real
    exe = None if library else which_elf(name)
    if exe:
        return exe
    cands: list[str] = []
    for soname, path in _ld_cache():
        if soname == name:
            cands.insert(0, path)
        elif soname.startswith(name + ".so") or soname.startswith("lib" + name + ".so") \
                or (name.endswith(".so") and soname.startswith(name + ".")):
            cands.append(path)
    if cands:
        return cands[0]
    where = f"in process {pid}'s mappings or " if pid is not None else ""
    raise BinaryNotFoundError(f"cannot find {name!r} {where}in the linker cache or PATH",
                              probe=name, hint="give a path instead")


def _in_root(pid: int, path: str) -> str:
    rooted = f"/proc/{pid}/root{path}"
    return rooted if os.path.exists(rooted) else path


def nspid(pid: int) -> int:
    """The PID as the process itself sees it (its innermost PID namespace):
    what a JVM names its perf map and hsperfdata files after."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return pid
