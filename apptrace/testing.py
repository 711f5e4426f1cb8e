"""Assert, in a test, on what a program did: probes it hit, TLS bytes it sent,
GC pauses it took.

A *recorder* traces a program while a test drives it and hands back a
:class:`Run`: the recorded events, counts, the program's exit status and
output, immutable. Runs have assertion helpers whose failures show what was
expected next to what fired::

    from apptrace.testing import run

    r = run(["fixtures/c/out/server", "3"], probes=["usdt:myapp:request__done(str,int)"])
    r.assert_fired("myapp:request__done", count=3, where=lambda ev: ev.args[1] == 200)

:func:`run` starts a command held before its first instruction until every
probe is attached (nothing early is missed) and waits for it to end;
:func:`start` does the same without waiting; :func:`attach` records a
running process until :meth:`Recorder.stop`. ``tls=True`` captures TLS
plaintext (:mod:`apptrace.ssl`), ``gc=True`` a JVM's GC pauses
(:mod:`apptrace.jvm`). A run saves as JSON lines (:meth:`Run.save`) and
:func:`load` reads it back for asserting later.

Works from pytest (the ``apptrace`` fixture of :mod:`apptrace.pytest_plugin`),
unittest or a plain script. Failed expectations raise
:class:`~apptrace.errors.TraceAssertionError`, an ``AssertionError``.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import inspect
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from apptrace.errors import (
    ApptraceError,
    OptionError,
    RunFileError,
    RunTimeoutError,
    TraceAssertionError,
)
from apptrace.events import Event, ProbeInfo, Stats, Unavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from apptrace.jvm import GcPause
    from apptrace.ssl import Connection

__all__ = ["Recorder", "Run", "RunStats", "attach", "jvm_unavailable", "load", "run", "start",
           "tracing_unavailable"]

FORMAT = "apptrace-run"
VERSION = 1
_SHOWN = 30          # events listed in a failure message, at most
_POLL_S = 0.05       # how long a recorder thread waits for data per round

Where = Callable[[Event], Any]
ArgSpec = Union[Sequence[Any], Mapping[int, Any]]


# -- what a run holds ---------------------------------------------------------


@dataclass(frozen=True)
class RunStats:
    """Counts of the probe events, frozen: delivered, lost in the kernel (ring
    buffer full), cut strings, faulted reads, per probe label."""

    events: int = 0
    lost: int = 0
    truncated_strings: int = 0
    read_faults: int = 0
    per_probe: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    lost_per_probe: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    decode_errors: int = 0

    @classmethod
    def from_stats(cls, s: Stats) -> RunStats:
        return cls(s.events, s.lost, s.truncated_strings, s.read_faults,
                   MappingProxyType(dict(s.per_probe)), MappingProxyType(dict(s.lost_per_probe)),
                   s.decode_errors)

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "lost": self.lost,
                "truncated_strings": self.truncated_strings, "read_faults": self.read_faults,
                "per_probe": dict(self.per_probe), "lost_per_probe": dict(self.lost_per_probe),
                "decode_errors": self.decode_errors}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunStats:
        return cls(int(d.get("events", 0)), int(d.get("lost", 0)),
                   int(d.get("truncated_strings", 0)), int(d.get("read_faults", 0)),
                   MappingProxyType({str(k): int(v) for k, v in d.get("per_probe", {}).items()}),
                   MappingProxyType({str(k): int(v)
                                     for k, v in d.get("lost_per_probe", {}).items()}),
                   int(d.get("decode_errors", 0)))


@dataclass(frozen=True)
class Run:
    """What one recording saw. Immutable; every collection is a tuple.

    ``events``: probe events in time order (:class:`~apptrace.events.Event`);
    ``tls``: TLS :class:`~apptrace.ssl.Chunk` and :class:`~apptrace.ssl.Gap`
    items; ``gc``: :class:`~apptrace.jvm.GcPause` and ``GcCycle`` items.
    ``exit_status`` is the command's (negative: the signal that ended it;
    None for a process that was attached to, or one still running);
    ``stdout`` its standard output (its stderr is not captured: it goes where
    the recording process's stderr goes).
    """

    argv: Optional[tuple[str, ...]] = None
    pid: Optional[int] = None
    exit_status: Optional[int] = None
    stdout: bytes = b""
    probes: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    stats: RunStats = RunStats()
    tls: tuple[Any, ...] = ()
    tls_lost: int = 0
    gc: tuple[Any, ...] = ()
    gc_lost: int = 0
    duration_s: float = 0.0
    warnings: tuple[str, ...] = ()
    finished: bool = True    # False for a snapshot of a recording still going on

    # -- reading ---------------------------------------------------------------

    @property
    def output(self) -> str:
        """The command's standard output as text."""
        return self.stdout.decode("utf-8", "replace")

    def select(self, probe: Optional[str] = None, *, args: Optional[ArgSpec] = None,
               where: Optional[Where] = None) -> tuple[Event, ...]:
        """The events of ``probe`` (see :meth:`assert_fired` for how it is
        matched; None: every probe) whose arguments match ``args`` and for
        which ``where(event)`` is true, in time order."""
        return tuple(ev for ev in self.events
                     if (probe is None or _probe_matches(probe, ev.probe))
                     and _why_not(ev, args, where) is None)

    def count(self, probe: Optional[str] = None, *, args: Optional[ArgSpec] = None,
              where: Optional[Where] = None) -> int:
        return len(self.select(probe, args=args, where=where))

    def args_of(self, probe: str, *, where: Optional[Where] = None) -> list[tuple[Any, ...]]:
        """The arguments of each event of ``probe``, in order: compare them with
        ``==`` to check every value at once."""
        return [ev.args for ev in self.select(probe, where=where)]

    # -- probe assertions --------------------------------------------------------

    def assert_fired(self, probe: str, *, count: Optional[int] = None,
                     at_least: Optional[int] = None, args: Optional[ArgSpec] = None,
                     where: Optional[Where] = None) -> tuple[Event, ...]:
        """Assert that ``probe`` fired: exactly ``count`` times, at least
        ``at_least`` times, or (neither given) at least once, counting only
        events whose arguments match ``args`` and for which ``where(event)``
        is true. Returns the matching events.

        ``probe`` is the probe's ``provider:name`` (or symbol), its label
        (``usdt:myapp:request__done``) or the probe string it was traced with;
        ``*``/``?`` globs work. ``args`` lists expected values by position
        (``("/items/0", 200)``), or maps positions to them (``{1: 404}``); a
        value may be ``...`` (anything), a type (``int``), a compiled regular
        expression (searched in a string) or a callable returning true.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        if count is not None and at_least is not None:
            raise OptionError("count", count, "not given together with at_least")
        for name, value in (("count", count), ("at_least", at_least)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise OptionError(name, value, "a count (an integer >= 0)")
        got = self.select(probe, args=args, where=where)
        if count is not None:
            ok, want = len(got) == count, _times(count)
        else:
            need = 1 if at_least is None else at_least
            ok, want = len(got) >= need, f"at least {_times(need)}"
        if not ok:
            self._fail_probe(f"expected {probe} to fire {want}{_conditions(args, where)};"
                             f" it fired {_times(len(got))}", probe, args, where)
        return got

    def assert_not_fired(self, probe: str, *, args: Optional[ArgSpec] = None,
                         where: Optional[Where] = None) -> None:
        """Assert that no event of ``probe`` matching ``args``/``where`` was recorded."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        got = self.select(probe, args=args, where=where)
        if got:
            self._fail_probe(f"expected {probe} not to fire{_conditions(args, where)};"
                             f" it fired {_times(len(got))}", probe, args, where)

    def assert_order(self, *steps: Union[str, tuple[str, ArgSpec]]) -> tuple[Event, ...]:
        """Assert that events matching ``steps`` happened in this order (others may
        come between). A step is a probe, or ``(probe, args)``. Returns the
        events that matched, one per step (the earliest that fits)."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        if not steps:
            raise OptionError("steps", steps, "at least one probe")
        found: list[Event] = []
        i = 0
        for n, step in enumerate(steps):
            probe, args = (step, None) if isinstance(step, str) else (step[0], step[1])
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                if _probe_matches(probe, ev.probe) and _why_not(ev, args, None) is None:
                    found.append(ev)
                    break
            else:
                after = (f" after: {_ev_line(found[-1], self._t0).strip()}" if found
                         else " at all")
                wanted = " -> ".join(_step_text(s) for s in steps)
                self._fail_probe(f"expected the order {wanted}; step {n + 1}"
                                 f" ({_step_text(step)}) did not happen{after}",
                                 probe, args, None, mark_all=True)
        return tuple(found)

    def assert_exit_status(self, status: int = 0) -> None:
        """Assert how the command ended; the failure shows the end of its output."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        if self.exit_status != status:
            tail = "\n".join(self.output.splitlines()[-15:])
            raise TraceAssertionError(
                f"expected {_argv_text(self.argv)} to exit with status {status}; it"
                f" {'is still running' if self.exit_status is None else 'exited with status'}"
                f"{'' if self.exit_status is None else ' ' + str(self.exit_status)}\n"
                f"last lines of its output:\n{_indent(tail or '(none)')}")

    # -- TLS ---------------------------------------------------------------------

    @property
    def connections(self) -> tuple[Connection, ...]:
        """Every TLS connection seen, in order of appearance (latest state)."""
        seen: dict[int, Connection] = {}
        for it in self.tls:
            seen[it.conn.id] = it.conn
        return tuple(seen[k] for k in sorted(seen))

    def stream(self, conn: Union[Connection, int], direction: str) -> Any:
        """One connection direction put back together (an :class:`apptrace.ssl.Stream`)."""
        from apptrace.ssl import reassemble

        if direction not in ("read", "write"):
            raise OptionError("direction", direction, "'read' or 'write'")
        try:
            return reassemble(self.tls, conn, direction)
        except LookupError as err:  # reassemble's own: no data that way
            raise OptionError("conn", conn, f"a connection with {direction} data"
                              f" ({err})") from err

    def sent(self, conn: Union[Connection, int, None] = None) -> bytes:
        """The plaintext sent over TLS: one connection's, or every connection's
        one after the other (missing bytes are zeros; see :meth:`stream`)."""
        return self._bytes("write", conn)

    def received(self, conn: Union[Connection, int, None] = None) -> bytes:
        """The plaintext received over TLS (like :meth:`sent`)."""
        return self._bytes("read", conn)

    def assert_sent(self, data: Union[bytes, str, re.Pattern[bytes]], *,
                    conn: Union[Connection, int, None] = None) -> bytes:
        """Assert that ``data`` (bytes, text as UTF-8, or a compiled bytes regular
        expression) appears in what one connection sent over TLS; returns the
        bytes that matched."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        return self._assert_tls("write", data, conn)

    def assert_received(self, data: Union[bytes, str, re.Pattern[bytes]], *,
                        conn: Union[Connection, int, None] = None) -> bytes:
        """Assert that ``data`` appears in what one connection received over TLS."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        return self._assert_tls("read", data, conn)

    def _streams(self, direction: str, conn: Union[Connection, int, None]) -> list[Any]:
        from apptrace.ssl import reassemble

        ids = [c.id for c in self.connections] if conn is None else \
            [conn.id if not isinstance(conn, int) else conn]
        out = []
        for cid in ids:
            try:
                st = reassemble(self.tls, cid, direction)
            except LookupError:  # nothing that way on this connection
                continue
            if st.data or st.gaps:  # (only peeks: nothing in the stream)
                out.append(st)
        return out

    def _bytes(self, direction: str, conn: Union[Connection, int, None]) -> bytes:
        return b"".join(s.data for s in self._streams(direction, conn))

    def _assert_tls(self, direction: str, data: Union[bytes, str, re.Pattern[bytes]],
                    conn: Union[Connection, int, None]) -> bytes:
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, re.Pattern)):
            raise OptionError("data", data, "bytes, a str or a compiled bytes pattern")
        streams = self._streams(direction, conn)
        for s in streams:
            if isinstance(data, bytes):
                if data in s.data:
                    return data
            else:
                m = data.search(s.data)
                if m:
                    return m.group(0)
        verb = "sent" if direction == "write" else "received"
        shown = data if isinstance(data, bytes) else f"re.compile({data.pattern!r})"
        lines = [f"expected {shown!r} to be {verb} over TLS"
                 f"{'' if conn is None else f' on connection {_conn_id(conn)}'};"
                 f" it was not"]
        if not self.tls:
            lines.append("no TLS data was recorded (was the run made with tls=True, and"
                         " does the program use OpenSSL, GnuTLS or NSS?)")
        elif not streams:
            lines.append(f"nothing was {verb} on {'any connection' if conn is None else 'it'}")
        for s in streams:
            lines.append(f"connection {s.conn.id} ({s.conn.five_tuple}) {verb}"
                         f" {len(s.data)} bytes:")
            lines.append(_indent(_preview(s.data)))
            if s.gaps:
                lines.append(f"  with {len(s.gaps)} gap(s) the capture does not have:"
                             f" {', '.join(f'{n} bytes at {o} ({r})' for o, n, r in s.gaps)}")
        if self.tls_lost:
            lines.append(f"note: {self.tls_lost} TLS records were lost (ring buffer full)")
        raise TraceAssertionError("\n".join(lines))

    # -- GC ----------------------------------------------------------------------

    @property
    def pauses(self) -> tuple[GcPause, ...]:
        """The stop-the-world GC pauses, in order."""
        return tuple(e for e in self.gc if getattr(e, "type", "") == "pause")

    @property
    def max_pause_ms(self) -> float:
        """The longest GC pause in milliseconds (0.0 when none was recorded:
        :meth:`assert_gc` checks that there were some)."""
        return max((p.duration_ns for p in self.pauses), default=0) / 1e6

    @property
    def total_pause_ms(self) -> float:
        return sum(p.duration_ns for p in self.pauses) / 1e6

    def assert_gc(self, *, max_pause_ms: Optional[float] = None,
                  max_total_ms: Optional[float] = None, min_pauses: int = 1,
                  full: Optional[bool] = None) -> tuple[GcPause, ...]:
        """Assert on the GC pauses: at least ``min_pauses`` (default 1, so a run
        that recorded none fails rather than passing vacuously), none longer
        than ``max_pause_ms``, ``max_total_ms`` at most in all; ``full=False``:
        no full collection. Returns the pauses."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        pauses = self.pauses
        problems = []
        if len(pauses) < min_pauses:
            problems.append(f"expected at least {min_pauses} GC pause(s); {len(pauses)}"
                            " were recorded")
        if max_pause_ms is not None:
            over = [p for p in pauses if p.duration_ns / 1e6 > max_pause_ms]
            if over:
                problems.append(f"expected no GC pause over {max_pause_ms} ms; {len(over)} of"
                                f" {len(pauses)} were (the longest {self.max_pause_ms:.3f} ms)")
        if max_total_ms is not None and self.total_pause_ms > max_total_ms:
            problems.append(f"expected at most {max_total_ms} ms of GC pauses in all; there"
                            f" were {self.total_pause_ms:.3f} ms")
        if full is False and any(p.full for p in pauses):
            problems.append(f"expected no full collection; there were"
                            f" {sum(1 for p in pauses if p.full)}")
        if full is True and not any(p.full for p in pauses):
            problems.append("expected a full collection; there was none")
        if problems:
            lines = problems + [f"{len(pauses)} pauses recorded, {self.total_pause_ms:.3f} ms"
                                f" in all{'; the longest:' if pauses else ''}"]
            if not self.gc:
                lines.append("no GC data was recorded (was the run made with gc=True, on a"
                             " java command?)")
            for p in sorted(pauses, key=lambda p: -p.duration_ns)[:8]:
                lines.append(f"  {p.duration_ns / 1e6:9.3f} ms  {p.kind} ({p.cause or '?'})"
                             f"  {p.manager}")
            if self.gc_lost:
                lines.append(f"note: {self.gc_lost} GC pauses were lost (ring buffer full)")
            raise TraceAssertionError("\n".join(lines))
        return pauses

    # -- saving --------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike[str]]) -> Path:
        """Write the run as JSON lines (a header, then one line per event, TLS item
        and GC pause); :func:`load` reads it back."""
        p = Path(path)
        infos: dict[ProbeInfo, int] = {}
        for ev in self.events:
            infos.setdefault(ev.probe, len(infos))
        head = {"format": FORMAT, "version": VERSION,
                "argv": list(self.argv) if self.argv is not None else None, "pid": self.pid,
                "exit_status": self.exit_status, "stdout_b64": _b64(self.stdout),
                "probes": list(self.probes), "stats": self.stats.to_json(),
                "tls_lost": self.tls_lost, "gc_lost": self.gc_lost,
                "duration_s": self.duration_s, "warnings": list(self.warnings),
                "finished": self.finished,
                "probe_infos": [dataclasses.asdict(i) for i in infos]}
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(head) + "\n")
            for ev in self.events:
                f.write(json.dumps(_event_json(ev, infos[ev.probe])) + "\n")
            for it in self.tls:
                f.write(json.dumps({"t": "tls", **_data_json(it)}) + "\n")
            for g in self.gc:
                f.write(json.dumps({"t": "gc", **_data_json(g)}) + "\n")
        os.replace(tmp, p)
        return p

    # -- text ------------------------------------------------------------------------

    @property
    def _t0(self) -> int:
        return self.events[0].ts_ns if self.events else 0

    def summary(self) -> str:
        """A few lines: what ran, how it ended, what was recorded."""
        lines = [f"{_argv_text(self.argv) if self.argv else f'process {self.pid}'}:"
                 f" {'still running' if not self.finished else _status_text(self.exit_status)}"
                 f", recorded for {self.duration_s:.2f} s"]
        if self.probes:
            per = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.per_probe.items()))
            lines.append(f"{self.stats.events} probe events ({per or 'no probe attached'});"
                         f" {self.stats.lost} lost")
        if self.tls:
            lines.append(f"{len(self.tls)} TLS items on {len(self.connections)} connection(s);"
                         f" {self.tls_lost} lost")
        if self.gc:
            lines.append(f"{len(self.pauses)} GC pauses, longest {self.max_pause_ms:.3f} ms;"
                         f" {self.gc_lost} lost")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Run(argv={self.argv!r}, pid={self.pid}, exit_status={self.exit_status},"
                f" events={len(self.events)}, tls={len(self.tls)}, gc={len(self.gc)})")

    def _fail_probe(self, headline: str, probe: str, args: Optional[ArgSpec],
                    where: Optional[Where], mark_all: bool = False) -> None:
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        lines = [headline]
        of_probe = [ev for ev in self.events if _probe_matches(probe, ev.probe)]
        traced = sorted(self.stats.per_probe)
        known = [lbl for lbl in traced if _label_matches(probe, lbl)]
        if not self.probes and not self.events:
            lines.append("no probes were traced in this run (give probes=[...])")
        elif not of_probe and not known:
            lines.append(f"{probe!r} names none of the probes traced: {', '.join(traced)}"
                         if traced else f"{probe!r} matched no probe")
        elif not of_probe:
            lines.append(f"{', '.join(known)} attached but never fired")
        plain = mark_all or not of_probe
        shown = self.events if plain else tuple(of_probe)
        if shown:
            lines.append("what fired (every event, in order):" if plain else
                         f"what fired (the events of {probe}, in order; + matched, - did not):")
            lines.extend(_listing(shown, probe, args, where, self._t0, plain))
        per = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.per_probe.items()))
        if per:
            lines.append(f"per probe: {per}")
        if self.stats.lost:
            lines.append(f"note: {self.stats.lost} events were lost in the kernel (ring buffer"
                         " full), so counts may be short: "
                         + ", ".join(f"{k} {v}" for k, v in self.stats.lost_per_probe.items()))
        if not self.finished:
            lines.append("note: this is a snapshot; the program was still running")
        raise TraceAssertionError("\n".join(lines))


# -- matching -------------------------------------------------------------------


_KINDS = ("usdt", "uprobe", "uretprobe")


def _names(info: ProbeInfo) -> tuple[str, ...]:
    return (info.name, info.label, f"{info.kind}:{info.name}",
            f"{info.kind}:{os.path.realpath(info.binary)}:{info.name}")


def _clean(selector: str) -> str:
    """A selector as the names it is compared with: a probe string's types
    dropped (``x:y(str,int)`` is ``x:y``), a binary given by path made real."""
    if selector.endswith(")") and "(" in selector:
        selector = selector[:selector.index("(")]
    parts = selector.split(":")
    if len(parts) >= 3 and parts[0] in _KINDS and "/" in parts[1] and \
            (parts[0] != "usdt" or len(parts) >= 4):
        parts[1] = os.path.realpath(parts[1])
    return ":".join(parts)


def _probe_matches(selector: str, info: ProbeInfo) -> bool:
    sel = _clean(selector)
    names = _names(info)
    parts = sel.split(":")
    if len(parts) >= 3 and parts[0] == info.kind and "/" not in parts[1] and \
            (parts[0] != "usdt" or len(parts) >= 4):
        # uprobe:libc:malloc names the binary by library name: libc.so.6
        base = os.path.basename(info.binary)
        if base == parts[1] or base.startswith(parts[1] + "."):
            sel = ":".join([parts[0]] + parts[2:])
    if any(c in sel for c in "*?["):
        return any(fnmatch.fnmatchcase(n, sel) for n in names)
    return sel in names


def _label_matches(selector: str, label: str) -> bool:
    """Does the selector name this probe label (``usdt:myapp:request__done``,
    ``uprobe:/bin/x:f``)? For probes that attached but never fired."""
    kind, _, rest = label.partition(":")
    name = ":".join(rest.split(":")[-2:]) if kind == "usdt" else rest.split(":")[-1]
    binary = rest[:-len(name) - 1] if rest != name else ""
    info = ProbeInfo(kind, binary or "?", name, label, qualified=bool(binary))
    return _probe_matches(selector, info)


def _show(expected: Any) -> str:
    if expected is ...:
        return "anything"
    if isinstance(expected, re.Pattern):
        return f"a match of {expected.pattern!r}"
    if isinstance(expected, type):
        return f"a {expected.__name__}"
    if callable(expected):
        return _source_of(expected)
    return repr(expected)


def _arg_problem(ev: Event, args: ArgSpec) -> Optional[str]:
    items = args.items() if isinstance(args, Mapping) else enumerate(args)
    for i, exp in items:
        if i >= len(ev.args):
            return f"it has no argument {i}"
        if exp is ...:
            continue
        got = ev.args[i]
        if isinstance(got, Unavailable):
            return f"arg {i} is unavailable ({got.reason}), expected {_show(exp)}"
        if isinstance(exp, re.Pattern):
            ok = isinstance(got, (str, bytes)) and type(got) is type(exp.pattern) \
                and exp.search(got) is not None
        elif isinstance(exp, type):
            ok = isinstance(got, exp)
        elif callable(exp):
            try:
                ok = bool(exp(got))
            except Exception as err:  # noqa: BLE001 - a user's predicate: shown, not raised
                return f"arg {i}: {_show(exp)} raised {type(err).__name__}: {err}"
        else:
            ok = got == exp
        if not ok:
            return f"arg {i} is {got!r}, expected {_show(exp)}"
    return None


def _why_not(ev: Event, args: Optional[ArgSpec], where: Optional[Where]) -> Optional[str]:
    """None when the event matches, else why not (for the failure listing)."""
    if args is not None:
        why = _arg_problem(ev, args)
        if why:
            return why
    if where is not None:
        try:
            if not where(ev):
                return "where() is false"
        except Exception as err:  # noqa: BLE001 - a user's predicate: shown, not raised
            return f"where() raised {type(err).__name__}: {err}"
    return None


def _source_of(fn: Callable[..., Any]) -> str:
    """``lambda ev: ev.args[1] == 200`` as written, else the function's name."""
    try:
        src = inspect.getsource(fn).strip()
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))
    if getattr(fn, "__name__", "") != "<lambda>":
        return getattr(fn, "__qualname__", src.splitlines()[0])
    src = " ".join(ln.strip() for ln in src.splitlines())
    code = fn.__code__  # type: ignore[attr-defined]
    own = "lambda " + ", ".join(code.co_varnames[:code.co_argcount]) + ":"
    start = src.find(own) if own in src else src.find("lambda")
    text, depth = src[start:], 0
    for n, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return text[:n].strip()
        elif ch == "," and depth == 0:
            return text[:n].strip()
    return text.strip()


