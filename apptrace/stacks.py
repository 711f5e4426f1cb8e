"""User stacks: captured in the kernel, symbolized here with blazesym in batches.

How a stack is captured: ``bpf_get_stack(BPF_F_USER_STACK)`` copies the
frame-pointer chain into the event, so events and stacks never race. The
kernel walks frame pointers, so the traced code must keep them: C/C++ built
with ``-fno-omit-frame-pointer`` (Debian and Fedora build most packages that
way now), a JVM run with ``-XX:+PreserveFramePointer``. Without them a stack
stops after the first frame or two.

Processes that exit before we symbolize: the session snapshots each traced
process's memory map (blazesym's ``cache_process``) when it first sees it and
again now and then while it runs, so a stack is still symbolized after the
process is gone. A probe in a binary mapped after the last snapshot (a
library loaded, fired, and the process gone before the next refresh) is
placed through the probe's own site in that binary.

Java: for a JVM, ``jcmd PID Compiler.perfmap`` writes ``/tmp/perf-<nspid>.map``
(JDK 17+); blazesym reads it for addresses in JIT code. For a JVM in another
PID namespace the map is read through ``/proc/PID/root/tmp`` and copied to the
host's ``/tmp/perf-<pid>.map``, where blazesym looks.

What we cause, we clean up, and only that: the perf maps that did not exist
before we asked for them are removed when the tracker closes, and so is the
JVM's attach socket (``/tmp/.java_pid<pid>``, made by its first attach) when
our attach made it and the JVM has exited without removing it (killed).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from apptrace.errors import ApptraceError, SymbolizerError
from apptrace.events import Event
from apptrace.procs import nspid

if TYPE_CHECKING:
    from apptrace.symbolize import StackFrame

__all__ = ["StackTracker", "write_perf_map", "is_jvm"]


def is_jvm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.rstrip().endswith("/libjvm.so") for line in f)
    except OSError:
        return False


def write_perf_map(pid: int, timeout: float = 30.0) -> str:
    """Ask a JVM to write its perf map; return the host path blazesym will read."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    jcmd = os.path.join(os.path.dirname(exe), "jcmd")
    if not os.path.exists(jcmd):
        jcmd = shutil.which("jcmd") or jcmd
    try:
        r = subprocess.run([jcmd, str(pid), "Compiler.perfmap"], capture_output=True,
                           text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SymbolizerError(f"cannot run {jcmd} for JVM {pid}: {err}",
                              hint="Java frames need jcmd from the same JDK (JDK 17+)") from err
    if r.returncode != 0:
        raise SymbolizerError(f"jcmd {pid} Compiler.perfmap failed: "
                              f"{(r.stdout + r.stderr).strip()[:300]}",
                              hint="needs JDK 17+ and the JVM's attach mechanism enabled")
    host, inner = _perf_maps(pid)
    src = inner if os.path.exists(inner) else host
    _normalize_perf_map(src, host)  # also brings a container's map to the host's /tmp
    return host


def _perf_maps(pid: int) -> tuple[str, str]:
    """(host path blazesym reads, path the JVM writes as seen from the host)."""
    return f"/tmp/perf-{pid}.map", f"/proc/{pid}/root/tmp/perf-{nspid(pid)}.map"


def _attach_socket(pid: int) -> Optional[str]:
    """The JVM's attach socket as the host sees it after the JVM is gone, or
    None for a JVM in another PID namespace (its /tmp is not ours to reach)."""
    return f"/tmp/.java_pid{pid}" if nspid(pid) == pid else None


PERF_MAP_LIMIT = 1 << 30  # a JIT's perf map grows, but not past this


def _normalize_perf_map(src: str, dst: str) -> None:
    """Rewrite a perf map in the plain ``START SIZE name`` hex form.

    JDK 17's ``Compiler.perfmap`` writes ``0x``-prefixed numbers, which
    blazesym rejects as invalid data for the whole lookup.
    """
    from apptrace.output import read_regular, replace_private

    try:
        # The JVM's user controls this path: no FIFO, device or link is followed.
        lines = read_regular(src, PERF_MAP_LIMIT).decode("utf-8", "replace").splitlines()
    except OSError as err:
        raise SymbolizerError(f"cannot read the JVM perf map {src}: {err}") from err
    out = []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3:
            continue
        start, size, name = parts
        try:
            out.append(f"{int(start, 16):x} {int(size, 16):x} {name}")
        except ValueError:
            continue
    # /tmp: a fixed temporary name could be a planted link; root would follow it.
    replace_private(dst, "\n".join(out) + "\n")


class StackTracker:
    """Per-session symbolization state: the symbolizer, cached PIDs, JVM maps."""

    REFRESH = 0.5      # seconds between map snapshots of a live process
    PERFMAP_EVERY = 5.0

    def __init__(self) -> None:
        from apptrace.symbolize import Symbolizer

        self.symbolizer = Symbolizer()
        self._cached: dict[int, float] = {}
        self._perfmap: dict[int, float] = {}
        self._jvm: dict[int, bool] = {}
        # Per JVM: (files our jcmd calls created, attach socket we caused or None).
        self._made: dict[int, tuple[list[str], Optional[str]]] = {}
        self._own_root: dict[int, bool] = {}  # the process sees our "/" (no container)
        self.errors: collections.deque[str] = collections.deque(maxlen=100)  # latest problems

    def watch(self, pid: int, *, force: bool = False) -> None:
        """Snapshot PID's maps now (and the JVM perf map, for a JVM)."""
        now = time.monotonic()
        last = self._cached.get(pid)
        if not force and last is not None and now - last < self.REFRESH:
            return
        jvm = self._jvm.get(pid)
        if jvm is None:  # read the maps once per process, not at every refresh
            jvm = self._jvm[pid] = is_jvm(pid)
            self._own_root[pid] = _same_root(pid)
        if jvm and now - self._perfmap.get(pid, -1e9) > self.PERFMAP_EVERY:
            self._perfmap[pid] = now
            if pid not in self._made:  # before our first attach: what exists already
                maps = [p for p in dict.fromkeys(_perf_maps(pid)) if not os.path.exists(p)]
                sock = _attach_socket(pid)
                self._made[pid] = (maps, sock if sock and not os.path.exists(sock) else None)
            try:
                write_perf_map(pid)
            except ApptraceError as err:
                self.errors.append(str(err))
        try:
            self.symbolizer.cache_process(pid)
            self._cached[pid] = now
        except SymbolizerError:
            self._cached.setdefault(pid, now)  # gone already; keep what we had

    def symbolize(self, events: list[Event],
                  anchors: Optional[list[tuple[str, int]]] = None) -> list[Event]:
        """Fill ``stack`` from ``raw_stack``. ``anchors[i]`` = (binary, site vaddr)
        of event i's probe: for a process gone before its maps were read, the
        probe IP gives that binary's load bias, so its frames still resolve."""
        by_pid: dict[int, list[int]] = {}
        for i, ev in enumerate(events):
            if ev.raw_stack:
                by_pid.setdefault(ev.pid, []).append(i)
        out = list(events)
        for pid, idxs in by_pid.items():
            if pid not in self._cached:
                self.watch(pid, force=True)
            leaf = [events[i].raw_stack[0] for i in idxs]  # type: ignore[index]
            rets = [a for i in idxs for a in events[i].raw_stack[1:]]  # type: ignore[index]
            try:
                leaf_f = self.symbolizer.symbolize_process(pid, leaf)
                ret_f = self.symbolizer.symbolize_process(pid, rets, return_addresses=True)
            except SymbolizerError as err:
                self.errors.append(str(err))
                for i in idxs:
                    out[i] = events[i].replace(stack=self._anchored(
                        events[i].raw_stack or (), anchors[i] if anchors else None))
                continue
            k = 0
            for n, i in enumerate(idxs):
                nret = len(events[i].raw_stack) - 1  # type: ignore[arg-type]
                groups = [leaf_f[n], *ret_f[k:k + nret]]
                k += nret
                if groups[0] and groups[0][0].symbol is None and anchors:
                    # The probe's own address unknown: the snapshot predates the
                    # binary it is in (a library loaded since, then the process
                    # exited). Place that binary through the probe's site.
                    out[i] = events[i].replace(stack=self._anchored(
                        events[i].raw_stack or (), anchors[i], groups))
                    continue
                out[i] = events[i].replace(stack=tuple(f for g in groups for f in g))
        return out

    def _anchored(self, stack: tuple[int, ...], anchor: Optional[tuple[str, int]],
                  known: Optional[list[Sequence[StackFrame]]] = None
                  ) -> tuple[StackFrame, ...]:
        """Frames for ``stack`` with the probe's binary placed by its site:
        ``anchor`` = (binary, site vaddr), and frame 0 is that site. Frames
        outside that binary come from ``known`` (the process lookup), where
        it resolved them."""
        def other(i: int, a: int) -> Sequence[StackFrame]:
            if known is not None and known[i] and known[i][0].symbol is not None:
                return known[i]
            return (_unknown(a),)

        if not stack or anchor is None or not anchor[1]:
            return tuple(f for i, a in enumerate(stack) for f in other(i, a))
        from apptrace.usdt.notes import ElfImage

        binary, vaddr = self._reachable(anchor[0]), anchor[1]
        bias = stack[0] - vaddr
        try:
            with ElfImage(binary) as img:
                lo = min(ld[0] for ld in img.loads)
                hi = max(ld[0] + ld[1] for ld in img.loads)
        except (ApptraceError, ValueError):
            return tuple(f for i, a in enumerate(stack) for f in other(i, a))
        # Frame 0 is the probe IP; the others are return addresses, looked up at -1.
        inside = [(i, a, a - bias - (1 if i else 0)) for i, a in enumerate(stack)
                  if lo <= a - bias - (1 if i else 0) < hi]
        try:
            found = self.symbolizer.symbolize_elf(binary, [v for _, _, v in inside])
        except SymbolizerError:
            return tuple(f for i, a in enumerate(stack) for f in other(i, a))
        by_index = {i: (a, got) for (i, a, _), got in zip(inside, found)}
        frames: list[StackFrame] = []
        for i, a in enumerate(stack):
            if i not in by_index:
                frames.extend(other(i, a))
                continue
            adj = 1 if i and by_index[i][1] and by_index[i][1][0].symbol is not None else 0
            frames.extend(f.replace(addr=a, module=f.module or binary,
                                  offset=f.offset + (adj if not f.inlined else 0))
                          for f in by_index[i][1])
        return tuple(frames)

    def _reachable(self, path: str) -> str:
        """A binary opened through ``/proc/PID/root`` as our own path once
        that process is gone, if it saw our root: a site's binary is named
        so that containers work, and the name dies with the process."""
        if path.startswith("/proc/") and not os.path.exists(path):
            pid, sep, rest = path[len("/proc/"):].partition("/root/")
            if sep and pid.isdigit() and self._own_root.get(int(pid)):
                return "/" + rest
        return path

    def close(self) -> None:
        self.symbolizer.close()
        self._clean_up()

    def _clean_up(self) -> None:
        """Remove the JVM files we caused (see the module docstring)."""
        for pid, (maps, sock) in self._made.items():
            for path in maps:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if sock is not None and not os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)  # the JVM was killed: nobody else will
        self._made.clear()


def _same_root(pid: int) -> bool:
    """Whether the process sees the same "/" as we do (not in a container)."""
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _unknown(addr: int) -> Any:
    from apptrace.symbolize import StackFrame

    return StackFrame(addr=addr, symbol=None, offset=0, file=None, line=None, inlined=False,
                      module=None, reason="process exited before its memory map was read")
