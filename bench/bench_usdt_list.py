"""Listing the USDT probes of libjvm.so, whole process as users run it, per tool.

    .venv/bin/python bench/bench_usdt_list.py [--quick] [--json]

Compares ``apptrace usdt list LIBJVM`` (the table, and ``--json``) with
``bpftrace -l 'usdt:LIBJVM:*'``, ``readelf -n`` and ``tplist-bpfcc -l`` (each
only if it is installed); ``python -c pass`` shows the interpreter's own
start-up, the floor of any Python tool. The commands are interleaved within
each iteration, in a rotating order, so all tools see the same machine state;
the median of N runs (25, or 7 with --quick) of wall time and of CPU time
(user + system, from the kernel's accounting of each finished child) is
reported with each tool's ratio to apptrace. CPU time is steadier than wall
time on a machine others are using.

apptrace is byte-compiled first, as pip does when it installs a wheel: a
checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every
module on every run and measure the compiler.

Goal: apptrace under 0.1 s and faster than ``bpftrace -l``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
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
        cmds["apptrace"] = [app, "usdt", "list", lib]
        cmds["apptrace --json"] = [app, "usdt", "list", "--json", lib]
        python = Path(app).with_name("python")
        if python.exists():
            cmds["python -c pass"] = [str(python), "-c", "pass"]
    if shutil.which("readelf"):
        cmds["readelf -n"] = ["readelf", "-n", lib]
    if shutil.which("bpftrace"):
        cmds["bpftrace -l"] = ["bpftrace", "-l", f"usdt:{lib}:*"]
    tplist = shutil.which("tplist-bpfcc") or shutil.which("tplist")
    if tplist:
        cmds["tplist -l"] = [tplist, "-l", lib]
    return cmds


def _time_once(argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one run; cpu is user + system of the finished child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def byte_compile(app: str) -> None:
    """Write apptrace's .pyc files, as installing a wheel does."""
    python = Path(app).with_name("python")
    pkg = subprocess.run([str(python), "-c", "import apptrace, os;"
                          " print(os.path.dirname(apptrace.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([str(python), "-m", "compileall", "-q", pkg], env=env,
                   stdout=subprocess.DEVNULL, check=False)


def run(quick: bool = False, runs: Optional[int] = None) -> dict[str, Any]:
    """Measure every installed tool; returns medians, ratios and the goal check."""
    n = runs or (7 if quick else 25)
    lib = find_libjvm()
    if lib is None:
        return {"error": "no JDK found (/usr/lib/jvm/*/lib/server/libjvm.so)"}
    cmds = commands(lib)
    if "apptrace" not in cmds:
        return {"error": "apptrace is not installed (.venv/bin/apptrace)"}
    byte_compile(cmds["apptrace"][0])

    # Warm-up: page cache, and drop tools that cannot list here (e.g. need root).
    skipped: dict[str, str] = {}
    lines: dict[str, int] = {}
    for name, argv in list(cmds.items()):
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            skipped[name] = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            del cmds[name]
            continue
        if name == "apptrace --json":
            doc = json.loads(r.stdout)
            lines[name] = sum(len(p["sites"]) for p in doc)
        else:
            lines[name] = r.stdout.count("\n")
    if "apptrace" not in cmds:
        return {"error": f"apptrace failed: {skipped.get('apptrace')}"}

    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    names = list(cmds)
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:      # rotate who goes first
            samples[name].append(_time_once(cmds[name]))

    base = statistics.median(w for w, _ in samples["apptrace"])
    base_cpu = statistics.median(c for _, c in samples["apptrace"])
    results: dict[str, Any] = {}
    for name, ts in samples.items():
        walls = [w for w, _ in ts]
        med = statistics.median(walls)
        cpu = statistics.median(c for _, c in ts)
        results[name] = {
            "argv": cmds[name],
            "median_s": med,
            "min_s": min(walls),
            "max_s": max(walls),
            "median_cpu_s": cpu,
            "ratio_to_apptrace": med / base if base else None,
            "cpu_ratio_to_apptrace": cpu / base_cpu if base_cpu else None,
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
            "apptrace_median_cpu_s": base_cpu,
            "under_0.1s": base < GOAL_SECONDS,
            "faster_than_bpftrace": None if bpf is None else base < bpf["median_s"],
            "less_cpu_than_bpftrace": None if bpf is None else base_cpu < bpf["median_cpu_s"],
        },
    }


def format_table(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"bench_usdt_list: {res['error']}"
    out = [f"USDT listing of {res['target']} (median of {res['runs']} runs, interleaved)", ""]
    out.append(f"{'tool':<17}{'wall':>9}{'min':>9}{'max':>9}{'x app':>7}{'cpu':>9}{'x app':>7}"
               "  output")
    for name, r in res["results"].items():
        what = ("sites" if name == "apptrace --json" else "lines")
        out.append(f"{name:<17}{r['median_s'] * 1000:>7.1f}ms{r['min_s'] * 1000:>7.1f}ms"
                   f"{r['max_s'] * 1000:>7.1f}ms{r['ratio_to_apptrace']:>6.2f}x"
                   f"{r['median_cpu_s'] * 1000:>7.1f}ms{r['cpu_ratio_to_apptrace']:>6.2f}x  "
                   f"{r['output']} {what}")
    for name, why in res["skipped"].items():
        out.append(f"{name:<17}skipped: {why}")
    g = res["goal"]
    out.append("")
    out.append(f"goal: apptrace < {GOAL_SECONDS:.1f} s: "
               f"{'MET' if g['under_0.1s'] else 'NOT MET'} ({g['apptrace_median_s']:.3f} s)")
    if g["faster_than_bpftrace"] is None:
        out.append("goal: faster than bpftrace -l: n/a (bpftrace not available)")
    else:
        out.append("goal: faster than bpftrace -l: "
                   f"{'MET' if g['faster_than_bpftrace'] else 'NOT MET'} (wall);"
                   f" {'less' if g['less_cpu_than_bpftrace'] else 'more'} CPU time")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="7 runs instead of 25")
    ap.add_argument("--runs", type=int, help="number of runs (overrides --quick)")
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, runs=args.runs)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
