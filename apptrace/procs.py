"""Processes and the files they map: identity through psutil, maps from /proc.

A PID alone is not an identity: PIDs are reused. :class:`ProcessRef` keeps
pid + create time (psutil's notion), so a tracer notices when "its" process
is gone even if the number came back. Files a process maps are opened through
``/proc/PID/root`` so processes in other mount namespaces (containers) work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from apptrace.errors import (
    ProbeNotFoundError,
    ProcessGoneError,
    ProcessNotFoundError,
    TracePermissionError,
)

__all__ = ["ProcessRef", "Mapping", "read_maps", "resolve_binary", "mapped_objects"]


@dataclass(frozen=True)
class ProcessRef:
    """A process as (pid, create time); compare with :meth:`alive`."""

    pid: int
    create_time: float
    name: str

    @classmethod
    def from_pid(cls, pid: int) -> ProcessRef:
        import psutil  # imported here: `usdt list` without -p does not need it

        try:
            p = psutil.Process(pid)
            return cls(pid, p.create_time(), p.name())
        except psutil.NoSuchProcess as err:
            raise ProcessNotFoundError(pid) from err
        except psutil.AccessDenied as err:
            raise TracePermissionError(f"not allowed to inspect process {pid}") from err
        except ValueError as err:  # negative pid
            raise ProcessNotFoundError(pid) from err

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


@dataclass(frozen=True)
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


def resolve_binary(name: str, pid: Optional[int] = None) -> str:
    """Turn what a user typed into a file path.

    A path is taken as is. With a PID, a library name is matched against
    what that process maps (``libssl`` finds ``/usr/lib/.../libssl.so.3``).
    Otherwise library names go through the dynamic linker's cache (as
    ``dlopen`` would) and other names through ``PATH``.
    """
    if "/" in name:
        path = name if pid is None or name.startswith("/proc/") else _in_root(pid, name)
        if not os.path.exists(path):
            raise ProbeNotFoundError(f"{name}: no such file", probe=name)
        return path
    if pid is not None:
        for shown, real in mapped_objects(pid):
            base = os.path.basename(shown)
            if base == name or base.startswith(name + ".so") or base.startswith(
                    "lib" + name + ".so") or (name.endswith(".so") and base.startswith(name)):
                return real
            if os.path.basename(os.path.realpath(real)) == name:
                return real
    cands: list[str] = []
    for soname, path in _ld_cache():
        if soname == name:
            cands.insert(0, path)
        elif soname.startswith(name + ".so") or soname.startswith("lib" + name + ".so") \
                or (name.endswith(".so") and soname.startswith(name + ".")):
            cands.append(path)
    if cands:
        return cands[0]
    import shutil

    exe = shutil.which(name)
    if exe:
        return exe
    where = f"in process {pid}'s mappings or " if pid is not None else ""
    raise ProbeNotFoundError(f"cannot find {name!r} {where}in the linker cache or PATH",
                             probe=name, hint="give a path instead")


def _in_root(pid: int, path: str) -> str:
    rooted = f"/proc/{pid}/root{path}"
    return rooted if os.path.exists(rooted) else path
