#!/usr/bin/env python3
"""How fast apptrace.symbolize turns addresses into frames, next to addr2line.

A C file with many functions (each with an inlined helper) is generated and
compiled with -g at run time, so the numbers do not depend on what happens to
be installed. The same random addresses inside those functions go to:

* apptrace cold: a fresh Symbolizer (DWARF parsed during the call),
* apptrace warm: the same Symbolizer again (what a long-running tracer sees:
  repeated addresses come from its result cache, new ones from blazesym),
* apptrace warm, process: absolute addresses in a running copy of the binary,
* the bare blazesym call, to show what the Python side costs,
* binutils ``addr2line -f -i``: one process, addresses on stdin.

Usage: python bench/bench_symbolize.py [--quick] [--json]
``run(quick)`` returns the results as a dict for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from apptrace.symbolize import Symbolizer  # noqa: E402

GOAL_WARM_PER_S = 200_000
GOAL_VS_ADDR2LINE = 10.0
REPEATS = 5  # best-of, to ride out noise on shared machines


def generate_source(nfuncs: int) -> str:
    """C source with `nfuncs` small functions, each calling an inlined helper."""
    parts = [
        "#include <stdio.h>",
        "static inline __attribute__((always_inline)) int mix(int a, int b) {",
        "    int t = a * 31 + b;",
        "    t ^= t >> 7;",
        "    return t + 3;",
        "}",
    ]
    for i in range(nfuncs):
        parts += [
            f"__attribute__((noinline)) int fn_{i}(int x) {{",
            f"    int acc = x + {i};",
            "    for (int k = 0; k < 3; k++) {",
            f"        acc = mix(acc, k + {i % 17});",
            "    }",
            f"    if (acc & 1) acc += {i * 7 % 101};",
            "    return acc;",
            "}",
        ]
    parts.append("typedef int (*fn_t)(int);")
    parts.append("static fn_t table[] = {" + ", ".join(f"fn_{i}" for i in range(nfuncs)) + "};")
    parts += [
        "int main(void) {",
        "    int s = 0;",
        f"    for (int i = 0; i < {nfuncs}; i++) s += table[i](i);",
        '    printf("ready %d\\n", s);',
        "    fflush(stdout);",
        "    char buf[8];",
        "    return fgets(buf, sizeof buf, stdin) == NULL;",
        "}",
    ]
    return "\n".join(parts) + "\n"


def function_ranges(binary: Path) -> list[tuple[int, int]]:
    """(start, size) of every fn_* in the binary's .symtab."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    with open(binary, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        if not isinstance(table, SymbolTableSection):
            raise RuntimeError(f"{binary} has no .symtab")
        return [(s["st_value"], s["st_size"]) for s in table.iter_symbols()
                if s.name.startswith("fn_") and s["st_size"] > 0]


def load_base(pid: int, binary: Path) -> int:
    """Where the binary's file offset 0 is mapped in the process (PIE load bias)."""
    real = os.path.realpath(binary)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise RuntimeError(f"{binary} not mapped in {pid}")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def native_only(symz: Symbolizer, path: str, addrs: list[int]) -> float:
    """Seconds for the bare blazesym call on a warm symbolizer, no Python frames built.

    Uses the binding's internals on purpose: it splits the warm time into
    what blazesym costs and what building StackFrame objects costs.
    """
    from apptrace import symbolize

    b = symbolize._binding()
    src = b.ffi.new("struct blaze_symbolize_src_elf *")
    cpath = b.ffi.new("char[]", path.encode())
    src.type_size = b.src_elf_size
    src.path = cpath
    src.debug_syms = True
    arr = b.ffi.new("uint64_t[]", addrs)
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        res = b.lib.blaze_symbolize_elf_virt_offsets(symz._ptr, src, arr, len(addrs))
        best = min(best, time.perf_counter() - t0)
        if res == b.null:
            raise RuntimeError("blazesym failed in the native-only measurement")
        b.lib.blaze_syms_free(res)
    return best