def _conditions(args: Optional[ArgSpec], where: Optional[Where]) -> str:
    parts = []
    if args is not None:
        items = args.items() if isinstance(args, Mapping) else enumerate(args)
        parts.append("with args " + ", ".join(f"[{i}] {_show(v)}" for i, v in items
                                                if v is not ...))
    if where is not None:
        parts.append(f"where {_source_of(where)}")
    return (" " + " and ".join(parts)) if parts else ""


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _step_text(step: Union[str, tuple[str, ArgSpec]]) -> str:
    if isinstance(step, str):
        return step
    return f"{step[0]}{_conditions(step[1], None)}"


def _ev_line(ev: Event, t0: int) -> str:
    args = " ".join(repr(a) if isinstance(a, (str, bytes)) else str(a) for a in ev.args)
    return f"{(ev.ts_ns - t0) / 1e6:9.3f} ms {ev.comm}[{ev.pid}] {ev.probe.label} {args}".rstrip()


def _listing(events: Sequence[Event], probe: str, args: Optional[ArgSpec],
             where: Optional[Where], t0: int, plain: bool) -> list[str]:
    out = []
    chosen = list(events)
    cut = 0
    if len(chosen) > _SHOWN:
        cut = len(chosen) - _SHOWN
        chosen = chosen[:_SHOWN // 2] + chosen[-_SHOWN // 2:]
    for k, ev in enumerate(chosen):
        if cut and k == _SHOWN // 2:
            out.append(f"  ... {cut} more ...")
        if plain:
            out.append(f"    {_ev_line(ev, t0)}")
            continue
        why = _why_not(ev, args, where) if _probe_matches(probe, ev.probe) else "another probe"
        mark = "+" if why is None else "-"
        out.append(f"  {mark} {_ev_line(ev, t0)}" + (f"    <- {why}" if why else ""))
    return out


def _indent(text: str) -> str:
    return "\n".join("  " + ln for ln in text.splitlines())


def _preview(data: bytes, limit: int = 400) -> str:
    shown = repr(data[:limit])
    return shown + (f" ... ({len(data) - limit} more bytes)" if len(data) > limit else "")


def _conn_id(conn: Union[Connection, int]) -> int:
    return conn if isinstance(conn, int) else conn.id


def _argv_text(argv: Optional[Sequence[str]]) -> str:
    import shlex

    return shlex.join(argv) if argv else "the program"


def _status_text(status: Optional[int]) -> str:
    if status is None:
        return "attached (not started by the recorder)"
    if status < 0:
        return f"killed by signal {-status}"
    return f"exited with status {status}"


# -- saving and loading -----------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _arg_json(a: Any) -> Any:
    if isinstance(a, Unavailable):
        return {"unavailable": a.reason}
    if isinstance(a, bytes):
        return {"bytes": _b64(a)}
    if isinstance(a, float) and (a != a or a in (float("inf"), float("-inf"))):
        return {"float": repr(a)}
    return a


def _arg_back(a: Any) -> Any:
    if isinstance(a, dict):
        if "unavailable" in a:
            return Unavailable(str(a["unavailable"]))
        if "bytes" in a:
            return base64.b64decode(a["bytes"])
        if "float" in a:
            return float(a["float"])
    return a


def _event_json(ev: Event, probe_index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"t": "event", "ts_ns": ev.ts_ns, "pid": ev.pid, "tid": ev.tid,
                           "comm": ev.comm, "probe": probe_index,
                           "args": [_arg_json(a) for a in ev.args], "site": ev.site}
    if ev.truncated:
        out["truncated"] = list(ev.truncated)
    if ev.stack is not None:
        out["stack"] = [[f.addr, f.symbol, f.offset, f.file, f.line, f.inlined, f.module,
                         f.reason] for f in ev.stack]
    if ev.raw_stack is not None:
        out["raw_stack"] = list(ev.raw_stack)
    return out


def _event_back(d: Mapping[str, Any], infos: Sequence[ProbeInfo]) -> Event:
    stack = None
    if d.get("stack") is not None:
        from apptrace.symbolize import StackFrame

        stack = tuple(StackFrame(*f) for f in d["stack"])
    raw = d.get("raw_stack")
    return Event(int(d["ts_ns"]), int(d["pid"]), int(d["tid"]), str(d["comm"]),
                 infos[int(d["probe"])], tuple(_arg_back(a) for a in d["args"]),
                 int(d.get("site", 0)), stack, tuple(raw) if raw is not None else None,
                 tuple(d.get("truncated", ())))


def _data_json(obj: Any) -> dict[str, Any]:
    """A frozen dataclass (TLS item, GC pause, and what they hold) as JSON."""
    out: dict[str, Any] = {"kind": type(obj).__name__}
    for f in dataclasses.fields(obj):
        out[f.name] = _value_json(getattr(obj, f.name))
    return out


def _value_json(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _data_json(v)
    if isinstance(v, bytes):
        return {"bytes": _b64(v)}
    if isinstance(v, (tuple, list)):
        return [_value_json(x) for x in v]
    return v


def _data_classes() -> dict[str, type]:
    from apptrace.jvm import GcCycle, GcPause, PoolUsage
    from apptrace.ssl import Chunk, Connection, Gap

    return {c.__name__: c for c in (Chunk, Gap, Connection, GcPause, GcCycle, PoolUsage)}


def _value_back(v: Any, classes: Mapping[str, type]) -> Any:
    if isinstance(v, dict):
        if "kind" in v and v["kind"] in classes:
            cls = classes[v["kind"]]
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: _value_back(x, classes) for k, x in v.items() if k in names})
        if set(v) == {"bytes"}:
            return base64.b64decode(v["bytes"])
        return {k: _value_back(x, classes) for k, x in v.items()}
    if isinstance(v, list):
        return tuple(_value_back(x, classes) for x in v)
    return v


