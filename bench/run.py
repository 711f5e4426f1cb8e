#!/usr/bin/env python3
"""Run every benchmark module in bench/ and collect the results.

A module takes part when its file is ``bench/bench_*.py`` and it exposes
``run(quick: bool) -> dict``; if it also has ``format_table(result) -> str``
that prints its table, otherwise the result is printed as JSON. The three
issue benchmarks (bench_engine, bench_usdt_list, bench_symbolize) run first.
One module failing does not stop the others; all results go to
.build/bench.json.

Usage: python bench/run.py [--quick] [--only NAME ...] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXPECTED = ("bench_engine", "bench_usdt_list", "bench_symbolize", "bench_gc", "bench_ssl",
            "bench_agg")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def discover() -> list[str]:
    found = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    return [n for n in EXPECTED if n in found] + [n for n in found if n not in EXPECTED]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster runs")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these modules (e.g. bench_engine or engine)")
    parser.add_argument("--output", default=str(REPO / ".build" / "bench.json"),
                        help="where to write the JSON results (default .build/bench.json)")
    args = parser.parse_args(argv)

    names = discover()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        names = [n for n in names if n in wanted]
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "host": {"machine": platform.machine(), "kernel": platform.release(),
                 "python": platform.python_version(), "cpus": os.cpu_count()},
        "modules": {},
    }
    failed = 0
    for missing in EXPECTED:
        if missing not in names and not args.only:
            print(f"== {missing}: skipped (bench/{missing}.py is not present)\n", flush=True)
            report["modules"][missing] = {"skipped": "module not present"}
    for name in names:
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            mod = load(name)
            fn = getattr(mod, "run", None)
            if not callable(fn):
                print(f"   skipped: {name} has no run(quick)\n", flush=True)
                report["modules"][name] = {"skipped": "no run(quick)"}
                continue
            result = fn(quick=args.quick)
        except Exception as err:  # noqa: BLE001 - report and go on with the others
            failed += 1
            tb = traceback.format_exc()
            print(f"   FAILED: {type(err).__name__}: {err}\n{tb}", flush=True)
            report["modules"][name] = {"error": f"{type(err).__name__}: {err}",
                                       "traceback": tb,
                                       "seconds": time.monotonic() - t}
            continue
        secs = time.monotonic() - t
        table = getattr(mod, "format_table", None)
        try:
            text = table(result) if callable(table) else json.dumps(result, indent=2,
                                                                   default=_json_default)
        except Exception as err:  # noqa: BLE001 - the numbers still go to the JSON
            text = f"(cannot format the table: {type(err).__name__}: {err})"
        print(text, flush=True)
        print(f"   ({secs:.1f}s)\n", flush=True)
        if isinstance(result, dict):
            result.setdefault("seconds", secs)
        report["modules"][name] = result

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(f"results written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
