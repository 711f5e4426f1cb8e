"""USDT semaphores raised by writing ``/proc/PID/mem`` (the ``procmem`` mode).

The default mode hands the semaphore's file offset to the kernel
(``ref_ctr_offset``), which covers every process and drops the count if we
die. This mode exists for kernels without it and for users who want to touch
one process only. It is careful about where it writes: the address must fall
in a mapping of the *same file* (device and inode) at the semaphore's file
offset, otherwise we refuse rather than corrupt the target.

What this mode raised must come down on every way out. A raise or a lower
runs with SIGINT, SIGTERM, SIGHUP and the other terminating signals held, so
a signal never lands between
writing the counter and remembering it. Only SIGKILL can stop a tracer
before it lowers: for that case each tracer keeps a small record of what it
raised (in ``/run/apptrace`` as root, else ``$XDG_RUNTIME_DIR/apptrace``),
removed when it lowers them; :func:`reset_left_raised` (``apptrace
semaphores -p PID --reset``) lowers exactly what dead tracers left raised.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from apptrace.errors import (
    ApptraceError,
    ProcessGoneError,
    ProcessNotFoundError,
    SemaphoreError,
    TracePermissionError,
)
from apptrace.procs import TERMINATING_SIGNALS, mapped_objects, read_maps, start_ticks

__all__ = ["ProcMemSemaphores", "semaphore_address", "read_semaphore", "SemaphoreValue",
           "LeftRaised", "list_semaphores", "find_left_raised", "reset_left_raised",
           "state_dir"]



@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Keep the usual ways of ending a process out of a raise/lower (main thread:
    Python runs signal handlers there, so the handler runs after the block)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def semaphore_address(pid: int, binary: str, file_offset: int) -> int:
    """Where the semaphore at ``file_offset`` of ``binary`` lives in PID's memory."""
    try:
        st = os.stat(binary)
    except OSError as err:
        raise SemaphoreError(f"cannot stat {binary}: {err.strerror or err}", pid=pid,
                             errno=err.errno or 0) from err
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    maps = read_maps(pid)
    same_file = [m for m in maps if m.inode == st.st_ino and m.dev == dev]
    if not same_file:
        same_file = [m for m in maps if m.inode == st.st_ino
                     and os.path.basename(m.path) == os.path.basename(binary)]
    for m in same_file:
        if m.offset <= file_offset < m.offset + (m.end - m.start) and "w" in m.perms:
            return m.start + (file_offset - m.offset)
    if same_file:
        raise SemaphoreError(
            f"process {pid} maps {binary} but no writable mapping holds file offset"
            f" {file_offset:#x}; refusing to write its memory", pid=pid)
    raise SemaphoreError(f"process {pid} does not map {binary} (device {dev[0]}:{dev[1]},"
                         f" inode {st.st_ino})", pid=pid,
                         hint="the library may not be loaded yet; kernel mode covers that")


