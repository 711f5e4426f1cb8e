"""``apptrace semaphores``."""

from __future__ import annotations

import argparse
import sys

from apptrace.cli.base import Command, print_json, say
from apptrace.output import escape_text


class SemaphoresCommand(Command):
    """Show a process's USDT semaphores; lower what a killed tracer left raised.

    With --semaphores procmem, apptrace raises semaphores by writing the
    target's memory and lowers them however it ends -- except SIGKILL, which
    nothing can catch. Each tracer records what it raised (in /run/apptrace as
    root, $XDG_RUNTIME_DIR/apptrace otherwise) until it lowers it; this
    command shows each semaphore's count and how much of it dead tracers left,
    and --reset lowers exactly that: never what a live tracer, the kernel
    (the default kernel mode) or another tool raised.
    """

    name = "semaphores"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-p", "--pid", type=int, required=True, help="the process")
        parser.add_argument("--reset", action="store_true",
                            help="lower what dead apptrace tracers left raised")
        parser.add_argument("--json", action="store_true", help="one JSON document")

    def run(self, args: argparse.Namespace) -> int:
        from apptrace.procs import ProcessRef
        from apptrace.semaphores import find_left_raised, list_semaphores, reset_left_raised

        ProcessRef.from_pid(args.pid)  # one clear line for a bad or kernel PID
        lowered = reset_left_raised(args.pid) if args.reset else []
        values = list_semaphores(args.pid)
        left = find_left_raised(args.pid)
        if args.json:
            print_json({"pid": args.pid, "semaphores": [v.to_json() for v in values],
                        "reset": [{"binary": b, "address": a, "lowered": n, "value": v}
                                  for b, a, n, v in lowered],
                        "dead_tracers": sorted({r.tracer_pid for r in left})})
            return 0
        root = f"/proc/{args.pid}/root"
        for binary, addr, n, now in lowered:
            shown = binary[len(root):] if binary.startswith(root + "/") else binary
            say(f"apptrace: lowered {shown}'s semaphore at {addr:#x} by {n} (now {now})")
        if not values:
            say(f"apptrace: no USDT semaphores in the objects process {args.pid} maps")
            return 0
        rows = [(escape_text(v.binary), escape_text(v.probe), f"{v.address:#x}", str(v.value),
                 str(v.left_raised) if v.left_raised else "") for v in values]
        head = ("BINARY", "PROBE", "ADDRESS", "VALUE", "LEFT BY DEAD TRACER")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        out = sys.stdout
        for r in [head, *rows]:
            out.write("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(r[:4], widths))))
            out.write(f"  {r[4]}\n".rstrip(" \n") + "\n" if r[4] else "\n")
        if left:
            say(f"apptrace: tracers {', '.join(str(r.tracer_pid) for r in left)} died with"
                " semaphores raised; `apptrace semaphores -p"
                f" {args.pid} --reset` lowers them")
        return 0
