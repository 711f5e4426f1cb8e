"""``apptrace trace``."""

from __future__ import annotations

import argparse
import bisect
import json
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Optional, TextIO

from apptrace.cli.base import Command, CommandError, command_status, deferred_signals, say
from apptrace.output import EscapingWriter, escape_text, open_output

if TYPE_CHECKING:
    from apptrace.events import Event, Stats


class TraceCommand(Command):
    """Trace USDT probes, uprobes and uretprobes; print one line (or JSON) per event.

    PROBE is usdt:[BINARY:]PROVIDER:NAME[(TYPES)], uprobe:BINARY:SYMBOL[(TYPES)]
    or uretprobe:BINARY:SYMBOL[(TYPE)]; globs work in provider, name and symbol.
    TYPES are int, long, u8..u64, s8..s64, str, float, double, ptr ('-' keeps
    the default). Target: -p PID, --path BIN (system-wide, including processes
    started later) or -- CMD ARGS... (spawned and held until attached).

    Probe strings come before --; everything after -- is the command. With
    a command, apptrace exits with the command's status (128+N when signal N
    ended it), and the command's stdout goes to stderr while events go to
    stdout (with -o FILE it stays on stdout), so `--json | jq` sees only JSON.

    Examples:
      apptrace trace 'usdt:python:function__entry(str,str,int)' -- python3.11 -c 'print(1)'
      apptrace trace --json 'uprobe:libc:getpid' -- python3.11 -c 'import os; os.getpid()'
      apptrace trace -d 1 -p PID 'uprobe:libc:malloc(long)'
    """

    name = "trace"
    takes_command = True

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("probes", nargs="*", metavar="PROBE")
        tgt = parser.add_argument_group("target (at most one)")
        tgt.add_argument("-p", "--pid", type=int, help="trace this running process")
        tgt.add_argument("--path", metavar="BIN",
                         help="trace every process running BIN, including later ones")
        parser.add_argument("--json", action="store_true", help="JSON lines output")
        parser.add_argument("-d", "--duration", type=float, metavar="SECONDS",
                            help="stop after this long")
        parser.add_argument("-n", "--max-events", dest="count", type=int,
                            help="stop after this many events")
        parser.add_argument("-o", "--output", metavar="FILE", help="write events here")
        parser.add_argument("--semaphores", choices=("kernel", "procmem"), default="kernel",
                            help="how to enable USDT semaphores (default: kernel)")
        parser.add_argument("--str-max", type=int, default=64,
                            help="longest string read per argument (bytes, default 64)")
        parser.add_argument("--ring-mb", type=int, metavar="MB",
                            help="ring buffer size per probe string (default: 32 MiB shared,"
                                 " at most 16 each); raise it when events are lost")
        parser.add_argument("--stack", action="store_true", help="capture user stacks")
        parser.add_argument("--folded", action="store_true",
                            help="with --stack: print folded stack counts at the end")
        parser.add_argument("--no-symbolize", action="store_true",
                            help="with --stack: raw addresses, each with the file that"
                                 " holds it and its offset there (no symbol lookup)")
        parser.add_argument("-q", "--quiet", action="store_true", help="no summary")
        from apptrace.cli.aggregate import add_trace_options

        add_trace_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        from apptrace.session import Session

        command = getattr(args, "command_argv", None)
        if sum(x is not None for x in (args.pid, args.path, command)) > 1:
            raise CommandError("trace: give only one of -p PID, --path BIN, -- CMD")
        if args.count_keys and ":" in args.count_keys:  # `--count PROBE`: no keys given
            args.probes.insert(0, args.count_keys)
            args.count_keys = ""
        if not args.probes:
            raise CommandError("trace: give at least one probe string (PROBE)")
        from apptrace.cli.aggregate import run_trace_aggregation, wants_aggregation

        if wants_aggregation(args):
            return run_trace_aggregation(args, command)
        if args.folded and not args.stack:
            args.stack = True
        if args.no_symbolize and not args.stack:
            raise CommandError("trace: --no-symbolize goes with --stack")
        check_options(args)
        modules = _RawModules() if args.no_symbolize else None
        out: TextIO = sys.stdout
        if args.output is not None:  # 0600, no links of others followed (apptrace.output)
            out = open_output(args.output)  # type: ignore[assignment]  # closed below

        stopping = {"flag": False}

        def on_term(signum: int, frame: Any) -> None:
            stopping["flag"] = True

        old = signal.signal(signal.SIGTERM, on_term)
        session: Optional[Session] = None
        n = 0
        try:
            # Events on stdout: the command's own stdout goes to stderr, so the
            # two never interleave (`apptrace trace --json -- CMD | jq`).
            session = Session(pid=args.pid, path=args.path, command=command,
                              command_stdout=2 if command and out is sys.stdout else None,
                              semaphores=args.semaphores, str_max=args.str_max,
                              ringbuf_kb=args.ring_mb * 1024 if args.ring_mb else None,
                              symbolize=not args.no_symbolize)
            for p in args.probes:
                session.add(p, stack=args.stack, fold=args.folded, where=args.where)
            session.start()
            if modules is not None and session.target is not None:
                modules.snapshot(session.target.pid)  # in case it exits before we print
            if not args.quiet:
                sites = sum(p.sites for p in session.probes)
                print(f"apptrace: attached {len(session.probes)} probes ({sites} sites) in"
                      f" {session.attach_seconds:.2f}s; Ctrl-C to stop", file=sys.stderr)
            deadline = None if args.duration is None else time.monotonic() + args.duration
            try:
                while not stopping["flag"]:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    alive = session.target_alive()
                    events = session.poll(0.2 if remaining is None else min(0.2, remaining))
                    for ev in events:
                        _emit(ev, out, args.json, modules)
                        n += 1
                        if args.count is not None and n >= args.count:
                            stopping["flag"] = True
                            break
                    if events:
                        out.flush()  # stream: `apptrace trace --json | jq` sees events now
                    if not alive and not events:
                        break
            except KeyboardInterrupt:
                pass
            # Nothing fires from here on: the last events, the folded stacks
            # and the counts below all describe the same instant.
            session.detach()
            if args.count is None or n < args.count:
                for ev in session.poll(0, flush=True):  # held back for ordering
                    _emit(ev, out, args.json, modules)
                    n += 1
                    if args.count is not None and n >= args.count:
                        break
            stacks_lost = 0
            if args.folded:
                for key, c in sorted(session.folded().items(), key=lambda kv: -kv[1]):
                    out.write(f"{escape_text(key)} {c}\n")
                    if key.split(";", 1)[-1].startswith("[stack lost: "):
                        stacks_lost += c
            stats = session.stats()
            warnings = session.warnings
        finally:
            signal.signal(signal.SIGTERM, old)
            try:
                if session is not None:
                    with deferred_signals():  # a signal now must not cut the cleanup short
                        session.close()
            finally:
                if out is not sys.stdout:
                    out.close()
                else:
                    sys.stdout.flush()
        if not args.quiet:
            _summary(stats, EscapingWriter(sys.stderr), session.exit_status,  # type: ignore[arg-type]
                     printed=n if args.count is not None else None)
            if warnings:
                say(f"apptrace: warning: {len(warnings)} problem(s) while symbolizing;"
                    f" last: {warnings[-1]}")
            if stacks_lost:
                # Mostly EEXIST: the stack's hash bucket already held another
                # stack (the map keeps the first), likelier as it fills.
                say(f"apptrace: warning: {stacks_lost} of {stats.events} events have no"
                    " stack: the kernel's stack map refused them (too many distinct"
                    " stacks for its buckets); they are counted on the"
                    " \"[stack lost: ...]\" line")
        return command_status(session.exit_status if command else None)


