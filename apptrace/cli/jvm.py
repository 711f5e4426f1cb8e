"""``apptrace jvm gc``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Optional, TextIO

from apptrace.cli.base import Command, CommandError, deferred_signals, say
from apptrace.output import EscapingWriter, open_output

if TYPE_CHECKING:
    from apptrace.jvm.gctrace import GcEvent, GcTracer
    from apptrace.jvm.prometheus import GcMetrics, MetricsServer


class JvmGcCommand(Command):
    """Trace a JVM's garbage-collection pauses through HotSpot's USDT probes.

    One line per stop-the-world pause (like a GC log line: kind, cause, heap
    before->after, duration, safepoint time) or per concurrent cycle (ZGC,
    Shenandoah); at the end, per collector: count, total, p50/p90/p99/max
    and a log2 histogram. No JVM flag is needed: JDKs built with DTrace
    probes (Debian/Ubuntu, Red Hat, Temurin) have them; Oracle's and
    Corretto's builds do not, and are reported as such.

    Target (exactly one): -p PID, --name NAME (process name, main class or
    jar), --all (every JVM on the machine, also those started later), or
    -- java ARGS... (started and held until the probes are in; apptrace then
    exits with its status, and its stdout goes to stderr).

    --histogram counts pauses in the kernel (lowest overhead): no per-pause
    lines, only the summary. --check-gc-log FILE compares with a log the JVM
    wrote with -Xlog:gc*,safepoint:file=FILE:uptime,timenanos (exit status 1
    when the pause counts differ). --prometheus [HOST:]PORT serves the
    numbers on /metrics while tracing (PORT alone: every interface).

    Examples:
      apptrace jvm gc -p JAVA_PID -d 2
      apptrace jvm gc --json -p JAVA_PID -d 1
      apptrace jvm gc --histogram -p JAVA_PID -d 1
      apptrace jvm gc --prometheus 127.0.0.1:0 -p JAVA_PID -d 1
    """

    name = "jvm gc"
    takes_command = True

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        tgt = parser.add_argument_group("target (exactly one, or -- java ARGS...)")
        tgt.add_argument("-p", "--pid", type=int, help="trace this JVM")
        tgt.add_argument("--name", help="trace the JVMs with this process name, main class"
                                        " or jar")
        tgt.add_argument("--all", action="store_true", dest="all_jvms",
                         help="trace every JVM, also those started later")
        parser.add_argument("--json", action="store_true",
                            help="JSON lines: one per pause or cycle, then the summary")
        parser.add_argument("-d", "--duration", type=float, metavar="SECONDS",
                            help="stop after this long")
        parser.add_argument("--histogram", action="store_true",
                            help="count pauses in the kernel: summary and histograms only")
        parser.add_argument("--check-gc-log", metavar="FILE",
                            help="at the end, compare with this -Xlog:gc* log (timenanos)")
        parser.add_argument("--prometheus", metavar="[HOST:]PORT",
                            help="serve metrics on http://HOST:PORT/metrics while tracing")
        parser.add_argument("-o", "--output", metavar="FILE", help="write the output here")
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="no progress messages on stderr")

    def run(self, args: argparse.Namespace) -> int:
        from apptrace.jvm.gctrace import GcTracer

        command = getattr(args, "command_argv", None)
        given = [n for n, v in (("-p", args.pid), ("--name", args.name),
                                ("--all", args.all_jvms or None), ("--", command))
                 if v is not None]
        if len(given) != 1:
            raise CommandError("jvm gc: give exactly one target: -p PID, --name NAME, --all"
                               " or -- java ARGS..." + (f" (got {' '.join(given)})"
                                                        if given else ""))
        _check_options(args)
        if args.histogram and args.check_gc_log:
            raise CommandError("jvm gc: --check-gc-log compares each pause; it cannot be"
                               " used with --histogram")
        out: TextIO = sys.stdout
        if args.output is not None:
            out = open_output(args.output)  # type: ignore[assignment]
        tracer: Optional[GcTracer] = None
        server: Optional[MetricsServer] = None
        metrics: Optional[GcMetrics] = None
        kept: list[GcEvent] = []
        check_failed = False
        status: Optional[int] = None
        try:
            tracer = GcTracer(pid=args.pid, name=args.name, all_jvms=args.all_jvms,
                              command=command, aggregate=args.histogram,
                              command_stdout=2 if command and out is sys.stdout else None)
            if args.prometheus is not None:
                from apptrace.jvm.prometheus import GcMetrics, MetricsServer

                metrics = GcMetrics()
                server = MetricsServer(args.prometheus, metrics)
            tracer.start()
            if metrics is not None:
                metrics.update(tracer)
            if not args.quiet:
                _started(tracer, server)
            self._loop(tracer, args, out, metrics, kept)
            tracer.detach()
            for ev in tracer.poll(0):  # the last records, after the probes are out
                self._event(ev, args, out, kept)
            summary = tracer.summary()
            seconds = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - tracer.start_ns) / 1e9
            names = {pid: tracer.main_class(pid) for pid in
                     {c.pid for c in summary.collectors}}
            if args.json:
                doc = summary.to_json()
                doc["seconds"] = round(seconds, 3)
                doc["main_class"] = {str(k): v for k, v in names.items()}
                out.write(json.dumps(doc, separators=(",", ":")) + "\n")
            else:
                w = EscapingWriter(out)
                if not args.histogram:
                    w.write("\n")
                for line in _summary_lines(summary, names, seconds):
                    w.write(line + "\n")
            if args.check_gc_log:
                check_failed = not self._check(tracer, args, out, kept)
            if summary.lost:
                say(f"apptrace: warning: {summary.lost} pauses lost (the ring buffer or a map"
                    " was full); their counts are missing from the summary")
            counters = dict(summary.counters)
            if counters.get("pools_dropped"):
                from apptrace.jvm.bpfgen import MAX_POOLS

                say(f"apptrace: warning: {counters['pools_dropped']} memory pools beyond"
                    f" {MAX_POOLS} per pause were not recorded")
            if counters.get("heap_full"):
                say(f"apptrace: warning: the pool usage of {counters['heap_full']} pools could"
                    " not be kept: too many JVMs for the table")
            if counters.get("names_full"):
                say(f"apptrace: warning: {counters['names_full']} names could not be kept"
                    " (shown as ?0x...): too many JVMs for the name table")
            if metrics is not None:
                metrics.update(tracer)
            status = tracer.exit_status if command else None
        finally:
            try:
                with deferred_signals():  # a signal now must not cut the cleanup short
                    if tracer is not None:
                        tracer.close()
                    if server is not None:
                        server.close()
            finally:
                if out is not sys.stdout:
                    out.close()
                else:
                    sys.stdout.flush()
        if check_failed:
            return 1
        from apptrace.cli.base import command_status

        return command_status(status)

    def _loop(self, tracer: GcTracer, args: argparse.Namespace, out: TextIO,
              metrics: Optional[GcMetrics], kept: list[GcEvent]) -> None:
        deadline = None if args.duration is None else time.monotonic() + args.duration
        next_publish = 0.0
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                alive = tracer.alive()
                events = tracer.poll(0.2 if remaining is None else min(0.2, remaining))
                for ev in events:
                    self._event(ev, args, out, kept)
                if events:
                    out.flush()  # stream: `apptrace jvm gc --json | jq` sees pauses now
                if metrics is not None and time.monotonic() >= next_publish:
                    metrics.update(tracer)
                    next_publish = time.monotonic() + 0.5
                if not alive and not events:
                    if not args.quiet and not tracer.command:
                        say("apptrace: the traced JVM exited")
                    break
        except KeyboardInterrupt:
            pass

    @staticmethod
    def _event(ev: GcEvent, args: argparse.Namespace, out: TextIO, kept: list[GcEvent]) -> None:
        from apptrace.jvm.gctrace import format_event

        if args.check_gc_log:
            kept.append(ev)
        if args.json:
            out.write(json.dumps(ev.to_json(), separators=(",", ":")) + "\n")
            return
        from apptrace.output import escape_text

        out.write(escape_text(format_event(ev, _clock(ev.ts_ns))) + "\n")

    @staticmethod
    def _check(tracer: GcTracer, args: argparse.Namespace, out: TextIO,
               kept: list[GcEvent]) -> bool:
        from apptrace.jvm.gclog import compare_with_log, format_comparison, read_gc_log

        log = read_gc_log(args.check_gc_log)
        result = compare_with_log(kept, log, tracer.start_ns)
        if args.json:
            out.write(json.dumps(result.to_json(), separators=(",", ":")) + "\n")
        else:
            w = EscapingWriter(out)
            w.write("\n")
            for line in format_comparison(result, args.check_gc_log):
                w.write(line + "\n")
        return result.counts_equal


def _check_options(args: argparse.Namespace) -> None:
    from apptrace.errors import OptionError
    from apptrace.options import check_int, check_seconds

    try:
        if args.duration is not None:
            check_seconds("-d/--duration", args.duration)
        if args.pid is not None:
            check_int("-p/--pid", args.pid, 1)
        if args.name is not None and not args.name:
            raise OptionError("--name", args.name, "a process name, main class or jar")
        if args.output is not None and not args.output:
            raise OptionError("-o/--output", args.output, "a file name (leave -o out for"
                              " stdout)")
        if args.prometheus is not None:
            from apptrace.jvm.prometheus import parse_listen

            parse_listen(args.prometheus)
    except OptionError as err:
        raise CommandError(f"jvm gc: {err}") from err


_WALL_OFFSET = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _clock(ts_ns: int) -> str:
    """A CLOCK_MONOTONIC stamp as local wall-clock time, to the millisecond."""
    wall = (ts_ns + _WALL_OFFSET) / 1e9
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def _started(tracer: GcTracer, server: Optional[MetricsServer]) -> None:
    libs = ", ".join(sorted({lib.shown for lib in tracer.libjvms}))
    if tracer.all_jvms:
        what = "every JVM (system-wide)"
    elif tracer.command:
        what = f"pid {tracer.child_pid} ({tracer.command[0]})"
    else:
        what = ", ".join(f"pid {p} ({tracer.main_class(p)})" for p in tracer.traced_pids)
    mode = "in-kernel histograms" if tracer.aggregate else "one line per pause"
    say(f"apptrace: tracing GC of {what} through {libs} in {tracer.attach_seconds:.2f}s"
        f" ({mode}); Ctrl-C to stop")
    for w in tracer.warnings:
        say(f"apptrace: warning: {w}")
    if server is not None:
        say(f"apptrace: serving metrics on {server.url}")


def _summary_lines(summary: Any, names: dict[int, str], seconds: float) -> list[str]:
    from apptrace.jvm.summary import format_summary

    return format_summary(summary, names, seconds)
