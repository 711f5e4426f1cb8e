"""``apptrace latency``."""

from __future__ import annotations

import argparse
import sys

from apptrace.cli.base import Command, CommandError


class LatencyCommand(Command):
    """Time calls in the kernel: entry to exit per thread, as a histogram with percentiles.

    ENTRY is uprobe:BINARY:SYMBOL (EXIT defaults to its return,
    uretprobe:BINARY:SYMBOL) or a USDT probe string with EXIT another one
    (usdt:postgresql:query__start usdt:postgresql:query__done). Calls nest
    and recurse correctly; a function left by longjmp or an exception is
    counted apart, never paired with the wrong exit. Printed at the end (or
    every --interval): count, average, minimum, maximum, p50/p90/p99 (bounded
    by their log2 bucket) and the histogram, per --by key.

    Examples:
      apptrace latency -d 1 -p PID uprobe:libc:malloc
      apptrace latency -d 1 -p PID 'uprobe:libc:malloc(long)' --by comm --where '4096 <= arg0'
    """

    name = "latency"
    takes_command = True

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        from apptrace.cli.aggregate import add_common_options

        parser.add_argument("entry", metavar="ENTRY")
        parser.add_argument("exit", nargs="?", metavar="EXIT")
        tgt = parser.add_argument_group("target (at most one)")
        tgt.add_argument("-p", "--pid", type=int, help="trace this running process")
        tgt.add_argument("--path", metavar="BIN",
                         help="trace every process running BIN, including later ones")
        parser.add_argument("--by", metavar="KEYS",
                            help="one row per key: comma-separated arg0..arg11 (of the entry),"
                                 " comm, pid, tid, probe")
        parser.add_argument("--where", metavar="EXPR",
                            help="only calls whose entry passes EXPR (arguments of the entry,"
                                 " pid, tid, comm, cpu), decided in the kernel")
        parser.add_argument("-d", "--duration", type=float, metavar="SECONDS",
                            help="stop after this long")
        parser.add_argument("--json", action="store_true",
                            help="one JSON object per result (each interval, and the end)")
        parser.add_argument("-o", "--output", metavar="FILE", help="write results here")
        parser.add_argument("--semaphores", choices=("kernel", "procmem"), default="kernel",
                            help="how to enable USDT semaphores (default: kernel)")
        parser.add_argument("--str-max", type=int, default=64,
                            help="bytes of a string kept in a key (default 64, at most 128)")
        add_common_options(parser)
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="no messages on stderr")

    def run(self, args: argparse.Namespace) -> int:
        from apptrace.agg.latency import Latency
        from apptrace.agg.spec import KEY_STR_MAX
        from apptrace.cli.aggregate import check_common, open_out, run_family
        from apptrace.errors import OptionError
        from apptrace.options import check_int, check_seconds

        command = getattr(args, "command_argv", None)
        if sum(x is not None for x in (args.pid, args.path, command)) > 1:
            raise CommandError("latency: give only one of -p PID, --path BIN, -- CMD")
        check_common(args, "latency")
        try:
            if args.duration is not None:
                check_seconds("-d/--duration", args.duration)
            check_int("--str-max", args.str_max, *KEY_STR_MAX)
            if args.output is not None and not args.output:
                raise OptionError("-o/--output", args.output, "a file name (leave -o out for"
                                  " stdout)")
        except OptionError as err:
            raise CommandError(f"latency: {err}") from err
        out = open_out(args.output)
        try:
            lat = Latency(args.entry, args.exit, pid=args.pid, path=args.path,
                          command=command,
                          command_stdout=2 if command and out is sys.stdout else None,
                          by=args.by, where=args.where, intervals=args.interval is not None,
                          max_keys=args.max_keys, str_max=args.str_max,
                          semaphores=args.semaphores)
        except BaseException:
            if out is not sys.stdout:
                out.close()
            raise
        return run_family(lat, args, out, command="latency")