def check_options(args: argparse.Namespace) -> None:
    """Every option in its range, before anything starts (one line, exit 2)."""
    from apptrace.errors import OptionError
    from apptrace.options import STR_MAX, check_int, check_seconds

    try:
        if args.duration is not None:
            check_seconds("-d/--duration", args.duration)
        if args.count is not None:
            check_int("-n/--max-events", args.count, 1)
        check_int("--str-max", args.str_max, *STR_MAX)
        if args.ring_mb is not None:
            check_int("--ring-mb", args.ring_mb, 1, 1024)
        if args.output is not None and not args.output:
            raise OptionError("-o/--output", args.output, "a file name (leave -o out for"
                              " stdout)")
    except OptionError as err:
        raise CommandError(f"trace: {err}") from err




class _RawModules:
    """Which file holds each raw stack address (--no-symbolize), from /proc/PID/maps.

    The maps are read once per process and again when an address is in none
    of the known mappings (a library loaded since).
    """

    def __init__(self) -> None:
        self._maps: dict[int, tuple[list[int], list[Any]]] = {}

    def snapshot(self, pid: int) -> None:
        from apptrace.errors import ApptraceError
        from apptrace.procs import read_maps

        try:
            maps = sorted(read_maps(pid), key=lambda m: m.start)
        except ApptraceError:  # gone already: keep what we had
            maps = self._maps.get(pid, ([], []))[1]
        self._maps[pid] = ([m.start for m in maps], maps)

    def where(self, pid: int, addr: int) -> tuple[Optional[str], Optional[int]]:
        """(file or pseudo-file such as [vdso], offset in the file) or (None, None)."""
        for fresh in (False, True):
            if fresh or pid not in self._maps:
                self.snapshot(pid)
            starts, maps = self._maps[pid]
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0 and addr < maps[i].end:
                m = maps[i]
                if not m.path:
                    return None, None  # anonymous memory (JIT code, for one)
                return m.path, (addr - m.start + m.offset if m.path.startswith("/") else None)
        return None, None

    def frames(self, ev: Event) -> list[dict[str, Any]]:
        out = []
        for addr in ev.raw_stack or ():
            module, offset = self.where(ev.pid, addr)
            out.append({"addr": addr, "module": module, "module_offset": offset})
        return out