def run_addr2line(binary: Path, addrs: list[int]) -> tuple[float, int]:
    """Seconds for one addr2line process to resolve all addresses, and the lines it printed."""
    feed = "".join(f"{a:#x}\n" for a in addrs)
    t0 = time.perf_counter()
    out = subprocess.run(["addr2line", "-f", "-i", "-e", str(binary)], input=feed,
                         capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, out.count("\n")


def run(quick: bool = False) -> dict[str, Any]:
    """Build the test binary, measure, and return the numbers."""
    nfuncs = 500 if quick else 2000
    naddrs = 5_000 if quick else 20_000
    rng = random.Random(1234)
    with tempfile.TemporaryDirectory(prefix="apptrace-bench-sym-") as tmp:
        src = Path(tmp) / "many.c"
        src.write_text(generate_source(nfuncs))
        binary = Path(tmp) / "many"
        subprocess.run(["gcc", "-g", "-O0", "-fno-omit-frame-pointer", str(src), "-o",
                        str(binary)], check=True)
        ranges = function_ranges(binary)
        addrs = []
        for _ in range(naddrs):
            start, size = ranges[rng.randrange(len(ranges))]
            addrs.append(start + rng.randrange(size))
        path = str(binary)

        results: dict[str, Any] = {
            "binary_bytes": binary.stat().st_size,
            "functions": len(ranges),
            "addresses": naddrs,
        }

        # Cold: a new symbolizer has to open and parse the ELF and DWARF.
        def cold() -> list[Any]:
            with Symbolizer() as s:
                return s.symbolize_elf(path, addrs)

        cold_runs = [timed(cold) for _ in range(REPEATS)]
        results["cold_s"] = min(t for t, _ in cold_runs)
        cold_frames = cold_runs[0][1]

        with Symbolizer() as symz:
            symz.symbolize_elf(path, addrs)
            warm_runs = [timed(lambda: symz.symbolize_elf(path, addrs))
                         for _ in range(REPEATS)]
            results["warm_s"] = min(t for t, _ in warm_runs)
            frames = warm_runs[0][1]
            results["native_s"] = native_only(symz, path, addrs)

            proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None and proc.stdin is not None
                proc.stdout.readline()
                base = load_base(proc.pid, binary)
                # Offset 0 maps to vaddr 0 for gcc's PIE output, so base + vaddr.
                abs_addrs = [base + a for a in addrs]
                symz.symbolize_process(proc.pid, abs_addrs)
                proc_runs = [timed(lambda: symz.symbolize_process(proc.pid, abs_addrs))
                             for _ in range(REPEATS)]
                results["warm_process_s"] = min(t for t, _ in proc_runs)
                proc_frames = proc_runs[0][1]
                proc.stdin.close()
            finally:
                proc.kill()
                proc.wait()

        results["frames"] = sum(len(g) for g in frames)
        results["inlined_frames"] = sum(f.inlined for g in frames for f in g)
        unresolved = sum(g[0].symbol is None for g in frames)
        if unresolved or cold_frames != frames:
            raise RuntimeError(f"benchmark self-check failed: {unresolved} unresolved")
        if [[f.symbol for f in g] for g in proc_frames] != \
                [[f.symbol for f in g] for g in frames]:
            raise RuntimeError("benchmark self-check failed: process and ELF results differ")

        if shutil.which("addr2line"):
            a2l_runs = [run_addr2line(binary, addrs) for _ in range(REPEATS)]
            results["addr2line_s"] = min(t for t, _ in a2l_runs)
            results["addr2line_output_lines"] = a2l_runs[0][1]

    for key in ("cold", "warm", "warm_process", "native", "addr2line"):
        if f"{key}_s" in results:
            results[f"{key}_per_s"] = naddrs / results[f"{key}_s"]
    if "addr2line_s" in results:
        results["warm_vs_addr2line"] = results["addr2line_s"] / results["warm_s"]
        results["cold_vs_addr2line"] = results["addr2line_s"] / results["cold_s"]
    results["goal_warm_met"] = results["warm_per_s"] >= GOAL_WARM_PER_S
    if "warm_vs_addr2line" in results:
        results["goal_vs_addr2line_met"] = results["warm_vs_addr2line"] >= GOAL_VS_ADDR2LINE
    return results


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"symbolize: {r['addresses']} addresses in {r['functions']} functions "
        f"({r['binary_bytes'] // 1024} KiB binary, {r['frames']} frames, "
        f"{r['inlined_frames']} inlined)",
        f"{'method':<28}{'seconds':>10}{'addr/s':>14}{'vs addr2line':>14}",
    ]
    a2l = r.get("addr2line_s")
    for label, key in (("apptrace cold (new)", "cold"), ("apptrace warm (ELF)", "warm"),
                       ("apptrace warm (process)", "warm_process"),
                       ("  blazesym C call alone", "native"),
                       ("addr2line -f -i", "addr2line")):
        if f"{key}_s" not in r:
            continue
        secs = r[f"{key}_s"]
        ratio = f"{a2l / secs:.1f}x" if a2l else "-"
        lines.append(f"{label:<28}{secs:>10.4f}{r[f'{key}_per_s']:>14,.0f}{ratio:>14}")
    goal = "met" if r["goal_warm_met"] else "MISSED"
    lines.append(f"goal >= {GOAL_WARM_PER_S:,} addr/s warm: {goal}")
    if "goal_vs_addr2line_met" in r:
        goal = "met" if r["goal_vs_addr2line_met"] else "MISSED"
        lines.append(f"goal >= {GOAL_VS_ADDR2LINE:.0f}x addr2line (warm): {goal}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller binary and fewer addresses")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
