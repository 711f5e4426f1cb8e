"""``apptrace prepare``."""

from __future__ import annotations

import argparse
import sys

from apptrace.cli.base import Command, print_json


class PrepareCommand(Command):
    """Compile apptrace's BPF programs once, so traces start without clang.

    A trace's program depends only on the shape of each probe string
    (argument and string counts, stacks), not on the probes themselves: the
    common shapes compiled here serve any probe string later, loaded from
    the compile cache in milliseconds. TLS capture's and JVM GC tracing's
    default programs are compiled too. `make setup` runs it; running it
    again compiles nothing.

    Examples:
      apptrace prepare
    """

    name = "prepare"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON object")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress")

    def run(self, args: argparse.Namespace) -> int:
        from apptrace.capabilities import has_trace_privileges
        from apptrace.engine.program import prepare

        def progress(i: int, n: int, compiled: bool) -> None:
            if not args.quiet and not args.json and sys.stderr.isatty():
                what = "compiled" if compiled else "cached"
                print(f"\rapptrace: program {i}/{n} {what}   ", end="", file=sys.stderr,
                      flush=True)

        from apptrace.jvm.bpfgen import default_programs as jvm_programs
        from apptrace.ssl._kernel import default_programs as ssl_programs

        compiled, cached = prepare(jvm_programs() + ssl_programs(), progress)
        if not args.quiet and not args.json and sys.stderr.isatty():
            print(file=sys.stderr)
        if args.json:
            print_json({"compiled": compiled, "cached": cached})
        elif not args.quiet:
            print(f"apptrace: {compiled} programs compiled, {cached} already cached"
                  + ("" if has_trace_privileges() else
                     " (compiling needs no privilege; tracing will)"))
        return 0
