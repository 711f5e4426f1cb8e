"""``apptrace doctor``."""

from __future__ import annotations

import argparse
import sys

from apptrace.cli.base import Command, print_json
from apptrace.output import escape_text


class DoctorCommand(Command):
    """Check that this machine can trace: privileges, kernel features, bcc, symbolizer, JDKs.

    Exits non-zero when a required check fails; each failure names its fix.
    Without root, checks that must ask the kernel say they were skipped
    ("skip": not checked) instead of reporting a missing feature.
    """

    name = "doctor"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from apptrace.capabilities import run_checks

        live = not args.json and sys.stderr.isatty()

        def progress(step: str) -> None:
            if live:
                sys.stderr.write(f"\rchecking {step}...\x1b[K")
                sys.stderr.flush()

        checks = run_checks(progress=progress)
        if live:
            sys.stderr.write("\r\x1b[K")
        # A check that could not run (no privilege) is not a failure of its
        # own: the privileges check already fails and names the fix.
        failed = [c for c in checks if c.required and not c.ok and c.checked]
        if args.json:
            print_json({"ok": not failed, "checks": [c.to_json() for c in checks]})
        else:
            w = max(len(c.name) for c in checks)
            for c in checks:
                mark = "skip" if not c.checked else "ok  " if c.ok else (
                    "FAIL" if c.required else "warn")
                line = f"{mark}  {c.name:<{w}}  {c.detail}"
                if not c.ok and c.fix:
                    line += f"  -> fix: {c.fix}"
                print(escape_text(line))
        return 1 if failed else 0