def _mem(pid: int, mode: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", mode | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as err:  # ESRCH: exiting, no memory left
        raise ProcessGoneError(pid) from err
    except PermissionError as err:
        raise TracePermissionError(f"cannot open /proc/{pid}/mem") from err


def read_semaphore(pid: int, address: int) -> int:
    """The 16-bit counter at ``address`` in PID."""
    fd = _mem(pid, os.O_RDONLY)
    try:
        raw = os.pread(fd, 2, address)
    except OSError as err:
        raise SemaphoreError(f"cannot read {address:#x} in process {pid}:"
                             f" {err.strerror or err}", pid=pid, errno=err.errno or 0) from err
    finally:
        os.close(fd)
    if len(raw) != 2:
        raise SemaphoreError(f"cannot read {address:#x} in process {pid}", pid=pid)
    return int(struct.unpack("<H", raw)[0])


@contextlib.contextmanager
def _target_lock(pid: int) -> Iterator[None]:
    """Serialize read-modify-write of PID's counters among apptrace tracers.

    /proc/PID/mem has no atomic add: two tracers raising the same semaphore
    at once both read 0 and both write 1 (seen in CI), and the first to
    finish would then switch the probe off under the other. An flock on a
    per-target file in the state directory orders them; without a state
    directory there is nothing to lock on."""
    base = state_dir(create=True)
    if base is None:
        yield
        return
    fd = os.open(os.path.join(base, f"lock-{pid}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _bump(pid: int, addr: int, delta: int) -> int:
    """Add ``delta`` to the counter (clamped to 0..65535); the new value."""
    with _target_lock(pid):
        return _bump_locked(pid, addr, delta)


def _bump_locked(pid: int, addr: int, delta: int) -> int:
    fd = _mem(pid, os.O_RDWR)
    try:
        (cur,) = struct.unpack("<H", os.pread(fd, 2, addr))
        new = max(0, min(0xFFFF, cur + delta))
        os.pwrite(fd, struct.pack("<H", new), addr)
        return int(new)
    except (OSError, struct.error) as err:
        if getattr(err, "errno", None) == 3 or not os.path.exists(f"/proc/{pid}"):
            raise ProcessGoneError(pid) from err
        raise SemaphoreError(f"cannot update semaphore at {addr:#x} in {pid}: {err}",
                             pid=pid, errno=getattr(err, "errno", 0) or 0) from err
    finally:
        os.close(fd)


# -- records of what a live tracer raised -------------------------------------------------

def state_dir(create: bool = False) -> Optional[str]:
    """Where tracers record raised semaphores: a directory only we can write, or None.

    ``APPTRACE_STATE_DIR`` overrides the default (``/run/apptrace`` for root,
    ``$XDG_RUNTIME_DIR/apptrace`` otherwise).
    """
    base = os.environ.get("APPTRACE_STATE_DIR")
    if not base:
        if os.geteuid() == 0:
            base = "/run/apptrace"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            base = os.path.join(os.environ["XDG_RUNTIME_DIR"], "apptrace")
        else:
            return None
    try:
        if create:
            os.makedirs(base, 0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError:
        return None
    # Someone else's (or a world-writable) directory could feed us records
    # that make us write other processes' memory: never use one.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    return base


def _alive(pid: int, start: int) -> bool:
    try:
        return start_ticks(pid) == start
    except (ProcessNotFoundError, TracePermissionError, ValueError, IndexError):
        return False


class _Record:
    """One tracer's record for one target: written on each raise, removed when lowered."""

    _seq = 0

    def __init__(self, pid: int, target_start: int) -> None:
        self.path: Optional[str] = None
        base = state_dir(create=True)
        if base is None:
            return
        me = os.getpid()
        _Record._seq += 1
        self.path = os.path.join(
            base, f"procmem-{me}-{start_ticks(me)}-{pid}-{_Record._seq}.json")
        self.head = {"tracer": {"pid": me, "start": start_ticks(me)},
                     "target": {"pid": pid, "start": target_start}}

    def save(self, sites: dict[int, tuple[str, int, int, int]], raised: dict[int, int]) -> None:
        if self.path is None:
            return
        doc = dict(self.head, semaphores=[
            {"binary": b, "offset": off, "dev": dev, "inode": ino, "address": addr,
             "count": raised[addr]}
            for addr, (b, off, dev, ino) in sites.items() if raised.get(addr)])
        base = os.path.dirname(self.path)
        try:
            fd, tmp = tempfile.mkstemp(dir=base, prefix=".procmem-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.path)
        except OSError:
            self.path = None  # no record: reset cannot help after a SIGKILL, nothing worse

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class ProcMemSemaphores:
    """Raise semaphores in one process; :meth:`close` lowers each one it raised."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._raised: dict[int, int] = {}  # address -> times we raised it
        self._sites: dict[int, tuple[str, int, int, int]] = {}  # address -> file identity
        self._record = _Record(pid, start_ticks(pid))

    @property
    def record_path(self) -> Optional[str]:
        """The file recording what this object raised (None: none could be written)."""
        return self._record.path

    def add(self, binary: str, file_offset: int) -> int:
        addr = semaphore_address(self.pid, binary, file_offset)
        st = os.stat(binary)
        with _signals_held():
            _bump(self.pid, addr, +1)
            self._raised[addr] = self._raised.get(addr, 0) + 1
            self._sites[addr] = (binary, file_offset, st.st_dev, st.st_ino)
            self._record.save(self._sites, self._raised)
        return addr

    def close(self) -> None:
        """Lower every semaphore we raised. A process that is gone needs nothing."""
        with _signals_held():
            raised, self._raised = self._raised, {}
            try:
                for addr, n in raised.items():
                    _bump(self.pid, addr, -n)
                    raised[addr] = 0
            except ProcessGoneError:
                pass
            except BaseException:
                self._raised = {a: n for a, n in raised.items() if n}
                self._record.save(self._sites, self._raised)
                raise
            self._record.remove()


# -- what `apptrace semaphores -p PID` shows and resets -------------------------------------

@dataclass(frozen=True)
class SemaphoreValue:
    """One USDT semaphore in a running process and its current count.

    ``left_raised`` is how much of the count tracers that died without
    lowering it (SIGKILL) are recorded to have added.
    """

    binary: str
    probe: str
    address: int
    value: int
    left_raised: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"binary": self.binary, "probe": self.probe, "address": self.address,
                "value": self.value, "left_raised": self.left_raised}


@dataclass(frozen=True)
class LeftRaised:
    """A record left by a tracer that is gone: what it raised in one target."""

    record: str
    tracer_pid: int
    entries: tuple[dict[str, Any], ...]


def _records() -> Iterator[tuple[str, dict[str, Any]]]:
    base = state_dir()
    if base is None:
        return
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return
    for name in names:
        if not (name.startswith("procmem-") and name.endswith(".json")):
            continue
        path = os.path.join(base, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd) as f:
                if os.fstat(f.fileno()).st_uid != os.geteuid():
                    continue
                doc = json.load(f)
            tracer, target = doc["tracer"], doc["target"]
            int(tracer["pid"]), int(tracer["start"]), int(target["pid"]), int(target["start"])
            list(doc["semaphores"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        yield path, doc


def find_left_raised(pid: int) -> list[LeftRaised]:
    """Records of dead tracers that raised semaphores in PID (this very process:
    its start time must match). Records whose target is gone are removed."""
    try:
        start = start_ticks(pid)
    except ProcessNotFoundError:
        start = None
    out = []
    for path, doc in _records():
        tracer, target = doc["tracer"], doc["target"]
        if not _alive(int(target["pid"]), int(target["start"])):
            with contextlib.suppress(OSError):
                os.unlink(path)  # its process is gone: nothing to lower, ever
            continue
        if int(target["pid"]) != pid or int(target["start"]) != start:
            continue
        if _alive(int(tracer["pid"]), int(tracer["start"])):
            continue  # a live tracer lowers its own
        out.append(LeftRaised(path, int(tracer["pid"]), tuple(doc["semaphores"])))
    return out


def list_semaphores(pid: int) -> list[SemaphoreValue]:
    """Every USDT semaphore in the objects PID maps, with its current count."""
    from apptrace.usdt.notes import read_probes

    left: dict[int, int] = {}
    for rec in find_left_raised(pid):
        for e in rec.entries:
            left[int(e["address"])] = left.get(int(e["address"]), 0) + int(e["count"])
    out = []
    for shown, real in mapped_objects(pid):
        try:
            probes = read_probes(real, display=shown)
        except ApptraceError:
            continue
        for p in probes:
            offsets = sorted({s.semaphore_offset for s in p.sites if s.semaphore_offset})
            for off in offsets:
                try:
                    addr = semaphore_address(pid, real, off)
                    value = read_semaphore(pid, addr)
                except SemaphoreError:
                    continue
                out.append(SemaphoreValue(shown, p.fullname, addr, value, left.get(addr, 0)))
    return out


def reset_left_raised(pid: int) -> list[tuple[str, int, int, int]]:
    """Lower what dead tracers recorded raising in PID, no more; remove their records.

    Each address is checked again against the file it belongs to (same device,
    inode and offset) before it is written. Returns (binary, address, lowered
    by, value now) per semaphore.
    """
    done = []
    for rec in find_left_raised(pid):
        with _signals_held():
            for e in rec.entries:
                addr = semaphore_address(pid, str(e["binary"]), int(e["offset"]))
                st = os.stat(str(e["binary"]))
                if addr != int(e["address"]) or (st.st_dev, st.st_ino) != (
                        int(e["dev"]), int(e["inode"])):
                    raise SemaphoreError(
                        f"{e['binary']} is not the file a dead tracer raised a semaphore of"
                        f" at {int(e['address']):#x}; not touching process {pid}", pid=pid,
                        hint=f"remove {rec.record} if the process was restarted")
                before = read_semaphore(pid, addr)
                now = _bump(pid, addr, -int(e["count"]))
                done.append((str(e["binary"]), addr, before - now, now))
            os.unlink(rec.record)
    return done
