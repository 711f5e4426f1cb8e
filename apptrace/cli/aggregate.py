"""What ``apptrace trace --count/--sum/--hist...`` and ``apptrace latency`` share:
options, their checks, and the loop that prints a result every interval and
at the end (a table or histograms, or one JSON object per result)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any, Optional, TextIO

from apptrace.cli.base import CommandError, deferred_signals, print_json, say

AGG_OPTIONS = ("count_keys", "sum", "min", "max", "avg", "hist")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """--interval, --max-keys (the trace command has its own -d, --json, -o, -q)."""
    parser.add_argument("--interval", type=float, metavar="SECONDS",
                        help="print what was counted in each interval of this length")
    parser.add_argument("--max-keys", type=int, default=10240, metavar="N",
                        help="distinct keys kept in the kernel (default 10240); hits beyond"
                             " are counted as not counted")


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    """``apptrace trace``'s in-kernel options."""
    g = parser.add_argument_group(
        "in-kernel filter and aggregation (with any of --count/--sum/--min/--max/--avg/"
        "--hist, hits are counted in the kernel and printed at the end, or every --interval,"
        " instead of one line per event)")
    g.add_argument("--where", metavar="EXPR",
                   help="only hits where EXPR is true, decided in the kernel: arg0..arg11, pid,"
                        " tid, comm, cpu; == != < <= > >= && || ! + - * / %% & | ^ << >>;"
                        ' prefix(arg1, "text"). Example: --where \'arg0 >= 4096 && comm =='
                        ' "java"\'')
    g.add_argument("--count", dest="count_keys", nargs="?", const="", metavar="KEYS",
                   help="count hits per key: comma-separated arg0..arg11, pid, tid, comm, cpu,"
                        " probe, ustack (none: one total)")
    for name in ("sum", "min", "max", "avg"):
        g.add_argument(f"--{name}", metavar="EXPR", help=f"the {name} of EXPR per key")
    g.add_argument("--hist", metavar="EXPR[:MIN:MAX:STEP]",
                   help="a histogram of EXPR per key: log2 buckets, or linear from MIN to MAX")
    add_common_options(g)  # type: ignore[arg-type]


def wants_aggregation(args: argparse.Namespace) -> bool:
    return any(getattr(args, a, None) is not None for a in AGG_OPTIONS)


def check_common(args: argparse.Namespace, command: str) -> None:
    from apptrace.agg.spec import MAX_KEYS
    from apptrace.errors import OptionError
    from apptrace.options import check_int, check_seconds

    try:
        if args.interval is not None:
            check_seconds("--interval", args.interval, hi=86400)
        check_int("--max-keys", args.max_keys, *MAX_KEYS)
    except OptionError as err:
        raise CommandError(f"{command}: {err}") from err


def run_family(family: Any, args: argparse.Namespace, out: TextIO, *, command: str) -> int:
    """Start the family, print a result every --interval and at the end.

    Stops at -d, when the target exits, at Ctrl-C or SIGTERM. The result is
    read after detaching, so it covers every hit up to the stop.
    """
    stopping = {"flag": False}

    def on_term(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        family.start()
        if not args.quiet:
            sites = sum(p.sites for p in family.probes)
            every = f", printing every {args.interval:g}s" if args.interval else ""
            say(f"apptrace: attached {len(family.probes)} probes ({sites} sites) in"
                f" {family.attach_seconds:.2f}s{every}; Ctrl-C to stop")
        deadline = None if args.duration is None else time.monotonic() + args.duration
        next_print = time.monotonic() + args.interval if args.interval else None
        try:
            while not stopping["flag"]:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                stops = [t for t in (deadline, next_print) if t is not None]
                wait = min(stops) - now if stops else 0.2
                if not family.wait(max(0.0, min(wait, 0.2))):
                    break
                if next_print is not None and time.monotonic() >= next_print:
                    _emit(family.read_interval(), out, args.json)
                    next_print += args.interval
        except KeyboardInterrupt:
            pass
        family.detach()  # nothing fires from here on: the last result is complete
        result = family.read_interval() if args.interval else family.read()
        _emit(result, out, args.json)
    finally:
        signal.signal(signal.SIGTERM, old)
        with deferred_signals():
            family.close()
        if out is not sys.stdout:
            out.close()
        else:
            sys.stdout.flush()
    from apptrace.cli.base import command_status

    status = family.exit_status
    if not args.quiet and status is not None:
        if status < 0:
            say(f"apptrace: command ended by {signal.Signals(-status).name}")
        else:
            say(f"apptrace: command exited with status {status}")
    return command_status(status if getattr(args, "command_argv", None) else None)


def _emit(result: Any, out: TextIO, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json(), out)
    else:
        out.write(result.format() + "\n\n")
    out.flush()


def open_out(path: Optional[str]) -> TextIO:
    from apptrace.output import open_output

    if path is None:
        return sys.stdout
    return open_output(path)  # type: ignore[return-value]


def run_trace_aggregation(args: argparse.Namespace, command: Optional[list[str]]) -> int:
    """``apptrace trace`` with an aggregation option: the Aggregator family."""
    from apptrace.agg import Aggregator
    from apptrace.agg.spec import parse_hist, parse_keys
    from apptrace.errors import OptionError

    for flag, bad in (("--stack", args.stack), ("--folded", args.folded),
                      ("--no-symbolize", args.no_symbolize), ("-n/--max-events",
                                                              args.count is not None)):
        if bad:
            raise CommandError(f"trace: {flag} prints events; it does not go with --count,"
                               " --sum, --min, --max, --avg or --hist (use --count ustack for"
                               " stacks)" if flag != "-n/--max-events" else
                               "trace: -n/--max-events counts printed events; with --count"
                               " and the like nothing is printed per event (use -d)")
    check_common(args, "trace")
    try:
        keys = parse_keys(args.count_keys)
        hist = parse_hist(args.hist) if args.hist is not None else None
        from apptrace.agg.spec import KEY_STR_MAX
        from apptrace.options import check_int

        check_int("--str-max", args.str_max, *KEY_STR_MAX)
    except OptionError as err:
        raise CommandError(f"trace: {err}") from err
    out = open_out(args.output)
    try:
        agg = Aggregator(pid=args.pid, path=args.path, command=command,
                         command_stdout=2 if command and out is sys.stdout else None,
                         keys=keys, where=args.where, sum=args.sum, min=args.min,
                         max=args.max, avg=args.avg, hist=hist,
                         intervals=args.interval is not None, max_keys=args.max_keys,
                         str_max=args.str_max, semaphores=args.semaphores)
        for p in args.probes:
            agg.add(p)
    except BaseException:
        if out is not sys.stdout:
            out.close()
        raise
    return run_family(agg, args, out, command="trace")