def load(path: Union[str, os.PathLike[str]]) -> Run:
    """Read a run :meth:`Run.save` wrote, for asserting on it again."""
    p = str(path)
    try:
        f = open(p, encoding="utf-8")
    except OSError as err:
        raise RunFileError(f"cannot open: {err.strerror}", path=p) from err
    with f:
        lines = f.read().splitlines()
    if not lines:
        raise RunFileError("empty file: not a saved apptrace run", path=p)
    try:
        head = json.loads(lines[0])
    except ValueError as err:
        raise RunFileError(f"not JSON ({err})", path=p, line=1) from err
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise RunFileError(f"not a saved apptrace run (no \"format\": \"{FORMAT}\" header)",
                           path=p, line=1)
    if head.get("version") != VERSION:
        raise RunFileError(f"saved by format version {head.get('version')!r}; this apptrace"
                           f" reads version {VERSION}", path=p, line=1)
    classes = _data_classes()
    try:
        infos = [ProbeInfo(**i) for i in head.get("probe_infos", [])]
    except TypeError as err:
        raise RunFileError(f"bad probe description ({err})", path=p, line=1) from err
    events: list[Event] = []
    tls: list[Any] = []
    gc: list[Any] = []
    for n, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        try:
            d = json.loads(text)
            kind = d.get("t")
            if kind == "event":
                events.append(_event_back(d, infos))
            elif kind == "tls":
                tls.append(_value_back({k: v for k, v in d.items() if k != "t"}, classes))
            elif kind == "gc":
                gc.append(_value_back({k: v for k, v in d.items() if k != "t"}, classes))
            else:
                raise RunFileError(f"unknown record type {kind!r}", path=p, line=n)
        except RunFileError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise RunFileError(f"cannot read this record ({type(err).__name__}: {err})",
                               path=p, line=n) from err
    argv = head.get("argv")
    return Run(argv=tuple(argv) if argv is not None else None, pid=head.get("pid"),
               exit_status=head.get("exit_status"),
               stdout=base64.b64decode(head.get("stdout_b64", "")),
               probes=tuple(head.get("probes", ())), events=tuple(events),
               stats=RunStats.from_json(head.get("stats", {})), tls=tuple(tls),
               tls_lost=int(head.get("tls_lost", 0)), gc=tuple(gc),
               gc_lost=int(head.get("gc_lost", 0)), duration_s=float(head.get("duration_s", 0)),
               warnings=tuple(head.get("warnings", ())), finished=bool(head.get("finished", True)))


