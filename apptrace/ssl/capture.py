"""A TLS plaintext capture: find the TLS libraries, attach, read, decode.

Lifecycle: ``Capture(pid=... | path=... | command=[...])`` → :meth:`start`
(implicit on first read) → iterate (or :meth:`poll`) → :meth:`close` (or
leave the ``with`` block). A capture is single-use. Reading stops when the
target exits (after its last records), when :meth:`stop` is called, or at
the ``duration`` given to :meth:`items`.

A thread drains the ring buffer into memory as soon as records arrive, so a
consumer that formats slowly (a hex dump) does not make the kernel drop
data; past ``backlog_mb`` of undelivered data the thread waits, the ring
fills, and what the kernel then drops is counted and shows as gaps.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import replace
from typing import Any, Iterator, Optional, Sequence

from apptrace import capabilities
from apptrace.engine.target import Target
from apptrace.errors import (
    ApptraceError,
    NoTlsLibraryError,
    OptionError,
    SessionStateError,
    StrippedTlsError,
)
from apptrace.ssl import libraries as _libs
from apptrace.ssl._kernel import (
    CLOSE,
    CONN,
    DATA,
    F_FAULT,
    F_PEEK,
    F_SKIP,
    FUNCS,
    LIB_NAMES,
    LOOP_PLACEHOLDER,
    STAT_NAMES,
    render,
)
from apptrace.ssl.libraries import TlsLibrary
from apptrace.ssl.model import CaptureStats, Chunk, Connection, Gap, Item, Stream, reassemble
from apptrace.ssl.net import kernel_addr, tcp_addresses

__all__ = ["Capture", "capture"]

_FUNC_NAMES = tuple(f.name for f in FUNCS)
_FUNC_DIR = tuple("write" if f.write else "read" for f in FUNCS)

# Tracepoints that tell which socket a TLS call used, with the field offsets
# the BPF side reads (checked against the format files before attaching).
_SYSCALLS = ("read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg")
_TRACEPOINTS: tuple[tuple[str, str, str, dict[str, int]], ...] = tuple(
    ("syscalls", f"sys_enter_{name}", "ssl_tp_sys_enter", {"fd": 16})
    for name in _SYSCALLS) + (
    ("sock", "sock_send_length", "ssl_tp_sock_len", {"sk": 8}),
    ("sock", "sock_recv_length", "ssl_tp_sock_len", {"sk": 8}),
    ("sock", "inet_sock_set_state", "ssl_tp_sk_state",
     {"skaddr": 8, "newstate": 20, "sport": 24, "dport": 26, "family": 28, "protocol": 30,
      "saddr": 32, "daddr": 36, "saddr_v6": 40, "daddr_v6": 56}),
)


class _ConnState:
    __slots__ = ("conn", "expected")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.expected = [0, 0]  # next offset per direction (read, write)


class Capture:
    """Plaintext of every TLS call of one target, as :class:`Chunk` items with
    :class:`Gap` items wherever bytes are missing.

    ``ring_mb``: size of the kernel ring buffer (rounded up to a power of
    two). ``max_bytes``: copy at most this many bytes of each call (the rest
    becomes a ``max-bytes`` gap; default: everything). ``keep``: remember
    every item so :meth:`stream` can reassemble a connection direction.
    ``command_stdout``: where a spawned command's standard output goes.
    ``multi``: force uprobe_multi links on or off (default: when the kernel
    has them; without, one perf-event uprobe per function).
    """

    def __init__(self, *, pid: Optional[int] = None, path: Optional[str] = None,
                 command: Optional[Sequence[str]] = None, ring_mb: int = 32,
                 max_bytes: Optional[int] = None, keep: bool = False,
                 command_stdout: Any = None, backlog_mb: int = 512,
                 rescan_s: float = 1.0, multi: Optional[bool] = None) -> None:
        if not isinstance(ring_mb, int) or not 1 <= ring_mb <= 4096:
            raise OptionError("ring_mb", ring_mb, "an integer from 1 to 4096")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise OptionError("max_bytes", max_bytes, "a positive number of bytes")
        if sum(x is not None for x in (pid, path, command)) != 1:
            raise OptionError("target", {"pid": pid, "path": path, "command": command},
                              "exactly one of pid, path, command")
        self.target = Target(pid=pid, path=path, command=command,
                             command_stdout=command_stdout)
        self.ring_bytes = 1 << (ring_mb * 1024 * 1024 - 1).bit_length()
        self.max_bytes = max_bytes
        self.keep = keep
        self.command_stdout = command_stdout
        self.backlog_bytes = backlog_mb << 20
        self.rescan_s = rescan_s
        self.poll_s = 0.002
        self.libraries: list[TlsLibrary] = []
        self.searched: list[str] = []
        self.warnings: list[str] = []
        self.attach_seconds = 0.0
        self.ended: Optional[str] = None   # why reading stopped
        # wall clock = monotonic (bpf_ktime_get_ns) + this
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self._state = "new"
        self._program: Any = None
        self._loader: Any = None
        self._ring: Any = None
        self._prog_fds: dict[tuple[str, bool], int] = {}
        self._attached: set[tuple[int, int]] = set()
        self._inspected: set[tuple[int, int]] = set()  # files looked at for TLS
        self._multi = capabilities.has_uprobe_multi() if multi is None else multi
        self._queue: collections.deque[list[tuple[Any, ...]]] = collections.deque()
        self._queued_bytes = 0
        self._in_hand = False
        self._cond = threading.Condition()
        self._drainer: Optional[threading.Thread] = None
        self._stop_drain = threading.Event()
        self._stopping = threading.Event()
        self._drain_error: Optional[BaseException] = None
        self._conns: dict[tuple[int, int], _ConnState] = {}
        self._all_conns: dict[int, Connection] = {}
        self._next_id = 1
        self._comms: dict[bytes, str] = {}
        self._kept: list[Item] = []
        self._chunks = 0
        self._gaps = 0
        self._last_rescan = 0.0
        self._final_stats: Optional[CaptureStats] = None
        self._finished = False

    # -- context manager --------------------------------------------------------

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    # -- starting ---------------------------------------------------------------

    def _pid(self) -> int:
        """The PID probes are limited to (-1: system-wide)."""
        pid = self.target.pid
        return -1 if pid is None else pid

    def _find_libraries(self) -> list[TlsLibrary]:
        t = self.target
        if t.process is not None and t.child is None:
            libs, objects = _libs.libraries_of_pid(t.process.pid, self._inspected)
            self.searched = objects
            if libs:
                return libs
            exe = _exe_of(t.process.pid)
            what = _libs.openssl_without_symbols(f"/proc/{t.process.pid}/exe")
            if what:
                raise StrippedTlsError(exe or f"process {t.process.pid}'s executable", what)
            raise NoTlsLibraryError(
                f"process {t.process.pid} ({t.process.name}) uses no TLS library apptrace"
                f" knows: looked for {'; '.join(_libs.SEARCHED)} in its {len(objects)}"
                f" mapped files (executable {exe or '?'})",
                searched=tuple(objects),
                hint="if it loads one later, start the capture after that or run it with"
                     " `apptrace ssl -- CMD`")
        if t.path is not None:
            libs = _libs.libraries_of_files([(t.path, t.path)])
            self.searched = [t.path]
            if libs:
                return libs
            what = _libs.openssl_without_symbols(t.path)
            if what:
                raise StrippedTlsError(t.path, what)
            needed = [p for p in _libs.needed_libraries(t.path)
                      if _libs.libraries_of_files([(p, p)])]
            hint = (f"it links {', '.join(needed)}: give --path with that library to capture"
                    " every process using it, or -p PID / -- CMD for one program"
                    if needed else "give a TLS library (libssl, libgnutls, libnspr4) or a"
                                   " program with OpenSSL linked in")
            raise NoTlsLibraryError(f"{t.path} has no TLS functions: looked for"
                                    f" {'; '.join(_libs.SEARCHED)}", searched=(t.path,),
                                    hint=hint)
        held = t.child
        assert held is not None
        files = [held.exe, *_libs.needed_libraries(held.exe), *_libs.system_libraries()]
        self.searched = files
        libs = _libs.libraries_of_files([(f, f) for f in files], self._inspected)
        if libs:
            return libs
        what = _libs.openssl_without_symbols(held.exe)
        if what:
            raise StrippedTlsError(held.exe, what)
        raise NoTlsLibraryError(f"{held.exe} uses no TLS library apptrace knows and none is"
                                f" installed: looked for {'; '.join(_libs.SEARCHED)}",
                                searched=tuple(files))

    def start(self) -> None:
        """Find the libraries, compile (or take from the cache), attach, then let a
        held command run."""
        if not capabilities.may_start(self._state, "this capture"):
            return
        t0 = time.monotonic()
        self._state = "starting"
        try:
            self.target.resolve()
            if self.target.command is not None:
                self.target.spawn()
            libs = self._find_libraries()
            self._load()
            for lib in libs:
                self._attach(lib)
            self._attach_tracepoints()
            self._drainer = threading.Thread(target=self._drain_loop, name="apptrace-ssl-drain",
                                             daemon=True)
            self._drainer.start()
            if self.target.child is not None:
                self.target.child.release()
            self._state = "running"
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.monotonic() - t0
        self._last_rescan = time.monotonic()

    def _load(self) -> None:
        from apptrace.bpf import Program
        from apptrace.ssl._loader import Loader
        from apptrace.ssl._ring import TlsRing

        self._program = Program(render(self.ring_bytes // 4096))
        self._loader = Loader(self._program)
        if self.max_bytes:
            import struct

            self._program.map("ssl_cfg").update(struct.pack("<I", 0),
                                                struct.pack("<Q", self.max_bytes))
        self._ring = TlsRing(self._program.map_fd("ssl_rb"), self.ring_bytes)

    def _prog(self, name: str, retprobe: bool) -> int:
        key = (name, retprobe)
        fd = self._prog_fds.get(key)
        if fd is None:
            if name == "ssl_return":
                fd = self._loader.with_callback(name, "ssl_chunk", LOOP_PLACEHOLDER,
                                                multi=self._multi)
            else:
                fd = self._loader.uprobe(name, multi=self._multi)
            self._prog_fds[key] = fd
        return fd

    def _attach(self, lib: TlsLibrary) -> None:
        if lib.file_id in self._attached:
            return
        pid = self._pid()
        groups: dict[tuple[str, bool], list[tuple[int, int]]] = {}
        for h in lib.hooks:
            prog, cookie = h.program, 0
            if self._multi and prog.startswith("ssl_enter_"):
                # one link for every data function of the library (fewer links:
                # each costs an RCU grace period to detach)
                prog, cookie = "ssl_enter", int(prog[len("ssl_enter_"):])
            groups.setdefault((prog, h.retprobe), []).append((h.file_offset, cookie))
        for (prog, ret), rows in groups.items():
            fd = self._prog(prog, ret)
            label = f"{lib.kind}:{os.path.basename(lib.path)}:{prog}"
            offsets = [r[0] for r in rows]
            if self._multi:
                self._program.attach_multi(fd, lib.open_path, offsets, [0] * len(offsets),
                                           [r[1] for r in rows], pid, ret, label)
            else:
                for off in offsets:
                    self._program.attach_perf(fd, lib.open_path, off, pid, 0, ret, label)
        self._attached.add(lib.file_id)
        self._inspected.add(lib.file_id)
        self.libraries.append(lib)

    def _attach_tracepoints(self) -> None:
        from apptrace.ssl._loader import tracepoint_fields

        fds: dict[str, int] = {}
        missing = []
        for category, event, prog, want in _TRACEPOINTS:
            fields = tracepoint_fields(category, event)
            if fields is None or any(fields.get(k) != v for k, v in want.items()):
                missing.append(f"{category}:{event}")
                continue
            if prog not in fds:
                fds[prog] = self._loader.tracepoint(prog)
            self._loader.attach_tracepoint(fds[prog], category, event)
        if missing:
            self.warnings.append(
                "tracepoints missing or of another layout (" + ", ".join(missing) + "):"
                " connections may show no socket or addresses")

    def _rescan(self) -> None:
        """Attach TLS libraries the target loaded since (``dlopen``)."""
        pid = self._pid()
        if pid < 0 or not self.target.alive():
            return
        try:
            libs, _ = _libs.libraries_of_pid(pid, self._inspected)
        except ApptraceError:
            return
        for lib in libs:
            if lib.file_id not in self._attached:
                try:
                    self._attach(lib)
                except ApptraceError as err:
                    self.warnings.append(f"cannot attach {lib.path}: {err}")

    # -- reading ------------------------------------------------------------------

    def _drain_loop(self) -> None:
        """Copy records out of the ring as they come. Records are submitted
        without wake-ups (BPF_RB_NO_WAKEUP): the traced program never pays for
        waking us; we look every 2 ms while data flows and up to every 10 ms
        when idle (the default 32 MiB ring holds far more than that)."""
        ring = self._ring
        idle = 0
        try:
            while not self._stop_drain.is_set():
                with self._cond:
                    while self._queued_bytes > self.backlog_bytes and \
                            not self._stop_drain.is_set():
                        self._cond.wait(0.1)
                if not ring.pending():
                    idle = min(idle + 1, 5)
                    time.sleep(self.poll_s * idle)
                    continue
                idle = 0
                recs: list[tuple[Any, ...]] = []
                size = 0
                with self._cond:
                    self._in_hand = True  # taken from the ring, not yet queued
                try:
                    recs = ring.drain()
                    size = sum(len(r[-1]) for r in recs if r[0] == DATA) + 64 * len(recs)
                finally:
                    with self._cond:
                        if recs:
                            self._queue.append(recs)
                            self._queued_bytes += size
                        self._in_hand = False
                        self._cond.notify_all()
                if not recs:
                    # Data pending but nothing complete: a record still being
                    # written (a 16 KiB chunk takes a while). Wait, don't spin.
                    time.sleep(self.poll_s)
        except BaseException as err:  # noqa: BLE001 - surfaced by poll()
            self._drain_error = err
        finally:
            with self._cond:
                self._cond.notify_all()

    def poll(self, timeout: Optional[float] = None) -> list[Item]:
        """Items that arrived, waiting up to ``timeout`` seconds for the first."""
        self.start()
        if self._state != "running":
            return []
        with self._cond:
            if timeout is None:
                # until something arrives, the target is gone or stop() is called
                while not self._queue and not self._stopping.is_set() and \
                        self.target.alive():
                    self._cond.wait(0.1)
            elif not self._queue and timeout > 0:
                self._cond.wait(timeout)
            batches = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        if self._drain_error is not None:
            err, self._drain_error = self._drain_error, None
            raise ApptraceError(f"reading the TLS ring buffer failed: {err}") from err
        out: list[Item] = []
        for recs in batches:
            out.extend(self._decode(recs))
        if self.rescan_s and time.monotonic() - self._last_rescan > self.rescan_s:
            self._last_rescan = time.monotonic()
            self._rescan()
        if self.keep:
            self._kept.extend(out)
        return out

    def _drained(self) -> bool:
        """Nothing left anywhere: not in the ring, not in the drain thread's hands,
        not queued."""
        with self._cond:
            return not self._queue and not self._in_hand and not self._ring.pending()

    def items(self, duration: Optional[float] = None) -> Iterator[Item]:
        """Yield items until the target exits (a path target: until :meth:`stop`),
        or for ``duration`` seconds."""
        for batch in self.batches(duration):
            yield from batch

    def batches(self, duration: Optional[float] = None) -> Iterator[list[Item]]:
        """Like :meth:`items`, one list per ring drain (a writer flushes after each)."""
        self.start()
        deadline = None if duration is None else time.monotonic() + duration
        while True:
            if self._stopping.is_set():
                self.ended = self.ended or "stopped"
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.ended = "duration"
                break
            alive = self.target.alive()
            got = self.poll(0.1 if remaining is None else min(0.1, remaining))
            if got:
                yield got
            if not alive and not got and self._drained():
                time.sleep(0.01)  # the drain thread's last batch
                if self._drained():
                    self.ended = "target exited"
                    break
        last = self.poll(0) + self._finish()
        if last:
            yield last

    def stop(self) -> None:
        """End the iteration (from another thread, a signal handler or a callback)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _finish(self) -> list[Item]:
        """Gaps at the end of open connections: records lost after the last one seen."""
        if self._finished or self._program is None:
            return []
        self._finished = True
        import struct

        out: list[Item] = []
        conns = self._program.map("ssl_conns")
        for (pid, handle), st in list(self._conns.items()):
            raw = conns.lookup(struct.pack("<IIQ", pid, 0, handle))
            if raw is None:
                continue
            final = struct.unpack_from("<QQ", raw)
            out.extend(self._tail_gaps(st, final, 0))
        if self.keep:
            self._kept.extend(out)
        return out

    def _tail_gaps(self, st: _ConnState, final: Sequence[int], ts: int) -> list[Item]:
        out: list[Item] = []
        for d, direction in enumerate(("read", "write")):
            if final[d] > st.expected[d]:
                out.append(Gap(ts, st.conn.pid, 0, "", st.conn.lib, "", direction, st.conn,
                               st.expected[d], final[d] - st.expected[d], "lost"))
                st.expected[d] = final[d]
                self._gaps += 1
        return out

    # -- decoding -----------------------------------------------------------------

    def _comm(self, raw: bytes) -> str:
        name = self._comms.get(raw)
        if name is None:
            name = self._comms[raw] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return name

    def _state_for(self, pid: int, handle: int, lib: int) -> _ConnState:
        st = self._conns.get((pid, handle))
        if st is None:
            conn = Connection(self._next_id, pid, handle, LIB_NAMES[lib])
            self._next_id += 1
            st = self._conns[(pid, handle)] = _ConnState(conn)
            self._all_conns[conn.id] = conn
        return st

    def _decode(self, recs: list[tuple[Any, ...]]) -> list[Item]:
        out: list[Item] = []
        append = out.append
        for r in recs:
            kind = r[0]
            if kind == DATA:
                (_, func, flags, lib, pid, tid, _n, ts, handle, off, call_len, call_off, span,
                 comm, payload) = r
                st = self._state_for(pid, handle, lib)
                direction = _FUNC_DIR[func]
                name = self._comm(comm)
                fname = _FUNC_NAMES[func]
                if flags & F_PEEK:
                    if not flags & (F_FAULT | F_SKIP):
                        self._chunks += 1
                        append(Chunk(ts, pid, tid, name, st.conn.lib, fname, direction,
                                     st.conn, off, payload, call_len, call_off, True))
                    continue
                d = 1 if direction == "write" else 0
                exp = st.expected[d]
                if off < exp:
                    # The kernel's offsets restarted: the object is a new connection.
                    del self._conns[(pid, handle)]
                    old = st.conn
                    st = self._state_for(pid, handle, lib)
                    st.conn = replace(st.conn, fd=old.fd, laddr=old.laddr, raddr=old.raddr)
                    self._all_conns[st.conn.id] = st.conn
                    exp = 0
                if off > exp:
                    self._gaps += 1
                    append(Gap(ts, pid, tid, name, st.conn.lib, fname, direction, st.conn, exp,
                               off - exp, "lost"))
                if flags & F_FAULT:
                    self._gaps += 1
                    append(Gap(ts, pid, tid, name, st.conn.lib, fname, direction, st.conn, off,
                               span, "unreadable"))
                elif flags & F_SKIP:
                    self._gaps += 1
                    append(Gap(ts, pid, tid, name, st.conn.lib, fname, direction, st.conn, off,
                               span, "max-bytes"))
                else:
                    self._chunks += 1
                    append(Chunk(ts, pid, tid, name, st.conn.lib, fname, direction, st.conn,
                                 off, payload, call_len, call_off))
                st.expected[d] = off + span
            elif kind == CONN:
                (_, lib, family, _why, pid, _tid, fd, _ts, handle, _sk, lport, rport, _pad,
                 laddr, raddr, _comm) = r
                st = self._state_for(pid, handle, lib)
                local = kernel_addr(family, laddr, lport) if family else None
                remote = kernel_addr(family, raddr, rport) if family else None
                if local is None and fd >= 0:
                    found = tcp_addresses(pid, fd)
                    if found is not None:
                        local, remote = found
                st.conn = replace(st.conn, lib=LIB_NAMES[lib],
                                  fd=fd if fd >= 0 else st.conn.fd,
                                  laddr=local or st.conn.laddr, raddr=remote or st.conn.raddr)
                self._all_conns[st.conn.id] = st.conn
            elif kind == CLOSE:
                (_, _lib, _p0, _p1, pid, _tid, _p2, ts, handle, off_r, off_w) = r
                gone = self._conns.pop((pid, handle), None)
                if gone is not None:
                    out.extend(self._tail_gaps(gone, (off_r, off_w), ts))
        return out

    # -- results ------------------------------------------------------------------

    @property
    def not_found(self) -> list[str]:
        """TLS implementations looked for and absent from the target."""
        kinds = {lib.kind for lib in self.libraries}
        names = {"openssl": "OpenSSL", "gnutls": "GnuTLS", "nss": "NSS"}
        return [name for kind, name in names.items() if kind not in kinds]

    @property
    def connections(self) -> list[Connection]:
        """Every connection seen, latest state, in order of appearance."""
        return [self._all_conns[k] for k in sorted(self._all_conns)]

    def stream(self, conn: Connection | int, direction: str) -> Stream:
        """One connection direction reassembled from what this capture kept
        (``keep=True``)."""
        if not self.keep:
            raise SessionStateError("stream() needs Capture(keep=True)")
        return reassemble(self._kept, conn, direction)

    @property
    def kept(self) -> list[Item]:
        return list(self._kept)

    def stats(self) -> CaptureStats:
        """Counts so far (after close: as they were at close)."""
        if self._program is None:
            return self._final_stats or CaptureStats()
        import struct

        m = self._program.map("ssl_stats")
        k = {name: m.sum_u64(struct.pack("<I", i)) for i, name in enumerate(STAT_NAMES)}
        st = CaptureStats(
            calls=k["calls"], bytes=k["bytes"], chunks=self._chunks,
            connections=len(self._all_conns), lost_records=k["lost_records"],
            lost_bytes=k["lost_bytes"], unreadable_bytes=k["fault_bytes"],
            skipped_bytes=k["skipped_bytes"], gaps=self._gaps,
            lost_meta=k["lost_conn_records"] + k["lost_close_records"],
            nested_calls=k["nested_calls"], failed_calls=k["failed_calls"],
            malformed=(self._ring.malformed + self._ring.discarded) if self._ring else 0)
        self._final_stats = st
        return st

    @property
    def exit_status(self) -> Optional[int]:
        """A spawned command's exit status (negative: the signal that ended it)."""
        return self.target.exit_status

    def close(self) -> None:
        """Detach everything, stop the drain thread, stop a spawned command."""
        if self._state == "closed":
            return
        if self._program is not None:
            try:
                self.stats()
            except ApptraceError:
                pass
        self._state = "closed"
        self._stop_drain.set()
        with self._cond:
            self._cond.notify_all()
        if self._drainer is not None:
            self._drainer.join(5)
            self._drainer = None
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._program is not None:
            self._program.close()
            self._program = None
        self.target.close()


def capture(*, pid: Optional[int] = None, path: Optional[str] = None,
            command: Optional[Sequence[str]] = None, **options: Any) -> Capture:
    """A started :class:`Capture`; use it as a context manager::

        with apptrace.ssl.capture(pid=1234) as cap:
            for item in cap:          # Chunk, or Gap where bytes are missing
                print(item.conn.five_tuple, item.direction, item.data[:60])
    """
    cap = Capture(pid=pid, path=path, command=command, **options)
    cap.start()
    return cap


def _exe_of(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None

