"""Wall time of listing the USDT probes of libjvm.so, whole process, per tool.

    .venv/bin/python bench/bench_usdt_list.py [--quick] [--json]

Compares ``apptrace usdt list --json LIBJVM`` with ``readelf -n``,
``bpftrace -l 'usdt:LIBJVM:*'`` and ``tplist-bpfcc -l`` (each only if it is
installed). The commands are interleaved within each iteration, in a rotating
order, so all tools see the same machine state; the median of N runs is
reported (15, or 5 with --quick) with each tool's ratio to apptrace.

Goal: apptrace under 0.1 s and faster than ``bpftrace -l``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 0.1


def find_libjvm() -> Optional[str]:
    found = sorted(glob.glob("/usr/lib/jvm/*/lib/server/libjvm.so"))
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "lib/server/libjvm.so")):
        found.insert(0, os.path.join(java_home, "lib/server/libjvm.so"))
    return os.path.realpath(found[0]) if found else None


def find_apptrace() -> Optional[str]:
    venv = ROOT / ".venv" / "bin" / "apptrace"
    if venv.exists():
        return str(venv)
    return shutil.which("apptrace")


def commands(lib: str) -> dict[str, list[str]]:
    """Tool name -> argv, for the tools installed here. apptrace comes first."""
    cmds: dict[str, list[str]] = {}
    app = find_apptrace()
    if app:
        cmds["apptrace"] = [app, "usdt", "list", "--json", lib]
    if shutil.which("readelf"):
        cmds["readelf -n"] = ["readelf", "-n", lib]
    if shutil.which("bpftrace"):
        cmds["bpftrace -l"] = ["bpftrace", "-l", f"usdt:{lib}:*"]
    tplist = shutil.which("tplist-bpfcc") or shutil.which("tplist")
    if tplist:
        cmds["tplist -l"] = [tplist, "-l", lib]
    return cmds


def _time_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def run(quick: bool = False, runs: Optional[int] = None) -> dict[str, Any]:
    """Measure every installed tool; returns medians, ratios and the goal check."""
    n = runs or (5 if quick else 15)
    lib = find_libjvm()
    if lib is None:
        return {"error": "no JDK found (/usr/lib/jvm/*/lib/server/libjvm.so)"}
    cmds = commands(lib)
    if "apptrace" not in cmds:
        return {"error": "apptrace is not installed (.venv/bin/apptrace)"}

    # Warm-up: page cache, and drop tools that cannot list here (e.g. need root).
    skipped: dict[str, str] = {}
    lines: dict[str, int] = {}
    for name, argv in list(cmds.items()):
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            skipped[name] = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            del cmds[name]
            continue
        if name == "apptrace":
            doc = json.loads(r.stdout)
            lines[name] = sum(len(p["sites"]) for p in doc)
        else:
            lines[name] = r.stdout.count("\n")
    if "apptrace" not in cmds:
        return {"error": f"apptrace failed: {skipped.get('apptrace')}"}

    samples: dict[str, list[float]] = {name: [] for name in cmds}
    names = list(cmds)
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:      # rotate who goes first
            samples[name].append(_time_once(cmds[name]))

    base = statistics.median(samples["apptrace"])
    results: dict[str, Any] = {}
    for name, ts in samples.items():
        med = statistics.median(ts)
        results[name] = {
            "argv": cmds[name],
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "ratio_to_apptrace": med / base if base else None,
            "output": lines.get(name),
        }
    bpf = results.get("bpftrace -l")
    return {
        "target": lib,
        "runs": n,
        "results": results,
        "skipped": skipped,
        "goal": {
            "apptrace_median_s": base,
            "under_0.1s": base < GOAL_SECONDS,
            "faster_than_bpftrace": None if bpf is None else base < bpf["median_s"],
        },
    }


def format_table(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"bench_usdt_list: {res['error']}"
    out = [f"USDT listing of {res['target']} (median of {res['runs']} runs, interleaved)", ""]
    out.append(f"{'tool':<14}{'median':>10}{'min':>10}{'max':>10}{'x apptrace':>12}  output")
    for name, r in res["results"].items():
        what = ("sites" if name == "apptrace" else "lines")
        out.append(f"{name:<14}{r['median_s'] * 1000:>8.1f}ms{r['min_s'] * 1000:>8.1f}ms"
                   f"{r['max_s'] * 1000:>8.1f}ms{r['ratio_to_apptrace']:>11.2f}x  "
                   f"{r['output']} {what}")
    for name, why in res["skipped"].items():
        out.append(f"{name:<14}skipped: {why}")
    g = res["goal"]
    out.append("")
    out.append(f"goal: apptrace < {GOAL_SECONDS:.1f} s: "
               f"{'MET' if g['under_0.1s'] else 'NOT MET'} ({g['apptrace_median_s']:.3f} s)")
    if g["faster_than_bpftrace"] is None:
        out.append("goal: faster than bpftrace -l: n/a (bpftrace not available)")
    else:
        out.append("goal: faster than bpftrace -l: "
                   f"{'MET' if g['faster_than_bpftrace'] else 'NOT MET'}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 runs instead of 15")
    ap.add_argument("--runs", type=int, help="number of runs (overrides --quick)")
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, runs=args.runs)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