# -- recording ----------------------------------------------------------------------


class _Family:
    """One tracer (probe strings, TLS, GC) driven by a recorder thread."""

    name = ""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.thread: Optional[threading.Thread] = None
        self.synced = 0
        self.error: Optional[BaseException] = None
        self.done = False

    def start(self) -> None: ...
    def alive(self) -> bool: return False
    def step(self, timeout: float) -> list[Any]: return []
    def flush(self) -> list[Any]: return []
    def finish(self, stopped: bool) -> list[Any]: return []
    def close(self) -> None: ...
    def refresh(self) -> None: ...

    @property
    def pid(self) -> Optional[int]:
        return None

    @property
    def exit_status(self) -> Optional[int]:
        return None


class _Probes(_Family):
    name = "probes"

    def __init__(self, target: dict[str, Any], probes: Sequence[str], stack: bool,
                 options: Mapping[str, Any]) -> None:
        super().__init__()
        from apptrace.session import Session

        self.s = Session(**target, **options)
        for p in probes:
            self.s.add(p, stack=stack)
        self.stats = RunStats()
        self.warnings: list[str] = []

    def start(self) -> None:
        self.s.start()

    def alive(self) -> bool:
        return self.s.target_alive()

    def step(self, timeout: float) -> list[Any]:
        return self.s.poll(timeout)

    def flush(self) -> list[Any]:
        return self.s.poll(0, flush=True)

    def finish(self, stopped: bool) -> list[Any]:
        if stopped:
            self.s.detach()  # nothing fires after this; what is in the rings still comes out
        out: list[Any] = []
        while True:
            got = self.s.poll(0, flush=True)
            if not got:
                break
            out.extend(got)
        return out

    def refresh(self) -> None:
        self.stats = RunStats.from_stats(self.s.stats())
        self.warnings = self.s.warnings

    def close(self) -> None:
        self.s.close()
        self.stats = RunStats.from_stats(self.s.stats())
        self.warnings = self.s.warnings

    @property
    def pid(self) -> Optional[int]:
        t = self.s.target
        return t.pid if t is not None else None

    @property
    def exit_status(self) -> Optional[int]:
        return self.s.exit_status