def _emit(ev: Event, out: TextIO, as_json: bool, modules: Optional[_RawModules] = None) -> None:
    raw = modules.frames(ev) if modules is not None and ev.raw_stack is not None else None
    if as_json:
        d = ev.to_json()
        if raw is not None:
            d["frames"] = raw
        out.write(json.dumps(d, separators=(",", ":")) + "\n")
        return
    out.write(ev.format() + "\n")
    for rf in raw or ():
        where = rf["module"] or "?"
        if rf["module_offset"] is not None:
            where += f"+{rf['module_offset']:#x}"
        out.write(escape_text(f"    {rf['addr']:#x} ({where})") + "\n")
    if ev.stack is not None:
        for f in ev.stack:
            where = f" {f.file}:{f.line}" if f.file else ""
            name = f"{f.symbol}+{f.offset:#x}" if f.symbol else f"{f.addr:#x}"
            inl = " [inlined]" if f.inlined else ""
            why = f" <{f.reason}>" if f.symbol is None and getattr(f, "reason", None) else ""
            out.write(escape_text(f"    {name}{inl}{where} ({f.module or '?'}){why}") + "\n")


def _summary(st: Stats, err: TextIO, status: Optional[int],
             printed: Optional[int] = None) -> None:
    parts = [f"{st.events} events", f"{st.lost} lost"]
    if printed is not None and printed != st.events:
        parts.insert(0, f"{printed} printed (-n)")
    if st.lost:
        parts[-1] += " (ring buffer full: raise --ring-mb or trace fewer probes)"
    if st.truncated_strings:
        parts.append(f"{st.truncated_strings} strings truncated (raise --str-max)")
    if st.read_faults:
        parts.append(f"{st.read_faults} argument reads faulted")
    if st.decode_errors:
        parts.append(f"{st.decode_errors} records not decoded (wrong size: an apptrace bug,"
                     " please report it)")
    err.write("apptrace: " + ", ".join(parts) + "\n")
    for label, c in sorted(st.per_probe.items()):
        lost = st.lost_per_probe.get(label, 0)
        bad = st.decode_errors_per_probe.get(label, 0)
        err.write(f"  {label}: {c}" + (f" ({lost} lost)" if lost else "")
                  + (f" ({bad} not decoded)" if bad else "") + "\n")
    for label, lost in st.lost_per_probe.items():
        if label not in st.per_probe:
            err.write(f"  {label}: 0 ({lost} lost)\n")
    for label, bad in st.decode_errors_per_probe.items():
        if label not in st.per_probe and label not in st.lost_per_probe:
            err.write(f"  {label}: 0 ({bad} not decoded)\n")
    if status is not None and status < 0:
        err.write(f"apptrace: command ended by {signal.Signals(-status).name}\n")
    elif status is not None:
        err.write(f"apptrace: command exited with status {status}\n")
