"""``apptrace usdt list``."""

from __future__ import annotations

import argparse
import sys

from apptrace.cli.base import Command, CommandError, print_json, say
from apptrace.errors import NoProbesError
from apptrace.usdt import Probe, list_probes
from apptrace.usdt.companions import companions_of


class UsdtListCommand(Command):
    """List the USDT probes of binaries, libraries or a running process.

    TARGET is an ELF path, a library name resolved as the dynamic linker would
    (libc, libssl.so.3) or a program on PATH. With -p PID, every object the
    process maps is read (through /proc/PID/root, so containers work).
    """

    name = "usdt list"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("targets", nargs="*", metavar="TARGET")
        parser.add_argument("-p", "--pid", type=int, help="list probes mapped by this process")
        parser.add_argument("--json", action="store_true", help="one JSON array of probes")
        parser.add_argument("-v", "--verbose", action="store_true", help="show every site")

    def run(self, args: argparse.Namespace) -> int:
        if not args.targets and args.pid is None:
            raise CommandError("usdt list: give at least one TARGET or -p PID")
        probes: list[Probe] = []
        empty: list[str] = []  # named targets without probes: said, not fatal
        if len(args.targets) > 1:
            for t in args.targets:
                try:
                    probes.extend(list_probes([t], pid=args.pid))
                except NoProbesError as err:
                    empty.append(t)
                    say(f"apptrace: {err}")
            if not probes:
                raise CommandError(f"usdt list: no USDT probes in {', '.join(empty)}", 1)
        else:
            probes = list_probes(args.targets, pid=args.pid)
        if args.json:
            print_json([p.to_json() for p in probes])
            return 0
        if not probes:
            print(f"no USDT probes in process {args.pid}", file=sys.stderr)
            return 0
        _table(probes, args.verbose)
        return 0


def _table(probes: list[Probe], verbose: bool) -> None:
    from apptrace.output import EscapingWriter

    out = EscapingWriter(sys.stdout)  # names and specs come from the binary: no escapes
    binw = max(len(p.binary) for p in probes)
    namew = max(len(p.fullname) for p in probes)
    out.write(f"{'BINARY':<{binw}}  {'PROBE':<{namew}}  SITES  SEMA  ARGS\n")
    for p in probes:
        args = " ".join(f"[{a.describe()}]" for a in p.sites[0].args)
        if not verbose and len({s.args_spec for s in p.sites}) > 1:
            args += "  (sites differ; -v)"
        out.write(f"{p.binary:<{binw}}  {p.fullname:<{namew}}  {len(p.sites):>5}  "
                  f"{'yes' if p.has_semaphore else 'no':>4}  {args}\n")
        if verbose:
            for provider, name in companions_of(p.provider, p.name):
                out.write(f"    tracing it also raises {provider}:{name}'s semaphore (the"
                          " interpreter reaches this probe only on its tracing path),"
                          " without tracing that probe\n")
            for s in p.sites:
                sema = f" sema={s.semaphore_address:#x}@{s.semaphore_offset:#x}" \
                    if s.semaphore else ""
                out.write(f"    site pc={s.pc:#x} off={s.file_offset:#x}{sema}"
                          f"  args: {s.args_spec}\n")
                for i, a in enumerate(s.args):
                    out.write(f"      arg{i}: {a.spec:<24} {a.describe()}\n")