class _Tls(_Family):
    name = "tls"

    def __init__(self, target: dict[str, Any], options: Mapping[str, Any]) -> None:
        super().__init__()
        import apptrace.ssl

        self.cap = apptrace.ssl.Capture(**target, **options)
        self.lost = 0

    def start(self) -> None:
        self.cap.start()

    def alive(self) -> bool:
        return bool(self.cap.target.alive())

    def step(self, timeout: float) -> list[Any]:
        return self.cap.poll(timeout)

    def flush(self) -> list[Any]:
        return self.cap.poll(_POLL_S)  # the capture's own thread has queued what arrived

    def finish(self, stopped: bool) -> list[Any]:
        out: list[Any] = []
        if stopped:
            out.extend(self.cap.poll(_POLL_S))
            self.cap.stop()
        for batch in self.cap.batches():  # the rest, then gaps for bytes known missing
            out.extend(batch)
        return out

    def refresh(self) -> None:
        self.lost = self.cap.stats().lost

    def close(self) -> None:
        self.cap.close()
        self.lost = self.cap.stats().lost

    @property
    def pid(self) -> Optional[int]:
        return self.cap.target.pid  # type: ignore[no-any-return]

    @property
    def exit_status(self) -> Optional[int]:
        return self.cap.exit_status


class _Gc(_Family):
    name = "gc"

    def __init__(self, target: dict[str, Any], options: Mapping[str, Any]) -> None:
        super().__init__()
        import apptrace.jvm

        self.t = apptrace.jvm.GcTracer(**target, **options)
        self.lost = 0

    def start(self) -> None:
        self.t.start()

    def alive(self) -> bool:
        return self.t.alive()

    def step(self, timeout: float) -> list[Any]:
        return self.t.poll(timeout)

    def flush(self) -> list[Any]:
        return self.t.poll(0)

    def finish(self, stopped: bool) -> list[Any]:
        if stopped:
            self.t.detach()
        out: list[Any] = []
        while True:
            got = self.t.poll(0)
            if not got:
                break
            out.extend(got)
        return out

    def refresh(self) -> None:
        self.lost = self.t.lost

    def close(self) -> None:
        self.refresh()
        self.t.close()

    @property
    def pid(self) -> Optional[int]:
        return self.t.child_pid if self.t.child_pid is not None else self.t.pid

    @property
    def exit_status(self) -> Optional[int]:
        return self.t.exit_status


class Recorder:
    """Records a program while a test drives it; :meth:`stop` or :meth:`wait`
    gives the :class:`Run`. Made by :func:`start` and :func:`attach`; every
    probe is attached when it is returned. A context manager (leaving the
    block stops it)."""

    def __init__(self, *, argv: Optional[Sequence[str]] = None, pid: Optional[int] = None,
                 probes: Sequence[str] = (), tls: bool = False, gc: bool = False,
                 stack: bool = False, str_max: int = 64, semaphores: str = "kernel",
                 session_options: Optional[Mapping[str, Any]] = None,
                 tls_options: Optional[Mapping[str, Any]] = None,
                 gc_options: Optional[Mapping[str, Any]] = None) -> None:
        if isinstance(probes, str):
            probes = [probes]
        probes = list(probes)
        if (argv is None) == (pid is None):
            raise OptionError("target", {"argv": argv, "pid": pid}, "exactly one of argv, pid")
        if argv is not None:
            if isinstance(argv, (str, bytes)) or not list(argv):
                raise OptionError("argv", argv, "a command as a list of strings, e.g."
                                  " ['./server', '3']")
            argv = [os.fspath(a) for a in argv]
        if not probes and not tls and not gc:
            raise OptionError("probes", probes, "at least one probe string, or tls=True, or"
                              " gc=True: something to record")
        wanted = [n for n, on in (("probes", bool(probes)), ("tls", tls), ("gc", gc)) if on]
        if argv is not None and len(wanted) > 1:
            raise OptionError(
                "+".join(wanted), True,
                "one kind per started command (each starts and holds it on its own); to record"
                " several, start the program yourself and use apptrace.testing.attach(pid,"
                " ...), or make one run per kind")
        self.argv = tuple(argv) if argv is not None else None
        self.probes = tuple(probes)
        self._out: Optional[IO[bytes]] = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._sync = 0
        self._families: list[_Family] = []
        self._run: Optional[Run] = None
        self._t0 = time.monotonic()
        self._t_end: Optional[float] = None
        target: dict[str, Any]
        if argv is not None:
            self._out = tempfile.TemporaryFile(prefix="apptrace-run-")
            target = {"command": list(argv), "command_stdout": self._out.fileno()}
        else:
            target = {"pid": pid}
        try:
            if probes:
                self._families.append(_Probes(
                    target, probes, stack,
                    {"str_max": str_max, "semaphores": semaphores, **(session_options or {})}))
            if tls:
                self._families.append(_Tls(target, dict(tls_options or {})))
            if gc:
                self._families.append(_Gc(target, dict(gc_options or {})))
            for fam in self._families:
                fam.start()
        except BaseException:
            self._close_all()
            if self._out is not None:
                self._out.close()
            raise
        self._t0 = time.monotonic()
        for fam in self._families:
            fam.thread = threading.Thread(target=self._drive, args=(fam,),
                                          name=f"apptrace-testing-{fam.name}", daemon=True)
            fam.thread.start()

    # -- the recorder threads ---------------------------------------------------------

    def _drive(self, fam: _Family) -> None:
        try:
            while not self._stop.is_set():
                alive = fam.alive()
                got = fam.step(_POLL_S)
                self._add(fam, got)
                want = self._sync
                if fam.synced != want:
                    self._add(fam, fam.flush())
                    fam.refresh()
                    with self._cond:
                        fam.synced = want
                        self._cond.notify_all()
                if not alive and not got:
                    break
            self._add(fam, fam.finish(self._stop.is_set()))
        except BaseException as err:  # noqa: BLE001 - raised again in the test's thread
            fam.error = err
        finally:
            try:
                fam.close()
            except BaseException as err:  # noqa: BLE001 - raised again in the test's thread
                fam.error = fam.error or err
            with self._cond:
                fam.done = True
                self._cond.notify_all()

    def _add(self, fam: _Family, items: Iterable[Any]) -> None:
        if items:
            with self._lock:
                fam.items.extend(items)

    # -- the test's side -------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        """The process recorded (a started command's)."""
        for fam in self._families:
            if fam.pid is not None:
                return fam.pid
        return None

    @property
    def running(self) -> bool:
        """Is anything still being recorded (the program runs, nobody stopped it)?"""
        return self._run is None and any(not fam.done for fam in self._families)

    @property
    def result(self) -> Optional[Run]:
        """The run, once :meth:`stop` or :meth:`wait` returned it; else None."""
        return self._run

    def snapshot(self, timeout: float = 5.0) -> Run:
        """What was recorded so far, including events still in the kernel's
        buffers; the recording goes on."""
        if self._run is not None:
            return self._run
        with self._cond:
            self._sync += 1
            want = self._sync
            deadline = time.monotonic() + timeout
            while any(not f.done and f.synced != want for f in self._families):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        self._raise_errors()
        return self._build(finished=False)

    def wait(self, timeout: Optional[float] = 60.0) -> Run:
        """Wait for the program to end (a started command, or an attached
        process exiting) and return the run; past ``timeout`` seconds stop it
        and raise :class:`~apptrace.errors.RunTimeoutError` (its ``run`` holds
        what was recorded)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
        if self.running:
            got = self.stop()
            what = _argv_text(self.argv) if self.argv else f"process {self.pid}"
            raise RunTimeoutError(f"{what} still ran after {timeout} s; stopped",
                                  timeout=float(timeout or 0), run=got)
        return self.stop()

    def stop(self) -> Run:
        """Stop recording now (a started command still running is terminated)
        and return the run. Calling it again returns the same run."""
        if self._run is not None:
            return self._run
        self._stop.set()
        for fam in self._families:
            if fam.thread is not None:
                fam.thread.join(30)
        self._t_end = time.monotonic()
        self._close_all()
        try:
            self._raise_errors()
            self._run = self._build(finished=True)
        finally:
            if self._out is not None:
                self._out.close()
                self._out = None
        return self._run

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        except ApptraceError:
            if exc[0] is None:
                raise

    def _close_all(self) -> None:
        for fam in self._families:
            if fam.thread is None or not fam.thread.is_alive():
                try:
                    fam.close()
                except ApptraceError as err:
                    fam.error = fam.error or err

    def _raise_errors(self) -> None:
        for fam in self._families:
            if fam.error is not None:
                err, fam.error = fam.error, None
                raise err

    def _build(self, *, finished: bool) -> Run:
        with self._lock:
            events: tuple[Event, ...] = ()
            stats, warnings, tls, tls_lost, gc, gc_lost = RunStats(), [], (), 0, (), 0
            for fam in self._families:
                if isinstance(fam, _Probes):
                    events, stats, warnings = tuple(fam.items), fam.stats, list(fam.warnings)
                elif isinstance(fam, _Tls):
                    tls, tls_lost = tuple(fam.items), fam.lost
                elif isinstance(fam, _Gc):
                    gc, gc_lost = tuple(fam.items), fam.lost
        stdout = b""
        if self._out is not None:
            size = os.fstat(self._out.fileno()).st_size
            stdout = os.pread(self._out.fileno(), size, 0)
        status = None
        if self.argv is not None:
            status = next((f.exit_status for f in self._families
                           if f.exit_status is not None), None)
        end = self._t_end if finished and self._t_end is not None else time.monotonic()
        return Run(argv=self.argv, pid=self.pid, exit_status=status, stdout=stdout,
                   probes=self.probes, events=events, stats=stats, tls=tls, tls_lost=tls_lost,
                   gc=gc, gc_lost=gc_lost, duration_s=round(end - self._t0, 6),
                   warnings=tuple(warnings), finished=finished)


def start(argv: Sequence[str], *, probes: Sequence[str] = (), tls: bool = False,
          gc: bool = False, stack: bool = False, **options: Any) -> Recorder:
    """Start ``argv`` held until every probe is attached, and record it; the
    program runs while the test goes on (:meth:`Recorder.wait`/:meth:`~Recorder.stop`)."""
    return Recorder(argv=argv, probes=probes, tls=tls, gc=gc, stack=stack, **options)


def attach(pid: int, *, probes: Sequence[str] = (), tls: bool = False, gc: bool = False,
           stack: bool = False, **options: Any) -> Recorder:
    """Record a running process from now until :meth:`Recorder.stop` (or its exit).
    Several kinds at once work here: ``probes=[...], tls=True``."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise OptionError("pid", pid, "a process ID (a positive integer)")
    return Recorder(pid=pid, probes=probes, tls=tls, gc=gc, stack=stack, **options)


def run(argv: Sequence[str], *, probes: Sequence[str] = (), tls: bool = False,
        gc: bool = False, stack: bool = False, timeout: Optional[float] = 60.0,
        **options: Any) -> Run:
    """Run ``argv`` to its end under tracing and return what was recorded.

    The command is held before its first instruction until every probe is
    attached. ``probes``: probe strings (``usdt:myapp:request__done(str,int)``);
    ``tls=True``: its TLS plaintext; ``gc=True``: its GC pauses (a ``java``
    command); one kind per run. ``stack``: a user stack with each probe event.
    Past ``timeout`` seconds the command is stopped and
    :class:`~apptrace.errors.RunTimeoutError` raised. Its stdout is captured
    (``run.output``); its stdin and stderr are this process's.
    """
    return start(argv, probes=probes, tls=tls, gc=gc, stack=stack, **options).wait(timeout)


# -- can this machine record? ------------------------------------------------------------


def tracing_unavailable() -> Optional[str]:
    """Why probes cannot be traced here (a sentence naming the fix), or None.
    Test harnesses skip or fail with it."""
    from apptrace import capabilities

    if not capabilities.has_trace_privileges():
        if os.geteuid() == 0:
            return ("tracing needs CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON, and this"
                    " process runs as root without them (dropped by a container or setpriv);"
                    " run `apptrace doctor`")
        return (f"tracing needs root, or CAP_BPF with CAP_PERFMON (this process runs as uid"
                f" {os.geteuid()}); run the tests as root, or see `apptrace doctor`")
    ok, why = capabilities.can_load_bpf()
    if not ok:
        return f"the kernel refuses BPF programs here: {why}"
    ok, why = capabilities.bcc_status(False)
    if not ok:
        return why
    return None


def jvm_unavailable(java: str = "java") -> Optional[str]:
    """Why the GC pauses of ``java`` cannot be traced here, or None."""
    import apptrace.jvm

    exe = java if os.sep in java else shutil.which(java)
    if exe is None or not os.path.exists(exe):
        return f"no {java!r} on PATH: install a JDK built with DTrace probes" \
               " (Debian: openjdk-17-jdk-headless)"
    home = Path(os.path.realpath(exe)).parent.parent
    lib = home / "lib" / "server" / "libjvm.so"
    if not lib.exists():
        return f"{exe} is not a HotSpot JDK's java (no {lib})"
    try:
        apptrace.jvm.load_libjvm(str(lib))
    except ApptraceError as err:
        return str(err)
    return None
